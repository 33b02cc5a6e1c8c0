"""The one typed settings object, read from `CASTELLAN_*` env vars and an optional `castellan.toml`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from server.errors import ConfigError
from server.sandbox.profile import StdioProfile

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_POLICIES = Path(__file__).resolve().parent / "_bundled" / "policies"
"""Where an installed wheel carries `policies/` (hatch force-include); a checkout uses the repository's."""


def default_policies() -> Path:
    """The repository's `policies/` in a checkout, else the copy packaged in the wheel."""
    checkout = REPO_ROOT / "policies"
    return checkout if checkout.is_dir() else BUNDLED_POLICIES


SECRET_PATTERNS = (
    r"sk-[A-Za-z0-9_\-]{16,}",  # OpenAI-style API keys
    r"dapi[0-9a-f]{32}",  # Databricks personal access tokens
    r"AKIA[0-9A-Z]{16}",  # AWS access key ids
    r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+",  # JWTs
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    r"gh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
    r"xox[abprs]-[A-Za-z0-9-]{10,}",  # Slack tokens
)


SERVING_FILE = "serving.json"
"""In the data directory while `castellan serve` runs: the URL and audience it serves."""


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8750
    public_url: str = ""
    """The gateway's external base URL; the resource URL is `<public_url>/mcp`. Default: http://host:port."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """Host header values accepted on /mcp (`name:*` allows any port). Loopback is always allowed."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Origin header values accepted on /mcp. Requests without an Origin are accepted."""
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    stateless: bool = False
    """Serve 2025-era clients without sessions (for replicas behind a load balancer without stickiness)."""
    json_response: bool = True
    fast_path: bool = True
    """Serve plain 2026-07-28 JSON `tools/call` and `tools/list` requests that nothing can be relayed to
    without the SDK server's per-request machinery (server/protocol/fast.py); false: the SDK serves all."""
    session_idle_timeout_seconds: float = 1800.0
    tool_timeout_seconds: float = Field(default=30.0, gt=0)
    shutdown_grace_seconds: float | None = Field(default=None, gt=0)
    """On SIGTERM, how long running calls may finish (and be audited) before they are cut off.
    Default: `tool_timeout_seconds` + 5."""
    metrics_auth: Literal["open", "token"] = "open"
    """`/metrics` for anyone (`open`), or only with a bearer token holding `castellan:metrics` or `castellan:admin`."""

    def shutdown_grace(self) -> float:
        return self.shutdown_grace_seconds or self.tool_timeout_seconds + 5.0


class ClaimNames(BaseModel):
    """Which JWT claims carry the identity. `scopes` may be a space-separated string or a list."""

    agent_id: str = "agent_id"
    agent_id_fallbacks: list[str] = Field(default_factory=lambda: ["azp", "client_id", "sub"])
    subject: str = "sub"
    groups: str = "groups"
    scopes: str = "scope"
    subject_kind: Literal["auto", "user", "service_principal"] = "auto"
    """The principal kind of the subject. `auto`: the agent itself (a service principal) when it has the
    agent's id, otherwise a user the agent acts for. Groups are always groups (docs/grants.md)."""


class AuthSettings(BaseModel):
    mode: Literal["dev", "jwt"] = "dev"
    """`dev`: tokens signed with a local key (the dev issuer, `castellan token`). `jwt`: any issuer's JWKS or keys."""
    issuer: str = ""
    """The trusted issuer (`iss`); required with `jwt`. Default in dev mode: the gateway's base URL (its own issuer)."""
    dev_issuer: bool = True
    """Dev mode: serve a local OAuth 2.1 authorization server at the gateway's base URL (RFC 8414 metadata,
    code + PKCE, refresh, client credentials, dynamic registration, client ID metadata documents) whose
    sign-in page lets anyone pick a demo identity. Refused with `environment = "production"`, whatever
    the overrides say (docs/identity.md)."""
    dev_issuer_private_documents: bool = False
    """Let the dev issuer fetch client ID metadata documents from loopback, private and link-local
    addresses (tests host them on 127.0.0.1). Off: refused, as the fetch is an SSRF surface."""
    audience: str = ""
    """Expected `aud` (RFC 8707 resource). Default: the gateway's resource URL."""
    jwks_url: str = ""
    keys_file: Path | None = None
    """A JWKS JSON file with the issuer's public keys (an alternative to `jwks_url`)."""
    jwks_cache_seconds: int = 300
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256", "EdDSA"])
    leeway_seconds: int = 30
    claims: ClaimNames = Field(default_factory=ClaimNames)
    required_scopes: list[str] = Field(default_factory=list)
    dev_token_ttl_seconds: int = 3600
    max_token_lifetime_seconds: int = Field(default=0, ge=0)
    """Refuse tokens whose lifetime (`exp - iat`) is longer than this; 0 accepts any (refused in production)."""
    authorization_servers: list[str] = Field(default_factory=list)
    """Advertised in the protected resource metadata. Default: `[issuer]`."""
    tool_scopes: dict[str, list[str]] = Field(default_factory=dict)
    """Scopes a tool's calls need beyond `required_scopes`: a tool's name, or a prefix ending in `*`
    (`{"admin.*" = ["castellan:admin-tools"]}`). A token without them gets HTTP 403 `insufficient_scope`
    naming them, and the client steps up (re-authorizes for them). The tools stay listed."""
    scopes_supported: list[str] = Field(default_factory=list)
    """The protected resource metadata's `scopes_supported`. Default: `required_scopes` and every scope
    of `tool_scopes`, so a client registers for all of them at once (authorization servers such as Hydra
    bind a client to the scopes it registered with, and a step-up does not register again)."""


class PolicySettings(BaseModel):
    engine: str = "auto"
    """`auto`: a managed local OPA when an `opa` binary is found, else `embedded`; or `opa`, `embedded`."""
    path: Path = Field(default_factory=default_policies)
    entrypoint: str = "data.castellan.gateway.decision"
    opa_url: str = ""
    """For `engine = "opa"`: the OPA server (a sidecar, or a remote OPA fed by bundles)."""
    opa_push: bool = True
    """Push `path` to that OPA (sidecar, dev). Off for an OPA that loads bundles itself."""
    opa_binary: str = ""
    """For `auto`: the OPA binary to manage (default: `opa` on PATH)."""
    timeout_seconds: float = Field(default=1.0, gt=0)
    workers: int = Field(default=1, ge=1, le=32)
    """Embedded engine threads (each holds its own engine), used when decisions are slow, and for OPA
    library decisions made while the event loop is working on another call."""
    inline_max_us: float = Field(default=250.0, ge=0)
    """Embedded: decide on the event loop's thread while decisions average less than this (regorus
    holds the GIL, so a thread would only add a hop); slower policies go to the worker threads, and
    so does an OPA library decision while the loop works on another call (it evaluates without the
    GIL, in parallel with the loop). 0 always uses the threads."""
    reload: bool = True
    """Watch `path` and reload on change; a broken edit is refused and the last good policy keeps deciding."""
    reload_interval_seconds: float = Field(default=1.0, gt=0)
    decision_log: bool = True
    """Emit every call decision in OPA's decision-log event format, masked by `data.system.log.mask`."""
    reload_quiet_seconds: float = Field(default=1.0, ge=0)
    """A changed policy directory is verified only once its content hash has read the same for this
    long (so a file written in several chunks is not loaded half-way)."""
    circuit_failures: int = Field(default=3, ge=1)
    """OPA: consecutive failures (no answer within `timeout_seconds`, refused connection) that open
    the circuit breaker; while open, calls are denied at once."""
    circuit_open_seconds: float = Field(default=1.0, gt=0)
    """OPA: how long an open circuit denies at once before one trial call is let through."""
    decision_log_max_bytes: int = Field(default=100 * 1024 * 1024, ge=0)
    """`<data_dir>/decisions.jsonl` is rotated when it would grow past this (0: never rotated)."""
    decision_log_keep: int = Field(default=5, ge=0)
    """Rotated decision logs kept (`decisions.jsonl.1` newest ... `.5` oldest); older ones are deleted."""
    decision_log_flush_seconds: float = Field(default=1.0, ge=0)
    """Decision-log lines are buffered and reach the file within this long (and at shutdown); a crash
    loses at most this interval's lines of the decision log (never of the audit). 0: a write per line."""
    shadow_path: Path | None = None
    """A candidate policy directory decided beside the live one on every call and never enforced: each
    disagreement is logged, counted (`castellan_shadow_disagreements`) and kept in the call's audit
    record (`castellan audit search --shadow-diff`). docs/shadow-and-replay.md."""
    shadow_timeout_seconds: float = Field(default=0.25, gt=0)
    """A shadow decision slower than this is recorded as an error, never waited for longer."""


class GrantSettings(BaseModel):
    backend: str = "local"
    """`local` (SQLite catalog with Unity Catalog semantics) or `databricks` (a workspace's Unity Catalog)."""
    path: Path | None = None
    """SQLite file of the local catalog. Default: `<data_dir>/catalog.db`."""
    cache_ttl_seconds: float = Field(default=30.0, ge=0)
    """A revoke takes effect within this time (at once for `local` while `watch_seconds` is on)."""
    watch_seconds: float = Field(default=2.0, ge=0)
    """For `local`: how often the gateway looks for grant changes made by anyone (the CLI, the admin API,
    another replica on the same file). A change drops the grant cache and tells connected agents that
    their tools, resources and prompts lists changed. 0: not watched."""
    max_stale_seconds: float = Field(default=300.0, ge=0)
    """While the source cannot answer, cached answers up to this old are used; older ones deny."""
    timeout_seconds: float = Field(default=10.0, gt=0)
    """For `databricks`: a lookup slower than this denies (retries included)."""
    databricks_host: str = ""
    """For `databricks`: the workspace URL. Empty: the SDK's usual configuration (env, profile)."""
    databricks_profile: str = ""
    databricks_identity: Literal["gateway", "on_behalf_of_user"] = "gateway"
    """For `databricks`: whose identity the workspace evaluates. `gateway`: the gateway's own credentials
    ask Unity Catalog about each of the caller's principals. `on_behalf_of_user`: the caller's token is
    federated at the workspace's token endpoint for a Databricks token of the caller's own, with which
    the workspace answers for itself (docs/grants.md#on-behalf-of-user). Needs `databricks_host`."""
    databricks_scopes: list[str] = Field(default_factory=lambda: ["all-apis"])
    """For `on_behalf_of_user`: the scopes asked for in the token federation."""
    databricks_client_id: str = ""
    """For `on_behalf_of_user`: the service principal's application id when the workspace federates
    through a service-principal federation policy; empty for an account-wide federation policy."""

    @model_validator(mode="after")
    def _on_behalf_needs_host(self) -> GrantSettings:
        if self.databricks_identity == "on_behalf_of_user" and self.backend != "databricks":
            raise ValueError("grants.databricks_identity = 'on_behalf_of_user' needs grants.backend = 'databricks'")
        if self.databricks_identity == "on_behalf_of_user" and not self.databricks_host:
            raise ValueError("grants.databricks_identity = 'on_behalf_of_user' needs grants.databricks_host")
        return self


class Limits(BaseModel):
    """Per-agent limits; 0 means unlimited. Windows are fixed and aligned to UTC."""

    calls_per_minute: int = Field(default=600, ge=0)
    calls_per_hour: int = Field(default=0, ge=0)
    calls_per_day: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)
    tokens_per_hour: int = Field(default=0, ge=0)
    tokens_per_day: int = Field(default=2_000_000, ge=0)
    tokens_per_month: int = Field(default=0, ge=0)
    concurrent_calls: int = Field(default=32, ge=0)
    max_run_calls: int = Field(default=50, ge=0)
    """Loop depth: tool calls in one agent run."""
    max_repeats: int = Field(default=5, ge=0)
    """The same tool with the same arguments this many times in one run is a loop."""
    max_depth: int = Field(default=8, ge=0)
    """Nesting: an agent called through a tool, calling tools again, adds one."""
    max_identical_calls: int = Field(default=30, ge=0)
    """The same tool with the same (canonical) arguments this many times by one identity within
    `identical_calls_window_seconds` is a loop, whatever run ids the caller declares."""
    identical_calls_window_seconds: int = Field(default=300, ge=1, le=86_400)
    max_calls_per_tool: int = Field(default=300, ge=0)
    """Calls of one tool by one identity within `tool_calls_window_seconds` (a sliding window)."""
    tool_calls_window_seconds: int = Field(default=60, ge=1, le=86_400)


class LimitOverrides(BaseModel):
    """Any subset of `Limits`, for a group or one agent."""

    model_config = {"extra": "forbid"}

    calls_per_minute: int | None = Field(default=None, ge=0)
    calls_per_hour: int | None = Field(default=None, ge=0)
    calls_per_day: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_hour: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    tokens_per_month: int | None = Field(default=None, ge=0)
    concurrent_calls: int | None = Field(default=None, ge=0)
    max_run_calls: int | None = Field(default=None, ge=0)
    max_repeats: int | None = Field(default=None, ge=0)
    max_depth: int | None = Field(default=None, ge=0)
    max_identical_calls: int | None = Field(default=None, ge=0)
    identical_calls_window_seconds: int | None = Field(default=None, ge=1, le=86_400)
    max_calls_per_tool: int | None = Field(default=None, ge=0)
    tool_calls_window_seconds: int | None = Field(default=None, ge=1, le=86_400)


class MeterSettings(BaseModel):
    backend: str = "sqlite"
    """`sqlite` (one gateway) or `redis` (replicas sharing limits)."""
    path: Path | None = None
    """SQLite file of the meters. Default: `<data_dir>/meters.db`."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    limits: Limits = Field(default_factory=Limits)
    groups: dict[str, LimitOverrides] = Field(default_factory=dict)
    """Overrides for members of a group; where several groups set a limit, the largest wins."""
    agents: dict[str, LimitOverrides] = Field(default_factory=dict)
    """Overrides for one agent id: the most specific, they win over groups and defaults."""
    reserve_output_tokens: int = Field(default=4096, ge=0)
    """Admission reserves the arguments' tokens plus this much for the result; a result beyond its
    reservation is truncated, so concurrent calls can never overrun a token budget."""
    reservation_ttl_seconds: float = Field(default=300.0, gt=0)
    """A reservation of a call that never settles (a crashed replica) expires after this."""
    instance_heartbeat_seconds: float = Field(default=5.0, gt=0)
    """Each gateway's meter marks itself alive this often, and releases what dead instances held."""
    instance_timeout_seconds: float = Field(default=20.0, gt=0)
    """An instance whose heartbeat is older than this is dead: its reservations are released (on the
    same machine a dead process is recognised at once, by its pid, right after a restart)."""
    token_encoding: str = "cl100k_base"
    """tiktoken encoding for tool arguments and results (a bundled offline copy is used when there is one)."""
    write_behind_seconds: float = Field(default=0.1, ge=0, le=5)
    """`sqlite`: the counts are kept in memory (exact, no database round trip per call) and written to
    the meters file at most this long after they change; a crash loses at most this much counting.
    One process per meters file (replicas: `redis`). 0: every admit and settle is its own transaction."""


class LlmModel(BaseModel):
    """One model (or serving endpoint) behind the LLM route: the securable callers need EXECUTE on,
    and the most tokens one completion of it can produce."""

    model_config = {"extra": "forbid"}

    securable: str = ""
    """`catalog.schema.name` of the model (a registered model is a FUNCTION securable in Unity
    Catalog). Default: `<llm.models_schema>.<model name>`."""
    max_completion_tokens: int = Field(default=0, ge=0)
    """The model's own output limit per choice (0: only the route's cap applies)."""


class LlmSettings(BaseModel):
    """The OpenAI-compatible route `/v1/chat/completions`, served when `upstream_url` is set."""

    upstream_url: str = ""
    """The upstream API base, e.g. https://api.openai.com/v1 or a Databricks serving endpoints base."""
    api_key_env: str = "CASTELLAN_LLM_API_KEY"
    """The environment variable holding the gateway's own upstream key (never the agent's token)."""
    timeout_seconds: float = Field(default=120.0, gt=0)
    log_payloads: bool = False
    """Put the messages (redacted) in the audit record; off by default."""
    redact_patterns: list[str] = Field(default_factory=lambda: list(SECRET_PATTERNS))
    """Secret-looking text replaced by [REDACTED] in logged payloads."""
    models: dict[str, LlmModel] = Field(default_factory=dict)
    """The models the route serves; a model not listed maps to `<models_schema>.<name>`, which must
    exist in the catalog (and be granted) to be called."""
    models_schema: str = Field(default="main.llm", pattern=r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+$")
    max_completion_tokens: int = Field(default=16_384, gt=0)
    """The route's cap on one choice's completion: a larger `max_tokens`/`max_completion_tokens` is
    lowered to it (the request is rewritten), so the reservation bounds what the provider can produce."""
    max_choices: int = Field(default=16, ge=1)
    """The largest `n` a request may ask for (each choice is reserved in full)."""


class SecretSource(BaseModel):
    """Where a secret comes from, never the secret itself: an environment variable or a file (a mounted
    secret; secrets managers deliver this way: Vault Agent, the Secrets Store CSI driver, Docker/K8s
    secrets). `castellan check-config` names the source without reading it out."""

    model_config = {"extra": "forbid"}

    env: str = ""
    file: Path | None = None

    def describe(self) -> str:
        return f"env {self.env}" if self.env else f"file {self.file}" if self.file else "unset"


class TokenExchangeSettings(BaseModel):
    """RFC 8693: the caller's token is exchanged at `token_url` for one scoped to this upstream."""

    model_config = {"extra": "forbid"}

    token_url: str
    """The token service's token endpoint (Keycloak, Entra, Okta, or `castellan sts`)."""
    client_id: str
    """The gateway's client at the token service (it authenticates with `client_secret`, HTTP Basic)."""
    client_secret: SecretSource = Field(default_factory=SecretSource)
    audience: str = ""
    """The upstream's audience the new token is for. Default: the upstream's `url`."""
    scopes: list[str] = Field(default_factory=list)
    """Requested scopes (the token service grants at most what the caller's token holds and the
    audience allows)."""
    timeout_seconds: float = Field(default=5.0, gt=0)


class BrokeredOAuthSettings(BaseModel):
    """A per-user grant the gateway brokers: each user authorizes the upstream once (authorization code +
    PKCE at the upstream's authorization server, through a link the gateway gives them); the gateway keeps
    the refresh token sealed at rest and refreshes the access token itself."""

    model_config = {"extra": "forbid"}

    authorize_url: str
    token_url: str
    client_id: str
    """The gateway's client at the upstream's authorization server; its redirect URI is
    `<server.public_url>/oauth/callback`."""
    client_secret: SecretSource = Field(default_factory=SecretSource)
    """Unset: a public client (PKCE only)."""
    scopes: list[str] = Field(default_factory=list)
    audience: str = ""
    """Sent as `audience` (and `resource`, RFC 8707) on the authorization request. Default: the upstream's url."""
    link_ttl_seconds: int = Field(default=600, gt=0, le=86_400)
    """How long an authorization link stays usable."""
    timeout_seconds: float = Field(default=10.0, gt=0)


class CredentialSettings(BaseModel):
    """Where brokered grants are kept: refresh and access tokens sealed (AES-256-GCM) under a key kept
    outside the database."""

    path: Path | None = None
    """SQLite file. Default: `<data_dir>/credentials.db`."""
    key: SecretSource = Field(default_factory=SecretSource)
    """The sealing key (base64 of 32 bytes), from an environment variable or a mounted file. Unset, in dev:
    `<data_dir>/credentials-key` is created (0600) on first use; production requires one."""


class UpstreamSettings(BaseModel):
    """An MCP server whose tools Castellan serves under `<name>.` and governs like its own."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[a-z][a-z0-9_\-]{0,31}$")
    url: str = ""
    """Streamable HTTP endpoint, e.g. http://files.internal:8000/mcp."""
    command: list[str] = Field(default_factory=list)
    """Or a stdio server: the command and its arguments."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for a stdio server."""
    sandbox: StdioProfile | None = None
    """Run the stdio server sandboxed under this profile (no network, only the listed paths and
    variables); unset: it runs as the gateway's own child with the gateway's environment."""
    headers: dict[str, str] = Field(default_factory=dict)
    """HTTP headers the gateway sends upstream (its own credentials; the agent's token is never forwarded)."""
    token_env: str = ""
    """An environment variable holding the gateway's bearer token for this upstream."""
    token_file: Path | None = None
    """Or a file holding it (a mounted secret)."""
    credential: Literal["gateway", "token_exchange", "brokered"] = "gateway"
    """What a call carries upstream: the gateway's own token (`token_env`/`token_file`, also used to
    connect and list tools), the caller's token exchanged for one for this upstream (`token_exchange`,
    RFC 8693), or the user's own brokered grant (`brokered`, [oauth]). Never the agent's token."""
    token_exchange: TokenExchangeSettings | None = None
    oauth: BrokeredOAuthSettings | None = None
    prefix: str | None = None
    """What the tools' names start with. Default `<name>.`; `""` serves them under their own names
    (they must not clash with other tools)."""
    schema_name: str = "main.upstream"
    """The catalog schema the tools' securables live in: `<schema_name>.<name>__<tool>`."""
    pin: Literal["first-use", "manual"] = "first-use"
    """`first-use`: the first definition seen is approved; `manual`: every definition needs approval."""
    timeout_seconds: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _credential_configured(self) -> UpstreamSettings:
        if self.credential == "token_exchange" and self.token_exchange is None:
            raise ValueError(f"upstream {self.name}: credential = 'token_exchange' needs [token_exchange]")
        if self.credential == "brokered" and self.oauth is None:
            raise ValueError(f"upstream {self.name}: credential = 'brokered' needs [oauth]")
        if self.credential != "gateway" and not self.url:
            raise ValueError(f"upstream {self.name}: per-user credentials need an HTTP upstream (url)")
        return self

    @property
    def tool_prefix(self) -> str:
        return self.prefix if self.prefix is not None else f"{self.name}."


class ToolSettings(BaseModel):
    tables_root: Path | None = None
    """Delta tables as `<root>/<catalog>/<schema>/<table>`. Default: `<data_dir>/delta`."""
    sql: bool = True
    """Serve `sql.query` over the tables."""
    docs_table: str = "main.support.docs"
    """The documents table `docs.search` indexes (empty: no document search)."""
    docs_embedder: Literal["auto", "hashing", "minilm", "none"] = "auto"
    """Vector search: `auto` is MiniLM when the `embeddings` extra is installed, else a hashing embedder."""
    table_resources: bool = True
    """Serve each table's schema and a sample, and the indexed documents, as resources (docs/protocol.md)."""
    function_modules: list[str] = Field(default_factory=list)
    """Python modules whose `@catalog_function`s become tools (the demo adds `tools.demo_functions`)."""
    function_timeout_seconds: float = Field(default=10.0, gt=0)
    function_cpu_seconds: int = Field(default=5, ge=1)
    function_memory_mb: int = Field(default=512, ge=64)
    function_workers: int = Field(default=2, ge=1)
    """Sandboxed worker processes per catalog function (calls beyond that wait for one)."""
    function_workers_per_identity: int = Field(default=1, ge=1)
    """How many of a function's workers one agent identity may hold at once (the rest stay free for others)."""
    function_calls_per_worker: int = Field(default=0, ge=0)
    """Calls a function worker serves before it is replaced: 1 gives every call a fresh sandbox (no state
    shared between calls, at the cost measured in bench/isolation.py); 0 keeps workers."""
    sandbox: Literal["auto", "bubblewrap", "rlimits"] = "auto"
    """How tool code is isolated (catalog functions, SQL workers, sandboxed stdio upstreams): `bubblewrap`
    (namespaces + seccomp; refuses to start without it), `rlimits` (resource limits and a clean
    environment only), `auto` (bubblewrap where the kernel allows it, else rlimits, logged at start-up)."""
    sql_workers: int = Field(default=2, ge=1)
    """DuckDB worker processes that run `sql.query` (out of the gateway's process)."""
    sql_workers_per_identity: int = Field(default=1, ge=1)
    """How many of them one agent identity may hold at once: the rest stay free for other agents."""
    sql_timeout_seconds: float = Field(default=20.0, gt=0)
    """A query running longer is interrupted, and its worker killed if it does not stop."""
    sql_memory_mb: int = Field(default=1024, ge=128)
    """DuckDB's memory_limit in a SQL worker; the worker process's address space is capped at this plus
    1 GB for the runtime (an operating-system limit: a query that allocates past it dies alone)."""
    sql_threads: int = Field(default=2, ge=1)
    sql_temp_mb: int = Field(default=512, ge=0)
    """Spill space per SQL worker, in a private temporary directory removed with it (0: no spill)."""
    databricks_functions: list[str] = Field(default_factory=list)
    """Unity Catalog functions (`catalog.schema.fn`, or `catalog.schema` for all of a schema) on the
    Databricks workspace of `grants.databricks_host`/`databricks_profile`, served as tools."""
    databricks_warehouse_id: str = ""
    """The SQL warehouse that runs them (statement execution API)."""
    databricks_identity: Literal["gateway", "on_behalf_of_user"] = "gateway"
    """Who runs them: the gateway's own credentials, or the caller's own Databricks identity (its token
    federated at the workspace, as for `grants.databricks_identity`; needs `grants.databricks_host`)."""
    upstream_refresh_seconds: float = Field(default=30.0, gt=0)
    """How often upstream tool lists are re-read (changed definitions are quarantined then)."""
    max_validation_steps: int = Field(default=100_000, ge=1_000)
    """Keyword evaluations one call's argument validation may take (about 0.3 s of a worker thread);
    a call that needs more is refused. See docs/tools.md."""


class AuditSettings(BaseModel):
    backend: str = "sqlite"
    path: Path | None = None
    """SQLite outbox. Default: `<data_dir>/audit.db`."""
    redact_fields: list[str] = Field(
        default_factory=lambda: [
            "password",
            "passwd",
            "secret",
            "client_secret",
            "token",
            "access_token",
            "refresh_token",
            "api_key",
            "apikey",
            "authorization",
            "private_key",
        ]
    )
    """Argument and result members with these names (any depth, case-insensitive) are stored as [REDACTED]."""
    redact_patterns: list[str] = Field(default_factory=lambda: list(SECRET_PATTERNS))
    """Text matching these regular expressions is stored as [REDACTED]."""
    ship: bool = True
    """Ship the outbox to MLflow as one trace per call (a background worker, never on the request path)."""
    ship_mode: Literal["process", "thread"] = "process"
    """`process`: a supervised `castellan ship` child process (MLflow's client is CPU-heavy and would
    hold the gateway's GIL); `thread`: inside the gateway process."""
    mlflow_tracking_uri: str = ""
    """Where traces go: empty for a local store (`sqlite:///<data_dir>/mlflow.db`), an `http://` tracking
    server (`mlflow server`, Postgres-backed in production), or `databricks` (a workspace, SDK config)."""
    mlflow_experiment: str = "castellan-audit"
    """The experiment the traces go to, created at start-up when missing."""
    ship_batch: int = Field(default=100, ge=1, le=1000)
    """The most calls one write to MLflow carries. The shipper halves its batch when a tracking
    server times out or refuses the request's size (408, 413, 504) and doubles it back after a few
    confirmed writes; a call is marked shipped only once confirmed, and re-shipping upserts."""
    mlflow_spans: Literal["stages", "call"] = "stages"
    """The trace's shape: `stages`, a root span and a child span per pipeline stage; `call`, the root
    span alone, each stage's duration and findings as its `castellan.stages` attribute (a tracking
    server ingests it at about half the CPU: bench/results/shipping.md). Tags are the same."""
    ship_interval_seconds: float = Field(default=0.5, gt=0)
    """How long the shipper waits before it looks again once it has caught up (its last write carried
    less than a full batch): the most a call waits to be shipped beyond its write, and what lets a
    steady stream of calls go out in batches instead of a write per few calls."""
    ship_backoff_max_seconds: float = Field(default=30.0, gt=0)
    """While MLflow is down, retries back off exponentially up to this."""
    ship_incomplete_after_seconds: float = Field(default=300.0, gt=0)
    """An allowed call with no outcome after this long is reported as unfinished (log, metric
    `castellan_audit_unfinished_calls`). It is shipped once it has an outcome: its own, or
    `interrupted`, appended at the next start when the gateway that ran it is gone."""
    max_ship_lag_seconds: float = Field(default=0.0, ge=0)
    """/readyz fails when the oldest unshipped record is older than this (0: lag is reported, never fails)."""
    chain_key: SecretStr | None = None
    """The secret the audit chain and its checkpoints are MACed with (at least 32 characters), e.g. from
    `CASTELLAN_AUDIT__CHAIN_KEY`. Not in the audit database. Production requires this or `chain_key_file`."""
    chain_key_file: Path | None = None
    """A file holding the chain key (a mounted secret, outside the data directory). Neither set: in dev,
    `<data_dir>/audit-chain-key` is created on first start (mode 0600)."""
    checkpoint_path: Path | None = None
    """The signed checkpoint file (append-only). Default: `<outbox stem>-checkpoints.jsonl` beside the outbox."""
    checkpoint_interval_seconds: float = Field(default=2.0, gt=0, le=60)
    """A checkpoint of the chain head at most this long after any write, and at shutdown."""
    outcome_commit_seconds: float = Field(default=0.2, ge=0, le=5)
    """An allowed call's outcome is group-committed off the response path, at most this long after the
    call returns (its decision is durable before its tool runs). A crash inside this interval leaves
    the call without an outcome: the next start closes it as `interrupted`. 0: each outcome is
    committed before its response is sent."""
    retention_days: float = Field(default=30.0, ge=0)
    """Shipped outbox records older than this are removed (a `retained` checkpoint keeps the rest
    verifiable). Unshipped records are never removed. 0: keep everything."""
    local_mlflow_retention_days: float = Field(default=7.0, ge=0)
    """Traces older than this are deleted from the local MLflow store (not from a tracking server). 0: keep."""
    local_mlflow_max_traces: int = Field(default=200_000, ge=0)
    """At most this many traces are kept in the local MLflow store (oldest deleted first). 0: no cap."""
    retention_interval_seconds: float = Field(default=300.0, gt=0)
    """How often retention runs."""
    min_free_disk_mb: int = Field(default=1024, ge=0)
    """Below this much free space on the data directory's disk, /readyz says degraded and a warning is logged."""


class ApprovalSettings(BaseModel):
    """Human approval of calls whose policy decision carries `require_approval` (docs/approvals.md)."""

    backend: str = "auto"
    """`sqlite`: a table in `<data_dir>/approvals.db` (WAL), shared by every gateway process serving from
    that data directory; `redis`: shared by replicas that share Redis; `auto`: `redis` when
    `metering.backend` is, else `sqlite`."""
    path: Path | None = None
    """SQLite file of the queue. Default: `<data_dir>/approvals.db`."""
    redis_url: str = ""
    """For `redis`. Default: `metering.redis_url`."""
    timeout_seconds: float = Field(default=120.0, gt=0, le=86_400)
    """How long a call waits for an approver; then it is denied. A policy may ask for less, never more."""
    poll_interval_seconds: float = Field(default=0.5, gt=0, le=10)
    """How often a waiting call reads the queue for a decision made by another gateway process (a
    decision made through this process wakes it at once)."""
    webhook_url: str = ""
    """Each new approval request (and each decision) is POSTed here as JSON, signed with `webhook_secret`."""
    webhook_secret: SecretStr | None = None
    """The HMAC-SHA256 key of the `X-Castellan-Signature` header (required with `webhook_url`)."""
    webhook_timeout_seconds: float = Field(default=5.0, gt=0)
    """One delivery attempt; failed attempts are retried with backoff until the request expires."""
    approval_page_url: str = ""
    """Where an approver can decide a request, `{id}` replaced by its id (in the webhook body and in
    URL-mode elicitation). Default: the console's page, `<base url>/console/approvals/{id}`, when the
    console is enabled; else none."""


class GuardrailSettings(BaseModel):
    """Content guardrails (docs/guardrails.md): what is detected in arguments and results for policy."""

    enabled: bool = True
    kinds: list[str] = Field(
        default_factory=lambda: ["email", "phone", "card_number", "iban", "national_id", "person_name", "address",
                                 "secret"]
    )  # fmt: skip
    """The detectors that run; the others' kinds never appear in `input.detections`."""
    phone_regions: list[str] = Field(default_factory=lambda: ["US", "GB", "DE", "FR"])
    """Regions whose national phone numbers (no `+` prefix) are recognised; international ones always are."""
    results: bool = True
    """Scan tool results too; a result with detections gets an after-call decision (`input.action == "result"`)."""

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        from server.guardrails.kinds import KINDS

        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown detection kinds {unknown}; choose from {list(KINDS)}")
        return kinds


class ConsoleSettings(BaseModel):
    """The web console under `/console` (docs/console.md)."""

    enabled: bool = True
    session_key: SecretStr | None = None
    """Seals the console's session cookie (32+ bytes of text; replicas behind one address share it).
    Default: a key generated into `<data_dir>/console-session.key` (0600) on first use."""
    session_max_age_seconds: int = Field(default=8 * 3600, ge=60, le=7 * 86_400)
    """A sign-in lasts this long at most (and never past its token's expiry)."""
    index_path: Path | None = None
    """The console's read-side index of the audit log (rebuildable; default `<data_dir>/console-index.db`)."""
    mlflow_ui_url: str = ""
    """Where a call's "MLflow trace" link points. Default: `audit.mlflow_tracking_uri` when it is http(s)."""
    oauth_sign_in: bool = True
    """Offer "Sign in with <issuer>" (authorization code + PKCE at the gateway's authorization server)
    beside the bearer-token form, when the gateway knows an authorization server."""
    oauth_client_id: str = ""
    """The console's client at the authorization server (redirect URI `<base_url>/console/oauth/callback`).
    Empty: the console registers itself dynamically (RFC 7591) at the first sign-in (the dev issuer)."""
    oauth_client_secret: SecretSource = Field(default_factory=SecretSource)
    """The client's secret (env or file), for a confidential client; unset: a public client (PKCE only)."""


class RelaySettings(BaseModel):
    """What an upstream may relay to the agent during a call (see docs/protocol.md, "What is relayed")."""

    request_timeout_seconds: float = Field(default=300.0, gt=0)
    """How long a relayed request (sampling, elicitation, roots) waits for the agent's answer."""
    round_ttl_seconds: float = Field(default=300.0, gt=0)
    """2026-07-28: how long a call waits for the agent's next round before it is cancelled."""
    max_waiting_calls: int = Field(default=10_000, gt=0)
    state_keys: list[SecretStr] = Field(default_factory=list)
    """Keys (at least 32 bytes each) sealing the `requestState` of input-required results; the first
    seals, all unseal (rotation). Empty: a key generated at start, held only by this process (a
    waiting call lives in its process anyway)."""


class TasksSettings(BaseModel):
    """The tasks extension (`io.modelcontextprotocol/tasks`, 2026-07-28): a call to a tool that
    supports tasks may run as a task the caller polls (see docs/protocol.md, "Tasks")."""

    enabled: bool = True
    default_ttl_seconds: float = Field(default=3600.0, gt=0)
    """How long a task (and its result) is kept from its creation, unless the caller asks for less."""
    max_ttl_seconds: float = Field(default=86_400.0, gt=0)
    """The longest a caller may ask a task to be kept; a running task is cancelled when it expires."""
    promote_after_seconds: float = Field(default=0.5, ge=0)
    """A call whose tool answers (or asks the agent something) sooner after it started is answered as
    a plain call; one still running then becomes a task. 0: every call to a tool that supports tasks
    becomes one."""
    poll_interval_ms: int = Field(default=500, gt=0)
    """The polling interval the gateway suggests to the caller."""
    max_tasks: int = Field(default=10_000, gt=0)
    """Tasks kept by this process at once (running or finished, until they expire)."""
    max_tasks_per_identity: int = Field(default=100, gt=0)
    """Tasks one identity (subject and agent) may hold at once."""


class Settings(BaseSettings):
    """Everything configurable. Precedence: explicit values, then env vars, then the TOML file."""

    model_config = SettingsConfigDict(env_prefix="CASTELLAN_", env_nested_delimiter="__", extra="forbid")

    environment: Literal["dev", "production"] = "dev"
    """`production` refuses unsafe settings at start-up (server/production.py lists them)."""
    production_overrides: list[str] = Field(default_factory=list)
    """Unsafe settings to accept in production anyway, each by name (e.g. `["server.metrics_auth"]`)."""
    data_dir: Path = Path(".castellan")
    demo: bool = True
    """Serve the demo tools and seed the demo catalog grants."""
    tools: ToolSettings = Field(default_factory=ToolSettings)
    upstreams: list[UpstreamSettings] = Field(default_factory=list)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    grants: GrantSettings = Field(default_factory=GrantSettings)
    metering: MeterSettings = Field(default_factory=MeterSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    credentials: CredentialSettings = Field(default_factory=CredentialSettings)
    approvals: ApprovalSettings = Field(default_factory=ApprovalSettings)
    guardrails: GuardrailSettings = Field(default_factory=GuardrailSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    tasks: TasksSettings = Field(default_factory=TasksSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def base_url(self) -> str:
        return (self.server.public_url or f"http://{self.server.host}:{self.server.port}").rstrip("/")

    @property
    def resource_url(self) -> str:
        """This gateway's MCP endpoint: the RFC 8707 resource that tokens must be issued for."""
        return f"{self.base_url}/mcp"

    @property
    def issuer(self) -> str:
        """The issuer whose tokens are trusted: `auth.issuer`, else in dev mode the gateway's own (its base URL)."""
        return self.auth.issuer or (self.base_url if self.auth.mode == "dev" else "")

    @property
    def audience(self) -> str:
        return self.auth.audience or self.resource_url

    def data_file(self, configured: Path | None, default_name: str) -> Path:
        return configured if configured is not None else self.data_dir / default_name


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Read settings. `config_file` (or `CASTELLAN_CONFIG`, or `./castellan.toml` when present) is the TOML.

    Raises `ConfigError` with every problem listed.
    """
    path = config_file or _default_config_file()
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    cls: type[Settings] = Settings
    if path is not None:
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})
        cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


def _default_config_file() -> Path | None:
    env = os.environ.get("CASTELLAN_CONFIG")
    if env:
        return Path(env)
    local = Path("castellan.toml")
    return local if local.is_file() else None
