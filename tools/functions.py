"""Catalog functions as tools: Python functions registered under `catalog.schema.name`.

The input schema comes from the signature (types via pydantic), the description from the docstring.
Calls run in sandboxed worker processes (`FunctionWorkers`) with a wall-clock timeout, CPU and memory
limits, no network and nothing of the gateway's files or environment: a runaway or hostile function
cannot take the gateway down or read its secrets, and its timeout ends only its own call.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import os
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError, create_model

from server.invoke import caller
from server.registry import ToolOutput, ToolSpec
from server.sandbox import Limits, Profile, SandboxMode, Worker, WorkerDied, WorkerTimeout, detect_mode
from server.sandbox.runtime import python_executable
from tools.fair_share import FairShare

_SECURABLE = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")


@dataclass(frozen=True, slots=True)
class CatalogFunction:
    """A Python function published as `catalog.schema.name`."""

    name: str
    function: Callable[..., Any]
    env: tuple[str, ...] = ()
    """Names of the gateway's environment variables this function may read (it sees no others)."""

    def __post_init__(self) -> None:
        if not _SECURABLE.match(self.name):
            raise ValueError(f"catalog function name {self.name!r} is not catalog.schema.name")


def catalog_function(name: str, env: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], CatalogFunction]:
    """Decorator: `@catalog_function("main.tools.discount")` over a typed, documented function.

    The function runs sandboxed, loaded from its own source file: it may import the standard library
    and installed packages, not other modules of its project. `env` grants environment variables."""
    return lambda fn: CatalogFunction(name, fn, tuple(env))


def _doc_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The docstring's summary paragraph and its `Args:` descriptions."""
    doc = inspect.getdoc(fn) or ""
    summary = doc.partition("\n\n")[0]
    params: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        if line.strip().lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            match = re.match(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", line)
            if match:
                params[match.group(1)] = match.group(2).strip()
            elif line.strip() and not line.startswith(" "):
                in_args = False
    return " ".join(summary.split()), params


def arguments_model(fn: Callable[..., Any]) -> type[BaseModel]:
    """A pydantic model of the function's parameters (all keyword-able, typed; defaults make them optional)."""
    fields: dict[str, Any] = {}
    for param in inspect.signature(fn, eval_str=True).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"{fn.__name__}: *args/**kwargs cannot be described to an agent")
        if param.annotation is inspect.Parameter.empty:
            raise ValueError(f"{fn.__name__}: parameter {param.name} has no type annotation")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (param.annotation, default)
    return create_model(f"{fn.__name__}_args", **fields)


def input_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """JSON Schema of the function's parameters, with the docstring's descriptions."""
    _, descriptions = _doc_parts(fn)
    schema = arguments_model(fn).model_json_schema()
    schema.pop("title", None)
    for name, prop in schema.get("properties", {}).items():
        prop.pop("title", None)
        if name in descriptions:
            prop["description"] = descriptions[name]
    schema["additionalProperties"] = False
    return schema


class FunctionWorkers:
    """The sandboxed worker processes of the catalog functions: a small pool per function.

    Each worker is one function's own sandbox (see `server.sandbox`): under bubblewrap it has no network,
    an environment of only what the function's declaration grants, a read-only view of the Python runtime
    and of the function's source file, nothing of the data directory, no child processes (seccomp), and
    address-space and CPU limits. A call that times out or breaks a limit kills its own worker only;
    other calls, in other workers, go on. One identity holds at most `per_identity` of a function's
    workers at once (`FairShare`), so one agent's slow calls cannot queue every other agent.
    `calls_per_worker = 1` gives every call a fresh sandbox (a spare is started ahead).
    """

    def __init__(
        self,
        workers: int = 2,
        memory_mb: int = 512,
        *,
        mode: SandboxMode | None = None,
        calls_per_worker: int = 0,
        per_identity: int = 1,
    ) -> None:
        self._size = max(1, workers)
        self._per_identity = per_identity
        self._memory = memory_mb * 1024 * 1024
        self.mode = mode or detect_mode("auto")
        self._calls_per_worker = calls_per_worker
        self._pools: dict[str, _FunctionPool] = {}

    def _pool(self, function: CatalogFunction) -> _FunctionPool:
        pool = self._pools.get(function.name)
        if pool is None or not pool.usable():
            if pool is not None:
                pool.close()
            pool = _FunctionPool(
                function, self.mode, self._size, self._memory, self._calls_per_worker, self._per_identity
            )
            self._pools[function.name] = pool
        return pool

    async def call(self, function: CatalogFunction, arguments: Mapping[str, Any], limits: tuple[float, int]) -> Any:
        """Runs `function(**arguments)` (JSON-typed arguments) in one of its workers within `limits` (wall
        seconds, CPU seconds). Raises `WorkerTimeout`, `WorkerDied` (a resource limit), or `FunctionFailed`."""
        return await self._pool(function).call(dict(arguments), limits)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    async def aclose(self) -> None:
        """Stops every worker and reaps it (from the loop that started them)."""
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()


class FunctionFailed(Exception):
    """The function raised (the message is its exception, as the worker reported it)."""


class _FunctionPool:
    def __init__(
        self, function: CatalogFunction, mode: SandboxMode, size: int, memory: int, per_worker: int, per_identity: int
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._mode = mode
        self._size = size
        self._per_worker = per_worker
        self._idle: list[Worker] = []
        self._all: set[Worker] = set()
        self._share = FairShare(size, per_identity)
        self._spare: asyncio.Task[None] | None = None
        fn = function.function
        source = Path(inspect.getsourcefile(fn) or "")
        runner = Path(__file__).with_name("_function_worker.py")
        inside_code = "/sandbox/code/" + fn.__module__.replace(".", "/") + ".py"
        isolated = mode.isolated
        self._argv = [
            python_executable(),
            "-I",
            "/sandbox/worker.py" if isolated else str(runner),
            fn.__module__,
            inside_code if isolated else str(source),
            fn.__qualname__,
        ]
        env = {name: os.environ[name] for name in function.env if name in os.environ}
        self._profile = Profile(
            mounts=((runner, "/sandbox/worker.py"), (source, inside_code)),
            env=env,
            limits=Limits(memory_bytes=memory, processes=1, open_files=64, file_bytes=16 << 20),
        )

    def usable(self) -> bool:
        """Workers belong to the event loop that started them (a test may run several loops)."""
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    async def _take(self) -> Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
            self._all.discard(worker)
        worker = await Worker.start(self._mode, self._profile, self._argv)
        self._all.add(worker)
        return worker

    def _keep_a_spare(self) -> None:
        if self._per_worker == 1 and not self._idle and (self._spare is None or self._spare.done()):
            self._spare = asyncio.ensure_future(self._start_spare())

    async def _start_spare(self) -> None:
        worker = await Worker.start(self._mode, self._profile, self._argv)
        self._all.add(worker)
        self._idle.append(worker)

    async def call(self, arguments: dict[str, Any], limits: tuple[float, int]) -> Any:
        wall, cpu = limits
        identity = caller.get()
        async with self._share.slot(identity.agent_id if identity is not None else ""):
            worker = await self._take()
            self._keep_a_spare()
            try:
                answer = await worker.request({"op": "call", "arguments": arguments, "cpu_seconds": cpu}, wall)
            except (WorkerTimeout, WorkerDied):
                self._all.discard(worker)
                raise
            except BaseException:
                self._all.discard(worker)  # cancelled mid-call (the pipeline's own timeout): end that call too
                await asyncio.shield(worker.kill())
                raise
            if worker.alive and (self._per_worker == 0 or worker.requests < self._per_worker):
                self._idle.append(worker)
            else:
                self._all.discard(worker)
                await worker.close()
        if not answer.get("ok"):
            raise FunctionFailed(str(answer.get("error", "the function failed"))[:500])
        return answer.get("result")

    def close(self) -> None:
        """Kills every worker at once (synchronous: called at shutdown, possibly outside the loop)."""
        for worker in list(self._all):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.process.pid, signal.SIGKILL)
        self._all.clear()
        self._idle.clear()

    async def aclose(self) -> None:
        if self._spare is not None:
            self._spare.cancel()
            await asyncio.gather(self._spare, return_exceptions=True)
        for worker in list(self._all):
            await worker.kill()
        self._all.clear()
        self._idle.clear()


class FunctionTool:
    """A catalog function served as an MCP tool; its securable is its own name."""

    def __init__(
        self, function: CatalogFunction, workers: FunctionWorkers, timeout_seconds: float = 10.0, cpu_seconds: int = 5
    ) -> None:
        self._function = function
        self._workers = workers
        self._timeout = timeout_seconds
        self._cpu = cpu_seconds
        summary, _ = _doc_parts(function.function)
        self._model = arguments_model(function.function)
        returns = inspect.signature(function.function, eval_str=True).return_annotation
        output_schema = None
        if returns is not inspect.Signature.empty:
            output_schema = {
                "type": "object",
                "properties": {"result": TypeAdapter(returns).json_schema()},
                "required": ["result"],
            }
        self.spec = ToolSpec(
            name=function.name,
            title=function.function.__name__.replace("_", " ").capitalize(),
            description=summary or f"The catalog function {function.name}.",
            securable=function.name,
            input_schema=input_schema(function.function),
            output_schema=output_schema,
            annotations={"readOnlyHint": True, "openWorldHint": False},
        )

    async def invoke(self, arguments: Mapping[str, Any]) -> ToolOutput:
        try:
            # validated here for a clear error; sent as JSON and typed again from the signature in the sandbox
            typed = self._model.model_validate(dict(arguments)).model_dump(mode="json")
        except ValidationError as exc:
            return ToolOutput(text=f"invalid arguments: {exc.errors()[0]['msg']}", is_error=True)
        try:
            result = await self._workers.call(self._function, typed, (self._timeout, self._cpu))
        except WorkerTimeout:
            return ToolOutput(text=f"{self.spec.name} timed out after {self._timeout:g} s", is_error=True)
        except WorkerDied as exc:
            return ToolOutput(text=f"{self.spec.name} exceeded its resource limits ({exc})", is_error=True)
        except FunctionFailed as exc:
            return ToolOutput(text=f"{self.spec.name} failed: {exc}", is_error=True)
        except OSError as exc:
            return ToolOutput(text=f"{self.spec.name} could not start its sandbox: {exc}", is_error=True)
        structured = {"result": json.loads(json.dumps(result, default=str))}
        return ToolOutput(text=json.dumps(structured), structured=structured)


def load_functions(module_names: list[str]) -> list[CatalogFunction]:
    """Every `CatalogFunction` defined at the top level of the given modules."""
    found: list[CatalogFunction] = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        found += [value for value in vars(module).values() if isinstance(value, CatalogFunction)]
    return found
