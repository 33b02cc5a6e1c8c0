"""After a real gateway has served calls full of secrets, no file under its data directory holds one:
the outbox, the decision log, its JSON log, the MLflow store it shipped to, and the exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.gateway_process import run_gateway
from tests.integration.conftest import raw_call, run_cli
from tests.integration.test_audit_shipping import metric, until
from tests.secret_shapes import SEED, SHAPES, leaks, secret_field

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


@pytest.mark.timeout(600)
async def test_no_file_the_gateway_writes_holds_a_secret(tmp_path: Path) -> None:
    data = tmp_path / "data"
    secrets = [shape() for shape in SHAPES for _ in range(2)]
    fields = [secret_field() for _ in secrets]
    env = {
        "CASTELLAN_AUDIT__SHIP": "true",
        "CASTELLAN_AUDIT__SHIP_INTERVAL_SECONDS": "0.2",
        "CASTELLAN_METERING__LIMITS__CALLS_PER_MINUTE": "0",
        "CASTELLAN_METERING__LIMITS__MAX_RUN_CALLS": "0",
        "CASTELLAN_METERING__LIMITS__MAX_REPEATS": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    with run_gateway(data, env, timeout=90) as gw:
        token = gw.token("bot", ["analysts"])
        outcomes = []
        for secret, (field, value) in zip(secrets, fields, strict=True):
            for tool, args in [
                ("echo", {"text": secret.text}),  # allowed: arguments and result
                ("echo", {"text": f"DROP TABLE users; {secret.text}"}),  # denied by policy
                ("echo", {"text": secret.text, field: value}),  # refused: unexpected argument
                ("echo", {"text": [secret.text]}),  # refused: the reason quotes the value
                (" ".join(secret.text.split()), {"q": secret.text}),  # refused: an unknown tool named so
            ]:
                result = await raw_call(gw, token, tool, args)
                outcomes.append(result.get("isError", False))
        calls = len(outcomes)
        assert outcomes.count(False) >= len(secrets) - 2, "the echo calls should be allowed (private keys are too long)"

        async def shipped() -> bool:
            return await metric(gw, "castellan_audit_shipped_calls") >= calls

        await until(shipped, 300)
        assert await metric(gw, "castellan_audit_shipped_calls") >= calls
        for fmt in ("csv", "jsonl", "parquet"):
            done = run_cli(gw, "audit", "search", "--limit", "1000", "--format", fmt, "-o", str(data / f"x.{fmt}"))
            assert done.returncode == 0, done.stderr
        exported = [json.loads(line) for line in (data / "x.jsonl").read_text().splitlines()]
        assert len(exported) == calls

    written = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert any(p.name == "decisions.jsonl" for p in written)
    assert any(p.name == "audit.db" for p in written)
    assert any("mlflow" in p.name for p in written), sorted(p.name for p in written)
    found = {
        str(p.relative_to(data)): hits
        for p, b in written.items()
        if (hits := leaks(b, secrets, tuple(v for _, v in fields)))
    }
    assert not found, f"seed {SEED}: {found}"
