"""The assembled gateway: backends, the call and list pipelines, the MCP handlers, and their lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog
from prometheus_client import Gauge

from server import backends
from server.approvals.queue import ApprovalQueue
from server.approvals.stage import ApprovalStage
from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
from server.audit.outbox import Outbox, SqliteOutbox
from server.audit.redaction import Redactor
from server.audit.retention import AuditHousekeeping
from server.audit.ship_process import ShipperProcess
from server.audit.shipper import Shipper
from server.audit.stage import AuditStage, DenialRecorder, RecordStage
from server.auth.cache import CachedVerifier
from server.auth.presented import PresentedTokens
from server.auth.scopes import tool_scopes
from server.auth.stage import AuthenticateStage
from server.auth.verifier import JwtVerifier, TokenVerifier
from server.completions import ResolveCompletionStage
from server.credentials.store import GrantStore
from server.demo import seed_demo_grants
from server.errors import BackendUnavailable
from server.grants.cache import CachedGrants
from server.grants.changes import GrantChanges
from server.grants.databricks_obo import OnBehalf, acts_on_behalf, on_behalf_for
from server.grants.local import LocalCatalog
from server.grants.source import GrantSource
from server.grants.stage import GrantsStage
from server.guardrails.stage import guard_stages_for
from server.invoke import InvokeStage
from server.listing import ToolLister
from server.llm.model import register_models
from server.llm.proxy import LlmProxy
from server.logs import dropped_lines, use_redactor
from server.metering.buffered import BufferedSqliteMeter
from server.metering.meter import Meter
from server.metering.retry import MeterRetries
from server.metering.stage import AdmitStage, ChargeStage, ReleaseReservation
from server.metering.tokens import TokenCounter
from server.metrics import Metrics
from server.pipeline import Pipeline, Stage
from server.policy.bundle import PolicyBundle
from server.policy.decision_log import DecisionLog
from server.policy.embedded import EmbeddedEngine
from server.policy.engine import PolicyEngine
from server.policy.obligations import ObligationsStage
from server.policy.opa import data_path
from server.policy.reload import PolicyMetrics, PolicyWatcher, verifier_for
from server.policy.shadow import ShadowPolicy, ShadowStage
from server.policy.stage import PolicyStage
from server.production import enforce_production
from server.prompts.catalog import PromptCatalog
from server.prompts.resolve import ResolvePromptStage
from server.protocol.acts import Acts
from server.protocol.completions import CompletionHandlers
from server.protocol.logging import LogLevels
from server.protocol.notifications import ListChanges
from server.protocol.prompts import PromptHandlers
from server.protocol.relay import relaying_calls
from server.protocol.resources import ResourceHandlers
from server.protocol.surface import Surface
from server.protocol.tasks import TaskCalls
from server.protocol.tools import McpHandlers
from server.registry import Tool, ToolRegistry
from server.resolve import ResolveStage
from server.resources.catalog import ResourceCatalog
from server.resources.own import SOURCE as OWN_SOURCE
from server.resources.own import own_resources
from server.resources.resolve import ResolveResourceStage
from server.resources.subscriptions import ResourceSubscriptions
from server.resources.target import ResourceTarget
from server.settings import Settings
from server.tasks.audit import TaskAudit
from server.upstream.credentials import UpstreamCredential, attach_credentials, grant_store, make_credentials
from server.upstream.manager import UpstreamManager
from server.upstream.pins import PinStore
from server.validate import ValidateStage

log = structlog.get_logger("castellan")


@dataclass
class Gateway:
    settings: Settings
    metrics: Metrics
    registry: ToolRegistry
    verifier: TokenVerifier
    engine: PolicyEngine
    grant_source: GrantSource
    grants: CachedGrants
    meter: Meter
    outbox: Outbox
    call_pipeline: Pipeline
    list_pipeline: Pipeline
    handlers: McpHandlers
    surface: Surface | None = None
    watcher: PolicyWatcher | None = None
    decision_log: DecisionLog | None = None
    llm: LlmProxy | None = None
    shipper: Shipper | ShipperProcess | None = None
    upstreams: UpstreamManager | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)
    meter_retries: MeterRetries | None = None
    housekeeping: AuditHousekeeping | None = None
    approvals: ApprovalQueue | None = None
    presented_tokens: PresentedTokens | None = None
    """Callers' tokens, kept (in memory) only when an upstream exchanges them (RFC 8693)."""
    upstream_credentials: dict[str, UpstreamCredential] = field(default_factory=dict)
    grant_store: GrantStore | None = None
    """Brokered per-user grants (server/credentials/), when an upstream brokers them."""
    shadow: ShadowPolicy | None = None
    grant_changes: GrantChanges | None = None
    """Watches the local catalog: a grant change drops the cache and is announced as list changes."""
    on_behalf: OnBehalf | None = None
    """The federation of callers' tokens at a Databricks workspace, when grants or tools act on their behalf."""

    async def start(self) -> None:
        """Start background work (the policy watcher, the audit shipper); needs the running event loop.
        The meter first releases what a previous, dead gateway process held."""
        await self.meter.start()
        if self.meter_retries is not None:
            self.meter_retries.start()
        if self.watcher is not None:
            self.watcher.start()
        if isinstance(self.outbox, SqliteOutbox):  # the writer: closes calls a crash cut off first
            self.metrics.interrupted_calls.inc(len(await self.outbox.start()))
        if self.housekeeping is not None:
            self.housekeeping.start()
        if self.shipper is not None:
            self.shipper.start()
        if self.upstreams is not None:
            await self.upstreams.start()
        if self.grant_changes is not None:
            await self.grant_changes.start()

    async def readiness(self) -> dict[str, str]:
        """Each backend's state: "ok" or why it cannot serve. Ready only when all are ok."""
        checks = {
            "policy": self.engine.check(),
            "grants": self.grant_source.check(),
            "metering": self.meter.check(),
            "audit": self.outbox.check(),
        }
        if self.approvals is not None:
            checks["approvals"] = self.approvals.check()
        if self.shipper is not None:
            checks["audit_shipping"] = self._shipping()
        if self.housekeeping is not None:
            checks["disk"] = self.housekeeping.check()
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                await asyncio.wait_for(check, timeout=2.0)
                results[name] = "ok"
            except BackendUnavailable as exc:
                results[name] = "; ".join(exc.reasons)
            except TimeoutError:
                results[name] = "timed out"
        return results

    def policy_status(self) -> dict[str, object]:
        """The policy version in force and, when hot reload is on, the latest refused edit."""
        if self.watcher is not None:
            return self.watcher.status()
        return {"version": self.engine.policy_version, "engine": self.engine.name}

    async def _shipping(self) -> None:
        assert self.shipper is not None
        status = await self.shipper.status()
        if status != "ok":
            raise BackendUnavailable("audit", status)

    async def close(self) -> None:
        if self.grant_changes is not None:
            await self.grant_changes.stop()
        if self.handlers.tasks is not None:
            await self.handlers.tasks.close()  # running tasks are cancelled, and recorded so
        if self.surface is not None:
            self.surface.changes.close()  # open subscriptions/listen streams end gracefully
        if self.upstreams is not None:
            await self.upstreams.close()
        for close_tool in self.closers:
            close_tool()
        if self.shipper is not None:
            await self.shipper.stop()
        if self.housekeeping is not None:
            await self.housekeeping.stop()
        if isinstance(self.outbox, SqliteOutbox):
            seq, head = self.outbox.record_head()  # so verify can tell if the tail was cut off later
            log.info("audit_chain_head", seq=seq, hash=head)
        if self.watcher is not None:
            await self.watcher.stop()
        if self.decision_log is not None:
            self.decision_log.close()
        if self.llm is not None:
            await self.llm.close()
        if self.meter_retries is not None:
            await self.meter_retries.close()
        shutdown = [self.engine.close, self.grant_source.close, self.meter.close, self.outbox.close]
        if self.approvals is not None:
            shutdown.insert(0, self.approvals.close)
        if self.shadow is not None:
            shutdown.append(self.shadow.close)
        shutdown.extend(credential.close for credential in self.upstream_credentials.values())  # token services
        if self.on_behalf is not None:
            shutdown.append(self.on_behalf.close)
        for closer in shutdown:
            try:
                await closer()
            except Exception as exc:
                log.warning("close_failed", error=repr(exc))


def shadow_policy_for(settings: Settings, metrics: Metrics) -> ShadowPolicy | None:
    """The candidate policy of `policy.shadow_path`, decided in-process (never enforced), or None."""
    if settings.policy.shadow_path is None:
        return None
    engine = EmbeddedEngine(
        PolicyBundle.from_directory(settings.policy.shadow_path),
        settings.policy.entrypoint,
        timeout_seconds=settings.policy.shadow_timeout_seconds,
    )
    log.info("shadow_policy", path=str(settings.policy.shadow_path), policy_version=engine.policy_version)
    return ShadowPolicy(engine, settings.policy.shadow_timeout_seconds, metrics.registry)


def own_resources_for(settings: Settings, registry: ToolRegistry) -> list[ResourceTarget]:
    """Castellan's own resources (server/resources/own.py): the tables' schemas and samples, and the
    documents of the index `docs.search` searches, when it serves one."""
    if not settings.tools.table_resources:
        return []
    from tools.catalog_tools import table_catalog
    from tools.doc_search import DocSearchTool

    index = next((t.index for t in registry if isinstance(t, DocSearchTool)), None)
    return own_resources(table_catalog(settings), index)


def build_gateway(settings: Settings, tools: Iterable[Tool] | None = None) -> Gateway:
    """Wire every component from `settings`. Raises `ConfigError` for anything that cannot work."""
    for unsafe in enforce_production(settings):
        log.warning("production_override", setting=unsafe.setting, risk=unsafe.why)
    metrics = Metrics()
    closers: list[Callable[[], None]] = []
    exchanging = any(u.credential == "token_exchange" for u in settings.upstreams)
    presented = PresentedTokens() if exchanging or acts_on_behalf(settings) else None
    on_behalf = on_behalf_for(settings, presented) if presented is not None else None
    if tools is None:
        from tools.catalog_tools import configured_tools

        tools, closers = configured_tools(settings, on_behalf)
    registry = ToolRegistry(tools)
    verifier = CachedVerifier(
        JwtVerifier(
            backends.make_key_source(settings),
            issuer=settings.issuer,
            audience=settings.audience,
            algorithms=settings.auth.algorithms,
            claims=settings.auth.claims,
            leeway_seconds=settings.auth.leeway_seconds,
            max_lifetime_seconds=settings.auth.max_token_lifetime_seconds,
        )
    )
    own = own_resources_for(settings, registry)
    engine = backends.make_engine(settings)
    grant_source = backends.make_grant_source(settings, on_behalf)
    if isinstance(grant_source, LocalCatalog):
        for tool in registry:  # every tool's function exists in the catalog, so it can be granted on
            grant_source.add_securable("FUNCTION", tool.spec.securable)
        from tools.catalog_tools import table_catalog

        for table in table_catalog(settings).names():
            grant_source.add_securable("TABLE", table)
        for resource in own:  # the gateway's own resources, as upstream ones are added when listed
            grant_source.add_securable("RESOURCE", resource.spec.securable)
        if settings.demo:
            seed_demo_grants(grant_source)
        if settings.llm.upstream_url:
            register_models(grant_source, settings.llm, settings.demo)
    resources, prompts = ResourceCatalog(), PromptCatalog()
    resources.sync(OWN_SOURCE, own)
    upstreams = None
    grants_store = grant_store(settings)
    upstream_credentials: dict[str, UpstreamCredential] = {}
    if settings.upstreams:
        upstreams = UpstreamManager(
            settings.upstreams,
            registry,
            PinStore(settings.data_dir / "upstream_pins.db"),
            settings.tools.upstream_refresh_seconds,
            on_new_tool=(
                (lambda tool: grant_source.add_securable("FUNCTION", tool.spec.securable))
                if isinstance(grant_source, LocalCatalog)
                else None
            ),
            resources=resources,
            on_new_resource=(
                (lambda target: grant_source.add_securable("RESOURCE", target.spec.securable))
                if isinstance(grant_source, LocalCatalog)
                else None
            ),
            prompts=prompts,
            on_new_prompt=(
                (lambda target: grant_source.add_securable("FUNCTION", target.spec.securable))
                if isinstance(grant_source, LocalCatalog)
                else None
            ),
        )
        upstream_credentials = make_credentials(settings, presented, grants_store)
        attach_credentials(upstreams.connections, upstream_credentials)
    grants = CachedGrants(grant_source, settings.grants.cache_ttl_seconds, settings.grants.max_stale_seconds)
    meter = backends.make_meter(settings)
    retries = MeterRetries(meter, metrics.registry)
    if isinstance(meter, BufferedSqliteMeter):  # its write-behind's failures count as owed settles
        meter.report = retries.written_behind
    counter = TokenCounter(settings.metering.token_encoding)
    outbox = backends.make_outbox(settings)
    redactor = Redactor.from_settings(settings.audit)
    use_redactor(redactor)  # the logs redact as the audit log does
    shipper: Shipper | ShipperProcess | None = None
    uri = ""
    if settings.audit.ship and isinstance(outbox, SqliteOutbox):
        uri = settings.audit.mlflow_tracking_uri or local_tracking_uri(settings.data_dir)
        target = MlflowTarget(uri, settings.audit.mlflow_experiment)
        if settings.audit.ship_mode == "process":
            audit_db = settings.data_file(settings.audit.path, "audit.db")
            shipper = ShipperProcess(outbox, settings.audit, settings.data_dir, audit_db, metrics)
        else:
            shipper = Shipper(outbox, target, settings.audit, metrics)

    bundle = PolicyBundle.from_directory(settings.policy.path)
    decision_log = (
        DecisionLog(
            settings.data_dir / "decisions.jsonl",
            bundle,
            data_path(settings.policy.entrypoint),
            redactor,
            settings.policy.decision_log_max_bytes,
            settings.policy.decision_log_keep,
            settings.policy.decision_log_flush_seconds,
        )
        if settings.policy.decision_log
        else None
    )
    Gauge("castellan_log_lines_dropped", "Log lines lost to a failed write (calls are unaffected).",
          registry=metrics.registry).set_function(dropped_lines)  # fmt: skip
    watcher = None
    if settings.policy.reload:
        watcher = PolicyWatcher(
            settings.policy.path,
            engine,
            settings.policy.reload_interval_seconds,
            on_loaded=decision_log.use if decision_log else None,
            quiet=settings.policy.reload_quiet_seconds,
            verify=verifier_for(engine, settings.policy.entrypoint),
        )
    metrics.registry.register(PolicyMetrics(engine, watcher))

    approvals = ApprovalQueue.from_settings(settings, redactor, metrics.registry)
    authenticate = AuthenticateStage(scopes=tool_scopes(settings))
    resolve = ResolveStage(registry)
    grants_stage = GrantsStage(grants)
    shadow = shadow_policy_for(settings, metrics)
    policy = PolicyStage(engine, decision_log, shadow)
    guard_arguments, guard_result = guard_stages_for(settings.guardrails, redactor, engine, metrics.registry)
    audit = AuditStage(  # once a call is answered: its outcome, then its decision-log line
        outbox,
        redactor,
        deferred=settings.audit.outcome_commit_seconds > 0,
        then=(decision_log.write_pending,) if decision_log else (),
    )
    closers.append(audit.flush)  # outcomes still to be built, before the outbox's last commit and head
    call_pipeline = Pipeline(
        [
            authenticate,
            resolve,
            AdmitStage(meter, settings.metering, counter),
            GrantsStage(grants, function_only=True),  # cheap refusals before argument validation
            ValidateStage(registry, settings.tools.max_validation_steps),
            grants_stage,
            *guard_arguments,  # guardrails: detections in the arguments, for input.detections
            policy,
            ApprovalStage(approvals),
            RecordStage(outbox, redactor),
            InvokeStage(settings.server.tool_timeout_seconds),
            *guard_result,  # guardrails: the after-call decision on what the result holds
            ObligationsStage(),
            ChargeStage(meter, counter, retries),
            *([ShadowStage(settings.policy.shadow_timeout_seconds)] if shadow else []),  # its verdict, collected
            audit,
        ],
        metrics,
        on_stop=[ReleaseReservation(meter, retries, counter), DenialRecorder(outbox, redactor)],
    )
    list_pipeline = Pipeline([authenticate, resolve, grants_stage, policy], metrics)
    relaying = relaying_calls(settings, engine, counter)
    handlers = McpHandlers(ToolLister(registry, list_pipeline), call_pipeline, metrics, relaying=relaying)
    if settings.tasks.enabled:  # long-running calls as tasks (2026-07-28 extension): docs/protocol.md
        handlers.tasks = TaskCalls(settings.tasks, registry, TaskAudit(outbox, redactor))

    # A resource read, a prompt and a completion are governed acts like a tool call: the same stages,
    # the target resolved from its catalog and what using it needs checked (docs/protocol.md).
    def act_pipeline(resolve_target: Stage, *validate: Stage) -> Pipeline:
        return Pipeline(
            [
                authenticate,
                resolve_target,
                AdmitStage(meter, settings.metering, counter),
                grants_stage,
                *validate,  # after grants: cheap refusals first
                policy,
                ApprovalStage(approvals),  # a policy may ask an approver for any act
                RecordStage(outbox, redactor),
                InvokeStage(settings.server.tool_timeout_seconds),
                ObligationsStage(),
                ChargeStage(meter, counter, retries),
                AuditStage(outbox, redactor),
            ],
            metrics,
            on_stop=[ReleaseReservation(meter, retries, counter), DenialRecorder(outbox, redactor)],
        )

    resolve_resource, resolve_prompt = ResolveResourceStage(resources), ResolvePromptStage(prompts)
    levels, changes = LogLevels(), ListChanges()
    subscriptions = ResourceSubscriptions(resources, changes.bus)
    if upstreams is not None:
        upstreams.on_lists_changed = changes.changed
        upstreams.watch_resources(subscriptions)
    handlers.decided = levels.decided
    acts = Acts(metrics, levels, relaying)  # reads and prompts relay what their upstream asks, as calls do
    surface = Surface(
        resources=resources,
        resource_handlers=ResourceHandlers(
            resources,
            Pipeline([authenticate, resolve_resource, grants_stage, policy], metrics),
            act_pipeline(resolve_resource),
            acts,
            subscriptions,
        ),
        prompts=prompts,
        prompt_handlers=PromptHandlers(
            prompts,
            Pipeline([authenticate, resolve_prompt, grants_stage, policy], metrics),
            act_pipeline(resolve_prompt, ValidateStage(registry, settings.tools.max_validation_steps)),
            acts,
        ),
        completion_handlers=CompletionHandlers(prompts, resources, act_pipeline(ResolveCompletionStage()), acts),
        levels=levels,
        changes=changes,
        completes=lambda: upstreams is not None and upstreams.serves("completions"),
    )
    log.info(
        "gateway_built",
        tools=len(registry),
        policy_engine=engine.name,
        policy_engine_url=getattr(engine, "url", None),
        policy_version=engine.policy_version,
        grants=settings.grants.backend,
        metering=settings.metering.backend,
        audit=settings.audit.backend,
        audit_shipping=f"{uri} ({settings.audit.ship_mode})" if shipper else "off",
        auth=settings.auth.mode,
        resource=settings.resource_url,
    )
    return Gateway(
        settings=settings,
        metrics=metrics,
        registry=registry,
        verifier=verifier,
        engine=engine,
        grant_source=grant_source,
        grants=grants,
        meter=meter,
        outbox=outbox,
        call_pipeline=call_pipeline,
        list_pipeline=list_pipeline,
        handlers=handlers,
        surface=surface,
        watcher=watcher,
        decision_log=decision_log,
        shipper=shipper,
        upstreams=upstreams,
        closers=closers,
        meter_retries=retries,
        approvals=approvals,
        presented_tokens=presented,
        upstream_credentials=upstream_credentials,
        grant_store=grants_store,
        shadow=shadow,
        on_behalf=on_behalf,
        grant_changes=(
            GrantChanges(
                settings.data_file(settings.grants.path, "catalog.db"),
                grants,
                changes.changed,
                settings.grants.watch_seconds,
            )
            if isinstance(grant_source, LocalCatalog) and settings.grants.watch_seconds > 0
            else None
        ),
        housekeeping=(
            AuditHousekeeping(outbox, settings.audit, settings.data_dir, metrics)
            if isinstance(outbox, SqliteOutbox)
            else None
        ),
        llm=LlmProxy(
            settings.llm,
            settings.metering,
            meter,
            outbox,
            counter,
            authenticate=authenticate,
            grants=grants_stage,
            policy=policy,
            metrics=metrics,
            retries=retries,
            redactor=redactor,
        )
        if settings.llm.upstream_url
        else None,
    )
