"""Signed checkpoints of the audit chain, kept outside the audit database: an append-only file of
lines, each saying "the chain reached record `seq` with hash `head`" and MACed with the chain key.

A rewrite of the database cannot move a checkpoint: a record at a checkpointed position that no
longer has the checkpointed hash, or a chain that ends before the last checkpoint, is reported by
`verify`. Kinds: `head` (written every few seconds of activity and at shutdown), `retained` (records
1..seq were removed by retention on purpose; the next record follows `head`), `keyed` (records
1..seq predate the chain key: they are checked by plain SHA-256, and this line seals them).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from server.audit.keys import ChainKey

Kind = Literal["head", "retained", "keyed"]
KINDS = ("head", "retained", "keyed")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    kind: str
    seq: int
    head: str
    time: float
    instance: str
    key_id: str
    mac: str = ""

    def message(self) -> bytes:
        fields = ["castellan-audit-checkpoint-v1", self.kind, self.seq, self.head, repr(self.time), self.instance]
        return json.dumps([*fields, self.key_id], separators=(",", ":")).encode()

    def signed(self, key: ChainKey) -> Checkpoint:
        unsigned = Checkpoint(self.kind, self.seq, self.head, self.time, self.instance, key.key_id)
        return Checkpoint(**{**asdict(unsigned), "mac": key.mac(unsigned.message())})

    def valid(self, key: ChainKey) -> bool:
        return self.key_id == key.key_id and self.kind in KINDS and key.mac(self.message()) == self.mac

    def line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @property
    def label(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        return f"{self.kind} checkpoint at record {self.seq} ({when})"


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A line of the checkpoint file that is not a checkpoint (edited, or cut by a crash mid-write)."""

    line: int
    text: str


def parse(text: str) -> tuple[list[Checkpoint], list[Unreadable]]:
    found: list[Checkpoint] = []
    bad: list[Unreadable] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            found.append(
                Checkpoint(
                    str(doc["kind"]),
                    int(doc["seq"]),
                    str(doc["head"]),
                    float(doc["time"]),
                    str(doc["instance"]),
                    str(doc["key_id"]),
                    str(doc["mac"]),
                )
            )
        except (ValueError, KeyError, TypeError):
            bad.append(Unreadable(number, line[:120]))
    return found, bad


class CheckpointLog:
    """Appends signed checkpoints to a file (`O_APPEND`, fsynced per line) and reads them back."""

    def __init__(self, path: Path, key: ChainKey) -> None:
        self.path = path
        self._key = key
        self._lock = threading.Lock()

    def append(self, kind: Kind, seq: int, head: str, instance: str) -> Checkpoint:
        """Blocking (an fsync): call it from a worker thread. Raises `OSError` when it cannot write."""
        checkpoint = Checkpoint(kind, seq, head, time.time(), instance, self._key.key_id).signed(self._key)
        data = (checkpoint.line() + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        return checkpoint

    def read(self) -> tuple[list[Checkpoint], list[Unreadable]]:
        try:
            return parse(self.path.read_text(errors="replace"))
        except FileNotFoundError:
            return [], []
