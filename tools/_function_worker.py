"""Runs inside the sandbox: one catalog function, called once per JSON line read from stdin.

Started as `python -I _function_worker.py MODULE PATH QUALNAME`; it sees the Python runtime and the
function's own source file only. `tools.functions` is a declaration-only stand-in here, so the
function's module loads without the gateway's code. Arguments arrive as JSON and are typed from the
function's signature (pydantic); the answer is JSON: `{"ok": true, "result": ...}` or an error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import types
from collections.abc import Callable
from typing import Any


class CatalogFunction:
    def __init__(self, name: str, function: Callable[..., Any], env: tuple[str, ...] = ()) -> None:
        self.name, self.function, self.env = name, function, env


def catalog_function(name: str, env: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], CatalogFunction]:
    return lambda fn: CatalogFunction(name, fn, env)


def _load(module_name: str, path: str, qualname: str) -> Callable[..., Any]:
    declarations = types.ModuleType("tools.functions")
    declarations.catalog_function = catalog_function  # type: ignore[attr-defined]
    declarations.CatalogFunction = CatalogFunction  # type: ignore[attr-defined]
    parts = module_name.split(".")
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = []
            sys.modules[package] = stub
    if "tools" not in sys.modules:
        sys.modules["tools"] = types.ModuleType("tools")
        sys.modules["tools"].__path__ = []
    sys.modules["tools.functions"] = declarations
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {module_name} from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    return target.function if isinstance(target, CatalogFunction) else target


def _limit_cpu(seconds: int) -> None:
    used = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(used.ru_utime + used.ru_stime) + seconds + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def main(module_name: str, path: str, qualname: str) -> None:
    # The answers go out on a private copy of stdout; what the function prints goes to stderr.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        from pydantic import validate_call

        fn = validate_call(_load(module_name, path, qualname))
        failure = ""
    except BaseException as exc:  # reported on every call: the gateway shows why the function cannot run
        failure = f"cannot load {module_name}: {type(exc).__name__}: {str(exc)[:300]}"
    channel.write('{"ready":true}\n')
    channel.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") != "call":
            continue
        if failure:
            channel.write(json.dumps({"ok": False, "error": failure}) + "\n")
            channel.flush()
            continue
        _limit_cpu(int(request.get("cpu_seconds", 5)))
        try:
            result = fn(**request["arguments"])
            text = json.dumps({"ok": True, "result": result}, separators=(",", ":"), default=str)
        except Exception as exc:
            text = json.dumps({"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        channel.write(text + "\n")
        channel.flush()


if __name__ == "__main__":
    main(*sys.argv[1:4])
