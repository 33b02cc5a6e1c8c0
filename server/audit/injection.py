"""Prompt-injection markers in tool results. A result is never changed for them (the agent gets what
the tool returned); the audit record is flagged, so auditors can find results that tried to steer the
agent, and policy authors can see which tools return such text."""

from __future__ import annotations

from typing import Any

import re2  # type: ignore[import-untyped]

from server import content
from server.registry import ToolOutput


def _options(*, capture: bool = True) -> Any:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False
    options.max_mem = 64 << 20
    options.never_capture = not capture
    return options


# Each marker: a name for the record, and what it looks for (case-insensitive). RE2: linear time, and
# about ten times faster than `re` on these patterns (2 MB scanned in ~0.13 s, against ~1.5 s).
_PATTERNS = {
    "ignore_instructions": r"\b(ignore|disregard|forget)\b.{0,40}\b(previous|prior|above|earlier|all|your)\b.{0,20}"
    r"\b(instructions|prompts?|rules|directions)\b",
    "role_override": r"\byou are now\b|\bact as (an? )?(admin|administrator|system|root|developer)\b"
    r"|\bnew instructions\b",
    "system_prompt": r"\b(system prompt|developer message)\b|<\|?(im_start|system)\|?>|\[/?INST\]|<</?SYS>>",
    "credential_request": r"\b(send|share|reveal|print|include|forward|post)\b.{0,40}\b(api[ _-]?keys?|passwords?|"
    r"credentials|secrets?|tokens?|private keys?)\b",
    "hidden_exfiltration": r"!\[[^\]]*\]\(https?://[^)\s]*\?[^)\s]*=",
    "conceal_from_user": r"\b(do not|don't|never)\b.{0,20}\b(tell|inform|mention|show)\b.{0,20}\bthe user\b",
    "tool_call_injection": r"\b(call|invoke|run|use)\b.{0,20}\bthe\b.{0,30}\btool\b.{0,40}\b(with|and then)\b",
}
MARKERS: dict[str, Any] = {name: re2.compile(pattern, options=_options()) for name, pattern in _PATTERNS.items()}
# Any marker at all, in one pass: the alternation (same options) matches a text exactly when one of the
# markers does, so a text with none (nearly every result) costs one search, not seven.
_ANY = re2.compile("|".join(f"(?:{pattern})" for pattern in _PATTERNS.values()), options=_options(capture=False))
SCAN_CHARS = 200_000
"""The window a text is scanned in (windows overlap, so no marker is split between two)."""


SCAN_TOTAL_CHARS = 2_000_000
"""What one result is scanned for at most, all its parts together."""


def scan(text: str) -> list[str]:
    """The names of the markers found in `text` (its first 200,000 characters; `scan_output` scans a
    whole result)."""
    sample = text[:SCAN_CHARS]
    if _ANY.search(sample) is None:
        return []
    return [name for name, pattern in MARKERS.items() if pattern.search(sample)]


_OVERLAP = 200  # longer than any marker's match, so none is split between two windows


_JOIN = "\n]\n"
r"""Between the texts of one result searched at once: no marker's match can cross it (`.` stops at a
newline, `!\[[^\]]*\]` at the bracket, which then needs `(` after it), and a word boundary at either
edge of a text stays one (the newlines are no word characters), so a text with a marker leaves one
in the join."""


def scan_output(output: ToolOutput) -> list[str]:
    """The markers found anywhere in a tool result (`server.content`): every text part (text blocks,
    text resources, structured content, resource links' names and descriptions) and every binary
    payload that is text, all of it in windows of 200,000 characters, up to 2,000,000 in all."""
    texts = list(content.readable(content.parts(output)))
    if sum(map(len, texts)) <= SCAN_CHARS and _ANY.search(_JOIN.join(texts)) is None:
        return []  # a result of one window's size or less: one search over all its texts proves none
    return _scan_windows(texts)


def _scan_windows(texts: list[str]) -> list[str]:
    found: set[str] = set()
    budget = SCAN_TOTAL_CHARS
    for text in texts:
        start = 0
        while start < len(text) and budget > 0:
            window = text[start : start + min(SCAN_CHARS, budget)]
            found.update(scan(window))
            budget -= len(window)
            start += max(1, len(window) - _OVERLAP)
            if start + _OVERLAP >= len(text):
                break
    return [name for name in MARKERS if name in found]
