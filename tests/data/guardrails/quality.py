"""Precision and recall of a detector on the labelled sample set (samples.jsonl): shared by the quality
test and bench/guardrails.py, so both measure the same way.

A finding is a true positive when it overlaps an expected value of the same kind in the same sample;
any other finding is a false positive; an expected value no finding of its kind overlaps is a miss.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

SAMPLES = Path(__file__).with_name("samples.jsonl")

# A detector under test: (text, field name) -> [(kind, start, end)]
Find = Callable[[str, str], Iterable[tuple[str, int, int]]]


def load_samples() -> list[dict[str, object]]:
    return [json.loads(line) for line in SAMPLES.read_text().splitlines() if line.strip()]


@dataclass
class Score:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    false_positives: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def evaluate(find: Find, kinds: Iterable[str] | None = None) -> dict[str, Score]:
    """Scores per kind (only `kinds` when given: a detector that has no such kind is not charged for it)."""
    wanted = set(kinds) if kinds is not None else None
    scores: dict[str, Score] = {}
    for sample in load_samples():
        text, name = str(sample["text"]), str(sample["field"])
        expected = []
        for item in sample["expect"]:  # type: ignore[attr-defined]
            start = text.index(item["value"])
            expected.append((item["kind"], start, start + len(item["value"])))
        found = [f for f in find(text, name) if wanted is None or f[0] in wanted]
        matched: set[int] = set()
        for kind, start, end in found:
            hit = next(
                (i for i, (k, s, e) in enumerate(expected) if k == kind and s < end and start < e and i not in matched),
                None,
            )
            score = scores.setdefault(kind, Score())
            if hit is None:
                score.fp += 1
                score.false_positives.append(f"{kind}: {text[start:end]!r} in {text!r}")
            else:
                matched.add(hit)
                score.tp += 1
        for i, (kind, start, end) in enumerate(expected):
            if (wanted is None or kind in wanted) and i not in matched:
                score = scores.setdefault(kind, Score())
                score.fn += 1
                score.misses.append(f"{kind}: {text[start:end]!r} in {text!r}")
    return scores


def totals(scores: dict[str, Score]) -> Score:
    total = Score()
    for score in scores.values():
        total.tp, total.fp, total.fn = total.tp + score.tp, total.fp + score.fp, total.fn + score.fn
    return total
