"""`castellan audit search --source mlflow` on the local store answers from its tables, without MLflow's
client, and gives exactly the answer MLflow's own trace search gives, for every filter it takes."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.audit_search import EXPERIMENT, fill_and_ship
from server.audit.keys import ChainKey
from server.audit.mlflow_search import search_store
from server.audit.mlflow_target import MlflowTarget, local_tracking_uri
from server.audit.search import AuditQuery
from tests.gateway_process import castellan

pytestmark = [pytest.mark.integration]

QUERIES = [
    AuditQuery(agent="agent-3", decision="deny", limit=50),
    AuditQuery(agent="agent-1", limit=7, offset=3),
    AuditQuery(tool="echo", decision="allow", limit=20),
    AuditQuery(decision="deny", stage="policy", limit=10),
    AuditQuery(outcome="ok", limit=15),
    AuditQuery(reason="call 15", limit=5),
    AuditQuery(since="2000-01-01T00:00:00Z", until="2100-01-01T00:00:00Z", limit=30),
    AuditQuery(run_id="no-such-run"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ChainKey]:
    data_dir = tmp_path_factory.mktemp("search-store")
    key = ChainKey.generate()
    asyncio.run(fill_and_ship(data_dir, key, 300))
    return data_dir, key


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: ",".join(f"{k}={v}" for k, v in asdict(q).items() if v))
def test_the_tables_answer_as_mlflow_search_does(store: tuple[Path, ChainKey], query: AuditQuery) -> None:
    data_dir, _ = store
    fast = search_store(data_dir / "mlflow.db", EXPERIMENT, query)
    slow = MlflowTarget(local_tracking_uri(data_dir), EXPERIMENT).search(query)
    assert fast is not None, "the reader does not know this MLflow store's schema revision"
    assert fast == slow


def test_a_group_filter_is_refused_rather_than_ignored(store: tuple[Path, ChainKey]) -> None:
    data_dir, _ = store
    with pytest.raises(ValueError, match="group"):
        search_store(data_dir / "mlflow.db", EXPERIMENT, AuditQuery(group="analysts"))
    with pytest.raises(ValueError, match="group"):
        MlflowTarget(local_tracking_uri(data_dir), EXPERIMENT).search(AuditQuery(group="analysts"))


def test_the_cli_finds_an_agents_denials_in_the_local_store(store: tuple[Path, ChainKey]) -> None:
    data_dir, _ = store
    env = {
        **os.environ,
        "CASTELLAN_DATA_DIR": str(data_dir),
        "CASTELLAN_AUDIT__CHAIN_KEY_FILE": str(data_dir / "chain-key"),
    }
    done = castellan("audit", "search", "--source", "mlflow", "--agent", "agent-3", "--decision", "deny",
                     "--format", "jsonl", env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    expected = MlflowTarget(local_tracking_uri(data_dir), EXPERIMENT).search(
        AuditQuery(agent="agent-3", decision="deny")
    )
    assert [r["call_id"] for r in rows] == [r["call_id"] for r in expected]
    assert rows, "the store has denials of agent-3"
    assert all(r["agent_id"] == "agent-3" and r["decision"] == "deny" for r in rows)
