"""A tool result's content, every kind of it, walked in one place.

What an agent receives is the text (or the content blocks, when a tool returns more than text: images,
audio, embedded resources, resource links) and the structured content. `parts` walks all of it, and the
token count, the `max_result_chars` obligation, the audit record and injection flagging all read the
parts, so no kind of content passes around them:

- text (text blocks, text resources, structured content, a resource link's name and description,
  a block of an unknown kind as JSON) is tokenised, counted in characters and scanned;
- a binary payload (image, audio, blob resource) counts by size: one token per `BYTES_PER_TOKEN`
  bytes decoded, its base64 characters toward `max_result_chars`; it is scanned when it decodes as
  text, and summarised in the audit record by kind, MIME type, size and SHA-256;
- a block's other members (`_meta`, `annotations`…) count by size too, as their JSON.

Structured content that a text block already carries (the MCP convention: the JSON serialised as
text) counts once.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from server.registry import ToolOutput

BYTES_PER_TOKEN = 4
"""A binary payload's tokens: its decoded size over this (about what text costs per byte)."""
_TEXT_MIME = ("text/", "application/json", "application/xml", "application/yaml", "application/javascript")
_SCAN_BLOB_BYTES = 200_000
# `json.dumps` with any argument builds a new encoder per call; these are the same encoders, built once.
_DUMPS = json.JSONEncoder(default=str).encode
_DUMPS_COMPACT = json.JSONEncoder(separators=(",", ":"), default=str).encode


@dataclass(frozen=True, slots=True)
class Part:
    """One piece of a result. `text` is what can be read as text (None for a binary payload)."""

    kind: str
    text: str | None
    payload_bytes: int
    """The payload's size: UTF-8 bytes of text, decoded bytes of a binary payload."""
    chars: int
    """Characters it takes in the result sent: the text's, or the base64's; plus `meta_bytes`."""
    meta_bytes: int = 0
    """The block's other members (`_meta`, `annotations`, …) as JSON."""
    mime_type: str | None = None
    uri: str | None = None
    data: str | None = None
    """A binary payload as sent (base64), for scanning when it is text."""

    @property
    def binary(self) -> bool:
        return self.text is None

    @property
    def sha256(self) -> str:
        """Of the payload: UTF-8 text, or the decoded bytes (computed when asked: the audit record)."""
        if self.text is not None:
            return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()
        return hashlib.sha256(_decoded(self.data or "")).hexdigest()

    def summary(self) -> dict[str, Any]:
        """What the audit record keeps of this part (never the payload itself)."""
        entry: dict[str, Any] = {"kind": self.kind, "bytes": self.payload_bytes, "sha256": self.sha256}
        if self.mime_type:
            entry["mime_type"] = self.mime_type
        if self.uri:
            entry["uri"] = self.uri[:500]
        if self.meta_bytes:
            entry["meta_bytes"] = self.meta_bytes
        return entry

    def describe(self) -> str:
        """The part in a line of text: itself when it is text, else a note of what it was."""
        if self.text is not None and self.kind != "resource_link":
            return self.text
        if self.kind == "resource_link":
            return f"[resource link {self.uri or '?'}] {self.text or ''}".rstrip()
        where = f" {self.uri}" if self.uri else ""
        return f"[{self.kind}{where} {self.mime_type or '?'}, {self.payload_bytes:,} bytes, sha256 {self.sha256[:16]}]"


def _decoded(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        return data.encode()


def _decoded_size(data: str) -> int:
    """The size base64 `data` decodes to, without decoding it (exact for well-formed base64)."""
    if len(data) % 4 == 0 and data.isascii():
        return len(data) // 4 * 3 - data[-2:].count("=")
    return len(_decoded(data))


def _text_part(kind: str, text: str, meta: int = 0, **extra: Any) -> Part:
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return Part(kind, text, size, len(text) + meta, meta, **extra)


def _binary_part(kind: str, data: Any, meta: int, mime_type: Any, uri: Any = None) -> Part:
    encoded = str(data or "")
    mime = str(mime_type) if mime_type else None
    return Part(kind, None, _decoded_size(encoded), len(encoded) + meta, meta, mime, str(uri) if uri else None, encoded)


def _meta_bytes(block: Mapping[str, Any], *payload: str) -> int:
    rest = {k: v for k, v in block.items() if k not in ("type", *payload)}
    return len(_DUMPS_COMPACT(rest)) if rest else 0


def block_parts(blocks: Any) -> Iterator[Part]:
    """The parts of MCP content blocks (dicts, as dumped by alias)."""
    for block in blocks:
        if not isinstance(block, Mapping):
            yield _text_part("unknown", _DUMPS(block))
            continue
        kind = str(block.get("type", "unknown"))
        if kind == "text":
            yield _text_part("text", str(block.get("text", "")), _meta_bytes(block, "text"))
        elif kind in ("image", "audio"):
            yield _binary_part(kind, block.get("data"), _meta_bytes(block, "data", "mimeType"), block.get("mimeType"))
        elif kind == "resource" and isinstance(block.get("resource"), Mapping):
            resource = block["resource"]
            meta = _meta_bytes(block, "resource") + _meta_bytes(resource, "text", "blob", "uri", "mimeType")
            uri, mime = resource.get("uri"), resource.get("mimeType")
            if "blob" in resource:
                yield _binary_part("resource", resource.get("blob"), meta, mime, uri)
            else:
                yield _text_part("resource", str(resource.get("text", "")), meta, mime_type=mime, uri=uri)
        elif kind == "resource_link":
            # Only a pointer, but its name and description are read by the agent's model.
            words = [str(block.get(k)) for k in ("name", "title", "description") if block.get(k)]
            meta = _meta_bytes(block, "name", "title", "description", "uri", "mimeType")
            mime = block.get("mimeType")
            yield _text_part("resource_link", "\n".join(words), meta, mime_type=mime, uri=block.get("uri"))
        else:
            yield _text_part(kind, _DUMPS(block))


def _carried(structured: Mapping[str, Any], texts: list[str]) -> bool:
    """Whether a text already is the structured content, serialised (counted there)."""
    for text in texts:
        if text[:1] in ("{", "["):
            try:
                if json.loads(text) == structured:
                    return True
            except ValueError:
                continue
    return False


_RECENT: dict[int, tuple[ToolOutput, tuple[Part, ...]]] = {}
_RECENT_ENTRIES = 32
_RECENT_CHARS = 262_144
"""Parts of results up to this many characters are remembered (bounding what the memory holds)."""


def parts(output: ToolOutput) -> tuple[Part, ...]:
    """Every part of what the agent receives for `output`: its content blocks (or its text when it
    has none), and its structured content unless a text already carries it.

    The token count, the guardrails, the injection scan and the audit record each ask about the same
    result: the parts of the last few results are remembered, by identity (a `ToolOutput` is frozen;
    the entry holds it, so its id is not reused while remembered)."""
    hit = _RECENT.get(id(output))
    if hit is not None and hit[0] is output:
        return hit[1]
    found = _parts(output)
    if total_chars(found) <= _RECENT_CHARS:
        if len(_RECENT) >= _RECENT_ENTRIES:
            _RECENT.clear()  # one atomic step (scans in worker threads ask too); the next asks refill it
        _RECENT[id(output)] = (output, found)
    return found


def _parts(output: ToolOutput) -> tuple[Part, ...]:
    found = list(block_parts(output.content)) if output.content else [_text_part("text", output.text)]
    if output.structured is not None:
        texts = [p.text for p in found if p.kind == "text" and p.text is not None]
        if not _carried(output.structured, texts):
            found.append(_text_part("structured", _DUMPS(output.structured)))
    return tuple(found)


def total_chars(found: tuple[Part, ...]) -> int:
    return sum(p.chars for p in found)


def size_tokens(found: tuple[Part, ...]) -> int:
    """The tokens counted by size: binary payloads and blocks' other members."""
    binary = sum(p.payload_bytes for p in found if p.binary)
    return math.ceil((binary + sum(p.meta_bytes for p in found)) / BYTES_PER_TOKEN)


def as_text(found: tuple[Part, ...]) -> str:
    """The result as one text: text parts as they are, others as a note (kind, type, size, hash)."""
    return "\n".join(p.describe() for p in found)


def readable(found: tuple[Part, ...]) -> Iterator[str]:
    """Every text in the result, for scanning: text parts, and binary payloads that are text (a text
    MIME type, or valid UTF-8 without control characters), their first 200,000 bytes."""
    for part in found:
        if part.text is not None:
            yield part.text
            continue
        if not part.data:
            continue
        try:
            raw = base64.b64decode(part.data[: _SCAN_BLOB_BYTES // 3 * 4], validate=False)
        except (binascii.Error, ValueError):
            continue
        if part.mime_type and part.mime_type.startswith(_TEXT_MIME):
            yield raw.decode("utf-8", errors="replace")
            continue
        try:  # incremental: a character cut at the end of the prefix is not an error
            text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
        except UnicodeDecodeError:
            continue
        if not any(ord(c) < 32 and c not in "\t\r\n" for c in text[:4096]):
            yield text


def rewritten(output: ToolOutput, text: str, *, has_output_schema: bool = False) -> ToolOutput:
    """`output` replaced by `text` alone (a truncation): its blocks and structured content dropped,
    the summary of what the tool returned kept for the audit record. A tool with an output schema must
    return conforming structured content, which a cut result no longer is: it becomes an error result
    (clients validate the others), the text saying what happened."""
    return ToolOutput(
        text=text, is_error=output.is_error or has_output_schema, returned=output.returned or summary(parts(output))
    )


def summary(found: tuple[Part, ...], limit: int = 50) -> dict[str, Any]:
    """The audit record's account of the content: each part's kind, size and hash (the first
    `limit`), and the totals."""
    return {
        "parts": [p.summary() for p in found[:limit]],
        "part_count": len(found),
        "kinds": sorted({p.kind for p in found}),
        "bytes": sum(p.payload_bytes + p.meta_bytes for p in found),
        "chars": total_chars(found),
    }
