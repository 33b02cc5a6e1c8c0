"""OPA's own evaluator in this process: the Go library in server/policy/golib (OPA v1.22.2), built by
scripts/build-opa-library into .cache/opa-library/ and called through ctypes.

The library is loaded on first use, not at import: a process that only imports this module (the
multiprocessing forkserver that serves catalog functions, for example) never starts a Go runtime,
so nothing forks with one. The gateway's own children are started by fork+exec (subprocess), which
is safe with a Go runtime in the parent. ctypes releases the GIL for each call, so an evaluation
on a worker thread does not stop the event loop."""

from __future__ import annotations

import ctypes
import json
import os
import re
import threading
import weakref
from functools import cache
from pathlib import Path
from typing import Any

from server.errors import ConfigError
from server.policy.bundle import MASK_RULE, PolicyBundle
from server.settings import REPO_ROOT

LIBRARY = REPO_ROOT / ".cache" / "opa-library" / "libcastellan_opa.so"
_UNDEFINED_FUNCTION = re.compile(r"(?P<where>[^\s:]+:\d+): rego_type_error: undefined function (?P<name>[\w.]+)")

_LOCATION = re.compile(r"(?P<file>[^\s:]+):\d+: rego_")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None


def library_path() -> Path | None:
    """`$CASTELLAN_OPA_LIBRARY` when set (an empty value disables the library), else the project's build."""
    env = os.environ.get("CASTELLAN_OPA_LIBRARY")
    if env is not None:
        return Path(env) if env and Path(env).is_file() else None
    return LIBRARY if LIBRARY.is_file() else None


def available() -> bool:
    return library_path() is not None


def _load() -> ctypes.CDLL:
    global _library
    with _lock:
        if _library is None:
            path = library_path()
            if path is None:
                raise ConfigError("the in-process OPA library is not built (scripts/build-opa-library needs Go)")
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as exc:
                raise ConfigError(f"the in-process OPA library {path} does not load: {exc}") from None
            lib.castellan_compile.argtypes = [ctypes.c_char_p]
            lib.castellan_eval.argtypes = [ctypes.c_longlong, ctypes.c_char_p, ctypes.c_int]
            lib.castellan_release.argtypes = [ctypes.c_longlong]
            lib.castellan_free.argtypes = [ctypes.c_void_p]
            for fn in (lib.castellan_compile, lib.castellan_eval, lib.castellan_limits):
                fn.restype = ctypes.c_void_p  # a C string we must free with castellan_free
            lib.castellan_release.restype = None
            lib.castellan_free.restype = None
            _library = lib
        return _library


def _reply(lib: ctypes.CDLL, pointer: int | None) -> dict[str, Any]:
    if not pointer:
        return {"error": "the policy library returned nothing"}
    try:
        text = ctypes.string_at(pointer)
    finally:
        lib.castellan_free(pointer)
    try:
        reply: dict[str, Any] = json.loads(text)
    except ValueError as exc:  # an integer of more than 4,300 digits, for one
        return {"error": f"the policy's result cannot be read: {exc}"}
    return reply


@cache
def limits() -> dict[str, Any]:
    """The library's OPA version, refused builtins (name → why) and bounds (name → bound)."""
    lib = _load()
    return _reply(lib, lib.castellan_limits())


def _explain(error: str) -> str:
    """Name a refused builtin in a compile error, with what serves it instead."""
    refused: dict[str, str] = limits()["refused"]
    match = _UNDEFINED_FUNCTION.search(error)
    if match and match["name"] in refused:
        name = match["name"]
        return (
            f"policy {match['where']} uses builtin {name}, which the embedded engine refuses "
            f"({refused[name]}); decide it with OPA (policy.engine = 'auto' or 'opa')"
        )
    if error.startswith("policy data"):
        return error
    where = _LOCATION.search(error)
    return f"policy {where['file'] if where else ''} does not compile: {error}".replace("policy  ", "policy ")


class CompiledPolicy:
    """One bundle compiled and prepared for one entrypoint; safe to evaluate from any thread.

    With `mask` (the decision log's mask bundle, `log_mask_bundle`), every evaluation also evaluates
    `MASK_RULE` on `{"input": the input, "result": the entrypoint's value}` in the same library call,
    on the input parsed once, under its own deadline (`mask_timeout_seconds`)."""

    def __init__(
        self,
        bundle: PolicyBundle,
        entrypoint: str,
        timeout_seconds: float = 1.0,
        mask: PolicyBundle | None = None,
        mask_timeout_seconds: float = 1.0,
    ) -> None:
        lib = _load()
        request: dict[str, Any] = {
            "modules": dict(bundle.modules),
            "data": bundle.data,
            "query": entrypoint,
            "timeout_ms": max(1, int(timeout_seconds * 1000)),
        }
        if mask is not None:
            if mask.data is not bundle.data and mask.data != bundle.data:
                raise ValueError("a mask bundle is compiled over its policy's data")
            request["mask"] = {
                "modules": dict(mask.modules),
                "query": MASK_RULE,
                "timeout_ms": max(1, int(mask_timeout_seconds * 1000)),
            }
        reply = _reply(lib, lib.castellan_compile(json.dumps(request).encode()))
        if "error" in reply:
            raise ConfigError(_explain(str(reply["error"])))
        self._lib = lib
        self._masked = mask is not None
        self._handle = int(reply["handle"])
        weakref.finalize(self, lib.castellan_release, self._handle)

    def evaluate(self, document_json: str, document: Any = None) -> tuple[bool, Any]:
        """(True, the entrypoint's value or None when undefined) or (False, the error message)."""
        ok, value, _ = self.evaluate_logged(document_json)
        return ok, value

    def evaluate_logged(self, document_json: str) -> tuple[bool, Any, tuple[Any] | None]:
        """`evaluate`, and the mask: `(its value or None when undefined,)` when it was evaluated, None
        when it was not (no mask compiled, the decision undefined or failed, or the mask failed: the
        decision log then evaluates it on its own, and reports its failure)."""
        data = document_json.encode()
        reply = _reply(self._lib, self._lib.castellan_eval(self._handle, data, len(data)))
        if "error" in reply:
            return False, str(reply["error"]), None
        mask = (reply.get("mask"),) if "result" in reply and "mask_error" not in reply and self._masked else None
        return True, reply.get("result"), mask
