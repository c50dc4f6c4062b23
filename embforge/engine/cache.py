"""Embedding cache: re-encoding the same text with the same model reads it back instead of running the model.

Keys: a model fingerprint (a hash of every weight and buffer plus the settings that shape an embedding: pooling,
attention, template, max lengths, dtype) selects a folder; inside it each text is keyed by a hash of
(query or document, instruction, text). Any change to the weights, a LoRA merge included, gives a new fingerprint,
so a stale vector cannot be served. Hashing the weights reads them once per model (about a second per GB).

Storage: append-only parts under <root>/<fingerprint>/, each a pair part-*.vecs.npy (float32 [n, H]) and
part-*.keys.npy (uint8 [n, 16]); the keys file is renamed into place last, so a part exists only once complete
(a killed process leaves no half part that could be read). Vectors are memory-mapped, not loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

# ModelConfig fields that cannot change an embedding's value (where the base came from, speed-only kernels).
_NOT_NUMERIC = ("path", "gradient_checkpointing", "liger", "attn_implementation", "lora")


def default_root() -> Path:
    from embforge.engine.assets import cache_root
    return cache_root() / "embeddings"


def model_fingerprint(embedder) -> str:
    """Hash of the embedder's weights, buffers and embedding settings (cached on the embedder object)."""
    cached = getattr(embedder, "_embforge_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    settings = {k: v for k, v in dataclasses.asdict(embedder.config).items() if k not in _NOT_NUMERIC}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, t in sorted(embedder.model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    embedder._embforge_fingerprint = h.hexdigest()
    return embedder._embforge_fingerprint


def text_key(text: str, instruction: str | None, is_query: bool) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{'q' if is_query else 'd'}\0{instruction or ''}\0{text}".encode("utf-8", "surrogatepass"))
    return h.digest()


class EmbeddingCache:
    """Vectors by text key for one model fingerprint."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.dir = Path(root) / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self._vecs: list[np.ndarray] = []
        self._index: dict[bytes, tuple[int, int]] = {}
        for keys_file in sorted(self.dir.glob("part-*.keys.npy")):
            self._add_part(keys_file)

    def __len__(self) -> int:
        return len(self._index)

    def _add_part(self, keys_file: Path):
        vecs = np.load(str(keys_file).replace(".keys.npy", ".vecs.npy"), mmap_mode="r")
        part = len(self._vecs)
        self._vecs.append(vecs)
        for row, key in enumerate(np.load(keys_file)):
            self._index[key.tobytes()] = (part, row)

    def get(self, key: bytes) -> np.ndarray | None:
        hit = self._index.get(key)
        return None if hit is None else self._vecs[hit[0]][hit[1]]

    def put(self, keys: list[bytes], vectors: torch.Tensor):
        if not keys:
            return
        stem = self.dir / f"part-{time.time_ns():020d}-{os.getpid()}"
        vec_file, key_file = Path(f"{stem}.vecs.npy"), Path(f"{stem}.keys.npy")
        from embforge.common import open_atomic
        for path, array in ((vec_file, vectors.float().cpu().numpy()),
                            (key_file, np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), -1))):
            with open_atomic(path, "wb") as f:    # vectors first, keys last: the keys file publishes the part
                np.save(f, array)
        self._add_part(key_file)


class CachedEncoder:
    """Any encoder of the evaluation contract (`encode(texts, *, instruction=None, batch_size=...)`) with a cache
    in front: only texts not seen before with this model reach the model, each once. `encoded` counts them."""

    def __init__(self, encoder, cache: EmbeddingCache):
        self.encoder = encoder
        self.cache = cache
        self.encoded = 0
        self.reused = 0

    def __getattr__(self, name):
        return getattr(self.__dict__["encoder"], name)

    def encode(self, texts: list[str], *, instruction: str | None = None, batch_size: int = 32,
               **kwargs) -> torch.Tensor:
        if not texts:
            return self.encoder.encode([], instruction=instruction, batch_size=batch_size, **kwargs)
        is_query = kwargs.get("is_query")
        if is_query is None:
            is_query = instruction is not None
        keys = [text_key(t, instruction, is_query) for t in texts]
        rows: list = [self.cache.get(k) for k in keys]
        todo: dict[bytes, int] = {}                     # first position of each missing text
        for i, (k, row) in enumerate(zip(keys, rows)):
            if row is None and k not in todo:
                todo[k] = i
        if todo:
            fresh = self.encoder.encode([texts[i] for i in todo.values()], instruction=instruction,
                                        batch_size=batch_size, **kwargs)
            self.cache.put(list(todo), fresh)
            by_key = dict(zip(todo, fresh))
            rows = [by_key[k] if row is None else row for k, row in zip(keys, rows)]
        self.encoded += len(todo)
        self.reused += len(texts) - len(todo)
        return torch.stack([r if isinstance(r, torch.Tensor) else torch.from_numpy(np.array(r, dtype=np.float32))
                            for r in rows]).float()


def cached(embedder, root: str | Path | None = None) -> CachedEncoder:
    """`embedder` behind the cache of its fingerprint under `root` (default $EMBFORGE_CACHE/embeddings)."""
    return CachedEncoder(embedder, EmbeddingCache(root or default_root(), model_fingerprint(embedder)))


def maybe_cached(encoder, *, enabled: bool = True, root: str | Path | None = None):
    """The encoder behind its cache when it is an embforge embedder and caching is on; anything else (a
    sentence-transformers or hashing encoder) as it is."""
    from embforge.engine.model import Embedder

    return cached(encoder, root) if enabled and isinstance(encoder, Embedder) else encoder
