"""The contrastive batch: the type every step consumes, how training examples are grouped into it, its text ids
(exact duplicates share one, so a duplicate is never a negative) and each rank's slice of it. A leaf: it imports
nothing else from embforge, so gradcache.py and distributed.py both build on it without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ContrastiveBatch:
    queries: list[str]
    instructions: list[str | None]
    documents: list[str]                  # grouped: query i owns documents[i*G:(i+1)*G], positive first
    query_ids: list[int] | None = None    # optional explicit text ids (both or neither); default: from the texts
    doc_ids: list[int] | None = None
    dataset: str | None = None            # where the batch came from (metrics, per-dataset losses)
    in_batch_negatives: bool = True       # false: each query's negatives are only its own group's documents

    def __post_init__(self):
        B, N = len(self.queries), len(self.documents)
        if B == 0:
            raise ValueError("ContrastiveBatch has no queries")
        if len(self.instructions) != B:
            raise ValueError(f"ContrastiveBatch: {B} queries but {len(self.instructions)} instructions")
        if N == 0 or N % B != 0:
            raise ValueError(f"ContrastiveBatch: {N} documents is not a positive multiple of {B} queries "
                             "(each query owns its positive and the same number of hard negatives)")
        if (self.query_ids is None) != (self.doc_ids is None):
            # Mixing given ids with ids derived from texts would put two unrelated numberings in one id space.
            raise ValueError("ContrastiveBatch: give both query_ids and doc_ids, or neither")
        if self.query_ids is not None and (len(self.query_ids) != B or len(self.doc_ids) != N):
            raise ValueError(f"ContrastiveBatch: {len(self.query_ids)} query_ids / {len(self.doc_ids)} doc_ids for "
                             f"{B} queries / {N} documents")



def text_ids(queries: list[str], documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One integer id per distinct text across queries and documents (exact duplicates share it). A dict, not a
    hash: ids never collide."""
    table: dict[str, int] = {}
    q = [table.setdefault(t, len(table)) for t in queries]
    d = [table.setdefault(t, len(table)) for t in documents]
    return torch.tensor(q, dtype=torch.long), torch.tensor(d, dtype=torch.long)


def to_batch(examples, negatives: int, *, dataset: str | None = None,
             in_batch_negatives: bool = True) -> ContrastiveBatch:
    """Grouped layout from training examples (anything with .query, .instruction, .positive, .negatives): each
    query owns [positive, K hard negatives]; short lists are filled with other examples' positives (still valid
    negatives, and the duplicate-text masking guards accidental matches)."""
    docs = []
    for i, ex in enumerate(examples):
        negs = list(ex.negatives[:negatives])
        j = 1
        while len(negs) < negatives:
            negs.append(examples[(i + j) % len(examples)].positive)
            j += 1
        docs += [ex.positive] + negs
    return ContrastiveBatch([e.query for e in examples], [e.instruction for e in examples], docs,
                            dataset=dataset, in_batch_negatives=in_batch_negatives)


def shard_batch(batch: ContrastiveBatch, dist_) -> ContrastiveBatch:
    """This rank's contiguous slice of the global ContrastiveBatch: queries [r*b, (r+1)*b) and their document
    groups, with text ids computed from the WHOLE global batch (identical on every rank, no communication, no
    collisions), so duplicate texts on different ranks are still masked. One process: the batch unchanged."""
    if not dist_.active:
        return batch
    B, N = len(batch.queries), len(batch.documents)
    b, G = B // dist_.world_size, N // B
    if batch.query_ids is not None:
        qid, did = list(batch.query_ids), list(batch.doc_ids)
    else:
        q, d = text_ids(batch.queries, batch.documents)
        qid, did = q.tolist(), d.tolist()
    qs = slice(dist_.rank * b, (dist_.rank + 1) * b)
    ds = slice(dist_.rank * b * G, (dist_.rank + 1) * b * G)
    return ContrastiveBatch(batch.queries[qs], batch.instructions[qs], batch.documents[ds], qid[qs], did[ds],
                            batch.dataset, batch.in_batch_negatives)
