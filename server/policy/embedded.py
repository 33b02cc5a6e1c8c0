"""The embedded policy engine: Rego decided in-process by regorus, off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import regorus

from server.errors import ConfigError
from server.policy._input import schema_errors
from server.policy._result import to_decision
from server.policy.bundle import PolicyBundle
from server.policy.engine import Decision

_UNDEFINED = '"<undefined>"'


def _clean(error: BaseException) -> str:
    """regorus errors carry a Rust backtrace after the message; keep the message."""
    return str(error).split("Stack backtrace:")[0].strip()


def compile_bundle(bundle: PolicyBundle) -> regorus.Engine:
    """A regorus engine holding `bundle`. Raises `ConfigError` naming the file when a module does not compile."""
    engine = regorus.Engine()
    for path, text in bundle.modules.items():
        try:
            engine.add_policy(path, text)
        except Exception as exc:  # regorus raises RuntimeError with the parser's message
            raise ConfigError(f"policy {path} does not compile: {_clean(exc)}") from None
    engine.add_data_json(json.dumps(bundle.data))
    return engine


class EmbeddedEngine:
    """Decides with regorus in a worker thread (engines are not shared between threads).

    The input is validated against the decision-input schema first; an invalid input, an
    undefined entrypoint or an evaluation error is a deny with the reason, never an exception.
    """

    name = "embedded"

    def __init__(self, bundle: PolicyBundle, entrypoint: str = "data.castellan.gateway.decision") -> None:
        compile_bundle(bundle)  # fail at start-up, on the caller's thread, with the file named
        self._bundle = bundle
        self._entrypoint = entrypoint
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rego")

    @property
    def policy_version(self) -> str:
        return self._bundle.version

    def _engine(self) -> regorus.Engine:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            engine = compile_bundle(self._bundle)
            self._local.engine = engine
        return engine

    def _evaluate(self, document_json: str) -> Any:
        engine = self._engine()
        engine.set_input_json(document_json)
        raw = engine.eval_rule_as_json(self._entrypoint)
        return None if raw == _UNDEFINED else json.loads(raw)

    async def decide(self, document: Mapping[str, Any]) -> Decision:
        version = self._bundle.version
        problems = schema_errors(document)
        if problems:
            return Decision.deny(f"decision input invalid: {problems[0]}", policy_version=version, engine=self.name)
        loop = asyncio.get_running_loop()
        try:
            raw = await loop.run_in_executor(self._executor, self._evaluate, json.dumps(document))
        except Exception as exc:  # evaluation error (e.g. conflicting rule values): deny with the reason
            return Decision.deny(f"policy evaluation failed: {_clean(exc)}", policy_version=version, engine=self.name)
        return to_decision(raw, policy_version=version, engine=self.name)

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
