"""Corpus encoding: `embforge encode --out-dir DIR`, resumable after kill -9, shards plus a manifest.

The corpus is cut, in input order, into shards of `shard_size` texts. Inside a shard texts are sorted by token
length and grouped into batches by a token budget: the real tokens of a padding-free packed batch where packing is
exact for this model (engine/packing.py), else batch size x longest sequence. Each finished shard is written to a
temp file and renamed into place (shard-NNNNN.npy, float32 [n, H], L2-normalized, input order), then
manifest.json is rewritten the same way. A killed run leaves only whole shards; the rerun checks the manifest
(same model fingerprint, same texts, same shard size, same instruction) and encodes only the missing shards.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"


class CorpusError(ValueError):
    pass


def _atomic_write(path: Path, write):
    from embforge.common import open_atomic
    with open_atomic(path, "wb") as f:
        write(f)


def corpus_digest(texts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def token_batches(lengths: list[int], budget: int, packed: bool) -> list[list[int]]:
    """Indices grouped longest first; a batch costs sum(lengths) when packed, else len(batch) * its longest.
    A text longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, longest, total = [], [], 0, 0
    for i in order:
        n = lengths[i]
        if cur and (total + n if packed else max(longest, n) * (len(cur) + 1)) > budget:
            batches.append(cur)
            cur, longest, total = [], 0, 0
        cur.append(i)
        longest, total = max(longest, n), total + n
    if cur:
        batches.append(cur)
    return batches


def _manifest(out: Path, fresh: dict) -> dict:
    path = out / MANIFEST
    if not path.exists():
        return fresh
    old = json.loads(path.read_text())
    for key in ("model", "corpus", "n", "shard_size", "instruction", "is_query"):
        if old.get(key) != fresh[key]:
            raise CorpusError(f"{path}: written for another {key} ({old.get(key)!r}, now {fresh[key]!r}); "
                              "use a new --out-dir or delete this one")
    return old


def encode_corpus(embedder, texts: list[str], out_dir: str | Path, *, ids: list[str] | None = None,
                  instruction: str | None = None, shard_size: int = 4096, token_budget: int = 16384,
                  progress: bool = True) -> dict:
    """Encode `texts` into `out_dir` (resuming what a previous run finished); returns the manifest, whose
    `encoded_now` says how many texts this call ran through the model."""
    from embforge.engine.cache import model_fingerprint

    if shard_size < 1 or token_budget < 1:
        raise CorpusError(f"--shard-size and --token-budget must be >= 1, got {shard_size} and {token_budget}")
    ids = [str(i) for i in range(len(texts))] if ids is None else list(ids)
    if len(ids) != len(texts):
        raise CorpusError(f"{len(ids)} ids for {len(texts)} texts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    is_query = instruction is not None
    n_shards = (len(texts) + shard_size - 1) // shard_size
    manifest = _manifest(out, {
        "model": model_fingerprint(embedder), "corpus": corpus_digest(texts), "n": len(texts),
        "shard_size": shard_size, "instruction": instruction, "is_query": is_query, "dim": embedder.hidden_size,
        "shards": {}})
    if not (out / "ids.json").exists():
        _atomic_write(out / "ids.json", lambda f: f.write(json.dumps(ids).encode()))
    done = {int(k) for k, name in manifest["shards"].items() if (out / name).exists()}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(texts), initial=sum(_shard_len(len(texts), shard_size, k) for k in done),
                   desc="encode", unit="doc", file=sys.stderr)
    encoded = 0
    was_training = embedder.model.training
    embedder.model.eval()
    try:
        for k in range(n_shards):
            if k in done:
                continue
            part = texts[k * shard_size:(k + 1) * shard_size]
            vecs = _encode_shard(embedder, part, instruction, is_query, token_budget, bar)
            name = f"shard-{k:05d}.npy"
            _atomic_write(out / name, lambda f: np.save(f, vecs.numpy()))
            manifest["shards"][str(k)] = name
            _atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            encoded += len(part)
    finally:
        embedder.model.train(was_training)
        if bar:
            bar.close()
    if not (out / MANIFEST).exists():       # an empty corpus still leaves a manifest
        _atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return {**manifest, "encoded_now": encoded}


def _shard_len(n: int, size: int, k: int) -> int:
    return min(size, n - k * size)


@torch.no_grad()
def _encode_shard(embedder, texts, instruction, is_query, budget, bar) -> torch.Tensor:
    seqs = embedder.tokenize(texts, is_query=is_query, instructions=[instruction] * len(texts) if is_query else None)
    out = torch.empty(len(seqs), embedder.hidden_size, dtype=torch.float32)
    for idx in token_batches([len(s) for s in seqs], budget, bool(embedder.packing)):
        emb = embedder.embed_chunk([seqs[i] for i in idx])
        out[idx] = torch.nn.functional.normalize(emb.float(), dim=-1).cpu()
        if bar:
            bar.update(len(idx))
    return out


def load_corpus(out_dir: str | Path) -> tuple[list[str], torch.Tensor]:
    """(ids, embeddings [n, H]) of a finished encoding; an unfinished one is an error naming what is missing."""
    out = Path(out_dir)
    if not (out / MANIFEST).exists():
        raise CorpusError(f"{out}: no {MANIFEST}; not a corpus encoding")
    manifest = json.loads((out / MANIFEST).read_text())
    n_shards = (manifest["n"] + manifest["shard_size"] - 1) // manifest["shard_size"]
    missing = [k for k in range(n_shards) if str(k) not in manifest["shards"]]
    if missing:
        raise CorpusError(f"{out}: {len(missing)} of {n_shards} shards not encoded yet (first: {missing[0]}); "
                          "rerun the same embforge encode to finish")
    ids = json.loads((out / "ids.json").read_text())
    parts = [torch.from_numpy(np.load(out / manifest["shards"][str(k)])) for k in range(n_shards)]
    return ids, torch.cat(parts) if parts else torch.empty(0, manifest["dim"])
