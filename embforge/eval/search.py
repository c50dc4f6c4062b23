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
    """Keeps the k best (score, global doc index) per query across document chunks."""

    def __init__(self, n_queries: int, k: int, device: torch.device | str = "cpu"):
        self.k = k
        self.scores = torch.full((n_queries, 0), float("-inf"), device=device)
        self.indices = torch.zeros((n_queries, 0), dtype=torch.long, device=device)

    def update(self, row_slice: slice, block_scores: torch.Tensor, offset: int) -> None:
        """Merge `block_scores` (rows = queries in `row_slice`, cols = docs offset..offset+n) into the buffer."""
        n = block_scores.shape[1]
        idx = torch.arange(offset, offset + n, device=block_scores.device).expand_as(block_scores)
        if self.scores.shape[1] == 0:  # first chunk: buffers take their width from it
            cur_s = torch.empty((block_scores.shape[0], 0), device=block_scores.device)
            cur_i = torch.empty((block_scores.shape[0], 0), dtype=torch.long, device=block_scores.device)
        else:
            cur_s, cur_i = self.scores[row_slice], self.indices[row_slice]
        cand_s = torch.cat([cur_s, block_scores.float()], dim=1)
        cand_i = torch.cat([cur_i, idx], dim=1)
        keep = min(self.k, cand_s.shape[1])
        top_s, pos = cand_s.topk(keep, dim=1)
        top_i = cand_i.gather(1, pos)
        if self.scores.shape[1] < keep:  # widen buffers while the corpus seen so far is smaller than k
            pad = keep - self.scores.shape[1]
            self.scores = torch.cat([self.scores, self.scores.new_full((self.scores.shape[0], pad), float("-inf"))], 1)
            self.indices = torch.cat([self.indices, self.indices.new_full((self.indices.shape[0], pad), -1)], 1)
        self.scores[row_slice, :keep] = top_s
        self.indices[row_slice, :keep] = top_i


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
    offset = 0
    for chunk in doc_chunks:
        chunk = chunk.to(query_emb.device, query_emb.dtype)
        if chunk.shape[-1] != query_emb.shape[-1]:
            raise ValueError(f"document dim {chunk.shape[-1]} != query dim {query_emb.shape[-1]}")
        for start in range(0, n_q, query_block):
            rows = slice(start, min(start + query_block, n_q))
            top.update(rows, _score_block(query_emb[rows], chunk), offset)
        offset += chunk.shape[0]
    if offset == 0:
        raise ValueError("empty corpus: no document embeddings were given")
    return top.scores, top.indices


def search(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int, *, doc_chunk: int = 50_000,
           query_block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`search_chunks` over an in-memory document matrix, sliced into `doc_chunk` rows at a time."""
    chunks = (doc_emb[i:i + doc_chunk] for i in range(0, doc_emb.shape[0], doc_chunk))
    return search_chunks(query_emb, chunks, k, query_block=query_block)
