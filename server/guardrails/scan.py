"""Detections in a call's arguments and in a tool's result, as the decision input carries them, and
the masking of detected spans in a result.

A detection in the input says what was found and where, never the value: `{"kind": "card_number",
"type": "card.visa", "category": "personal_data", "where": "arguments", "path": "payment.number",
"field": "number", "count": 1}`. Array indices in `path` are `[*]`, so a thousand rows with an
email each are one detection with `count` 1000, and the input stays small whatever the payload.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from server.guardrails.detectors import Detector, Finding
from server.guardrails.kinds import KINDS
from server.policy._input import normalized_text
from server.registry import ToolOutput

# Found in the text as written: a secret's case matters, and so does a name's capital letters.
# Everything else is found in the normalised text policy rules see (NFKC, invisible characters
# removed), so full-width digits or a zero-width space inside a card number do not hide it.
AS_WRITTEN = frozenset({"secret", "person_name", "address"})
NORMALISED = frozenset(KINDS) - AS_WRITTEN
MAX_DETECTIONS = 256
"""Distinct (path, type) entries in one input; past this the rest are counted in the last one."""
MAX_SCANNED_CHARS = 1_000_000
"""Text scanned per call and side (arguments, result); the rest is not (docs/guardrails.md)."""


def _strings(value: Any, path: str, field: str) -> Iterator[tuple[str, str, str]]:
    """(path, field, text) of every string value at any depth."""
    if isinstance(value, str):
        yield path, field, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else str(key), str(key))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item, f"{path}[*]", field)


class Detections:
    """Accumulates findings as input entries, one per (where, path, type), in the order first seen."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._entries: dict[tuple[str, str], dict[str, Any]] = {}

    def add(self, path: str, field: str, findings: list[Finding]) -> None:
        for finding in findings:
            key = (path, finding.type)
            entry = self._entries.get(key)
            if entry is None:
                if len(self._entries) >= MAX_DETECTIONS:
                    entry = next(reversed(self._entries.values()))
                else:
                    entry = self._entries[key] = {
                        "kind": finding.kind,
                        "type": finding.type,
                        "category": finding.category,
                        "where": self._where,
                        "path": path,
                        "field": field,
                        "count": 0,
                    }
            entry["count"] += 1

    def entries(self) -> tuple[dict[str, Any], ...]:
        return tuple(self._entries.values())


def scan_arguments(arguments: Mapping[str, Any], detector: Detector) -> tuple[dict[str, Any], ...]:
    """The detections in every string of `arguments` at any depth (values; keys are names, not data)."""
    found = Detections("arguments")
    budget = MAX_SCANNED_CHARS
    for path, field, text in _strings(arguments, "", ""):
        if budget <= 0:
            break
        text = text[:budget]
        budget -= len(text)
        findings = detector.find(text, field, AS_WRITTEN)
        view = normalized_text(text)
        findings += detector.find(view, field, NORMALISED)
        found.add(path, field, findings)
    return found.entries()


def _json(text: str) -> Any:
    if text[:1] in ("{", "[") and len(text) <= MAX_SCANNED_CHARS:
        try:
            return json.loads(text)
        except ValueError:
            return None
    return None


def _result_strings(output: ToolOutput) -> Iterator[tuple[str, str, str]]:
    """(path, field, text) of what the agent would read: the structured content's strings, the
    text (as JSON members when it is JSON, once when it only carries the structured content), and
    the text of content blocks."""
    if output.structured is not None:
        yield from _strings(output.structured, "structured", "")
    texts: list[tuple[str, str]] = []
    if output.content:
        for block in output.content:
            if not isinstance(block, Mapping):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(("content[*].text", block["text"]))
            elif kind == "resource" and isinstance(block.get("resource"), Mapping):
                text = block["resource"].get("text")
                if isinstance(text, str):
                    texts.append(("content[*].resource.text", text))
            elif kind == "resource_link":
                for member in ("name", "title", "description"):
                    if isinstance(block.get(member), str):
                        texts.append((f"content[*].{member}", block[member]))
    else:
        texts.append(("text", output.text))
    for path, text in texts:
        parsed = _json(text)
        if parsed is not None and output.structured is not None and parsed == output.structured:
            continue  # the structured content, serialised: scanned above
        if parsed is not None:
            yield from _strings(parsed, path, "")
        else:
            yield path, "", text


def scan_result(output: ToolOutput, detector: Detector) -> tuple[dict[str, Any], ...]:
    """The detections in a tool's result (as written: a result is masked where it was found)."""
    found = Detections("result")
    budget = MAX_SCANNED_CHARS
    for path, field, text in _result_strings(output):
        if budget <= 0:
            break
        text = text[:budget]
        budget -= len(text)
        found.add(path, field, detector.find(text, field))
    return found.entries()


def mask_text(text: str, field: str, detector: Detector, kinds: frozenset[str]) -> str:
    """`text` with each finding of `kinds` replaced by `[REDACTED:<kind>]`."""
    findings = detector.find(text, field, kinds)
    if not findings:
        return text
    parts: list[str] = []
    last = 0
    for finding in findings:
        parts.append(text[last : finding.start])
        parts.append(f"[REDACTED:{finding.kind}]")
        last = finding.end
    parts.append(text[last:])
    return "".join(parts)


def mask_value(value: Any, detector: Detector, kinds: frozenset[str], field: str = "") -> Any:
    """`value` with every string in it masked (`mask_text`), at any depth."""
    if isinstance(value, str):
        return mask_text(value, field, detector, kinds)
    if isinstance(value, Mapping):
        return {k: mask_value(v, detector, kinds, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_value(v, detector, kinds, field) for v in value]
    return value


def masked_output(output: ToolOutput, detector: Detector, kinds: frozenset[str]) -> ToolOutput:
    """`output` with the findings of `kinds` masked in its text, structured content and text blocks
    (binary blocks pass as they are: nothing in them is read as text by the agent's model)."""
    structured = mask_value(output.structured, detector, kinds) if output.structured is not None else None
    carried = output.structured

    def text_of(text: str) -> str:
        parsed = _json(text)
        if parsed is not None and carried is not None and parsed == carried:
            return json.dumps(structured)
        return (
            mask_text(text, "", detector, kinds) if parsed is None else json.dumps(mask_value(parsed, detector, kinds))
        )

    blocks: list[Mapping[str, Any]] = []
    for block in output.content:
        if isinstance(block, Mapping) and block.get("type") == "text" and isinstance(block.get("text"), str):
            blocks.append({**block, "text": text_of(block["text"])})
        elif (
            isinstance(block, Mapping)
            and block.get("type") == "resource"
            and isinstance(block.get("resource"), Mapping)
            and isinstance(block["resource"].get("text"), str)
        ):
            resource = block["resource"]
            blocks.append({**block, "resource": {**resource, "text": text_of(resource["text"])}})
        elif isinstance(block, Mapping) and block.get("type") == "resource_link":
            blocks.append({k: text_of(v) if k in ("name", "title", "description") and isinstance(v, str) else v
                           for k, v in block.items()})  # fmt: skip
        else:
            blocks.append(block)
    return replace(output, text=text_of(output.text), structured=structured, content=tuple(blocks))
