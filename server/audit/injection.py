"""Prompt-injection markers in tool results. A result is never changed for them (the agent gets what
the tool returned); the audit record is flagged, so auditors can find results that tried to steer the
agent, and policy authors can see which tools return such text."""

from __future__ import annotations

import re

# Each marker: a name for the record, and what it looks for (case-insensitive).
MARKERS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
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
    }.items()
}
SCAN_CHARS = 200_000


def scan(text: str) -> list[str]:
    """The names of the markers found in `text` (its first 200,000 characters)."""
    sample = text[:SCAN_CHARS]
    return [name for name, pattern in MARKERS.items() if pattern.search(sample)]
