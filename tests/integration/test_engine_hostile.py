"""Hostile arguments to builtins that panic or allocate without bound, through a running gateway:
every call is denied with a reason and audited, the process stays up, and the next legitimate call
is allowed. (In regorus, `strings.count(s, "")` raised a BaseException panic that escaped the
pipeline, and `numbers.range`, `net.cidr_expand` or a huge `sprintf` width aborted the process.)"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from server.policy import inprocess_opa
from server.settings import REPO_ROOT
from tests.gateway_process import GatewayProcess, run_gateway
from tests.integration.conftest import deny_body, raw_call

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

HOSTILE = [
    "count:" + "x" * 150,
    "range:1000000000000",
    "range:1e400",
    "range:-9007199254740991",
    "step:100000000000",
    "cidr:0.0.0.0/0",
    "cidr:::/0",
    "cidr:::ffff:0.0.0.0/96",
    "width:1000000000",
    "width:999999",
    "shift:1099511627776",
    "replace:" + "y" * 150,
    "template:" + "{{range .x}}" * 5 + "x" + "{{end}}" * 5,  # 99^5 x's: took the process down (Go OOM)
    "template:{{range .x}}{{.}}{{end}}",
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def decisions(gw: GatewayProcess) -> list[dict[str, Any]]:
    with sqlite3.connect(gw.data_dir / "audit.db") as db:
        return [json.loads(r[0]) for r in db.execute("SELECT record FROM outbox WHERE kind = 'decision' ORDER BY seq")]


async def test_hostile_builtin_arguments_are_denied_audited_and_survived(tmp_path: Path) -> None:
    if not inprocess_opa.available():
        pytest.fail("the OPA library is not built: run scripts/build-opa-library (needs Go)")
    policies = tmp_path / "policies"
    shutil.copytree(REPO_ROOT / "policies", policies)
    shutil.copy(Path(__file__).parent / "policies" / "hostile" / "hostile.rego", policies / "castellan")
    env = {"CASTELLAN_POLICY__ENGINE": "embedded", "CASTELLAN_POLICY__PATH": str(policies)}
    with run_gateway(tmp_path / "gw", env) as gw:
        assert '"evaluator": "opa-library"' in gw.log()
        token = gw.token("hostile-bot", ["analysts"])
        assert (await raw_call(gw, token, "echo", {"text": "hello"}))["isError"] is False
        denied: dict[str, list[str]] = {}
        for text in HOSTILE:
            body = deny_body(await raw_call(gw, token, "echo", {"text": text}))
            assert body["stage"] == "policy", (text, body)
            assert body["reasons"], (text, body)
            denied[text] = list(body["reasons"])
            assert gw.process.poll() is None, f"the gateway died on {text!r}"
            after = await raw_call(gw, token, "echo", {"text": "still here"})
            assert after["isError"] is False, (text, after)
        # Within OPA's own behaviour the policy's reasons; past a bound, the evaluation fails (deny).
        assert denied["count:" + "x" * 150] == ["count=151"]
        assert denied["width:999999"] == ["width=999999"]
        assert denied["width:1000000000"] == ["width=13"]  # Go's fmt refuses widths over 1e6: %!(BADWIDTH)1
        assert denied["template:{{range .x}}{{.}}{{end}}"] == ["template=189"]
        bounded = ["range:1000000000000", "range:1e400", "step:100000000000", "cidr:0.0.0.0/0", "cidr:::/0"]
        for text in [*bounded, "shift:1099511627776", "template:" + "{{range .x}}" * 5 + "x" + "{{end}}" * 5]:
            assert denied[text] == ["policy evaluation failed"], text
        assert "a bound of the embedded engine" in gw.log()
        records = decisions(gw)
    # Stopped by SIGTERM (Python's handler, with Go's runtime in the process): a clean exit, no kill.
    assert gw.process.returncode in (0, -signal.SIGTERM), gw.log()[-2000:]
    audited = {r["arguments"]["text"]: r for r in records if r.get("arguments", {}).get("text") in denied}
    assert set(audited) == set(denied), "a denied call has no audit record"
    assert all(r["decision"] == "deny" and r["reasons"] == denied[t] for t, r in audited.items())


async def test_without_the_library_the_gateway_says_so_and_denies_what_regorus_cannot_decide(tmp_path: Path) -> None:
    """The regorus fallback: named in the start-up log as a warning, the shipped policy served, an
    ASCII call decided as OPA decides it, a non-ASCII one denied with a reason and audited."""
    env = {"CASTELLAN_POLICY__ENGINE": "embedded", "CASTELLAN_OPA_LIBRARY": ""}
    with run_gateway(tmp_path / "gw", env) as gw:
        log = gw.log()
        assert '"evaluator": "regorus"' in log
        assert "verified subset only" in log
        token = gw.token("fallback-bot", ["analysts"])
        assert (await raw_call(gw, token, "echo", {"text": "hello"}))["isError"] is False
        body = deny_body(await raw_call(gw, token, "echo", {"text": "ADMİN"}))
        assert body["reasons"] == ["policy evaluation failed"]
        assert "outside the verified domain of the regorus fallback" in gw.log()
        assert (await raw_call(gw, token, "echo", {"text": "hello again"}))["isError"] is False
        records = decisions(gw)
    assert [r["decision"] for r in records if r.get("arguments", {}).get("text") == "ADMİN"] == ["deny"]
