"""The OPA engine: a real OPA server (v1) decides over its REST API, through a pooled aiohttp client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import structlog

from server.errors import BackendUnavailable, ConfigError
from server.policy._input import input_problem
from server.policy._result import EVALUATION_FAILED, to_decision
from server.policy.authoring import test_rules
from server.policy.bundle import PolicyBundle
from server.policy.circuit import Circuit
from server.policy.engine import Decision, LoadReport
from server.policy.verify import PROBES, probe_problems

log = structlog.get_logger("castellan.policy")
UNAVAILABLE = "policy engine unavailable"
_MODULE_PREFIX = "castellan/"
_TEST_PREFIX = "castellan-tests/"
_RUNTIME_ID = "castellan-runtime/decision"
_RUNTIME_PATH = "castellan_runtime/result"
_REVISION_KEY = "castellan_pushed"
_ENTRYPOINT = re.compile(r"^data(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_JSON = {"content-type": "application/json"}


def data_path(entrypoint: str) -> str:
    """`data.castellan.gateway.decision` → `castellan/gateway/decision` (the REST data API path)."""
    if not entrypoint.startswith("data."):
        raise ConfigError(f"policy entrypoint {entrypoint!r} must start with 'data.'")
    return entrypoint.removeprefix("data.").replace(".", "/")


def runtime_module(entrypoint: str, revision: str) -> str:
    """The module the gateway queries: the decision and, from the same evaluation, the revision of
    the modules (this module, pushed last) and of the data (pushed first). They differ only while a
    push is in progress, so a decision never carries a label other than the version that decided it."""
    return f"""package castellan_runtime

import rego.v1

revision := "{revision}"

default data_revision := ""

data_revision := data.{_REVISION_KEY}.revision

result := {{"revision": revision, "data_revision": data_revision, "decision": d}} if {{
	d := {entrypoint}
}} else := {{"revision": revision, "data_revision": data_revision}}
"""


class _Unreachable(Exception):
    """OPA gave no answer: connection refused or reset, a timeout, a 5xx that is not an OPA error."""


class OpaServerEngine:
    """Asks an OPA server for each decision.

    With `push` (a sidecar or the managed OPA), the gateway owns the policy. `load` stages a version
    in OPA (its data, carrying a fresh revision, then its modules), runs the version's own
    `*_test.rego` tests and the probe inputs in that OPA, and only then commits it by pushing the
    runtime module with the same revision; a refusal at any step pushes the last good version back.
    Each query reads the decision and both revisions in one evaluation: a decision is labelled with
    the version OPA evaluated, and a query that lands mid-push waits for the push and asks again.
    Without `push` (an OPA fed by bundles), OPA owns the policy and the label is the bundle revision
    OPA reports with the decision (`provenance`).

    Every call gets at most `timeout` seconds for its decision, whatever it waits on. Failures feed a
    circuit breaker (`circuit`): while it is open calls are denied at once. At most one re-push (to an
    OPA that restarted and lost the policy) is in flight; callers share it. Any failure raises
    `BackendUnavailable` with the reason "policy engine unavailable": the call is denied.
    """

    name = "opa"
    verifies_on_load = True  # reload runs no separate verification: `load` verifies in this OPA

    def __init__(
        self,
        url: str,
        *,
        entrypoint: str = "data.castellan.gateway.decision",
        bundle: PolicyBundle | None = None,
        timeout: float = 1.0,
        circuit: Circuit | None = None,
        on_unavailable: Callable[[], Awaitable[None]] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if not _ENTRYPOINT.match(entrypoint):
            raise ConfigError(f"policy entrypoint {entrypoint!r} must be a reference like data.pkg.rule")
        self._url = url.rstrip("/")
        self._entrypoint = entrypoint
        self._path = data_path(entrypoint)
        self._bundle = bundle  # with push: the version in force (committed, or to push on first use)
        self._push = bundle is not None
        self._timeout_s = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._push_lock = asyncio.Lock()
        self._idle = asyncio.Event()  # cleared while a push (load or re-push) is in progress
        self._idle.set()
        self._pushes = 0
        self._staged = ""
        self._repush: asyncio.Task[None] | None = None
        self._revive: asyncio.Future[None] | None = None
        self._on_unavailable = on_unavailable
        self._on_close = on_close
        self._remote_version = "opa"
        self.circuit = circuit or Circuit()
        self.repushes = 0  # pushes of the version in force to an OPA that had lost it
        self._committed = False

    @property
    def policy_version(self) -> str:
        return self._bundle.version if self._bundle is not None else self._remote_version

    @property
    def url(self) -> str:
        return self._url

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=128, ttl_dns_cache=300, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    # -- deciding -------------------------------------------------------------------------------

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
        if not self.circuit.allow():
            raise BackendUnavailable("policy", UNAVAILABLE)
        body = json.dumps({"input": document})
        try:
            async with asyncio.timeout(self._timeout_s):
                raw, version = await (self._ask_pushed(body) if self._push else self._ask_bundled(body))
        except TimeoutError:
            self._failed(f"no decision within {self._timeout_s}s")
            raise BackendUnavailable("policy", UNAVAILABLE) from None
        except _Unreachable as exc:
            self._failed(str(exc))
            raise BackendUnavailable("policy", UNAVAILABLE) from None
        self.circuit.succeeded()
        eval_ms = (time.perf_counter() - started) * 1000
        return to_decision(raw, policy_version=version, engine=self.name, decision_id=decision_id, eval_ms=eval_ms)

    async def _ask_pushed(self, body: str) -> tuple[Any, str]:
        # strict-builtin-errors: a builtin given a wrong type is an error (a deny) as in the embedded
        # engine, not an undefined expression that would quietly skip a deny rule.
        url = f"{self._url}/v1/data/{_RUNTIME_PATH}?strict-builtin-errors=true"
        retried = False
        for _ in range(4):
            status, text = await self._post(url, body)
            if status != 200:
                return self._evaluation_failed(text), self.policy_version
            result = json.loads(text).get("result")
            settled = isinstance(result, dict) and result.get("revision") == result.get("data_revision")
            if isinstance(result, dict) and settled:
                return result.get("decision"), str(result["revision"]).rsplit(".", 1)[0]
            # Evaluated mid-push (the revisions differ) or before any push (no runtime module).
            if not self._idle.is_set():
                await self._idle.wait()  # a push of ours is running: wait for it, then ask again
            elif isinstance(result, dict) and not retried:
                retried = True  # the push may have ended since this query was evaluated
            else:
                await self._repush_once()  # OPA lost the policy (restarted), or another writer mixed it
        raise _Unreachable("the policy in OPA did not settle")

    async def _ask_bundled(self, body: str) -> tuple[Any, str]:
        url = f"{self._url}/v1/data/{self._path}?strict-builtin-errors=true&provenance=true"
        status, text = await self._post(url, body)
        if status != 200:
            return self._evaluation_failed(text), self._remote_version
        payload = json.loads(text)
        self._remote_version = _revision(payload) or self._remote_version
        return payload.get("result"), _revision(payload) or self._remote_version

    def _evaluation_failed(self, text: str) -> dict[str, Any]:
        log.warning("policy_evaluation_failed", engine=self.name, error=_opa_error(text))
        return {"allow": False, "reasons": [EVALUATION_FAILED]}

    async def _post(self, url: str, body: str) -> tuple[int, str]:
        try:
            async with self._client().post(url, data=body, headers=_JSON) as resp:
                status, text = resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Unreachable(repr(exc)) from None
        if status >= 500 and "code" not in text:
            raise _Unreachable(f"OPA answered {status}")
        return status, text

    def _failed(self, error: str) -> None:
        """OPA did not answer a call: count it against the circuit, and let the owner revive OPA
        (in the background: no call waits for a restart)."""
        log.warning("opa_unavailable", url=self._url, error=error, circuit=self.circuit.state)
        self.circuit.failed(error)
        self._start_revive()

    def _start_revive(self) -> None:
        if self._on_unavailable is not None and (self._revive is None or self._revive.done()):
            self._revive = asyncio.ensure_future(self._on_unavailable())
            self._revive.add_done_callback(_consume)

    # -- pushing --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        async with self._push_lock:
            self._idle.clear()
            try:
                yield
            finally:
                self._idle.set()

    async def load(self, bundle: PolicyBundle) -> LoadReport:
        if not self._push:
            return LoadReport(False, self.policy_version, ("this OPA is fed by bundles; the gateway does not push",))
        started = time.perf_counter()
        try:
            async with self._exclusive(), _reaching(self._url):
                errors = await self._stage(bundle) or await self._verify_staged(bundle) or await self._commit()
                if errors:
                    if self._bundle is not None:
                        restored = await self._stage(self._bundle) or await self._commit()
                        if restored:  # the next query finds the revisions apart and pushes again
                            log.error("opa_restore_failed", errors=restored)
                    return LoadReport(loaded=False, policy_version=self.policy_version, errors=tuple(errors))
                self._bundle = bundle
        except _Unreachable as exc:
            # Not a verdict on the version: the watcher tries it again. Queries meanwhile find the
            # revisions apart (or none) and restore the version in force once OPA answers.
            raise BackendUnavailable("policy", f"{UNAVAILABLE} while loading: {exc}") from None
        held_ms = round((time.perf_counter() - started) * 1000, 1)  # calls waited at most this long
        log.info("opa_policy_pushed", url=self._url, version=bundle.version, revision=self._staged, held_ms=held_ms)
        return LoadReport(loaded=True, policy_version=bundle.version)

    async def _repush_once(self) -> None:
        """Push the version in force again (OPA lost it); one re-push at most, shared by all callers."""
        if self._repush is None or self._repush.done():
            self._repush = asyncio.get_running_loop().create_task(self._repush_now())
            self._repush.add_done_callback(_consume)
        try:
            await asyncio.shield(self._repush)
        except _Unreachable:
            raise
        except Exception as exc:
            raise _Unreachable(repr(exc)) from None

    async def _repush_now(self) -> None:
        async with self._exclusive(), _reaching(self._url):
            assert self._bundle is not None
            self.repushes += self._committed  # the first push is not a re-push
            errors = await self._stage(self._bundle) or await self._commit()
        if errors:
            raise _Unreachable("; ".join(errors))
        log.info("opa_policy_pushed", url=self._url, policy_version=self._bundle.version, revision=self._staged)

    async def _stage(self, bundle: PolicyBundle) -> list[str]:
        """PUT the data (with a fresh revision), then the modules; delete modules of ours the bundle
        no longer has. Queries find the data's revision ahead of the runtime module's until `_commit`."""
        self._pushes += 1
        self._staged = f"{bundle.version}.{self._pushes}"
        data = {**bundle.data, _REVISION_KEY: {"revision": self._staged}}
        async with self._client().put(f"{self._url}/v1/data", json=data) as resp:
            if resp.status >= 300:
                return [f"OPA refused the data: {_opa_error(await resp.text())}"]
        errors = await self._put_modules({_MODULE_PREFIX + p: t for p, t in bundle.modules.items()})
        if errors:
            return errors
        wanted = {_MODULE_PREFIX + p for p in bundle.modules}
        stale = [m for m in await self._module_ids() if m.startswith(_MODULE_PREFIX) and m not in wanted]
        await self._delete_modules(stale)
        return []

    async def _commit(self) -> list[str]:
        errors = await self._put_modules({_RUNTIME_ID: runtime_module(self._entrypoint, self._staged)})
        self._committed = self._committed or not errors
        return errors

    async def _put_modules(self, modules: Mapping[str, str]) -> list[str]:
        """PUT each module; one OPA refuses is retried after the others (it may call a function from a
        module not pushed yet) until no progress is made. The errors of those still refused."""
        pending = dict(modules)
        errors: dict[str, str] = {}
        while pending:
            errors = {}
            for module_id, text in pending.items():
                async with self._client().put(
                    f"{self._url}/v1/policies/{module_id}", data=text.encode(), headers={"content-type": "text/plain"}
                ) as resp:
                    if resp.status >= 300:
                        errors[module_id] = _opa_error(await resp.text())
            if len(errors) == len(pending):
                break
            pending = {m: pending[m] for m in errors}
        return [f"OPA refused {m.split('/', 1)[1]}: {e}" for m, e in errors.items()]

    async def _module_ids(self) -> list[str]:
        async with self._client().get(f"{self._url}/v1/policies") as resp:
            return [p["id"] for p in (await resp.json()).get("result", [])]

    async def _delete_modules(self, module_ids: list[str]) -> None:
        for module_id in module_ids:
            async with self._client().delete(f"{self._url}/v1/policies/{module_id}"):
                pass

    async def _verify_staged(self, bundle: PolicyBundle) -> list[str]:
        """The staged version's own tests and the probe inputs, evaluated by this OPA (concurrently:
        calls wait while this runs). The test modules are removed again whatever the outcome."""
        tests = {_TEST_PREFIX + p: t for p, t in bundle.tests.items()}
        try:
            errors = await self._put_modules(tests)
            if errors:
                return errors
            packages: dict[str, list[str]] = {}
            for text in bundle.tests.values():
                for name in test_rules(text):
                    package, rule = name.removeprefix("data.").rsplit(".", 1)
                    packages.setdefault(package, []).append(rule)
            answers = await asyncio.gather(self._run_probes(), *(self._run_tests(p, r) for p, r in packages.items()))
            return [problem for problems in answers for problem in problems]
        finally:
            await self._delete_modules(list(tests))

    async def _run_tests(self, package: str, rules: list[str]) -> list[str]:
        async with self._client().get(f"{self._url}/v1/data/{package.replace('.', '/')}") as resp:
            status, text = resp.status, await resp.text()
        if status != 200:
            return [f"test data.{package}.{r} failed: {_opa_error(text)}" for r in rules]
        values = json.loads(text).get("result") or {}
        return [f"test data.{package}.{r} failed" for r in rules if values.get(r) is not True]

    async def _run_probes(self) -> list[str]:
        url = f"{self._url}/v1/data/{self._path}?strict-builtin-errors=true"

        async def probe(document: Mapping[str, Any]) -> tuple[int, str]:
            async with self._client().post(url, data=json.dumps({"input": document}), headers=_JSON) as resp:
                return resp.status, await resp.text()

        answers = await asyncio.gather(*(probe(d) for d in PROBES.values()))
        problems: list[str] = []
        results: dict[str, Any] = {}
        for name, (status, text) in zip(PROBES, answers, strict=True):
            if status != 200:
                problems.append(f"probe '{name}': evaluation failed: {_opa_error(text)}")
            else:
                results[name] = json.loads(text).get("result")
        return problems + probe_problems(results)

    # -- operations -----------------------------------------------------------------------------

    async def check(self) -> None:
        if self.circuit.state != "closed":
            raise BackendUnavailable("policy", f"{UNAVAILABLE} ({self.circuit.describe()})")
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._client().get(f"{self._url}/health") as resp:
                    if resp.status != 200:
                        raise BackendUnavailable("policy", f"{UNAVAILABLE} (health {resp.status})")
                if self._push:
                    async with self._client().get(f"{self._url}/v1/data/castellan_runtime/revision") as resp:
                        pushed = (await resp.json()).get("result") if resp.status == 200 else None
                    if pushed is None:
                        await self._repush_once()
        except (aiohttp.ClientError, TimeoutError, _Unreachable) as exc:
            self._start_revive()
            raise BackendUnavailable("policy", f"{UNAVAILABLE} ({exc!r})") from None

    async def close(self) -> None:
        for task in (self._repush, self._revive):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._session is not None:
            await self._session.close()
        if self._on_close is not None:
            self._on_close()


@contextlib.asynccontextmanager
async def _reaching(url: str) -> AsyncIterator[None]:
    """A push step that got no answer from OPA (connection, timeout) raises `_Unreachable`."""
    try:
        yield
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _Unreachable(f"{url}: {exc!r}") from None


def _consume(task: asyncio.Future[None]) -> None:
    """Background pushes and revivals report through their callers and the log; never 'never retrieved'."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("opa_background_task_failed", error=repr(exc))


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
