"""The audit hash chain: each record's MAC (HMAC-SHA256 with the chain key, kept outside the database)
covers its position, content, the instance that wrote it and the previous record's MAC; signed
checkpoints of the head are kept outside the database. `verify` recomputes the chain, checks it
against the checkpoints, and says at which position it was edited, deleted, cut off, rewritten and
rehashed, or renumbered.

Records written before the chain was keyed (`key_id` NULL) carry a plain SHA-256 chain: they verify
as before, and the `keyed` checkpoint written when the key was first used seals them.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _quote

from server.audit.checkpoints import Checkpoint, Unreadable
from server.audit.keys import ChainKey

GENESIS = "0" * 64
# How far `verify` looks for the position a renumbered record was written at.
_RENUMBER_SEARCH = 1024


def record_hash(prev_hash: str, seq: int, call_id: str, kind: str, ts: float, record: str) -> str:
    """The unkeyed chain of records written before the chain key (kept to verify them)."""
    canonical = json.dumps([prev_hash, seq, call_id, kind, repr(ts), record], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def record_mac(
    key: ChainKey, prev_hash: str, seq: int, call_id: str, kind: str, ts: float, record: str, instance: str | None
) -> str:
    """HMAC-SHA256, with `key`, of the compact JSON array `["castellan-audit-record-v2", key id, prev_hash,
    seq, call_id, kind, repr(ts), record, instance]`.

    It runs on the audit writer's thread for every record (and for every record `verify` reads), so
    the per-key work is done once (`_keyed`: the HMAC's keyed state, which is copied, and the key id's
    hash), and the array is written as `json.dumps(fields, separators=(",", ":"))` writes it (each
    string through the same ASCII escaping), without building the list and the encoder per record.
    """
    keyed, prefix = _keyed(key)
    mac = keyed.copy()
    mac.update(
        (
            f"{prefix}{_quote(prev_hash)},{int(seq)},{_quote(call_id)},{_quote(kind)},{_quote(repr(ts))},"
            f"{_quote(record)},{'null' if instance is None else _quote(instance)}]"
        ).encode()
    )
    return mac.hexdigest()


@functools.lru_cache(maxsize=16)
def _keyed(key: ChainKey) -> tuple[hmac.HMAC, str]:
    """The HMAC state after the key (copied per record: the same MAC as `key.mac`) and the array's start."""
    return hmac.new(key.secret, digestmod=hashlib.sha256), f'["castellan-audit-record-v2",{_quote(key.key_id)},'


@dataclass(frozen=True, slots=True)
class Break:
    """Where the chain breaks, and how it looks."""

    seq: int
    problem: str


@dataclass(frozen=True, slots=True)
class Verification:
    records: int
    head: str
    breaks: tuple[Break, ...]
    last_seq: int = 0
    checkpoints: int = 0
    """Valid checkpoints the chain was checked against."""
    last_checkpoint: int = 0
    unkeyed: int = 0
    """Records from before the chain was keyed (SHA-256 only)."""
    interrupted: tuple[str, ...] = ()
    """Calls a crash cut off, closed as `interrupted` at the next start."""
    unfinished: tuple[str, ...] = field(default=())
    """Allowed calls with no outcome yet (running, or their gateway died and has not restarted)."""

    @property
    def intact(self) -> bool:
        return not self.breaks


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    call_id: str
    kind: str
    ts: float
    record: str
    prev_hash: str
    hash: str
    key_id: str | None
    instance: str | None


def _expected(key: ChainKey, row: Row, seq: int | None = None) -> str:
    position = row.seq if seq is None else seq
    if row.key_id is None:
        return record_hash(row.prev_hash, position, row.call_id, row.kind, row.ts, row.record)
    return record_mac(key, row.prev_hash, position, row.call_id, row.kind, row.ts, row.record, row.instance)


def verify_rows(
    rows: Iterable[Row],
    key: ChainKey,
    checkpoints: Sequence[Checkpoint] = (),
    unreadable: Sequence[Unreadable] = (),
    expected_heads: Sequence[tuple[int, str]] = (),
    legacy_heads: Sequence[tuple[int, str]] = (),
) -> Verification:
    """Recompute the chain and check it against signed checkpoints and any heads the caller knows."""
    breaks: list[Break] = []
    trusted: list[Checkpoint] = []
    for cp in checkpoints:
        if cp.valid(key):
            trusted.append(cp)
        else:
            why = "signed with another key" if cp.key_id != key.key_id else "not signed by the chain key"
            breaks.append(Break(cp.seq, f"a {cp.label} is {why} (forged or edited)"))
    for bad in unreadable:
        breaks.append(Break(0, f"checkpoint file line {bad.line} is not a checkpoint (edited?): {bad.text!r}"))
    retained = max((cp for cp in trusted if cp.kind == "retained"), key=lambda c: c.seq, default=None)
    keyed_from = min((cp.seq for cp in trusted if cp.kind == "keyed"), default=None)
    heads: dict[int, list[tuple[str, str]]] = {}
    for cp in trusted:
        heads.setdefault(cp.seq, []).append((cp.head, cp.label))
    for seq, head in expected_heads:
        heads.setdefault(seq, []).append((head, f"expected head {seq}:{head[:16]}…"))
    for seq, head in legacy_heads:
        heads.setdefault(seq, []).append((head, "recorded chain head"))

    stored_at: dict[str, int] = {}
    hashes: dict[int, str] = {}
    expected_prev, expected_seq, count, unkeyed, seen_keyed = GENESIS, None, 0, 0, False
    offset: int | None = None  # the renumbering offset of the run being read, once found
    searched = False
    for row in rows:
        count += 1
        if expected_seq is None:  # the first record: 1, or the one after what retention removed
            expected_seq = 1
            if retained is not None and 1 < row.seq <= retained.seq:
                expected_seq, expected_prev = row.seq, row.prev_hash  # retention is still removing these
            elif retained is not None and row.seq > 1:
                expected_seq, expected_prev = retained.seq + 1, retained.head
        if row.seq > expected_seq:
            what = "deleted" if count > 1 or retained is None else "deleted, beyond what retention removed"
            breaks.append(Break(row.seq, f"records {expected_seq}..{row.seq - 1} are missing ({what})"))
        if row.prev_hash != expected_prev:
            breaks.append(Break(row.seq, "does not follow the record before it (a record was deleted or reordered)"))
        if row.key_id is None:
            unkeyed += 1
            if seen_keyed or (keyed_from is not None and row.seq > keyed_from):
                breaks.append(
                    Break(
                        row.seq, "an unkeyed record where the chain is keyed (rewritten and rehashed without the key)"
                    )
                )
        else:
            seen_keyed = True
            if row.key_id != key.key_id:
                breaks.append(Break(row.seq, f"written with another chain key ({row.key_id}): cannot be checked"))
        if row.hash != _expected(key, row) and (row.key_id is None or row.key_id == key.key_id):
            original = _renumbered_from(key, row, offset, heads, stored_at, searched)
            searched = True
            if original is not None:
                if offset != original - row.seq and original > row.seq:
                    breaks.append(
                        Break(row.seq, f"records {row.seq}..{original - 1} are missing (deleted, then renumbered)")
                    )
                offset = original - row.seq
                breaks.append(Break(row.seq, f"renumbered: this record was written as record {original}"))
            elif row.key_id is not None and row.hash == record_hash(
                row.prev_hash, row.seq, row.call_id, row.kind, row.ts, row.record
            ):
                breaks.append(Break(row.seq, "rehashed without the chain key (rewritten and rehashed: forged)"))
            else:
                breaks.append(Break(row.seq, "its content does not match its hash (edited)"))
        else:
            offset, searched = None, False
        stored_at[row.hash] = row.seq
        hashes[row.seq] = row.hash
        expected_prev, expected_seq = row.hash, row.seq + 1
    last_seq = (expected_seq or 1) - 1

    for seq in sorted(heads):
        for head, label in heads[seq]:
            moved = stored_at.get(head)
            if moved is not None and moved != seq:
                breaks.append(Break(moved, f"the record the {label} names is now at {moved} (renumbered)"))
            elif seq > last_seq:
                breaks.append(
                    Break(
                        last_seq + 1,
                        f"records {last_seq + 1}..{seq} are missing: the chain ends before the {label} (tail cut off)",
                    )
                )
            elif seq in hashes and hashes[seq] != head:
                breaks.append(
                    Break(seq, f"does not match the {label} (rewritten and rehashed after it was checkpointed)")
                )
            elif seq not in hashes and (retained is None or seq > retained.seq) and seq > 0:
                breaks.append(Break(seq, f"the record the {label} names is missing (deleted)"))
    unique = sorted(set(breaks), key=lambda b: (b.seq, b.problem))
    return Verification(
        records=count,
        head=expected_prev if count else (retained.head if retained else GENESIS),
        breaks=tuple(unique),
        last_seq=last_seq,
        checkpoints=len(trusted),
        last_checkpoint=max((cp.seq for cp in trusted if cp.kind == "head"), default=0),
        unkeyed=unkeyed,
    )


def _renumbered_from(
    key: ChainKey,
    row: Row,
    offset: int | None,
    heads: dict[int, list[tuple[str, str]]],
    stored_at: dict[str, int],
    searched: bool,
) -> int | None:
    """The position this record's MAC was computed for, when it now sits at another one."""
    candidates: list[int] = []
    if offset is not None:
        candidates.append(row.seq + offset)
    for seq, entries in heads.items():  # a checkpointed hash found elsewhere gives the offset directly
        if any(head == row.hash for head, _ in entries):
            candidates.append(seq)
    if not searched:  # search once per run of mismatches: the rest of the run shares its offset
        for distance in range(1, _RENUMBER_SEARCH + 1):
            candidates += [row.seq + distance, row.seq - distance]
    for candidate in candidates:
        if candidate > 0 and candidate != row.seq and _expected(key, row, candidate) == row.hash:
            return candidate
    return None


def read_rows(conn: sqlite3.Connection) -> Iterable[Row]:
    cursor = conn.execute(
        "SELECT seq, call_id, kind, ts, record, prev_hash, hash, key_id, instance FROM outbox ORDER BY seq"
    )
    for values in cursor:
        yield Row(*values)


def legacy_heads(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    return [(int(seq), str(head)) for seq, head in conn.execute("SELECT seq, hash FROM chain_heads ORDER BY seq")]
