"""Runs inside the sandbox: a DuckDB worker for `sql.query`, one query per JSON line read from stdin.

Started as `python -I _sql_worker.py CONFIG` (JSON: memory_limit, threads, temp_directory,
max_temp_directory_size). Each query gets a fresh in-memory database with external access off,
only the granted Delta tables registered (as `__t<n>`), and its configuration locked before the
query runs. `{"op": "interrupt"}` while a query runs interrupts it. Answers are JSON lines: typed
columns and JSON-safe rows, bounded in rows and bytes, or `{"error": ...}`.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
import json
import os
import sys
import threading
import uuid
from typing import Any

import duckdb
from deltalake import DeltaTable


class _Query:
    def __init__(self, config: dict[str, Any], request: dict[str, Any], channel: Any, lock: threading.Lock) -> None:
        self.config, self.request, self.channel, self.lock = config, request, channel, lock
        self.con: Any = None
        self.interrupted = False

    def run(self) -> None:
        try:
            answer = self._execute()
        except duckdb.InterruptException:
            answer = {"error": "interrupted"}
        except duckdb.Error as exc:
            answer = {"error": str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__}
        except Exception as exc:  # a table that cannot be read, a value that cannot be converted
            answer = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        finally:
            if self.con is not None:
                self.con.close()
        with self.lock:
            self.channel.write(json.dumps(answer, separators=(",", ":")) + "\n")
            self.channel.flush()

    def _execute(self) -> dict[str, Any]:
        self.con = duckdb.connect(
            ":memory:",
            config={
                "enable_external_access": False,
                "autoload_known_extensions": False,
                "autoinstall_known_extensions": False,
                "allow_community_extensions": False,
                "allow_unsigned_extensions": False,
                **self.config,
            },
        )
        for alias, path in self.request["tables"].items():
            self.con.register(alias, DeltaTable(path).to_pyarrow_dataset())
        self.con.execute("SET lock_configuration = true")
        if self.interrupted:
            raise duckdb.InterruptException("interrupted")
        cursor = self.con.execute(self.request["sql"])
        columns = [{"name": d[0], "type": str(d[1])} for d in cursor.description or []]
        max_rows, max_bytes = int(self.request["max_rows"]), int(self.request["max_bytes"])
        rows: list[list[Any]] = []
        size, truncated = 2, False
        for row in cursor.fetchmany(max_rows + 1):
            if len(rows) == max_rows:
                truncated = True
                break
            values = [json_value(v) for v in row]
            size += len(json.dumps(values, separators=(",", ":"))) + 1
            if size > max_bytes:
                truncated = True
                break
            rows.append(values)
        return {"columns": columns, "rows": rows, "row_count": len(rows), "truncated": truncated}

    def interrupt(self) -> None:
        self.interrupted = True
        if self.con is not None:
            with contextlib.suppress(duckdb.Error):
                self.con.interrupt()


def json_value(value: Any) -> Any:
    """A DuckDB value as JSON: decimals and non-finite floats as strings, times in ISO 8601, bytes base64."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


def main(raw_config: str) -> None:
    config = json.loads(raw_config)
    import pyarrow

    pyarrow.set_io_thread_count(int(config["threads"]))
    pyarrow.set_cpu_count(int(config["threads"]))
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    lock = threading.Lock()
    channel.write('{"ready":true}\n')
    channel.flush()
    current: _Query | None = None
    worker: threading.Thread | None = None
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "interrupt":
            if current is not None and worker is not None and worker.is_alive():
                current.interrupt()
            continue
        if request.get("op") != "query":
            continue
        if worker is not None:
            worker.join()  # the gateway sends one query at a time; an interrupted one ends first
        current = _Query(config, request, channel, lock)
        worker = threading.Thread(target=current.run, daemon=True)
        worker.start()
    if worker is not None:
        worker.join()  # stdin closed: finish the query in hand, then exit


if __name__ == "__main__":
    main(sys.argv[1])
