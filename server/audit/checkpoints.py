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

    def read_new(self, position: tuple[int, int]) -> tuple[list[Checkpoint], tuple[int, int]]:
        """The checkpoints appended since `position` (inode, offset; `(0, 0)` for all), and the new
        position. A file that was compacted (another inode, or shorter) is read again from the start."""
        try:
            with self.path.open("rb") as fh:
                stat = os.fstat(fh.fileno())
                inode, offset = position
                if inode != stat.st_ino or offset > stat.st_size:
                    offset = 0
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return [], (0, 0)
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next read
        found, _ = parse(complete.decode(errors="replace"))
        return found, (stat.st_ino, offset + len(complete))

    def compact(self, retained_through: int, thin_after_seconds: float = 86_400, thin_to_seconds: float = 3_600) -> int:
        """Rewrites the file (atomically) without what retention made moot: valid checkpoints at or
        below the latest `retained` one (that one is kept), and valid head checkpoints older than
        `thin_after_seconds` thinned to one per `thin_to_seconds`. Anything that is not a valid
        checkpoint is kept as it is (evidence). Returns how many lines it dropped. Call it from the
        thread that appends (the outbox's database thread)."""
        with self._lock:
            try:
                lines = self.path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                return 0
            kept: list[str] = []
            cutoff, last_head, retained_kept = time.time() - thin_after_seconds, 0.0, False
            for line in reversed(lines):  # newest first: the latest `retained` line is the one kept
                if not line.strip():
                    continue
                found, _ = parse(line)
                cp = found[0] if found else None
                if cp is None or not cp.valid(self._key):
                    kept.append(line)
                elif cp.kind == "retained" and cp.seq == retained_through and not retained_kept:
                    kept.append(line)
                    retained_kept = True
                elif cp.seq <= retained_through or (
                    cp.kind == "head" and cp.time < cutoff and last_head and last_head - cp.time < thin_to_seconds
                ):
                    continue
                else:
                    kept.append(line)
                    if cp.kind == "head" and cp.time < cutoff:
                        last_head = cp.time
            dropped = len(lines) - len(kept)
            if not dropped:
                return 0
            temporary = self.path.with_suffix(".compacting")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, "".join(line + "\n" for line in reversed(kept)).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
            return dropped
