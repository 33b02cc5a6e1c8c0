"""Several connections opening one new SQLite file at the same moment all get a WAL database.

Two approval queues, a gateway and a CLI, or a gateway and its shipper may open a fresh file together;
SQLite refuses the journal-mode switch at once ("database is locked") to all but one of them. That was
seen as a failed approvals test under load.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from server.sqlite import enable_wal

SCHEMA = "CREATE TABLE IF NOT EXISTS t (a INTEGER PRIMARY KEY, b TEXT); CREATE INDEX IF NOT EXISTS tb ON t (b);"


def test_racing_openers_of_a_new_file_all_succeed(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def open_(path: Path, ready: threading.Barrier) -> None:
        ready.wait()
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
            enable_wal(conn)
            conn.executescript(SCHEMA)
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            conn.close()
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)

    for i in range(200):
        path = tmp_path / f"race-{i}.db"
        ready = threading.Barrier(3)
        threads = [threading.Thread(target=open_, args=(path, ready)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
