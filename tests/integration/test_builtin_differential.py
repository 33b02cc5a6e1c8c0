"""Builtin by builtin, the embedded engine against the real OPA (`opa run --server`, queried as the
gateway queries it: strict builtin errors, JSON over REST): every builtin OPA v1.22.2 declares, on
adversarial argument tuples (Unicode case and digit classes, İ/ß, confusables, combining marks,
emoji, lone surrogates, numbers at 2^53 and at the edge of float precision, IPv6 forms including
IPv4-mapped, base64 and JSON edge cases, wrong types), comparing value, undefined and error exactly.

- The OPA library must agree on every tuple (it is OPA's evaluator; this proves the binding: JSON in
  and out, numbers, strictness, data), except where a bound of the embedded engine refuses.
- regorus (the fallback) must agree on every tuple for each builtin of its verified set; for the
  builtins exact only on plain values, on every plain tuple, and must deny the others.

Several thousand pairs per run. `CASTELLAN_DIFF_SEED` picks other tuples (the default is fixed)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.errors import ConfigError
from server.policy import inprocess_opa
from server.policy.bundle import PolicyBundle
from server.policy.regorus_subset import EXACT_BUILTINS, PLAIN_BUILTINS, RegorusPolicy
from tests.opa import opa_binary, run_opa

# ~60 s per test on 2 quiet cores; several times that when the machine is loaded.
pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(600)]
SEED = os.environ.get("CASTELLAN_DIFF_SEED", "castellan-1")
TUPLES_PER_BUILTIN = 24

# Not compared: output that differs from run to run (time, randomness, signatures with a nonce),
# printing, unification, builtins that need the compiler's context, and OPA's internals.
NOT_COMPARED = {
    "time.now_ns",
    "rand.intn",
    "uuid.rfc4122",
    "io.jwt.encode_sign",
    "io.jwt.encode_sign_raw",
    "io.jwt.decode_verify",
    "print",
    "trace",
    "eq",
    "assign",
    "walk",
    "rego.metadata.chain",
    "rego.metadata.rule",
}

STRINGS: list[str] = [
    "",
    " ",
    "a",
    "abc",
    "ABC",
    "Abc Def",
    "a,b,,c",
    "  padded  ",
    "\t\n",
    "drop table",
    "DROP TABLE",
    "İ",
    "\u0131",
    "ß",
    "ẞ",
    "ǅ",
    "ﬀ",
    "Σς",
    "K",  # KELVIN SIGN
    "\uff21\uff22\uff23",  # full-width
    "\u0430dmin",  # Cyrillic a
    "ADMİN",
    "é",
    "e\u0301",
    "😀",
    "👩\u200d👩\u200d👧",
    "\u200b",
    "\u202eevil",
    "a\x00b",
    "\x1f",
    "\ud800",  # lone surrogate
    "١٢٣",  # Arabic-Indic digits
    "\uff11\uff12\uff13",  # full-width digits
    "²",
    "Ⅻ",
    "0",
    "1",
    "-5",
    "+5",
    ".5",
    "5.",
    "1_000",
    "1e3",
    "0x10",
    "NaN",
    "Inf",
    "9007199254740993",
    "0.1",
    "1KB",
    "1KiB",
    "1.5Gi",
    "10mb",
    "1x",
    "-1K",
    "10.0.0.1",
    "10.0.0.0/8",
    "192.168.1.0/24",
    "::ffff:10.0.0.1",
    "::ffff:10.0.0.0/104",
    "2001:db8::/32",
    "2001:DB8::1",
    "fe80::1%eth0",
    "0.0.0.0/0",
    "1.0.0",
    "v1.0.0",
    "1.2.3-rc.1+build.5",
    "01.2.3",
    "2026-11-23T12:00:00Z",
    "2026-11-23T12:00:00.123456789+05:30",
    "2026-11-23T12:00:00+25:00",
    "2026-02-30T00:00:00Z",
    "1h30m",
    "-1.5h",
    "YWJj",
    "YWJj=",
    "YW Jj",
    "YWJ",
    "_-8",
    "e30",
    "{}",
    "[1,2",
    '{"a":1}',
    '{"a":1,"a":2}',
    '"\\ud800"',
    "null",
    "1e400",
    "a%26b&c=d+e%20f",
    "%zz",
    "a=1&a=2&b",
    "http://user@example.com:8080/p?q=1#f",
    "*.example.com",
    "a.b.c",
    "[a-z]+",
    "^\\w+$",
    "^\\d+$",
    "\\bfoo\\b",
    "\\s+",
    "(?i)straße",
    "(a",
    "/a/b",
    "%s-%d",
    "%v",
    "%q",
    "%x",
    "%5.2f",
    "a:b:c",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
]
NUMBERS: list[Any] = [
    0,
    1,
    -1,
    2,
    3,
    7,
    10,
    100,
    255,
    65536,
    0.5,
    1.5,
    2.5,
    -2.5,
    0.1,
    0.2,
    0.30000000000000004,
    3.14159,
    1e-7,
    1e21,
    1e308,
    5e-324,
    -0.0,
    2**31,
    2**53 - 1,
    2**53,
    2**53 + 1,
    -(2**53),
    2**63,
    2**64 + 1,
    123456789.123,
]
SCALARS: list[Any] = [None, True, False]
ARRAYS: list[Any] = [
    [],
    [1, 2, 3],
    [3, 1, 2],
    ["b", "a", "B"],
    [3, "a", None, True, 1.5],
    ["a", "a"],
    [[1, 2], [3]],
    ["İ", "i", "I"],
    [0.1, 0.2],
    [2**53, 2**53 + 1],
    [{"op": "add", "path": "/a", "value": 1}],
    [{"op": "remove", "path": "/x"}],
    ["10.0.0.0/8", "10.1.0.0/16"],
    ["a", "b/c"],
]
OBJECTS: list[Any] = [
    {},
    {"a": 1},
    {"a": 1, "b": [2]},
    {"z": {"y": [1, {"x": None}]}},
    {"a": {"b": "c"}},
    {"İ": 1, "i": 2},
    {"a": "1", "b": "2"},
    {"": ""},
    {"1": 1, "2": 2},
]
POOLS: dict[str, list[Any]] = {
    "string": STRINGS,
    "number": NUMBERS,
    "boolean": [True, False],
    "null": [None],
    "array": ARRAYS,
    "set": ARRAYS,
    "object": OBJECTS,
}
ANY = STRINGS + NUMBERS + SCALARS + ARRAYS + OBJECTS

# The inputs on which regorus used to decide differently from OPA, by builtin (the issue's
# fail-open classes): each must now agree, or regorus must refuse the builtin at load.
PINNED: dict[str, list[list[Any]]] = {
    "regex.match": [["^\\w+$", "é"], ["^\\d+$", "١٢٣"], ["\\s", "\u00a0"], ["\\bé", "é"]],
    "lower": [["İ"], ["ẞ"], ["ǅ"], ["K"], ["ADMİN"]],
    "upper": [["ß"], ["ﬀ"], ["\u0131"], ["ǅ"]],
    "count": [["😀"], ["👩\u200d👩\u200d👧"], ["e\u0301"], ["ADMİN"]],
    "net.cidr_contains": [["10.0.0.0/8", "::ffff:10.0.0.1"], ["::ffff:10.0.0.0/104", "10.0.0.1"]],
    "units.parse_bytes": [["1x"], ["-1K"], [""]],
    "array.slice": [[[1, 2, 3], 2, 1], [[1, 2, 3], "a", 1], [[1, 2, 3], 0.5, 2]],
    "json.patch": [[{"a": 1}, [{"op": "nope", "path": "/a"}]], [{"a": 1}, [{"op": "remove", "path": "/b"}]]],
    "time.add_date": [[0, 100000000, 0, 0], [0, "a", 0, 0]],
    "base64.decode": [["YW Jj"], ["YWJ"], ["YWJj="]],
    "base64.is_valid": [["YW Jj"], ["YWJ"]],
    "json.is_valid": [['{"a":1,"a":2}'], ['"\\ud800"'], ["1e400"]],
    "urlquery.decode": [["a%26b&c"], ["%zz"], ["a+b"]],
    "semver.compare": [["1.0.0", "v1.0.0"], ["01.2.3", "1.2.3"]],
    "semver.is_valid": [["v1.0.0"], ["01.2.3"], ["1.2.3-rc.1+build.5"]],
    "time.parse_rfc3339_ns": [["2026-11-23T12:00:00+25:00"], ["2026-02-30T00:00:00Z"]],
    "plus": [[0.1, 0.2], [2**53, 1]],
    "to_number": [["+5"], [".5"], ["1_000"], [" 5"]],
    "sprintf": [["%v", [1234567.5]], ["%v", [["\x1f"]]], ["%d", [1.5]], ["%s", ["İ"]]],
    "strings.count": [["abc", ""]],
    "crypto.sha256": [["abc"]],
    "io.jwt.decode": [["eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"]],
}


@dataclass(frozen=True)
class Builtin:
    name: str
    params: tuple[Any, ...]
    fmt: str = ""  # sprintf as regorus accepts it: this literal format, a literal array of arguments

    @property
    def package(self) -> str:
        suffix = f"_{SPRINTF_FORMATS.index(self.fmt)}" if self.fmt else ""
        return "b." + self.name.replace(".", "_") + suffix

    def module(self) -> str:
        args = []
        for i, param in enumerate(self.params):
            args.append(f"s(input.a{i})" if _types(param) == {"set"} else f"input.a{i}")
        if self.fmt:
            call = f"sprintf({json.dumps(self.fmt)}, [{', '.join(args)}])"
            return f"package {self.package}\n\nimport rego.v1\n\nr := [y | y := {call}]\n"
        return (
            f"package {self.package}\n\nimport rego.v1\n\n"
            "s(x) := {y | some y in x} if is_array(x)\n\n"
            "s(x) := x if not is_array(x)\n\n"
            f"r := [y | y := {self.name}({', '.join(args)})]\n"
        )

    def bundle(self) -> PolicyBundle:
        return PolicyBundle(root=Path("."), modules={f"{self.package}.rego": self.module()}, tests={}, data={})


SPRINTF_FORMATS = ["%v", "a=%v, b=%v", "100%% %v"]


def _types(param: Any) -> set[str]:
    if param.get("type") == "any" and param.get("of"):
        return set().union(*(_types(p) for p in param["of"]))
    return {param.get("type", "any")}


def capabilities() -> list[Builtin]:
    done = subprocess.run([opa_binary(), "capabilities", "--current"], capture_output=True, text=True, check=True)
    found = []
    for item in json.loads(done.stdout)["builtins"]:
        name = item["name"]
        if name in NOT_COMPARED or name.startswith("internal.") or "decl" not in item:
            continue
        found.append(Builtin(name, tuple(item["decl"].get("args", []))))
    return found


def tuples(builtin: Builtin) -> list[list[Any]]:
    rng = random.Random(f"{SEED}:{builtin.name}")
    out = [list(t) for t in PINNED.get(builtin.name, [])]
    for _ in range(TUPLES_PER_BUILTIN):
        row = []
        for param in builtin.params:
            types = sorted(_types(param) & set(POOLS))
            pool = ANY if not types or rng.random() < 0.15 else POOLS[rng.choice(types)]
            row.append(rng.choice(pool))
        out.append(row)
    return out


def document(row: list[Any]) -> dict[str, Any]:
    return {f"a{i}": value for i, value in enumerate(row)}


Outcome = tuple[str, str]


def outcome(ok: bool, value: Any) -> Outcome:
    if not ok:
        return ("error", "")
    if value is None:
        return ("undefined", "")
    return ("value", json.dumps(value, sort_keys=True))


class Opa:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url, self.session = url, session
        self.limit = asyncio.Semaphore(8)

    async def push(self, builtin: Builtin) -> bool:
        async with self.session.put(f"{self.url}/v1/policies/{builtin.package}", data=builtin.module()) as resp:
            return resp.status == 200

    async def decide(self, builtin: Builtin, doc: dict[str, Any]) -> Outcome:
        path = builtin.package.replace(".", "/")
        async with (
            self.limit,
            self.session.post(
                f"{self.url}/v1/data/{path}/r?strict-builtin-errors=true", data=json.dumps({"input": doc})
            ) as resp,
        ):
            body = json.loads(await resp.text())
        if resp.status != 200:
            return ("error", "")
        return outcome(True, body.get("result"))


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def opa_url() -> Iterator[str]:
    with run_opa() as opa:
        yield opa.url


@pytest.fixture(scope="module")
async def opa(opa_url: str) -> AsyncIterator[Opa]:
    async with aiohttp.ClientSession() as session:
        yield Opa(opa_url, session)


@pytest.fixture(scope="module")
def builtins() -> Iterator[list[Builtin]]:
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # bits.lsh within its bound makes integers of 20,000 digits
    yield capabilities()
    sys.set_int_max_str_digits(limit)


def _has_surrogate(value: Any) -> bool:
    return "\\ud8" in json.dumps(value) or "\\udc" in json.dumps(value)


async def test_the_opa_library_decides_every_builtin_as_opa(opa: Opa, builtins: list[Builtin]) -> None:
    if not inprocess_opa.available():
        pytest.fail("the OPA library is not built: run scripts/build-opa-library (needs Go)")
    refused = set(inprocess_opa.limits()["refused"])
    bounded = set(inprocess_opa.limits()["bounds"])
    pairs, disagreements = 0, []
    for builtin in builtins:
        if not await opa.push(builtin):  # deprecated in Rego v1 (all, any, cast_*, re_match, ...)
            with pytest.raises(ConfigError, match="does not compile"):
                inprocess_opa.CompiledPolicy(builtin.bundle(), f"data.{builtin.package}.r")
            continue
        if builtin.name in refused:
            with pytest.raises(ConfigError, match=rf"uses builtin {builtin.name}, which the embedded engine refuses"):
                inprocess_opa.CompiledPolicy(builtin.bundle(), f"data.{builtin.package}.r")
            continue
        compiled = inprocess_opa.CompiledPolicy(builtin.bundle(), f"data.{builtin.package}.r")
        rows, mine = [], []
        for row in tuples(builtin):
            ok, value = compiled.evaluate(json.dumps(document(row)))
            if builtin.name in bounded and not ok and "a bound of the embedded engine" in value:
                continue  # past a bound: the reference OPA would allocate until it dies
            rows.append(row)
            mine.append(outcome(ok, value))
        references = await asyncio.gather(*(opa.decide(builtin, document(row)) for row in rows))
        pairs += len(rows)
        for row, result, reference in zip(rows, mine, references, strict=True):
            if result != reference:
                disagreements.append((builtin.name, row, result, reference))
    print(f"\nOPA library vs OPA: {pairs} pairs over {len(builtins)} builtins")
    assert pairs >= 4000
    assert disagreements == [], "\n".join(map(repr, disagreements[:40]))


async def test_regorus_decides_its_verified_builtins_as_opa(opa: Opa, builtins: list[Builtin]) -> None:
    by_name = {b.name: b for b in builtins}
    verified = EXACT_BUILTINS | PLAIN_BUILTINS
    assert verified <= set(by_name), "a verified builtin is not an OPA builtin"
    pairs, disagreements = 0, []
    cases = [(by_name[name], tuples(by_name[name])) for name in sorted(verified - {"sprintf"})]
    for fmt in SPRINTF_FORMATS:
        sprintf = Builtin("sprintf", tuple({"type": "any"} for _ in range(fmt.count("%v"))), fmt)
        cases.append((sprintf, [[v] * fmt.count("%v") for v in ANY]))
    for builtin, rows in cases:
        name = builtin.name
        assert await opa.push(builtin), name
        policy = RegorusPolicy(builtin.bundle(), f"data.{builtin.package}.r")
        rows += [[v] * len(builtin.params) for v in STRINGS]  # every string in every slot
        references = await asyncio.gather(*(opa.decide(builtin, document(row)) for row in rows))
        for row, reference in zip(rows, references, strict=True):
            doc = document(row)
            ok, value = policy.evaluate(json.dumps(doc))
            pairs += 1
            mine = outcome(ok, value)
            if policy.outside_domain(doc) is not None:
                if mine != ("error", ""):
                    disagreements.append((name, row, mine, "outside the plain domain: must deny"))
                continue
            if _has_surrogate(doc) and mine == ("error", ""):
                continue  # regorus refuses JSON with a lone surrogate escape: a denial (fail-closed)
            if mine != reference:
                disagreements.append((name, row, mine, reference))
    print(f"\nregorus (verified subset) vs OPA: {pairs} pairs over {len(verified)} builtins")
    assert pairs >= 1500
    assert disagreements == [], "\n".join(map(repr, disagreements[:40]))
