"""Exact dense search with a running top-k, so the full query x corpus score matrix never exists.

Scores are computed one (query block x document chunk) at a time and merged into a per-query top-k buffer.
Peak score memory is `query_block * (doc_chunk + k)` floats whatever the corpus size, and the document
embeddings can arrive as a stream of chunks (encoded on the fly), so a 1M-document corpus needs neither all
scores nor all embeddings in memory at once.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def _score_block(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """Cosine scores for one block (inputs are L2-normalised). A separate function so tests can watch sizes."""
    return queries @ docs.T


class RunningTopK:
    """Keeps the k best (score, global doc index) per query across document chunks.

    Buffers are exactly min(k, documents seen) wide, so a corpus smaller than k never yields padding entries.
    """

    def __init__(self, n_queries: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.seen = 0
        self.scores = torch.empty((n_queries, 0), device=device)
        self.indices = torch.empty((n_queries, 0), dtype=torch.long, device=device)
        self._next: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin_chunk(self, n_docs: int) -> None:
        width = min(self.k, self.seen + n_docs)
        n_q = self.scores.shape[0]
        self._next = (self.scores.new_empty((n_q, width)), self.indices.new_empty((n_q, width)))

    def update(self, rows: slice, block_scores: torch.Tensor) -> None:
        """Merge scores of queries `rows` against the current chunk (whose first doc is index `self.seen`)."""
        new_s, new_i = self._next
        idx = torch.arange(self.seen, self.seen + block_scores.shape[1], device=block_scores.device)
        cand_s = torch.cat([self.scores[rows], block_scores.float()], dim=1)
        cand_i = torch.cat([self.indices[rows], idx.expand_as(block_scores)], dim=1)
        top_s, pos = cand_s.topk(new_s.shape[1], dim=1)
        new_s[rows] = top_s
        new_i[rows] = cand_i.gather(1, pos)

    def end_chunk(self, n_docs: int) -> None:
        self.scores, self.indices = self._next
        self._next = None
        self.seen += n_docs


def search_chunks(query_emb: torch.Tensor, doc_chunks: Iterable[torch.Tensor], k: int, *,
                  query_block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents per query over a stream of document-embedding chunks.

    Returns (scores [Q, k'], indices [Q, k']) sorted by descending score, with k' = min(k, corpus size) and
    indices counted across the whole stream. Each chunk is scored against `query_block` queries at a time.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_q = query_emb.shape[0]
    top = RunningTopK(n_q, k, device=query_emb.device)
    for chunk in doc_chunks:
        chunk = chunk.to(query_emb.device, query_emb.dtype)
        if chunk.shape[-1] != query_emb.shape[-1]:
            raise ValueError(f"document dim {chunk.shape[-1]} != query dim {query_emb.shape[-1]}")
        if chunk.shape[0] == 0:
            continue
        top.begin_chunk(chunk.shape[0])
        for start in range(0, n_q, query_block):
            rows = slice(start, min(start + query_block, n_q))
            top.update(rows, _score_block(query_emb[rows], chunk))
        top.end_chunk(chunk.shape[0])
    if top.seen == 0:
        raise ValueError("empty corpus: no document embeddings were given")
    return top.scores, top.indices


def search(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int, *, doc_chunk: int = 50_000,
           query_block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`search_chunks` over an in-memory document matrix, sliced into `doc_chunk` rows at a time."""
    chunks = (doc_emb[i:i + doc_chunk] for i in range(0, doc_emb.shape[0], doc_chunk))
    return search_chunks(query_emb, chunks, k, query_block=query_block)
