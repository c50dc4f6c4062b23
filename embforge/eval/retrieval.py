"""`evaluate_retrieval`: encode a BEIR split, exact top-k search in chunks, score with pytrec_eval."""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from embforge.engine.search import search_chunks

from .beir import BeirDataset, load_beir
from .encoders import encode_unique
from .metrics import DEFAULT_K, retrieval_metrics


def _encode_queries(encoder, ds: BeirDataset, qids: list[str], instruction: str | None,
                    batch_size: int) -> torch.Tensor:
    """Encode queries, grouping by instruction (a per-query instruction wins over the default one)."""
    groups: dict[str | None, list[int]] = {}
    for i, qid in enumerate(qids):
        groups.setdefault(ds.instructions.get(qid, instruction), []).append(i)
    out: torch.Tensor | None = None
    for inst, rows in groups.items():
        emb = encode_unique(encoder, [ds.queries[qids[i]] for i in rows], instruction=inst, batch_size=batch_size)
        if out is None:
            out = emb.new_empty((len(qids), emb.shape[1]))
        out[rows] = emb
    return out


def _corpus_stream(encoder, texts: list[str], chunk: int, batch_size: int, progress: bool) -> Iterator[torch.Tensor]:
    """Encode the corpus chunk by chunk so only one chunk of document embeddings is alive at a time."""
    bar = tqdm(total=len(texts), desc="encode corpus", unit="doc", file=sys.stderr, disable=not progress)
    for start in range(0, len(texts), chunk):
        emb = encode_unique(encoder, texts[start:start + chunk], instruction=None, batch_size=batch_size)
        bar.update(min(chunk, len(texts) - start))
        yield emb
    bar.close()


def evaluate_retrieval(encoder, dataset: BeirDataset | str | Path, *, split: str = "test",
                       instruction: str | None = None, batch_size: int = 32,
                       k_values: Sequence[int] = DEFAULT_K, corpus_chunk: int = 10_000,
                       progress: bool = True, return_run: bool = False) -> dict:
    """nDCG@k, MRR@k, Recall@k (k in k_values) and MAP@max(k) of `encoder` on a BEIR split.

    `dataset` is a BeirDataset or a BEIR folder (loaded with `split`). Only queries with relevance judgements
    are encoded and averaged (BEIR convention). `instruction` applies to queries only; a query's own
    instruction from queries.jsonl takes precedence. With `return_run=True` the result carries
    `"run": {qid: {doc_id: score}}` (the top max(k_values) documents per query).
    """
    ds = dataset if isinstance(dataset, BeirDataset) else load_beir(dataset, split)
    qids = [q for q in ds.qrels if q in ds.queries]
    if not qids:
        raise ValueError(f"{ds.name}/{ds.split}: no query with relevance judgements")
    doc_ids = list(ds.corpus)
    depth = max(k_values)

    q_emb = _encode_queries(encoder, ds, qids, instruction, batch_size)
    stream = _corpus_stream(encoder, [ds.corpus[d] for d in doc_ids], corpus_chunk, batch_size, progress)
    scores, indices = search_chunks(q_emb, stream, depth)

    run = {qid: {doc_ids[j]: float(s) for s, j in zip(srow.tolist(), irow.tolist())}
           for qid, srow, irow in zip(qids, scores, indices)}
    result = retrieval_metrics({q: ds.qrels[q] for q in qids}, run, k_values)
    result["num_docs"] = len(doc_ids)
    if return_run:
        result["run"] = run
    return result
