"""GradCache: an effective batch of thousands of sequences through one GPU, with exact full-batch gradients.

    pass 1   embed every query and document without grad, in chunks; cache fp32 embeddings
    loss     fused InfoNCE on the cached embeddings -> loss and dL/d(embedding)
    pass 2   re-run each chunk with grad under the exact RNG state it had in pass 1 (CPU and CUDA generators, so
             LoRA dropout masks match) and backpropagate the cached gradient: sum(emb * dL/demb).backward()

Chunks are formed by a token budget after sorting all sequences by length, and each chunk is padded only to its own
longest member, so a chunk of short queries never pays for the longest document. Identical texts anywhere in the
batch get the same id, so a duplicate is never used as a negative. When everything fits in one chunk the step is a
single forward with grad (no second pass).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from embforge.kernels import infonce_loss


@dataclass
class ContrastiveBatch:
    queries: list[str]
    instructions: list[str | None]
    documents: list[str]                  # grouped: query i owns documents[i*G:(i+1)*G], positive first
    query_ids: list[int] | None = None    # optional explicit text ids (otherwise derived from the texts)
    doc_ids: list[int] | None = None

    def __post_init__(self):
        B, N = len(self.queries), len(self.documents)
        if B == 0:
            raise ValueError("ContrastiveBatch has no queries")
        if len(self.instructions) != B:
            raise ValueError(f"ContrastiveBatch: {B} queries but {len(self.instructions)} instructions")
        if N % B != 0 or N == 0:
            raise ValueError(f"ContrastiveBatch: {N} documents is not a positive multiple of {B} queries "
                             "(each query owns its positive and the same number of hard negatives)")


@dataclass
class StepResult:
    loss: float
    n_chunks: int
    tokens: int            # real (unpadded) tokens embedded
    padded_tokens: int     # tokens computed including padding, per pass
    timings: dict = field(default_factory=dict)   # seconds: pass1, loss, pass2


def make_chunks(lengths: list[int], chunk_tokens: int, max_chunk_seqs: int | None = None) -> list[list[int]]:
    """Group sequence indices, longest first, so that len(chunk) * longest_in_chunk <= chunk_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks, cur, cur_max = [], [], 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        too_many = max_chunk_seqs is not None and len(cur) >= max_chunk_seqs
        if cur and ((len(cur) + 1) * new_max > chunk_tokens or too_many):
            chunks.append(cur)
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        chunks.append(cur)
    return chunks


def text_ids(queries: list[str], documents: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """One integer id per distinct text across queries and documents (exact duplicates share it)."""
    table: dict[str, int] = {}
    q = [table.setdefault(t, len(table)) for t in queries]
    d = [table.setdefault(t, len(table)) for t in documents]
    return torch.tensor(q), torch.tensor(d)


class _RngState:
    """CPU and (when initialized) every CUDA generator's state, captured and restorable."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def auto_chunk_tokens(embedder, *, max_length: int = 512, start: int = 1024, limit: int = 1 << 17) -> int:
    """Largest token budget whose forward+backward fits the GPU (doubling probe); a fixed default on CPU."""
    if embedder.device.type != "cuda":
        return 4096
    best = None
    budget = start
    eos = embedder.tokenizer.eos_token_id
    while budget <= limit:
        rows = max(1, budget // max_length)
        ids = torch.full((rows, max_length), eos, device=embedder.device)
        mask = torch.ones_like(ids)
        try:
            torch.cuda.reset_peak_memory_stats()
            emb = embedder.forward_tokens(ids, mask)
            emb.float().sum().backward()
            embedder.model.zero_grad(set_to_none=True)
            free, total = torch.cuda.mem_get_info()
            best = budget
            if torch.cuda.max_memory_allocated() > 0.7 * total:
                break
            budget *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if best is None:
        raise RuntimeError(f"even {start} tokens per chunk do not fit this GPU")
    return best


def contrastive_step(embedder, batch: ContrastiveBatch, *, temperature: float | torch.Tensor = 0.02,
                     chunk_tokens: int | str = 4096, max_chunk_seqs: int | None = None, same_tower: bool = False,
                     matryoshka_dims=None, matryoshka_weights=None, loss_backend: str = "auto") -> StepResult:
    """One GradCache step; gradients accumulate into the trainable parameters' .grad (the caller zeroes them)."""
    t0 = time.perf_counter()
    q_seqs = embedder.tokenize(batch.queries, is_query=True, instructions=batch.instructions)
    d_seqs = embedder.tokenize(batch.documents, is_query=False)
    seqs = q_seqs + d_seqs
    B = len(q_seqs)
    if chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(embedder)
    chunks = make_chunks([len(s) for s in seqs], int(chunk_tokens), max_chunk_seqs)
    if batch.query_ids is not None and batch.doc_ids is not None:
        qid, did = torch.tensor(batch.query_ids), torch.tensor(batch.doc_ids)
    else:
        qid, did = text_ids(batch.queries, batch.documents)
    dev = embedder.device
    loss_kw = dict(query_ids=qid.to(dev), doc_ids=did.to(dev), same_tower=same_tower,
                   matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights, backend=loss_backend)
    padded = sum(len(c) * max(len(seqs[i]) for i in c) for c in chunks)
    tokens = sum(len(s) for s in seqs)
    timings = {}

    if len(chunks) == 1:
        # Everything fits at once: a plain forward with grad, nothing cached, no second pass.
        ids, mask = embedder.collate([seqs[i] for i in chunks[0]])
        emb = embedder.forward_tokens(ids, mask)
        reps = torch.empty_like(emb)
        reps[torch.tensor(chunks[0], device=emb.device)] = emb
        loss = infonce_loss(reps[:B], reps[B:], temperature, **loss_kw)
        loss.backward()
        timings["pass1"] = time.perf_counter() - t0
        return StepResult(float(loss.detach()), 1, tokens, padded, timings)

    # Pass 1: no grad, cache fp32 embeddings and each chunk's RNG state.
    H = embedder.hidden_size
    cache = torch.empty(len(seqs), H, device=dev, dtype=torch.float32)
    states = []
    with torch.no_grad():
        for c in chunks:
            states.append(_RngState())
            ids, mask = embedder.collate([seqs[i] for i in c])
            cache[torch.tensor(c, device=dev)] = embedder.forward_tokens(ids, mask).float()
    after_pass1 = _RngState()
    t1 = time.perf_counter()
    timings["pass1"] = t1 - t0

    # Loss and its gradient w.r.t. every cached embedding.
    reps = cache.requires_grad_()
    loss = infonce_loss(reps[:B], reps[B:], temperature, **loss_kw)
    loss.backward()
    grad = reps.grad
    t2 = time.perf_counter()
    timings["loss"] = t2 - t1

    # Pass 2: replay each chunk under its pass-1 RNG state and push the cached gradient through the encoder.
    for c, state in zip(chunks, states):
        state.restore()
        ids, mask = embedder.collate([seqs[i] for i in c])
        emb = embedder.forward_tokens(ids, mask)
        g = grad[torch.tensor(c, device=dev)]
        torch.autograd.backward(emb, grad_tensors=g.to(emb.dtype))
    after_pass1.restore()  # leave the generators where a single pass would have left them
    timings["pass2"] = time.perf_counter() - t2
    return StepResult(float(loss.detach()), len(chunks), tokens, padded, timings)
