"""A search index that follows a Delta table of documents, incrementally.

The first sync reads the whole table; later syncs read only the changes between the indexed version
and the latest one from the table's change data feed (`delta.enableChangeDataFeed`): inserts and
update post-images are (re)indexed, deletes and pre-images removed. A table without the feed, or one
rewritten under the index (its version went back), is rebuilt in full, and the rebuild is counted.

Full text: SQLite FTS5 with BM25 ranking. Vectors: one embedding per document, cosine similarity.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from tools.embeddings import Embedder
from tools.tables import TableCatalog

log = structlog.get_logger("castellan.tools.docs")

_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(doc_id UNINDEXED, title, body, tokenize = 'porter unicode61');
CREATE TABLE IF NOT EXISTS vectors (doc_id TEXT PRIMARY KEY, vector TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Hit:
    doc_id: str
    title: str
    snippet: str
    score: float


@dataclass
class SyncStats:
    version: int | None = None
    full_rebuilds: int = 0
    incremental_syncs: int = 0
    upserted: int = 0
    deleted: int = 0


class DocIndex:
    def __init__(
        self,
        tables: TableCatalog,
        table: str,
        path: Path,
        id_column: str = "doc_id",
        title_column: str = "title",
        body_column: str = "body",
        embedder: Embedder | None = None,
    ) -> None:
        self._tables = tables
        self.table = table
        self._columns = (id_column, title_column, body_column)
        self._embedder = embedder
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.stats = SyncStats(version=self._state("version"))

    def _state(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else None

    def sync(self) -> SyncStats:
        """Brings the index to the table's latest version (blocking; call from a worker thread)."""
        with self._lock:
            delta = self._tables.open(self.table)
            latest = int(delta.version())
            indexed = self.stats.version
            if indexed == latest:
                return self.stats
            if indexed is None or latest < indexed:
                self._rebuild(delta, latest)
                return self.stats
            try:
                import pyarrow as pa

                changes = pa.table(delta.load_cdf(starting_version=indexed + 1, ending_version=latest).read_all())
            except Exception as exc:  # no change data feed for that range: rebuild
                log.warning("doc_index_rebuild", table=self.table, reason=str(exc)[:200])
                self._rebuild(delta, latest)
                return self.stats
            self._apply_changes(changes.to_pylist(), latest)
            return self.stats

    def _rebuild(self, delta: Any, version: int) -> None:
        rows = delta.to_pyarrow_table(columns=list(self._columns)).to_pylist()
        self._db.execute("BEGIN")
        self._db.execute("DELETE FROM docs")
        self._db.execute("DELETE FROM vectors")
        self._upsert(rows)
        self._set_version(version)
        self._db.execute("COMMIT")
        self.stats.full_rebuilds += 1
        self.stats.upserted += len(rows)
        self.stats.version = version
        log.info("doc_index_built", table=self.table, version=version, documents=len(rows))

    def _apply_changes(self, changes: list[dict[str, Any]], version: int) -> None:
        # In commit order; within a commit, removals (deletes, pre-images) before additions.
        order = {"delete": 0, "update_preimage": 0, "insert": 1, "update_postimage": 1}
        changes.sort(key=lambda c: (c["_commit_version"], order.get(c["_change_type"], 2)))
        id_column = self._columns[0]
        self._db.execute("BEGIN")
        removed = added = 0
        for change in changes:
            kind = change["_change_type"]
            if kind in ("delete", "update_preimage"):
                self._remove(str(change[id_column]))
                removed += 1
            elif kind in ("insert", "update_postimage"):
                self._upsert([change])
                added += 1
        self._set_version(version)
        self._db.execute("COMMIT")
        self.stats.incremental_syncs += 1
        self.stats.upserted += added
        self.stats.deleted += removed
        self.stats.version = version
        log.info("doc_index_synced", table=self.table, version=version, upserted=added, deleted=removed)

    def _remove(self, doc_id: str) -> None:
        self._db.execute("DELETE FROM docs WHERE doc_id = ?", (doc_id,))
        self._db.execute("DELETE FROM vectors WHERE doc_id = ?", (doc_id,))

    def _upsert(self, rows: Sequence[dict[str, Any]]) -> None:
        id_column, title_column, body_column = self._columns
        for row in rows:
            self._remove(str(row[id_column]))
            self._db.execute(
                "INSERT INTO docs (doc_id, title, body) VALUES (?, ?, ?)",
                (str(row[id_column]), str(row.get(title_column) or ""), str(row.get(body_column) or "")),
            )
        if self._embedder is not None and rows:
            texts = [f"{r.get(title_column) or ''}\n{r.get(body_column) or ''}" for r in rows]
            for row, vector in zip(rows, self._embedder.embed(texts), strict=True):
                self._db.execute(
                    "INSERT OR REPLACE INTO vectors VALUES (?, ?)", (str(row[id_column]), json.dumps(vector))
                )

    def _set_version(self, version: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO state VALUES ('version', ?)", (str(version),))

    def document(self, doc_id: str) -> tuple[str, str] | None:
        """The indexed document `doc_id`: its title and body, or None."""
        with self._lock:
            row = self._db.execute("SELECT title, body FROM docs WHERE doc_id = ?", (doc_id,)).fetchone()
        return (str(row[0]), str(row[1])) if row is not None else None

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0])

    def search_text(self, query: str, limit: int) -> list[Hit]:
        terms = [t for t in "".join(c if c.isalnum() else " " for c in query).split() if t]
        if not terms:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        with self._lock:
            rows = self._db.execute(
                "SELECT doc_id, title, snippet(docs, 2, '[', ']', '…', 16), bm25(docs, 0.0, 2.0, 1.0) AS rank "
                "FROM docs WHERE docs MATCH ? ORDER BY rank LIMIT ?",
                (match, limit),
            ).fetchall()
        return [Hit(r[0], r[1], r[2], round(-float(r[3]), 4)) for r in rows]

    def search_vector(self, query: str, limit: int) -> list[Hit]:
        if self._embedder is None:
            raise RuntimeError("vector search needs an embedder")
        (target,) = self._embedder.embed([query])
        with self._lock:
            rows = self._db.execute(
                "SELECT v.doc_id, d.title, substr(d.body, 1, 200), v.vector FROM vectors v "
                "JOIN docs d ON d.doc_id = v.doc_id"
            ).fetchall()
        scored = [(_cosine(target, json.loads(r[3])), r) for r in rows]
        scored.sort(key=lambda s: s[0], reverse=True)
        return [Hit(r[0], r[1], r[2], round(score, 4)) for score, r in scored[:limit]]

    def close(self) -> None:
        self._db.close()


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
