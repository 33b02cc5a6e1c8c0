"""The OPA library's bounds: builtins whose allocation grows with argument values halt before they
allocate (an error, so a denial), and within the bounds they are OPA's own. Each case past its bound
took the process down before (Go out of memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server.errors import ConfigError
from server.policy import inprocess_opa
from server.policy.bundle import PolicyBundle
from server.settings import REPO_ROOT

pytestmark = pytest.mark.skipif(not inprocess_opa.available(), reason="the OPA library is not built (needs Go)")
COPIES = [{"op": "copy", "from": "", "path": f"/c{i}"} for i in range(30)]  # each may double the document
WIDE_INDENT = {"x": [[1]] * 2000, "i": " " * 10**5}  # the indent repeated on every line
NESTED_RANGES = "{{range .x}}" * 5 + "{{end}}" * 5  # 99^5 repetitions


def evaluate(tmp_path: Path, expression: str, document: Any) -> tuple[bool, Any]:
    (tmp_path / "p.rego").write_text(f"package p\n\nimport rego.v1\n\nr := {expression}\n")
    policy = inprocess_opa.CompiledPolicy(PolicyBundle.from_directory(tmp_path), "data.p.r")
    return policy.evaluate(json.dumps(document))


@pytest.mark.parametrize(
    ("expression", "document"),
    [
        ("count(numbers.range(0, input.n))", {"n": 10**12}),
        ("count(numbers.range(input.n, 0))", {"n": -(2**53)}),
        ("count(numbers.range_step(0, input.n, 2))", {"n": 10**9}),
        ("count(net.cidr_expand(input.c))", {"c": "::/0"}),
        ("count(net.cidr_expand(input.c))", {"c": "10.0.0.0/8"}),
        ("bits.lsh(1, input.n)", {"n": 2**40}),
        ('count(replace(input.s, "", input.s))', {"s": "x" * 5000}),
        ('count(strings.replace_n({"": input.s}, input.s))', {"s": "x" * 5000}),
        ('count(regex.replace(input.s, "", input.v))', {"s": "a" * 20000, "v": "b" * 1000}),
        ('count(regex.replace(input.s, "a", "$0$0$0"))', {"s": "a" * 4000}),
        (
            'json.patch({"a": "xxxxxxxx"}, input.p)',
            {"p": [{"op": "copy", "from": "", "path": f"/c{i}"} for i in range(30)]},
        ),
        (
            'count(strings.render_template(input.t, {"x": numbers.range(1, 99)}))',
            {"t": "{{range .x}}" * 5 + "{{end}}" * 5},
        ),
        ('regex.globs_match(input.p, "a")', {"p": "a" * 5000}),
        (
            'count(json.marshal_with_options(input.x, {"pretty": true, "indent": input.i}))',
            {"x": [[1]] * 2000, "i": " " * 10**5},
        ),
    ],
)
def test_past_a_bound_the_evaluation_halts_before_allocating(tmp_path: Path, expression: str, document: Any) -> None:
    ok, error = evaluate(tmp_path, expression, document)
    assert not ok
    assert "a bound of the embedded engine" in error


@pytest.mark.parametrize(
    ("expression", "document", "expected"),
    [
        ("count(numbers.range(0, input.n))", {"n": 99_999}, 100_000),
        ("count(net.cidr_expand(input.c))", {"c": "10.0.0.0/16"}, 65_536),
        ('count(replace(input.s, "", "y"))', {"s": "x" * 1000}, 2001),
        ('regex.replace(input.s, "b", "[$0]")', {"s": "abc"}, "a[b]c"),
        ('json.patch({"a": 1}, [{"op": "copy", "from": "/a", "path": "/b"}])', {}, {"a": 1, "b": 1}),
        ('strings.render_template("{{range .x}}{{.}},{{end}}", {"x": [1, 2]})', {}, "1,2,"),
        ('strings.count(input.s, "")', {"s": "abc"}, 4),
        ('json.marshal_with_options({"a": [1]}, {"pretty": true, "indent": "  "})', {}, '{\n  "a": [\n    1\n  ]\n}'),
        ('sprintf("%*d", [input.w, 1])', {"w": 10**9}, "%!(BADWIDTH)1"),
    ],
)
def test_within_the_bounds_the_builtins_are_opas(tmp_path: Path, expression: str, document: Any, expected: Any) -> None:
    assert evaluate(tmp_path, expression, document) == (True, expected)


def test_graph_reachable_paths_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"uses builtin graph\.reachable_paths, which the embedded engine refuses"):
        evaluate(tmp_path, "graph.reachable_paths(input.g, input.s)", {})


def test_an_evaluation_past_the_deadline_is_an_error(tmp_path: Path) -> None:
    slow = "count([x | some x in numbers.range(1, 99999); some y in numbers.range(1, 99999); x == y])"
    (tmp_path / "p.rego").write_text(f"package p\n\nimport rego.v1\n\nr := {slow}\n")
    policy = inprocess_opa.CompiledPolicy(PolicyBundle.from_directory(tmp_path), "data.p.r", timeout_seconds=0.05)
    ok, error = policy.evaluate("{}")
    assert not ok
    assert "cancel" in error.lower()


@pytest.mark.parametrize(("gogc", "expected"), [(None, 400), ("150", 150)])
def test_the_library_paces_its_collector_at_400_unless_gogc_says_otherwise(gogc: str | None, expected: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GOGC"} | ({"GOGC": gogc} if gogc else {})
    printed = subprocess.run(
        [sys.executable, "-c", "from server.policy import inprocess_opa; print(inprocess_opa.limits()['gc_percent'])"],
        env=env, capture_output=True, text=True, timeout=120, check=True, cwd=REPO_ROOT,
    ).stdout  # fmt: skip
    assert int(printed) == expected
