"""Catalog functions as tools: Python functions registered under `catalog.schema.name`.

The input schema comes from the signature (types via pydantic), the description from the docstring.
Calls run in a separate worker process with a timeout, an address-space limit and a CPU-time limit,
so a runaway function cannot take the gateway down: on a timeout the worker is killed and replaced.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import json
import multiprocessing
import re
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError, create_model

from server.registry import ToolOutput, ToolSpec

_SECURABLE = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")


@dataclass(frozen=True, slots=True)
class CatalogFunction:
    """A Python function published as `catalog.schema.name`."""

    name: str
    function: Callable[..., Any]

    def __post_init__(self) -> None:
        if not _SECURABLE.match(self.name):
            raise ValueError(f"catalog function name {self.name!r} is not catalog.schema.name")


def catalog_function(name: str) -> Callable[[Callable[..., Any]], CatalogFunction]:
    """Decorator: `@catalog_function("main.tools.discount")` over a typed, documented function."""
    return lambda fn: CatalogFunction(name, fn)


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


def _limit_worker(memory_bytes: int) -> None:
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _run(module: str, qualname: str, arguments: dict[str, Any], cpu_seconds: int) -> Any:
    """In the worker: cap this call's CPU time, then call the function."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = spent + cpu_seconds + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    fn = target.function if isinstance(target, CatalogFunction) else target
    result = fn(**arguments)
    json.dumps(result, default=str)  # fails here, in the worker, if the result cannot be sent back
    return result


class FunctionWorkers:
    """A small process pool for catalog functions, replaced whole when a call times out."""

    def __init__(self, workers: int = 2, memory_mb: int = 512) -> None:
        self._workers = workers
        self._memory = memory_mb * 1024 * 1024
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self._workers,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=_limit_worker,
            initargs=(self._memory,),
        )

    async def call(self, fn: Callable[..., Any], arguments: Mapping[str, Any], limits: tuple[float, int]) -> Any:
        """Runs `fn(**arguments)` in a worker within `limits` (wall seconds, CPU seconds)."""
        wall, cpu = limits
        future = self._pool.submit(_run, fn.__module__, fn.__qualname__, dict(arguments), cpu)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=wall)
        except TimeoutError:
            self._kill()
            raise
        except concurrent.futures.process.BrokenProcessPool:
            self._kill()  # the worker died (memory limit, CPU limit, crash): start fresh for the next call
            raise

    def _kill(self) -> None:
        old, self._pool = self._pool, self._new_pool()
        for process in list(getattr(old, "_processes", {}).values()):
            process.kill()
        old.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


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
            typed = dict(self._model.model_validate(dict(arguments)))  # "2026-01-01" -> date, as declared
        except ValidationError as exc:
            return ToolOutput(text=f"invalid arguments: {exc.errors()[0]['msg']}", is_error=True)
        try:
            result = await self._workers.call(self._function.function, typed, (self._timeout, self._cpu))
        except TimeoutError:
            return ToolOutput(text=f"{self.spec.name} timed out after {self._timeout:g} s", is_error=True)
        except concurrent.futures.process.BrokenProcessPool:
            return ToolOutput(text=f"{self.spec.name} exceeded its resource limits", is_error=True)
        except Exception as exc:
            return ToolOutput(text=f"{self.spec.name} failed: {type(exc).__name__}: {str(exc)[:300]}", is_error=True)
        structured = {"result": json.loads(json.dumps(result, default=str))}
        return ToolOutput(text=json.dumps(structured), structured=structured)


def load_functions(module_names: list[str]) -> list[CatalogFunction]:
    """Every `CatalogFunction` defined at the top level of the given modules."""
    found: list[CatalogFunction] = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        found += [value for value in vars(module).values() if isinstance(value, CatalogFunction)]
    return found
