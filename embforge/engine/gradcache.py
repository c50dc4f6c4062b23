"""GradCache: an effective batch of thousands of sequences through one GPU, with exact full-batch gradients.

    pass 1   embed every query and document without grad, in chunks; cache the embeddings (cache_dtype: fp32,
             bf16 on CUDA for a bf16/fp16 model, where the loss matmuls then run on bf16 tensor cores)
    loss     fused InfoNCE on the cached embeddings -> loss and dL/d(embedding)
    pass 2   re-run each chunk with grad under the exact RNG state it had in pass 1 (CPU and CUDA generators, so
             LoRA dropout masks match) and backpropagate the cached gradient: sum(emb * dL/demb).backward()

Chunks are formed by a token budget. Packed (embedder.packing, the default wherever it is exact: packing.py), a
chunk is one padding-free row of concatenated sequences holding up to `chunk_tokens` real tokens, attention confined
to each sequence. Padded, sequences are sorted by length and each chunk is padded only to its own longest member,
so a chunk of short queries never pays for the longest document. Identical texts anywhere in the
batch get the same id, so a duplicate is never used as a negative. When everything fits in one chunk the step is a
single forward with grad (no second pass).

On N ranks (`dist`, see engine/distributed.py) the batch is this rank's slice of the global batch, with global text
ids; the loss gathers every rank's embeddings and ids, computes only this rank's query rows against all of them, and
the gather's backward returns each embedding's gradient to its owner, so pass 2 is unchanged. Parameter gradients
are reduced (SUM) once, in the last chunk's backward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from embforge.engine.batch import ContrastiveBatch, text_ids
from embforge.engine.distributed import grad_sync
from embforge.engine.packing import make_packed_chunks
from embforge.kernels import infonce_loss

CPU_CHUNK_TOKENS = 4096   # "auto" on CPU: memory is rarely the limit there, and larger chunks stop paying off


@dataclass
class StepResult:
    loss: float
    n_chunks: int
    tokens: int            # real (unpadded) tokens embedded
    padded_tokens: int     # tokens computed per pass, padding included (== tokens when packed)
    chunk_tokens: int = 0  # the budget used (resolved when "auto"): real tokens when packed, rows x longest if not
    timings: dict = field(default_factory=dict)   # seconds: pass1 (encoder forward), loss, pass2 (encoder backward)
    packed: bool = False   # chunks were padding-free packed rows


def make_chunks(lengths: list[int], chunk_tokens: int, max_chunk_seqs: int | None = None) -> list[list[int]]:
    """Group sequence indices, longest first, so that len(chunk) * longest_in_chunk <= chunk_tokens (a sequence
    longer than the budget gets a chunk of its own)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if max_chunk_seqs is not None and max_chunk_seqs < 1:
        raise ValueError(f"max_chunk_seqs must be >= 1 or None, got {max_chunk_seqs}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        # Sorted longest first, so the chunk's first member is its longest: adding i costs (len+1) * that.
        full = max_chunk_seqs is not None and len(cur) >= max_chunk_seqs
        if cur and ((len(cur) + 1) * lengths[cur[0]] > chunk_tokens or full):
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    return chunks


class _RngState:
    """The CPU generator and the model device's CUDA generator (LoRA dropout draws from the latter on GPU)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fits(embedder, rows: int, seq_len: int) -> int | None:
    """Peak bytes of one forward+backward of rows sequences of seq_len tokens (one packed row of rows x seq_len
    tokens when the embedder packs), or None on out-of-memory."""
    dev = embedder.device
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        embedder.embed_chunk([[embedder.tokenizer.eos_token_id] * seq_len] * rows).sum().backward()
        _sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    except torch.OutOfMemoryError:
        return None
    finally:
        for p in embedder.trainable_parameters():
            p.grad = None
        torch.cuda.empty_cache()


def auto_chunk_tokens(embedder, *, seq_len: int | None = None, headroom: float = 0.8,
                      max_tokens: int = 1 << 18) -> int:
    """The largest token budget whose forward+backward fits the GPU: double rows of `seq_len` (default: the longest
    allowed sequence) until the next doubling would pass `headroom` of the free memory, then extrapolate linearly
    (activations grow linearly in tokens) and verify once. Cached per embedder and seq_len. Grads and RNG state
    are left as they were. On CPU: CPU_CHUNK_TOKENS."""
    dev = embedder.device
    if dev.type != "cuda":
        return CPU_CHUNK_TOKENS
    seq_len = seq_len or max(embedder.config.query_max_length, embedder.config.doc_max_length)
    cache = embedder.__dict__.setdefault("_auto_chunk_tokens", {})
    key = (seq_len, getattr(embedder, "packing", False))   # packed and padded rows are probed apart
    if key in cache:
        return cache[key]
    saved = [(p, p.grad) for p in embedder.trainable_parameters()]
    rng = _RngState(dev)
    try:
        _sync(dev)
        free = torch.cuda.mem_get_info(dev)[0]
        budget = headroom * free
        rows, best, best_peak = 1, None, None
        while rows * seq_len <= max_tokens:
            peak = _fits(embedder, rows, seq_len)
            if peak is None:
                break
            best, best_peak = rows, peak
            if 2 * peak > budget:
                break
            rows *= 2
        if best is None:
            raise RuntimeError(f"chunk_tokens=auto: one sequence of {seq_len} tokens does not fit this GPU "
                               f"({free / 2**30:.1f} GiB free); lower the max lengths or enable "
                               "gradient_checkpointing / quantization")
        guess = min(int(best * budget / max(best_peak, 1)), 2 * best - 1, max_tokens // seq_len)
        if guess > best and _fits(embedder, guess, seq_len) is not None:
            best = guess
    finally:
        for p, g in saved:
            p.grad = g
        rng.restore()
    cache[key] = best * seq_len
    return cache[key]


def contrastive_step(embedder, batch: ContrastiveBatch, *, temperature: float | torch.Tensor = 0.02,
                     chunk_tokens: int | str = 4096, max_chunk_seqs: int | None = None, same_tower: bool = False,
                     matryoshka_dims=None, matryoshka_weights=None, loss_backend: str = "auto",
                     dist=None, cache_dtype: str = "auto") -> StepResult:
    """One GradCache step; gradients accumulate into the trainable parameters' .grad (the caller zeroes them).

    dist: a distributed.Dist with a process group, to train on N ranks (the embedder then a WrappedEmbedder and the
    batch this rank's slice with global ids, see batch.shard_batch); result.loss is then the global loss.

    chunk_tokens: tokens per chunk -- real tokens of one packed row when embedder.packing, else padded tokens
    (rows x longest row) -- or "auto" (see auto_chunk_tokens). The batch size
    is the batch's; this only sets how much runs through the encoder at once. Train/eval mode is the caller's.

    cache_dtype: dtype of the cached embeddings and their gradients, hence of the loss matmuls (see
    resolve_cache_dtype); fp32 stays the reference everywhere but CUDA."""
    dev = embedder.device
    cache_dt = resolve_cache_dtype(cache_dtype, embedder)
    _sync(dev)
    t0 = time.perf_counter()
    q_seqs = embedder.tokenize(batch.queries, is_query=True, instructions=batch.instructions)
    d_seqs = embedder.tokenize(batch.documents, is_query=False)
    seqs = q_seqs + d_seqs
    B = len(q_seqs)
    if chunk_tokens == "auto":
        if dist is not None and dist.active:
            # The probe's backward would run through the DDP/FSDP engine, out of step with the other ranks.
            raise ValueError("chunk_tokens='auto' with dist: resolve it with auto_chunk_tokens(plain embedder) "
                             "before wrapping (train does)")
        chunk_tokens = auto_chunk_tokens(embedder)
    elif isinstance(chunk_tokens, str):
        raise ValueError(f"chunk_tokens must be an int or 'auto', got {chunk_tokens!r}")
    packed = bool(getattr(embedder, "packing", False))
    chunks = (make_packed_chunks if packed else make_chunks)([len(s) for s in seqs], int(chunk_tokens),
                                                             max_chunk_seqs)
    if batch.query_ids is not None:
        qid, did = torch.tensor(batch.query_ids, dtype=torch.long), torch.tensor(batch.doc_ids, dtype=torch.long)
    elif dist is not None and dist.active:
        raise ValueError("contrastive_step on several ranks needs the global batch's text ids "
                         "(ContrastiveBatch.query_ids/doc_ids, as batch.shard_batch sets them)")
    else:
        qid, did = text_ids(batch.queries, batch.documents)
    loss_kw = dict(query_ids=qid.to(dev), doc_ids=did.to(dev), same_tower=same_tower,
                   matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights, backend=loss_backend)
    chunks = _equal_chunk_count(chunks, embedder, dist)
    real = sum(len(s) for s in seqs)
    computed = real if packed else sum(len(c) * max(len(seqs[i]) for i in c) for c in chunks if c)
    result = StepResult(0.0, len(chunks), real, computed, int(chunk_tokens), packed=packed)
    index = [torch.tensor(c, device=dev) for c in chunks]

    if _one_pass(chunks, dist):
        # Everything fits at once: a plain forward with grad, nothing cached, no second pass.
        emb = embedder.embed_chunk([seqs[i] for i in chunks[0]])
        reps = torch.empty_like(emb).index_copy(0, index[0], emb).to(cache_dt)   # batch order, differentiably
        _sync(dev)
        t1 = time.perf_counter()
        loss = _loss(reps, B, temperature, loss_kw, dist)
        _sync(dev)
        t2 = time.perf_counter()
        loss.backward()
        _sync(dev)
        result.loss = _global_value(loss, dist)
        result.timings = {"pass1": t1 - t0, "loss": t2 - t1, "pass2": time.perf_counter() - t2}
        return result

    # Pass 1: no grad, cache the embeddings and each chunk's RNG state.
    cache = torch.empty(len(seqs), embedder.hidden_size, device=dev, dtype=cache_dt)
    states = []
    with torch.no_grad():
        for c, idx in zip(chunks, index):
            states.append(_RngState(dev))
            if not c:   # an empty chunk (FSDP2: every rank runs as many forwards as the busiest)
                _dummy_forward(embedder)
                continue
            cache.index_copy_(0, idx, embedder.embed_chunk([seqs[i] for i in c]).to(cache_dt))
    after_pass1 = _RngState(dev)
    _sync(dev)
    t1 = time.perf_counter()

    # Loss and its gradient w.r.t. every cached embedding.
    reps = cache.requires_grad_()
    loss = _loss(reps, B, temperature, loss_kw, dist)
    loss.backward()
    grad = reps.grad
    _sync(dev)
    t2 = time.perf_counter()

    # Pass 2: replay each chunk under its pass-1 RNG state and push the cached gradient through the encoder.
    # On N ranks gradients are reduced once: in the last chunk's backward (no_sync for the others).
    for k, (c, idx, state) in enumerate(zip(chunks, index, states)):
        state.restore()
        with grad_sync(embedder, k == len(chunks) - 1):
            if not c:
                (_dummy_forward(embedder) * 0).sum().backward()
                continue
            emb = embedder.embed_chunk([seqs[i] for i in c])
            torch.autograd.backward(emb, grad_tensors=grad.index_select(0, idx).to(emb.dtype))
    after_pass1.restore()  # leave the generators where a single pass would have left them
    _sync(dev)
    result.loss = _global_value(loss, dist)
    result.timings = {"pass1": t1 - t0, "loss": t2 - t1, "pass2": time.perf_counter() - t2}
    return result


CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_cache_dtype(requested: str, embedder) -> torch.dtype:
    """cache_dtype: "auto" | "float32" | "bfloat16". auto = bf16 on CUDA when the model computes in bf16/fp16 (its
    embeddings carry bf16 precision already; the InfoNCE matmuls then use bf16 tensor cores with fp32 accumulation,
    G' is written in bf16, and the gradient handed to pass 2 is bf16, which is what the bf16 backward consumes),
    fp32 otherwise: on CPU (the exact reference; bf16 matmuls are slow there) and for an fp32 model on CUDA, whose
    user asked for fp32 (TF32 there would be a process-wide switch; the loss is a few percent of a step's FLOPs).
    docs/bench.md "GradCache cache precision" gives the measured bf16-vs-fp32 error."""
    if requested == "auto":
        model_dtype = getattr(embedder.model, "dtype", torch.float32)
        bf16_model = model_dtype in (torch.bfloat16, torch.float16)
        return torch.bfloat16 if embedder.device.type == "cuda" and bf16_model else torch.float32
    if requested not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be 'auto', 'float32' or 'bfloat16', got {requested!r}")
    return CACHE_DTYPES[requested]


def _loss(reps: torch.Tensor, B: int, temperature, loss_kw: dict, dist) -> torch.Tensor:
    """InfoNCE of the B queries reps[:B] against the documents reps[B:] (grouped: G per query).

    On N ranks (dist active) this is rank r's share of the global loss: its own B query rows against EVERY rank's
    documents (and every rank's queries with same_tower), gathered in rank order, which is global batch order, with
    positives at their global positions, divided by N (= b / B_global), so the ranks' losses sum to the global mean
    loss. dist.gather_rows' backward sums each gathered row's gradient over ranks and hands it to its owner, so
    reps.grad holds exactly d(global loss)/d(own embedding): no 1/N or N factor is left to correct anywhere."""
    if dist is None or not dist.active:
        return infonce_loss(reps[:B], reps[B:], temperature, **loss_kw)
    ws, H = dist.world_size, reps.shape[1]
    n = reps.shape[0] - B
    kw = dict(loss_kw)
    qid, did = kw.pop("query_ids"), kw.pop("doc_ids")
    rows = dist.gather_rows(reps).view(ws, B + n, H)      # one all-gather for queries and documents
    ids = dist.gather_ids(torch.cat([qid, did])).view(ws, B + n)
    q_all, d_all = rows[:, :B].reshape(ws * B, H), rows[:, B:].reshape(ws * n, H)
    qid_all, did_all = ids[:, :B].reshape(-1), ids[:, B:].reshape(-1)
    off = dist.rank * B
    pos = (off + torch.arange(B, device=reps.device)) * (n // B)
    if kw["same_tower"]:
        kw.update(tower_queries=q_all, tower_query_ids=qid_all, query_offset=off)
    loss = infonce_loss(q_all[off: off + B], d_all, temperature, positive_index=pos,
                        query_ids=qid_all[off: off + B], doc_ids=did_all, **kw)
    return loss / ws


def _global_value(loss: torch.Tensor, dist) -> float:
    """The loss one process would report: on N ranks the sum of the ranks' shares."""
    value = float(loss.detach())
    return dist.sum(value) if dist is not None and dist.active else value


def _equal_chunk_count(chunks: list[list[int]], embedder, dist) -> list[list[int]]:
    """FSDP2 gathers parameters collectively in every forward, so every rank must run as many chunks as the
    busiest: the others get empty chunks (a one-token forward whose output gets zero gradient). DDP communicates
    only in the last synced backward, so its ranks may differ."""
    if dist is None or not dist.active or getattr(embedder, "strategy", None) != "fsdp":
        return chunks
    most = int(dist.max(float(len(chunks))))
    return chunks + [[] for _ in range(most - len(chunks))]


def _one_pass(chunks: list[list[int]], dist) -> bool:
    """One chunk: a single forward with grad. On N ranks only if EVERY rank has one chunk: the one-pass and two-pass
    paths issue their collectives in a different order (DDP's bucket rebuild in the first grad forward vs the
    embedding all-gather after pass 1), so ranks on different paths would deadlock."""
    if dist is None or not dist.active:
        return len(chunks) == 1
    return dist.max(float(len(chunks))) == 1


def _dummy_forward(embedder) -> torch.Tensor:
    ids = torch.full((1, 1), embedder.tokenizer.eos_token_id, device=embedder.device, dtype=torch.long)
    return embedder.forward_tokens(ids, torch.ones_like(ids))
