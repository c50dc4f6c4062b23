"""InfoNCE over temperature-scaled cosine similarity, without ever holding the B x N similarity matrix.

Math (see ../shared/docs/recipe.md):
    u_i = q_i/|q_i|, v_j = d_j/|d_j|, s_ij = u_i.v_j, l_i = LSE_j(s_ij/tau),
    L = 1/B sum_i (l_i - s_{i,p(i)}/tau),  G_ij = dL/ds_ij = (P_ij - 1[j=p(i)]) / (B tau).

Why this shape of algorithm. The embedding width H is large (4096 for Mistral-7B), so a FlashAttention-style
kernel that keeps a [BLOCK_M, H] accumulator on chip does not fit, and any tile-recompute scheme pays the
2BNH similarity matmul again per pass. Instead we walk the queries in row chunks of C rows, C chosen from a
memory budget and independent of B:

    1. S_c = Q_c @ D^T          raw dot products, fp32 accumulate (tensor cores on GPU)   2CNH FLOPs
    2. epilogue (fused)          scale by 1/|q_i|, 1/|d_j|, 1/tau; mask; online max/sum-exp -> l_i;
                                 P, G' = G * 1/|d_j| written in the matmul dtype; row dots sum_j G_ij s_ij
    3. g_c = G'_c @ D           2CNH FLOPs,   h' += G'_c^T @ U_c   2CNH FLOPs

so a full forward+backward costs the minimum 6BNH FLOPs with no recomputation, and the scratch is
C x N x (4 + 2) bytes. When the inputs need gradients the forward computes them right away (the loss of a
GradCache step is always followed by its backward) and backward only scales them by grad_output.

Step 2 is either the Triton kernel below (backend="triton") or the same arithmetic in torch ops
(backend="torch", used on CPU); step 1 and 3 are matmuls in both. Normalization is fused: the matmul sees the
raw bf16 inputs (no rounding of q/|q|), and the inverse norms are applied to the fp32 accumulator.

Gradients through the normalization: dq_i = (g_i - (u_i.g_i) u_i)/|q_i| with u_i.g_i = sum_j G_ij s_ij, and
dd_j = h'_j - (v_j.h'_j) v_j where h'_j = sum_i G_ij u_i / |d_j|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from embforge.kernels import utils as U
from embforge.kernels.utils import choose_chunk_rows, resolve_backend  # noqa: F401  (public API)

# ----------------------------------------------------------------------------------------------------------
# Triton epilogue: one program per query row, two sweeps over the N candidates of that row.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _infonce_rows_kernel(
    S_ptr, stride_s,            # [C, N] fp32 raw dot products q_i . d_j
    G_ptr, stride_g,            # [C, N] out: G_ij / |d_j|   (unused unless COMPUTE_GRAD)
    rq_ptr, rd_ptr,             # [C] 1/|q_i|, [N] 1/|d_j|  (fp32)
    pos_ptr,                    # [C] int64 column of each row's positive
    posid_ptr, qid_ptr,         # [C] int64 id of the positive's text and of the query's text (-1: none)
    cid_ptr,                    # [N] int64 id of each candidate's text (-1: none)
    self_ptr,                   # [C] int64 column holding the query itself (same-tower), -1: none
    lse_ptr, spos_ptr, rowdot_ptr,  # out [C] fp32: l_i, s_{i,p(i)}, sum_j G_ij s_ij
    N, inv_tau, grad_scale,
    HAS_IDS: tl.constexpr, HAS_SELF: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S_ptr + row * stride_s
    rq = tl.load(rq_ptr + row)
    pos = tl.load(pos_ptr + row)
    if HAS_IDS:
        pos_id = tl.load(posid_ptr + row)
        q_id = tl.load(qid_ptr + row)
    if HAS_SELF:
        self_col = tl.load(self_ptr + row)
    offs = tl.arange(0, BLOCK_N)
    # Sweep 1: online log-sum-exp, kept per lane (base-2) and reduced once at the end.
    LOG2E: tl.constexpr = 1.4426950408889634
    # Masked logits use a finite floor instead of -inf so that no lane ever computes -inf - -inf.
    NEG: tl.constexpr = -1.0e30
    m = tl.full([BLOCK_N], NEG, tl.float32)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + offs
        inb = cols < N
        s = tl.load(s_row + cols, mask=inb, other=0.0) * rq * tl.load(rd_ptr + cols, mask=inb, other=0.0)
        keep = inb
        if HAS_IDS:
            cid = tl.load(cid_ptr + cols, mask=inb, other=-1)
            false_neg = (cid >= 0) & ((cid == pos_id) | (cid == q_id))
            keep = keep & ((cols == pos) | (~false_neg))
        if HAS_SELF:
            keep = keep & (cols != self_col)
        x = tl.where(keep, s * (inv_tau * LOG2E), NEG)
        m_new = tl.maximum(m, x)
        alpha = tl.exp2(m - m_new)
        p = tl.where(keep, tl.exp2(x - m_new), 0.0)
        acc = acc * alpha + p
        m = m_new
    m_row = tl.max(m, axis=0)
    l_row = tl.sum(acc * tl.exp2(m - m_row), axis=0)
    lse2 = m_row + tl.log2(l_row)            # base-2 log-sum-exp of s/tau
    s_pos = tl.load(s_row + pos) * rq * tl.load(rd_ptr + pos)
    tl.store(lse_ptr + row, lse2 / LOG2E)
    tl.store(spos_ptr + row, s_pos)
    if COMPUTE_GRAD:
        g_row = G_ptr + row * stride_g
        rowdot = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + offs
            inb = cols < N
            rd = tl.load(rd_ptr + cols, mask=inb, other=0.0)
            s = tl.load(s_row + cols, mask=inb, other=0.0) * rq * rd
            keep = inb
            if HAS_IDS:
                cid = tl.load(cid_ptr + cols, mask=inb, other=-1)
                false_neg = (cid >= 0) & ((cid == pos_id) | (cid == q_id))
                keep = keep & ((cols == pos) | (~false_neg))
            if HAS_SELF:
                keep = keep & (cols != self_col)
            p = tl.where(keep, tl.exp2(s * (inv_tau * LOG2E) - lse2), 0.0)
            g = (p - tl.where(cols == pos, 1.0, 0.0)) * grad_scale
            rowdot += g * s
            tl.store(g_row + cols, (g * rd).to(G_ptr.dtype.element_ty), mask=inb)
        tl.store(rowdot_ptr + row, tl.sum(rowdot, axis=0))


def _rows_triton(S, rq, rd, pos, pos_id, q_id, cid, self_col, inv_tau, grad_scale, G):
    if S.dtype == torch.float64:  # the kernel computes in fp32; float64 (gradcheck) takes the torch epilogue
        return _rows_torch(S, rq, rd, pos, pos_id, q_id, cid, self_col, inv_tau, grad_scale, G)
    C, N = S.shape
    lse = U.empty(C, device=S.device, dtype=torch.float32)
    spos = U.empty(C, device=S.device, dtype=torch.float32)
    rowdot = U.empty(C, device=S.device, dtype=torch.float32)
    has_ids = cid is not None
    has_self = self_col is not None
    dummy = pos  # placeholder pointer for disabled features (never read)
    block_n = min(1024, triton.next_power_of_2(max(N, 16)))
    _infonce_rows_kernel[(C,)](
        S, S.stride(0), G if G is not None else S, G.stride(0) if G is not None else 0,
        rq, rd, pos,
        pos_id if has_ids else dummy, q_id if has_ids else dummy, cid if has_ids else dummy,
        self_col if has_self else dummy,
        lse, spos, rowdot,
        N, inv_tau, grad_scale,
        HAS_IDS=has_ids, HAS_SELF=has_self, COMPUTE_GRAD=G is not None, BLOCK_N=block_n,
        num_warps=4 if block_n <= 512 else 8,
    )
    return lse, spos, rowdot


def _rows_torch(S, rq, rd, pos, pos_id, q_id, cid, self_col, inv_tau, grad_scale, G):
    """The same epilogue in torch ops (CPU path). Works in place on S and one logits buffer, so its scratch stays
    within utils._SCRATCH_BYTES_PER_ENTRY["torch"] per similarity entry."""
    C, N = S.shape
    rows = torch.arange(C, device=S.device)
    s = S.mul_(rq[:, None]).mul_(rd[None, :])          # cosine similarities, in place
    logits = s * inv_tau
    if cid is not None or self_col is not None:
        drop = torch.zeros(C, N, dtype=torch.bool, device=S.device)
        if cid is not None:
            drop |= (cid[None, :] >= 0) & ((cid[None, :] == pos_id[:, None]) | (cid[None, :] == q_id[:, None]))
        if self_col is not None:
            drop[rows, self_col] = True
        drop[rows, pos] = False                       # the positive is never masked
        logits.masked_fill_(drop, float("-inf"))
        del drop
    lse = torch.logsumexp(logits, dim=1)
    spos = s[rows, pos]
    rowdot = None
    if G is not None:
        p = logits.sub_(lse[:, None]).exp_()           # P, in place
        p[rows, pos] -= 1.0
        p.mul_(grad_scale)                             # G = (P - onehot) / (B tau)
        rowdot = torch.einsum("ij,ij->i", p, s)
        if G.dtype == p.dtype:
            torch.mul(p, rd[None, :], out=G)
        else:
            G.copy_(p.mul_(rd[None, :]))
    return lse, spos, rowdot


# ----------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------
# Chunked driver shared by both backends.
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Masking:
    pos: torch.Tensor              # [B] int64
    pos_id: torch.Tensor | None    # [B]
    q_id: torch.Tensor | None      # [B]
    cid: torch.Tensor | None       # [N']
    self_col: torch.Tensor | None  # [B]


def _infonce_chunked(q, d, inv_tau: float, m: _Masking, chunk_rows: int, impl, want_grad: bool,
                     eps: float):
    """Loss, and when want_grad: dL/dq, dL/dd (in the inputs' dtypes) and sum_ij G_ij s_ij (for dL/dtau)."""
    epilogue, project = impl
    B, N = q.shape[0], d.shape[0]
    mm_dtype, acc = U.matmul_dtype(q), U.acc_dtype(q)
    qm, dm = q.to(mm_dtype), d.to(mm_dtype)
    # Inverse norms from the raw inputs, accumulated in fp32 (no fp32 copy of q or d).
    rq = torch.linalg.vector_norm(q, dim=1, dtype=acc).clamp_min_(eps).reciprocal_()
    rd = torch.linalg.vector_norm(d, dim=1, dtype=acc).clamp_min_(eps).reciprocal_()
    grad_scale = inv_tau / B
    loss = torch.zeros((), device=q.device, dtype=acc)
    if want_grad:
        g = U.empty(B, q.shape[1], device=q.device, dtype=acc)
        h = U.empty(N, d.shape[1], device=q.device, dtype=acc)
        rowdot_all = U.empty(B, device=q.device, dtype=acc)
        G_buf = U.empty(min(chunk_rows, B), N, device=q.device, dtype=mm_dtype)
    dmT = dm.t()
    for start in range(0, B, chunk_rows):
        end = min(B, start + chunk_rows)
        sl = slice(start, end)
        S = U.mm_f32(qm[sl], dmT)
        G = G_buf[: end - start] if want_grad else None
        lse, spos, rowdot = epilogue(
            S, rq[sl], rd, m.pos[sl],
            None if m.pos_id is None else m.pos_id[sl], None if m.q_id is None else m.q_id[sl], m.cid,
            None if m.self_col is None else m.self_col[sl], inv_tau, grad_scale, G)
        loss += (lse - spos * inv_tau).sum()
        del S
        if want_grad:
            g[sl] = U.mm_f32(G, dm)
            u_c = (qm[sl] * rq[sl, None]).to(mm_dtype)
            U.accumulate_f32_(h, G.t(), u_c, first=start == 0)
            rowdot_all[sl] = rowdot
    loss = loss / B
    if not want_grad:
        return loss, None, None, None
    dq = project(g, q, rq, rowdot_all)
    del g
    dd = project(h, d, rd, None)
    return loss, dq, dd, rowdot_all.sum()


class _InfoNCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, d, temperature, masking, chunk_rows, impl, eps):
        tau = float(temperature)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        loss, dq, dd, gs = _infonce_chunked(q, d, 1.0 / tau, masking, chunk_rows, impl, want_grad, eps)
        if want_grad:
            # dL/dtau = -(1/tau) sum_ij G_ij s_ij
            dtau = (-gs / tau).reshape(())
            ctx.save_for_backward(dq, dd, dtau)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        dq, dd, dtau = ctx.saved_tensors
        # dq, dd are already in the inputs' dtypes
        gq = dq * grad_out.to(dq.dtype) if ctx.needs_input_grad[0] else None
        gd = dd * grad_out.to(dd.dtype) if ctx.needs_input_grad[1] else None
        gt = (dtau * grad_out) if ctx.needs_input_grad[2] else None
        return gq, gd, gt, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------
def _check(q: torch.Tensor, d: torch.Tensor):
    for name, x in (("q", q), ("d", d)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"infonce_loss: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"infonce_loss: {name} must be 2-D [rows, H], got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"infonce_loss: {name} must be float32/bfloat16/float16/float64, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"infonce_loss: {name} is empty: shape {tuple(x.shape)}")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"infonce_loss: q and d widths differ: q {tuple(q.shape)} vs d {tuple(d.shape)}")
    if q.device != d.device:
        raise ValueError(f"infonce_loss: q is on {q.device} but d is on {d.device}")


def _temperature(temperature):
    if isinstance(temperature, torch.Tensor):
        tau_t = temperature
        tau_val = float(temperature.detach())
    else:
        tau_t = torch.tensor(float(temperature))
        tau_val = float(temperature)
    if not (tau_val > 0 and math.isfinite(tau_val)):
        raise ValueError(f"infonce_loss: temperature must be a positive finite number, got {tau_val}")
    return tau_t, tau_val


def _single_dim_loss(q, d, temperature, *, positive_index, query_ids, doc_ids, opts, backend,
                     chunk_size, memory_budget_mb, eps, tower_queries=None, tower_query_ids=None, query_offset=0):
    B, N = q.shape[0], d.shape[0]
    dev = q.device
    if positive_index is None:
        if N % B != 0:
            raise ValueError(f"infonce_loss: N={N} candidates is not a multiple of B={B} queries; the default "
                             "grouped layout (query i owns d[i*G:(i+1)*G], positive first) needs N % B == 0 - "
                             "pass positive_index")
        pos = torch.arange(B, device=dev, dtype=torch.int64) * (N // B)
    else:
        pos = U.ids(positive_index, B, "positive_index", dev)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= N):
            raise ValueError(f"infonce_loss: positive_index must lie in [0, {N}), got range "
                             f"[{int(pos.min())}, {int(pos.max())}]")
    q_id = U.ids(query_ids, B, "query_ids", dev)
    cid = U.ids(doc_ids, N, "doc_ids", dev)
    if not opts.plain:     # margin, GTE directions, own group, distillation: infonce_terms.py
        from embforge.kernels.infonce_terms import terms_loss
        tau_t, _ = _temperature(temperature)
        return terms_loss(q, d, tau_t, opts, pos=pos, q_id=q_id, cid=cid, tower_queries=tower_queries,
                          tower_query_ids=tower_query_ids, query_offset=query_offset, backend=backend,
                          chunk_size=chunk_size, memory_budget_mb=memory_budget_mb, eps=eps,
                          default_layout=positive_index is None)
    same_tower = "q2q" in opts.directions
    candidates = d
    self_col = None
    if same_tower:
        # Gecko's same-tower negatives: other queries join the candidates; a query never competes with itself.
        # tower_queries (default: q) are the queries that join; q is rows [query_offset, query_offset + B) of them
        # (a rank's own slice of the gathered global queries).
        tq, tq_id = q, q_id
        if tower_queries is not None:
            tq = tower_queries
            tq_id = U.ids(tower_query_ids, tq.shape[0], "tower_query_ids", dev)
        candidates = torch.cat([d, tq.to(d.dtype)], dim=0)
        self_col = torch.arange(B, device=dev, dtype=torch.int64) + N + query_offset
        if cid is not None or tq_id is not None:
            cid_d = cid if cid is not None else torch.full((N,), -1, device=dev, dtype=torch.int64)
            cid_q = tq_id if tq_id is not None else torch.full((tq.shape[0],), -1, device=dev, dtype=torch.int64)
            cid = torch.cat([cid_d, cid_q])
    if cid is not None:
        pos_id = cid[pos]
        if q_id is None:
            q_id = torch.full((B,), -1, device=dev, dtype=torch.int64)
    else:
        pos_id = q_id = None
    masking = _Masking(pos, pos_id, q_id, cid, self_col)
    n_all = candidates.shape[0]
    rows = chunk_size if chunk_size else U.choose_chunk_rows(n_all, memory_budget_mb, B, backend)
    impl = (_rows_triton, U.project_triton) if backend == "triton" else (_rows_torch, U.project_torch)
    tau_t, _ = _temperature(temperature)
    # With same_tower, q reaches the loss both as queries and (through the cat) as candidates; autograd sums
    # the two gradients.
    return _InfoNCEFunction.apply(q, candidates, tau_t, masking, rows, impl, eps)


def infonce_loss(q: torch.Tensor, d: torch.Tensor, temperature: float | torch.Tensor = 0.02, *,
                 positive_index=None, query_ids=None, doc_ids=None, same_tower: bool = False,
                 matryoshka_dims=None, matryoshka_weights=None, backend: str = "auto",
                 chunk_size: int | None = None, memory_budget_mb: float | None = None,
                 eps: float = 1e-6, tower_queries: torch.Tensor | None = None, tower_query_ids=None,
                 query_offset: int = 0, directions=("q2d",), false_negative_margin: float | None = None,
                 in_batch_negatives: bool = True, teacher_scores: torch.Tensor | None = None,
                 teacher_temperature: float = 1.0, distill_weight: float = 0.0,
                 group_size: int | None = None) -> torch.Tensor:
    """InfoNCE over cosine similarity / temperature with in-batch and hard negatives.

    q: [B, H] raw query embeddings; d: [N, H] raw candidate embeddings (not normalized; fp32/bf16/fp16).
    By default query i owns d[i*G:(i+1)*G] (G = N // B), the first being its positive; `positive_index` [B]
    overrides. Every candidate is a negative for every other query (in-batch negatives).

    query_ids [B] / doc_ids [N]: integer text ids (-1 = unknown). A candidate whose id equals the id of the
        query's positive, or of the query itself, is not used as a negative (known false negatives,
        duplicate texts in the batch).
    same_tower: also use the other queries as negatives (Gecko); a synonym for adding "q2q" to directions.
    matryoshka_dims / matryoshka_weights: sum of weighted losses over leading-dimension prefixes.
    backend: "auto" (Triton epilogue on CUDA, torch elsewhere), "triton", or "torch".
    chunk_size / memory_budget_mb: query rows processed at once; by default as many as fit
        memory_budget_mb (1024) of C x N scratch. Memory never grows as B x N.
    eps: norms are clamped to eps (a zero vector gives finite values, never NaN).
    tower_queries [T, H] / tower_query_ids [T] / query_offset (q2q / d2q): the "other queries" of q2q and d2q,
        when q is only rows [query_offset, query_offset + B) of them (one rank's slice of the gathered queries);
        default: q itself, offset 0. positive_index then still indexes d.

    The terms below are defined exactly in embforge/kernels/infonce_terms.py; each keeps the memory bound.
    directions: any of "q2d" (query vs candidates), "q2q" (query vs other queries), "d2q" (other queries vs the
        query's positive), "d2d" (the positive vs the other candidates) - GTE's joint partition; one softmax per
        query over the positive and every enabled term.
    false_negative_margin m: a negative of any term whose cosine exceeds s(q_i, d_p(i)) + m is dropped.
    in_batch_negatives=False: query i's negatives are only its own group d[p(i) : p(i) + G] (q2d only).
    teacher_scores [B, G]: a teacher's scores of each query's group (positive first; a NaN row = unscored);
        adds distill_weight * mean over scored rows of KL(softmax(T_i/teacher_temperature) || softmax(s_i/tau)).
        Under row sharding pass the gathered [B_all, G] rows with query_offset: the mean then runs over the whole
        batch's scored rows, so each rank's loss / world size adds up to the one-process loss.
    group_size G: candidates each query owns from its positive on (default: teacher_scores' width, else N // B in
        the grouped layout); needed with positive_index for in_batch_negatives=False.
    Returns a 0-dim fp32 tensor, differentiable w.r.t. q, d and a tensor temperature.
    """
    _check(q, d)
    backend = U.resolve_backend(backend, q.device)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"infonce_loss: chunk_size must be >= 1, got {chunk_size}")
    from embforge.kernels.infonce_terms import resolve_options
    opts = resolve_options(directions, same_tower, false_negative_margin, in_batch_negatives, teacher_scores,
                           teacher_temperature, distill_weight, group_size)
    kw = dict(positive_index=positive_index, query_ids=query_ids, doc_ids=doc_ids, opts=opts,
              backend=backend, chunk_size=chunk_size, memory_budget_mb=memory_budget_mb, eps=eps,
              tower_query_ids=tower_query_ids, query_offset=query_offset)
    gathered_teacher = opts.teacher is not None and opts.teacher.shape[0] != q.shape[0]
    if tower_queries is not None:
        if not opts.directions & {"q2q", "d2q"}:
            raise ValueError("infonce_loss: tower_queries is only used with same_tower=True or directions q2q / d2q")
        _check(tower_queries, d)
        if not 0 <= query_offset <= tower_queries.shape[0] - q.shape[0]:
            raise ValueError(f"infonce_loss: query_offset={query_offset} puts the {q.shape[0]} queries outside the "
                             f"{tower_queries.shape[0]} tower_queries")
        if gathered_teacher and opts.teacher.shape[0] != tower_queries.shape[0]:
            raise ValueError(f"infonce_loss: teacher_scores has {opts.teacher.shape[0]} rows but there are "
                             f"{tower_queries.shape[0]} tower_queries (gathered rows must match)")
    elif tower_query_ids is not None or (query_offset != 0 and not gathered_teacher):
        raise ValueError("infonce_loss: query_offset / tower_query_ids need tower_queries (or gathered "
                         "teacher_scores for query_offset)")
    if matryoshka_dims is None:
        return _single_dim_loss(q, d, temperature, tower_queries=tower_queries, **kw)
    dims = list(matryoshka_dims)
    weights = list(matryoshka_weights) if matryoshka_weights is not None else [1.0] * len(dims)
    if len(weights) != len(dims):
        raise ValueError(f"infonce_loss: {len(dims)} matryoshka_dims but {len(weights)} matryoshka_weights")
    H = q.shape[1]
    for m_dim in dims:
        if not (0 < int(m_dim) <= H):
            raise ValueError(f"infonce_loss: matryoshka dim {m_dim} must lie in [1, {H}]")
    total = None
    for m_dim, w in zip(dims, weights):
        tq = None if tower_queries is None else tower_queries[:, : int(m_dim)]
        part = _single_dim_loss(q[:, : int(m_dim)], d[:, : int(m_dim)], temperature, tower_queries=tq, **kw) \
            * float(w)
        total = part if total is None else total + part
    return total


def infonce_loss_eager(q, d, temperature=0.02, positive_index=None):
    """The plain PyTorch baseline: normalize -> full B x N matmul -> cross_entropy (memory grows as B x N)."""
    B, N = q.shape[0], d.shape[0]
    if positive_index is None:
        positive_index = torch.arange(B, device=q.device) * (N // B)
    u = torch.nn.functional.normalize(q.float(), dim=-1)
    v = torch.nn.functional.normalize(d.float(), dim=-1)
    logits = (u @ v.t()) / temperature
    return torch.nn.functional.cross_entropy(logits, positive_index)
