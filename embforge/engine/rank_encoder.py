"""Evaluation on every rank: the embedder as an evaluation sees it under torchrun.

`RankShardedEncoder.encode(texts)` is called by every rank with the same texts (evaluations are deterministic:
the same queries, corpus chunks and instruction groups in the same order on every rank). Each rank encodes one
contiguous share, and one all-gather gives every rank all the rows, in order. So the evaluation's work divides by N,
no rank waits in a collective while another encodes alone (a collective waits at most one batch of the slowest
rank, so no evaluation length can reach distributed.timeout_s), and every rank can score the same embeddings.

DDP: each rank holds the whole model and encodes its share with the plain embedder (no collective per batch).
FSDP2: the weights are sharded, so every batch goes through the FSDP root (its forward gathers the parameters, a
collective): the ranks run equally many batches, the shorter shares padding with a one-token forward.
One process never builds this (train() hands evaluation the plain embedder).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


class RankShardedEncoder:
    def __init__(self, embedder, step_embedder, dist_):
        self.__dict__.update(embedder=embedder, step_embedder=step_embedder, dist=dist_,
                             fsdp=getattr(step_embedder, "strategy", None) == "fsdp")

    def __getattr__(self, name):          # tokenizer, hidden_size, model, ...: the embedder's
        return getattr(self.embedder, name)

    def encode(self, texts: list[str], *, instruction: str | None = None, is_query: bool | None = None,
               batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Embedder.encode's contract (L2-normalized fp32 [n, H] on CPU), computed by all ranks together."""
        texts = list(texts)
        n, ws, rank = len(texts), self.dist.world_size, self.dist.rank
        share = math.ceil(n / ws)
        mine = texts[min(rank * share, n):min((rank + 1) * share, n)]
        if self.fsdp:
            emb = self._encode_in_step(mine, instruction, is_query, batch_size)
        elif mine:
            emb = self.embedder.encode(mine, instruction=instruction, is_query=is_query, batch_size=batch_size)
        else:
            emb = torch.empty(0, self.embedder.hidden_size)
        padded = torch.zeros(share, self.embedder.hidden_size, dtype=torch.float32)
        padded[:len(mine)] = emb
        dev = self.dist.comm_device
        out = torch.empty(ws * share, padded.shape[1], dtype=torch.float32, device=dev)
        dist.all_gather_into_tensor(out, padded.to(dev))
        # shares are full except the last non-empty one, so the first n rows are the texts in order
        return out[:n].cpu()

    @torch.no_grad()
    def _encode_in_step(self, texts, instruction, is_query, batch_size) -> torch.Tensor:
        emb = self.embedder
        if is_query is None:
            is_query = instruction is not None
        seqs = emb.tokenize(texts, is_query=is_query, instructions=[instruction] * len(texts) if is_query
                            else None) if texts else []      # an empty share still runs the others' batch count
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        most = int(self.dist.max(float(len(batches))))
        out = torch.empty(len(seqs), emb.hidden_size, dtype=torch.float32)
        eos = [[emb.tokenizer.eos_token_id]]
        was_training = emb.model.training
        emb.model.eval()
        try:
            for i in range(most):
                if i < len(batches):
                    idx = batches[i]
                    e = self.step_embedder.embed_chunk([seqs[j] for j in idx])
                    out[idx] = torch.nn.functional.normalize(e, dim=-1).cpu()   # as Embedder.encode
                else:       # keeps FSDP's parameter all-gathers in step with the busier ranks; output unused
                    self.step_embedder.embed_chunk(eos)
        finally:
            emb.model.train(was_training)
        return out
