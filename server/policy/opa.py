"""The OPA engine: a real OPA server (v1) decides over its REST API, through a pooled aiohttp client."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

import aiohttp
import structlog

from server.errors import BackendUnavailable, ConfigError
from server.policy._input import input_problem
from server.policy._result import EVALUATION_FAILED, to_decision
from server.policy.bundle import PolicyBundle
from server.policy.embedded import compile_bundle
from server.policy.engine import Decision, LoadReport

log = structlog.get_logger("castellan.policy")
UNAVAILABLE = "policy engine unavailable"
_MODULE_PREFIX = "castellan/"


def data_path(entrypoint: str) -> str:
    """`data.castellan.gateway.decision` → `castellan/gateway/decision` (the REST data API path)."""
    if not entrypoint.startswith("data."):
        raise ConfigError(f"policy entrypoint {entrypoint!r} must start with 'data.'")
    return entrypoint.removeprefix("data.").replace(".", "/")


class OpaServerEngine:
    """Asks an OPA server for each decision (`POST /v1/data/<entrypoint>`).

    With `push` (a sidecar or the managed OPA), the gateway owns the policy: `load` compiles the
    bundle, then PUTs its data and modules; a module OPA refuses rolls the push back to the last
    good bundle. Without `push` (an OPA fed by bundles), OPA owns it and the version is the bundle
    revision OPA reports. Connection errors, timeouts and 5xx without a result raise
    `BackendUnavailable` with the reason "policy engine unavailable": the call is denied.
    """

    name = "opa"

    def __init__(
        self,
        url: str,
        *,
        entrypoint: str = "data.castellan.gateway.decision",
        bundle: PolicyBundle | None = None,
        timeout: float = 1.0,
        on_unavailable: Callable[[], Awaitable[None]] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._url = url.rstrip("/")
        self._path = data_path(entrypoint)
        self._bundle = bundle
        self._push = bundle is not None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._pushed: PolicyBundle | None = None
        self._push_lock = asyncio.Lock()
        self._on_unavailable = on_unavailable
        self._on_close = on_close
        self._remote_version = "opa"

    @property
    def policy_version(self) -> str:
        return self._bundle.version if self._bundle is not None else self._remote_version

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=128, ttl_dns_cache=300, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def load(self, bundle: PolicyBundle) -> LoadReport:
        try:
            compile_bundle(bundle)
        except ConfigError as exc:
            return LoadReport(loaded=False, policy_version=self.policy_version, errors=(str(exc),))
        if not self._push:
            return LoadReport(False, self.policy_version, ("this OPA is fed by bundles; the gateway does not push",))
        async with self._push_lock:
            errors = await self._push_bundle(bundle)
            if errors:
                if self._pushed is not None:
                    await self._push_bundle(self._pushed)
                return LoadReport(loaded=False, policy_version=self.policy_version, errors=tuple(errors))
            self._bundle = self._pushed = bundle
        return LoadReport(loaded=True, policy_version=bundle.version)

    async def _push_bundle(self, bundle: PolicyBundle) -> list[str]:
        """PUT data, then each module; delete modules of ours that the bundle no longer has."""
        client = self._client()
        errors: list[str] = []
        try:
            async with client.put(f"{self._url}/v1/data", json=bundle.data) as resp:
                if resp.status >= 300:
                    errors.append(f"OPA refused the data: {await resp.text()}")
            for path, text in bundle.modules.items():
                headers = {"content-type": "text/plain"}
                async with client.put(
                    f"{self._url}/v1/policies/{_MODULE_PREFIX}{path}", data=text.encode(), headers=headers
                ) as resp:
                    if resp.status >= 300:
                        errors.append(f"OPA refused {path}: {_opa_error(await resp.text())}")
            async with client.get(f"{self._url}/v1/policies") as resp:
                listed = (await resp.json()).get("result", [])
            stale = [
                p["id"]
                for p in listed
                if p["id"].startswith(_MODULE_PREFIX) and p["id"].removeprefix(_MODULE_PREFIX) not in bundle.modules
            ]
            for module_id in stale:
                async with client.delete(f"{self._url}/v1/policies/{module_id}"):
                    pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors.append(f"{UNAVAILABLE}: {exc}")
        return errors

    async def _ensure_pushed(self) -> None:
        if self._push and self._bundle is not None and self._pushed is not self._bundle:
            async with self._push_lock:
                if self._pushed is not self._bundle:
                    errors = await self._push_bundle(self._bundle)
                    if errors:
                        await self._unavailable("; ".join(errors))
                    self._pushed = self._bundle
                    log.info("opa_policy_pushed", url=self._url, policy_version=self._bundle.version)

    async def decide(self, document: Mapping[str, Any]) -> Decision:
        decision_id = uuid.uuid4().hex
        started = time.perf_counter()
        problem = input_problem(document)
        if problem is not None:
            return to_decision(
                {"allow": False, "reasons": [problem]},
                policy_version=self.policy_version,
                engine=self.name,
                decision_id=decision_id,
            )
        body = json.dumps({"input": document})
        raw = await self._query(body)
        if raw is None and self._push and await self._policy_missing():
            # OPA restarted and lost what we pushed: push again, then ask once more.
            self._pushed = None
            raw = await self._query(body)
        eval_ms = (time.perf_counter() - started) * 1000
        return to_decision(
            raw, policy_version=self.policy_version, engine=self.name, decision_id=decision_id, eval_ms=eval_ms
        )

    async def _query(self, body: str) -> Any:
        await self._ensure_pushed()
        # strict-builtin-errors: a builtin given a wrong type is an error (a deny) as in the embedded
        # engine, not an undefined expression that would quietly skip a deny rule.
        url = f"{self._url}/v1/data/{self._path}?strict-builtin-errors=true" + (
            "" if self._push else "&provenance=true"
        )
        try:
            async with self._client().post(url, data=body, headers={"content-type": "application/json"}) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._unavailable(repr(exc))
        if status != 200:
            if status >= 500 and "code" not in text:
                raise BackendUnavailable("policy", UNAVAILABLE)
            log.warning("policy_evaluation_failed", engine=self.name, error=_opa_error(text))
            return {"allow": False, "reasons": [EVALUATION_FAILED]}
        payload = json.loads(text)
        if not self._push:
            self._remote_version = _revision(payload) or self._remote_version
        return payload.get("result")

    async def _unavailable(self, error: str) -> NoReturn:
        """OPA cannot answer: forget what was pushed, let the owner revive it, and deny."""
        self._pushed = None
        log.warning("opa_unavailable", url=self._url, error=error)
        if self._on_unavailable is not None:
            await self._on_unavailable()
        raise BackendUnavailable("policy", UNAVAILABLE)

    async def _policy_missing(self) -> bool:
        try:
            first = next(iter(self._bundle.modules)) if self._bundle else ""
            async with self._client().get(f"{self._url}/v1/policies/{_MODULE_PREFIX}{first}") as resp:
                return resp.status == 404
        except (aiohttp.ClientError, TimeoutError):
            return True

    async def check(self) -> None:
        try:
            async with self._client().get(f"{self._url}/health") as resp:
                if resp.status != 200:
                    raise BackendUnavailable("policy", f"{UNAVAILABLE} (health {resp.status})")
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._unavailable(repr(exc))
        await self._ensure_pushed()

    @property
    def url(self) -> str:
        return self._url

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._on_close is not None:
            self._on_close()


def _opa_error(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300]
    details = [e.get("message", "") for e in body.get("errors", []) if isinstance(e, dict)]
    return "; ".join([body.get("message", ""), *details]).strip("; ")[:500]


def _revision(payload: Mapping[str, Any]) -> str:
    bundles = payload.get("provenance", {}).get("bundles", {})
    return ",".join(f"{name}@{b.get('revision', '')}" for name, b in sorted(bundles.items()))
