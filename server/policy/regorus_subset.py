"""regorus restricted to the subset of Rego proved to decide exactly as OPA: the embedded engine's
fallback where the in-process OPA library is not built (no Go toolchain).

A policy is accepted only when every builtin it calls and every construct it uses is in the verified
set below (tests/integration/test_engine_differential.py compares each against the real OPA on
adversarial values). Some builtins are exact only on plain values (printable ASCII strings and
integers within ±(2^53-1)): regorus counts strings in UTF-16 units, maps case with full Unicode
mappings and formats non-integers differently. A policy that uses one is accepted, and an input (or
data) holding anything else is denied with the reason instead of being decided inexactly.

Evaluations never raise: a Rust panic (pyo3's PanicException derives from BaseException) becomes an
error, and the engine that panicked is marked poisoned so that its owner builds a fresh one."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import regorus

from server.errors import ConfigError
from server.policy.bundle import PolicyBundle, package_of

_UNDEFINED = '"<undefined>"'

# Exact on every value (the differential suite's per-builtin cases).
EXACT_BUILTINS = frozenset(
    {
        "is_string",
        "is_number",
        "is_boolean",
        "is_array",
        "is_object",
        "is_set",
        "is_null",
        "type_name",
        "object.get",
        "object.keys",
        "startswith",
        "endswith",
        "contains",
        "concat",
        "array.concat",
    }
)
# Exact on plain values only: the policy is accepted, and inputs outside the plain domain are denied.
# sprintf only with a literal format of `%v` verbs and a literal array of as many arguments.
PLAIN_BUILTINS = frozenset({"count", "lower", "upper", "sprintf", "trim_space", "split"})
VERIFIED_BUILTINS = EXACT_BUILTINS | PLAIN_BUILTINS

# AST node kinds of regorus's parser that the differential suite covers. Not here: arithmetic
# (`+ - * / %`: regorus computes in f64/i64, OPA in arbitrary precision) and `with`.
VERIFIED_CONSTRUCTS = frozenset(
    {
        "Var",
        "RefDot",
        "RefBrack",
        "Spec",
        "Func",
        "Compr",
        "Expr",
        "NotExpr",
        "BoolExpr",
        "AssignExpr",
        "Membership",
        "SomeIn",
        "SomeVars",
        "Every",
        "Call",
        "Object",
        "Array",
        "Set",
        "ArrayCompr",
        "SetCompr",
        "ObjectCompr",
        "String",
        "RawString",
        "Number",
        "Bool",
        "Null",
    }
)
MAX_PLAIN_INTEGER = 2**53 - 1


def _clean(error: BaseException) -> str:
    """regorus errors carry a Rust backtrace after the message; keep the message."""
    return str(error).split("Stack backtrace:")[0].strip()


@dataclass(frozen=True, slots=True)
class Subset:
    """What a policy needs of regorus: which inputs it can decide exactly."""

    ascii_only: bool  # uses a builtin exact only on printable ASCII strings
    integers_only: bool  # formats numbers (sprintf %v): exact only on integers


def _nodes(node: Any) -> Iterator[tuple[str, Any]]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key[:1].isupper() or key == "with_mods":
                    yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _dotted(ref: Any) -> str | None:
    """`a.b.c` for a Var/RefDot chain; None for anything else (a computed function name)."""
    if not isinstance(ref, dict) or len(ref) != 1:
        return None
    ((kind, body),) = ref.items()
    if kind == "Var":
        return str(body["value"])
    if kind == "RefDot":
        head = _dotted(body["refr"])
        return None if head is None else f"{head}.{body['field'][1]}"
    return None


def _functions(modules: list[dict[str, Any]]) -> set[str]:
    """Full paths (data.pkg.name) of the policy's own functions."""
    found = set()
    for module in modules:
        package = package_of(module["source"]["contents"])
        for kind, body in _nodes(module["ast"]["rules"]):
            if kind == "Func":
                name = _dotted(body["refr"])
                if name:
                    found.add(f"data.{package}.{name}")
    return found


def _imports(module: dict[str, Any]) -> dict[str, str]:
    aliases = {}
    for item in module["ast"].get("imports", []):
        path = _dotted(item.get("refr"))
        if path and path.startswith("data."):
            aliases[item.get("as") or path.rsplit(".", 1)[-1]] = path
    return aliases


def _where(module: dict[str, Any], body: Any) -> str:
    line = body.get("span", {}).get("line", "?") if isinstance(body, dict) else "?"
    return f"{module['source']['file']}:{line}"


def check_subset(engine: regorus.Engine) -> Subset:
    """Raise `ConfigError` naming every builtin and construct outside the verified set (with file:line)."""
    modules: list[dict[str, Any]] = json.loads(engine.get_ast_as_json())
    own = _functions(modules)
    plain = numbers = False
    literals: list[tuple[dict[str, Any], Any]] = []
    outside: dict[str, str] = {}  # what → where it is first used

    def refuse(module: dict[str, Any], body: Any, what: str) -> None:
        where = _where(module, body)
        if what not in outside or _line_key(where) < _line_key(outside[what]):
            outside[what] = where

    for module in modules:
        package = package_of(module["source"]["contents"])
        aliases = _imports(module)
        source: str = module["source"]["contents"]
        for kind, body in _nodes(module["ast"]["rules"]):
            if kind == "with_mods":
                if body:
                    refuse(module, body[0], "the `with` keyword")
                continue
            if kind not in VERIFIED_CONSTRUCTS:
                refuse(module, body, f"the construct {kind}")
                continue
            if kind == "Number":
                text = source.encode()[body["span"]["start"] : body["span"]["end"]].decode()
                if not _exact_number(text):
                    refuse(module, body, f"the number literal {text}")
            if kind in ("String", "RawString") and isinstance(body.get("value"), str):
                literals.append((module, body))
            if kind != "Call":
                continue
            name = _dotted(body["fcn"])
            if name is None:
                refuse(module, body, "a computed function reference")
                continue
            head, _, rest = name.partition(".")
            candidates = {f"data.{package}.{name}", name}
            if head in aliases:
                candidates.add(f"{aliases[head]}.{rest}" if rest else aliases[head])
            if candidates & own:
                continue
            if name not in VERIFIED_BUILTINS:
                refuse(module, body, f"builtin {name}")
            elif name == "sprintf" and not _verified_sprintf(body["params"]):
                refuse(module, body, "sprintf other than a literal format of %v verbs with as many arguments")
            plain = plain or name in PLAIN_BUILTINS
            numbers = numbers or name == "sprintf"
    for module, body in literals if plain else []:
        if plain_problem(body["value"], "a string literal"):
            refuse(module, body, f"the string literal {body['value']!r} (not printable ASCII) with ASCII-only builtins")
    if outside:
        ordered = sorted(outside.items(), key=lambda item: _line_key(item[1]))
        uses = ", ".join(f"{what} ({where})" for what, where in ordered)
        raise ConfigError(
            f"policy uses {uses}: outside what the embedded engine can decide exactly as OPA without the "
            "in-process OPA library (regorus fallback: verified subset only; run scripts/build-opa-library, "
            "which needs Go, or decide with OPA: policy.engine = 'auto' or 'opa')"
        )
    return Subset(ascii_only=plain, integers_only=numbers)


def _verified_sprintf(params: list[Any]) -> bool:
    """regorus formats `%s` of a number, `%d` of a string, `%q`, flags, widths and a wrong number
    of arguments differently from OPA (Go's fmt); `%v` of plain values alike."""
    if len(params) != 2 or not isinstance(params[0], dict) or not isinstance(params[1], dict):
        return False
    literal = params[0].get("String") or params[0].get("RawString")
    items = params[1].get("Array", {}).get("items")
    if literal is None or items is None:
        return False
    verbs = re.findall(r"%(.?)", str(literal["value"]).replace("%%", ""))
    return all(v == "v" for v in verbs) and len(verbs) == len(items)


def _line_key(where: str) -> tuple[str, int]:
    path, _, line = where.rpartition(":")
    return path, int(line) if line.isdigit() else 0


def _exact_number(text: str) -> bool:
    """A literal that regorus (f64) and OPA (exact decimal) read as the same number."""
    try:
        value = float(text)
    except ValueError:
        return False
    if "." not in text and "e" not in text.lower():
        return abs(int(text)) <= MAX_PLAIN_INTEGER
    from decimal import Decimal

    return Decimal(value) == Decimal(text)


def plain_problem(value: Any, where: str = "input", integers: bool = True) -> str | None:
    """Why `value` is outside the plain domain: printable ASCII strings (and keys) and, with
    `integers`, integers within ±(2^53-1) as its only numbers."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii() or not item.isprintable():
                return f"{path} is not a printable ASCII string"
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if integers and abs(item) > MAX_PLAIN_INTEGER:
                return f"{path} is an integer beyond 2^53"
        elif isinstance(item, float):
            if integers:
                return f"{path} is not an integer"
        elif isinstance(item, Mapping):
            for key, inner in item.items():
                if not isinstance(key, str) or not key.isascii() or not key.isprintable():
                    return f"a key in {path} is not a printable ASCII string"
                stack.append((inner, f"{path}.{key}"))
        elif isinstance(item, list | tuple):
            stack.extend((inner, f"{path}[{i}]") for i, inner in enumerate(item))
    return None


def syntax_check(bundle: PolicyBundle) -> None:
    """Raise `ConfigError` naming the file when a module does not parse (no subset check)."""
    engine = regorus.Engine()
    problem = None
    for path, text in bundle.modules.items():
        try:
            engine.add_policy(path, text)
        except Exception as exc:
            problem = f"policy {path} does not compile: {_clean(exc)}"
            break
    del engine  # on this thread (see RegorusPolicy)
    if problem is not None:
        raise ConfigError(problem)


class RegorusPolicy:
    """One regorus engine holding a bundle, for the thread that made it (regorus engines may not
    cross threads, not even to be freed: see _thread_engines)."""

    def __init__(self, bundle: PolicyBundle, entrypoint: str) -> None:
        engine = regorus.Engine()
        problem = None
        for path, text in bundle.modules.items():
            try:
                engine.add_policy(path, text)
            except Exception as exc:  # regorus raises RuntimeError with the parser's message
                problem = f"policy {path} does not compile: {_clean(exc)}"
                break
        subset = Subset(ascii_only=False, integers_only=False)
        if problem is None:
            try:
                engine.add_data_json(json.dumps(bundle.data))
                subset = check_subset(engine)
            except ConfigError as exc:
                problem = str(exc)
            except Exception as exc:
                problem = f"policy data does not load: {_clean(exc)}"
        if problem is None and subset.ascii_only:
            data_problem = plain_problem(bundle.data, "data", subset.integers_only)
            if data_problem:
                problem = (
                    f"policy data: {data_problem}, and the policy uses builtins that regorus decides "
                    "exactly as OPA only on printable ASCII strings and integers"
                )
        if problem is not None:
            # Free the engine here, on this thread: a traceback would keep this frame (and the engine)
            # alive until garbage collection, which may run on another thread, where regorus aborts.
            del engine
            raise ConfigError(problem)
        self._engine = engine
        self._entrypoint = entrypoint
        self.subset = subset
        self.poisoned = False

    def outside_domain(self, document: Any) -> str | None:
        """Why this policy cannot decide `document` exactly as OPA (None: it can)."""
        if not self.subset.ascii_only:
            return None
        return plain_problem(document, "input", self.subset.integers_only)

    def evaluate(self, document_json: str, document: Any = None) -> tuple[bool, Any]:
        """(True, value or None when undefined) or (False, the error). Never raises."""
        if self.subset.ascii_only:
            problem = self.outside_domain(json.loads(document_json) if document is None else document)
            if problem:
                return False, f"outside the verified domain of the regorus fallback: {problem}"
        try:
            self._engine.set_input_json(document_json)
            raw = self._engine.eval_rule_as_json(self._entrypoint)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a Rust panic is a BaseException (pyo3)
            if not isinstance(exc, Exception):
                self.poisoned = True
                return False, f"panic in regorus: {_clean(exc)}"
            return False, _clean(exc)
        return True, None if raw == _UNDEFINED else json.loads(raw)
