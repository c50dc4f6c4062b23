"""The loss terms beyond plain query->document InfoNCE, in the same chunked, memory-bounded scheme as infonce.py:
GTE's joint partition (q2q, d2q, d2d), the false-negative margin, own-group-only negatives, and distillation from
teacher scores. `infonce_loss` routes here whenever one of these options is used; the plain loss keeps its own
single-segment kernel (infonce.py), so its speed does not change.

Definitions. Cosines s(a, b) of normalized vectors; query i, its positive p(i), temperature tau.
    l_i = LSE(Z_i) - s(q_i, d_p(i))/tau,        L = 1/B sum_i l_i  (+ distillation)
where the partition Z_i holds s(q_i, d_p(i))/tau and, per enabled direction,
    q2d   s(q_i, d_j)/tau      every candidate j != p(i)                    (the plain loss)
    q2q   s(q_i, q_k)/tau      every other query k != i                     (same_tower=True is a synonym)
    d2q   s(q_k, d_p(i))/tau   every other query k != i, against i's positive
    d2d   s(d_p(i), d_l)/tau   every candidate l != p(i)
Every negative term is dropped when
    id rule      its text id (>= 0) equals the id of query i or the id of p(i);
    margin rule  (false_negative_margin = m) its cosine exceeds s(q_i, d_p(i)) + m.
in_batch_negatives=False keeps only q2d negatives from query i's own group d[p(i) : p(i) + G] (its hard negatives;
q2d only). Masks are decided on the current similarities and are constants for the gradient.
Distillation: teacher_scores T [B, G], row i scoring query i's group (positive first); a row of NaN is unscored.
    L += distill_weight * 1/R sum_{i scored} KL( softmax(T_i / teacher_temperature) || softmax(s(q_i, group_i)/tau) )
with R the number of scored rows. With Matryoshka dims each prefix's loss is this whole loss at that prefix.

Layout. E = [d; Qt]: the N candidates, then (when q2q or d2q is on) the T "tower" queries Qt - q itself, or under
row sharding every rank's gathered queries, q being rows [off, off + B) of them. Every logit of row i is a cosine of
one of two anchors with a row of E:
    segment A   anchor u_i (the query):         E[:N] -> q2d and the positive,   E[N:] -> q2q
    segment B   anchor v_p(i) (its positive):   E[:N] -> d2d,                     E[N:] -> d2q
so a chunk of C rows computes S_A = Q_c E_A^T and S_B = P_c E_B^T (P_c = the chunk's positives, E_B the slice of E
that d2d / d2q need): at most C x (N + T) each, C chosen so both fit the memory budget; nothing B x N is ever held.
LSE(Z_i) = logaddexp(LSE of row i of A, LSE of row i of B). With G_A = dL/dS_A, G_B = dL/dS_B in cosine space,
    G = (softmax over Z_i - 1[positive]) / (B tau)   per entry, both segments
    + c (softmax(s(q_i, group_i)/tau) - softmax(T_i/t)) / tau   on the group's entries of A (distillation; c below)
    dL/du_i      = sum_x G_A[i,x] e^_x                             g = G'_A @ E_A, per row chunk
    dL/de^_x    += sum_i G_A[i,x] u_i + sum_i G_B[i,x] v_p(i)      column sums, accumulated over the row chunks
    dL/dv_p(i)  += sum_x G_B[i,x] e^_x                             row sums of B, scattered to row p(i) of E
    dL/dtau      = -(1/tau) sum G s over every entry of both segments (distillation included)
(G' = G scaled by each column's 1/|e_x|, as in infonce.py, which also gives the normalization chain rule.)

Row sharding (one rank's B queries against every rank's gathered candidates): the ranks' losses, each divided by
the world size, add up to the one-process loss when each rank passes the gathered queries as tower_queries (for q2q
and d2q: "other queries" are all queries of the global batch) and the gathered teacher rows, so that R counts the
scored rows of the whole batch: c = distill_weight * B_all / (B R), B_all the rows of teacher_scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from embforge.kernels import utils as base

DIRECTIONS = ("q2d", "q2q", "d2q", "d2d")


# ----------------------------------------------------------------------------------------------------------
# Options: what the caller asked for, validated once (independent of the Matryoshka prefix).
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Options:
    directions: frozenset
    margin: float | None
    in_batch: bool
    teacher: torch.Tensor | None      # [B or B_all, G], NaN rows unscored (validated even at weight 0)
    teacher_temperature: float
    distill_weight: float
    group_size: int | None

    @property
    def distill(self) -> bool:
        return self.teacher is not None and self.distill_weight > 0

    @property
    def plain(self) -> bool:
        """Nothing the plain kernel cannot do (q2d, optionally q2q via its same-tower candidates)."""
        return ("q2d" in self.directions and self.directions <= {"q2d", "q2q"} and self.margin is None
                and self.in_batch and not self.distill)


def resolve_options(directions, same_tower, false_negative_margin, in_batch_negatives, teacher_scores,
                    teacher_temperature, distill_weight, group_size) -> Options:
    if isinstance(directions, str):
        directions = (directions,)
    try:
        dirs = list(directions)
    except TypeError:
        raise ValueError(f"infonce_loss: directions must be a list of {', '.join(DIRECTIONS)}, got {directions!r}")
    for x in dirs:
        if x not in DIRECTIONS:
            raise ValueError(f"infonce_loss: unknown direction {x!r} (choose from {', '.join(DIRECTIONS)})")
    if not dirs:
        raise ValueError(f"infonce_loss: directions is empty (choose from {', '.join(DIRECTIONS)})")
    dirs = set(dirs) | ({"q2q"} if same_tower else set())
    margin = None
    if false_negative_margin is not None:
        try:
            margin = float(false_negative_margin)
        except (TypeError, ValueError):
            margin = float("nan")
        if not math.isfinite(margin):
            raise ValueError(f"infonce_loss: false_negative_margin must be a finite number or None, "
                             f"got {false_negative_margin!r}")
    if not in_batch_negatives and dirs != {"q2d"}:
        raise ValueError(f"infonce_loss: in_batch_negatives=False keeps only query i's own group (q2d); it cannot "
                         f"be combined with directions {sorted(dirs - {'q2d'})} or same_tower")
    t_temp, weight = _positive_number(teacher_temperature, "teacher_temperature"), float(distill_weight)
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"infonce_loss: distill_weight must be a finite number >= 0, got {distill_weight!r}")
    if weight > 0 and teacher_scores is None:
        raise ValueError("infonce_loss: distill_weight > 0 needs teacher_scores")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"infonce_loss: group_size must be a positive integer, got {group_size!r}")
    teacher = None
    if teacher_scores is not None:
        teacher = _check_teacher(teacher_scores)     # at weight 0 it changes nothing: the plain kernel runs
    return Options(frozenset(dirs), margin, bool(in_batch_negatives), teacher, t_temp, weight, group_size)


def _positive_number(x, name):
    try:
        v = float(x)
    except (TypeError, ValueError):
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"infonce_loss: {name} must be a positive finite number, got {x!r}")
    return v


def _check_teacher(t):
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float32)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"infonce_loss: teacher_scores must be 2-D [queries, group size], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"infonce_loss: teacher_scores must be floating point (NaN marks unscored rows), "
                         f"got {t.dtype}")
    nan = torch.isnan(t)
    partial = nan.any(1) & ~nan.all(1)
    if bool(partial.any()):
        raise ValueError(f"infonce_loss: teacher_scores row {int(partial.nonzero()[0])} is partly NaN; a row is "
                         "either all NaN (unscored) or all finite")
    if bool(torch.isinf(t).any()):
        raise ValueError("infonce_loss: teacher_scores holds an infinite value (use a NaN row for 'unscored')")
    return t.detach()


# ----------------------------------------------------------------------------------------------------------
# Triton epilogue for one segment (A or B) of a row chunk: one program per row, mode STATS writes the segment's
# log-sum-exp, mode GRAD (given the joint log-sum-exp) writes G' and the row dot sum_x G s.
# Column x (segment-local) is a candidate when x < n_doc, a tower query otherwise.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _segment_kernel(
    S_ptr, stride_s,            # [C, W] fp32 raw dot products anchor_i . e_x
    G_ptr, stride_g,            # [C, W] out (GRAD): G_ix / |e_x| in the matmul dtype
    ra_ptr, re_ptr,             # [C] 1/|anchor_i|, [W] 1/|e_x|
    cid_ptr,                    # [W] text id of each column (-1: none)
    posid_ptr, qid_ptr,         # [C] text id of the row's positive and of its query (-1: none)
    pos_ptr,                    # [C] the positive's column in this segment (HAS_POS), also the group start
    ex1_ptr, ex2_ptr,           # [C] columns that are the anchor itself or its query (never negatives; may be < 0)
    thr_ptr,                    # [C] cosine above which a negative is dropped (HAS_MARGIN)
    lse_ptr,                    # [C] STATS: out, this segment's LSE of s/tau; GRAD: in, the joint LSE
    rowdot_ptr,                 # [C] out (GRAD): sum_x G_ix s_ix
    W, n_doc, group, inv_tau, grad_scale,
    HAS_IDS: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_POS: tl.constexpr, DOC_ON: tl.constexpr,
    QRY_ON: tl.constexpr, GROUP_ONLY: tl.constexpr, GRAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S_ptr + row * stride_s
    ra = tl.load(ra_ptr + row)
    ex1 = tl.load(ex1_ptr + row)
    ex2 = tl.load(ex2_ptr + row)
    if HAS_IDS:
        pos_id = tl.load(posid_ptr + row)
        q_id = tl.load(qid_ptr + row)
    if HAS_POS or GROUP_ONLY:
        pos = tl.load(pos_ptr + row)
    if HAS_MARGIN:
        thr = tl.load(thr_ptr + row)
    offs = tl.arange(0, BLOCK_N)
    LOG2E: tl.constexpr = 1.4426950408889634
    NEG: tl.constexpr = -1.0e30          # finite floor: no lane computes -inf - -inf
    if GRAD:
        lse2 = tl.load(lse_ptr + row) * LOG2E
        g_row = G_ptr + row * stride_g
        rowdot = tl.zeros([BLOCK_N], tl.float32)
    else:
        m = tl.full([BLOCK_N], NEG, tl.float32)
        acc = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, W, BLOCK_N):
        cols = start + offs
        inb = cols < W
        re = tl.load(re_ptr + cols, mask=inb, other=0.0)
        s = tl.load(s_row + cols, mask=inb, other=0.0) * ra * re
        is_doc = cols < n_doc
        if DOC_ON:
            doc_ok = is_doc
            if GROUP_ONLY:
                doc_ok = doc_ok & (cols >= pos) & (cols < pos + group)
        else:
            doc_ok = cols < 0
        if QRY_ON:
            keep = doc_ok | (~is_doc)
        else:
            keep = doc_ok
        keep = keep & inb & (cols != ex1) & (cols != ex2)
        if HAS_IDS:
            cid = tl.load(cid_ptr + cols, mask=inb, other=-1)
            keep = keep & ~((cid >= 0) & ((cid == pos_id) | (cid == q_id)))
        if HAS_MARGIN:
            keep = keep & ~(s > thr)
        if HAS_POS:
            keep = keep | (cols == pos)          # the positive is never dropped
        if GRAD:
            p = tl.where(keep, tl.exp2(s * (inv_tau * LOG2E) - lse2), 0.0)
            if HAS_POS:
                p = p - tl.where(cols == pos, 1.0, 0.0)
            g = p * grad_scale
            rowdot += g * s
            tl.store(g_row + cols, (g * re).to(G_ptr.dtype.element_ty), mask=inb)
        else:
            x = tl.where(keep, s * (inv_tau * LOG2E), NEG)
            m_new = tl.maximum(m, x)
            acc = acc * tl.exp2(m - m_new) + tl.where(keep, tl.exp2(x - m_new), 0.0)
            m = m_new
    if GRAD:
        tl.store(rowdot_ptr + row, tl.sum(rowdot, axis=0))
    else:
        m_row = tl.max(m, axis=0)
        l_row = tl.sum(acc * tl.exp2(m - m_row), axis=0)
        # l_row == 0 (every column dropped) gives -inf: the segment adds nothing to the joint LSE
        tl.store(lse_ptr + row, (m_row + tl.log2(l_row)) / LOG2E)


@dataclass
class _Segment:
    """One segment of a row chunk: S = anchors @ E[lo:hi]^T and how its columns are masked."""
    S: torch.Tensor                 # [C, W] raw dots (the torch path turns it into cosines in place)
    ra: torch.Tensor                # [C] inverse anchor norms
    re: torch.Tensor                # [W] inverse column norms
    cid: torch.Tensor | None        # [W]
    pos_id: torch.Tensor | None     # [C]
    q_id: torch.Tensor | None       # [C]
    pos: torch.Tensor               # [C] positive's (segment-local) column: the group start
    has_pos: bool                   # the positive is one of this segment's columns (segment A)
    ex1: torch.Tensor               # [C] excluded columns (segment-local; out of range = none)
    ex2: torch.Tensor
    thr: torch.Tensor | None        # [C]
    n_doc: int                      # columns < n_doc are candidates, the rest tower queries
    doc_on: bool
    qry_on: bool
    group: int | None               # own-group-only: candidates [pos, pos + group)
    logits: torch.Tensor | None = None   # torch path: masked logits kept from stats to grad


def _stats_triton(seg: _Segment, inv_tau: float) -> torch.Tensor:
    return _launch(seg, inv_tau, 0.0, None, None)


def _grad_triton(seg: _Segment, lse, inv_tau, grad_scale, G) -> torch.Tensor:
    rowdot = base.empty(seg.S.shape[0], device=seg.S.device, dtype=torch.float32)
    _launch(seg, inv_tau, grad_scale, (lse, rowdot), G)
    return rowdot


def _launch(seg: _Segment, inv_tau, grad_scale, grad, G):
    C, W = seg.S.shape
    dummy = seg.pos
    lse = base.empty(C, device=seg.S.device, dtype=torch.float32) if grad is None else grad[0].contiguous()
    rowdot = grad[1] if grad is not None else lse
    block_n = min(1024, triton.next_power_of_2(max(W, 16)))
    has_ids = seg.cid is not None
    _segment_kernel[(C,)](
        seg.S, seg.S.stride(0), G if G is not None else seg.S, G.stride(0) if G is not None else 0,
        seg.ra, seg.re, seg.cid if has_ids else dummy, seg.pos_id if has_ids else dummy,
        seg.q_id if has_ids else dummy, seg.pos, seg.ex1, seg.ex2,
        seg.thr if seg.thr is not None else seg.ra, lse, rowdot,
        W, seg.n_doc, seg.group or 0, inv_tau, grad_scale,
        HAS_IDS=has_ids, HAS_MARGIN=seg.thr is not None, HAS_POS=seg.has_pos, DOC_ON=seg.doc_on,
        QRY_ON=seg.qry_on, GROUP_ONLY=seg.group is not None, GRAD=G is not None, BLOCK_N=block_n,
        num_warps=4 if block_n <= 512 else 8,
    )
    return lse


# ----------------------------------------------------------------------------------------------------------
# The same epilogue in torch ops (CPU path; also float64). Masked logits are kept from stats to grad.
# ----------------------------------------------------------------------------------------------------------
def _stats_torch(seg: _Segment, inv_tau: float) -> torch.Tensor:
    """Only the rules in use cost a pass over the C x W entries; the self exclusions are one entry per row."""
    C, W = seg.S.shape
    dev = seg.S.device
    rows, cols = torch.arange(C, device=dev), torch.arange(W, device=dev)
    s = seg.S.mul_(seg.ra[:, None]).mul_(seg.re[None, :])     # cosines, in place
    drop = []                                                 # [C, W] or [1, W] masks, OR-ed below

    is_doc = cols < seg.n_doc
    if not seg.doc_on:
        drop.append(is_doc[None, :])
    elif seg.group is not None:
        drop.append(is_doc[None, :] & ((cols[None, :] < seg.pos[:, None])
                                       | (cols[None, :] >= seg.pos[:, None] + seg.group)))
    if not seg.qry_on and seg.n_doc < W:
        drop.append(~is_doc[None, :])
    if seg.cid is not None:
        known = (seg.cid >= 0)[None, :]
        drop.append(known & ((seg.cid[None, :] == seg.pos_id[:, None]) | (seg.cid[None, :] == seg.q_id[:, None])))
    if seg.thr is not None:
        drop.append(s > seg.thr[:, None])
    mask = drop[0].expand(C, W).clone() if drop else None
    for m in drop[1:]:
        mask |= m
    for ex in (seg.ex1, seg.ex2):
        hit = (ex >= 0) & (ex < W)
        if bool(hit.any()):
            if mask is None:
                mask = torch.zeros(C, W, dtype=torch.bool, device=dev)
            mask[rows[hit], ex[hit]] = True
    if mask is not None and seg.has_pos:
        mask[rows, seg.pos] = False                            # the positive is never dropped
    seg.logits = s * inv_tau
    if mask is not None:
        seg.logits.masked_fill_(mask, float("-inf"))
    del mask, drop
    return torch.logsumexp(seg.logits, dim=1)


def _grad_torch(seg: _Segment, lse, inv_tau, grad_scale, G) -> torch.Tensor:
    p = seg.logits.sub_(lse[:, None]).exp_()
    seg.logits = None
    if seg.has_pos:
        p[torch.arange(p.shape[0], device=p.device), seg.pos] -= 1.0
    p.mul_(grad_scale)
    rowdot = torch.einsum("ij,ij->i", p, seg.S)
    if G.dtype == p.dtype:
        torch.mul(p, seg.re[None, :], out=G)
    else:
        G.copy_(p.mul_(seg.re[None, :]))
    return rowdot


def _cosines_of(seg: _Segment, cols: torch.Tensor) -> torch.Tensor:
    """Cosines of the given [C, k] segment-local columns (before the torch stats turn S into cosines)."""
    return seg.S.gather(1, cols) * seg.ra[:, None] * seg.re[cols]


# ----------------------------------------------------------------------------------------------------------
# Distillation on the group entries of segment A: O(C G) work next to the O(C N H) matmuls, in torch ops.
# ----------------------------------------------------------------------------------------------------------
def _distill(s_grp, log_pt, weight_row, inv_tau):
    """KL_i(pt || softmax(s_grp/tau)) * weight_row and its gradient w.r.t. the group cosines."""
    log_ps = torch.log_softmax(s_grp * inv_tau, dim=1)
    pt = log_pt.exp()
    kl = (pt * (log_pt - log_ps)).sum(1)
    grad = (log_ps.exp() - pt) * (inv_tau * weight_row[:, None])
    return (kl * weight_row).sum(), grad


@dataclass
class _Layout:
    n_doc: int
    pos: torch.Tensor               # [B] column of each positive in E (< n_doc)
    pos_id: torch.Tensor | None
    q_id: torch.Tensor | None
    cid: torch.Tensor | None        # [N + T]
    self_col: torch.Tensor | None   # [B] column of each query in E (n_doc + offset + i), None without tower
    a_doc: bool                     # q2d
    a_qry: bool                     # q2q
    a_width: int                    # columns of segment A (E[:a_width])
    b_range: tuple | None           # (lo, hi) of segment B in E, None without d2q / d2d
    margin: float | None
    group: int | None               # own-group-only
    group_size: int | None          # distillation's group
    log_pt: torch.Tensor | None     # [B, G] log softmax(T/t) (0 on unscored rows)
    distill_row: torch.Tensor | None  # [B] c on scored rows, 0 on unscored


def _terms_chunked(q, E, inv_tau: float, L: _Layout, chunk_rows: int, backend: str, want_grad: bool, eps: float):
    stats, grad_fn = (_stats_triton, _grad_triton) if backend == "triton" else (_stats_torch, _grad_torch)
    project = base.project_triton if backend == "triton" else base.project_torch
    if q.dtype == torch.float64:     # the kernel computes in fp32; float64 (gradcheck) takes the torch ops
        stats, grad_fn = _stats_torch, _grad_torch
    B, dev = q.shape[0], q.device
    mm_dtype, acc = base.matmul_dtype(q), base.acc_dtype(q)
    qm, Em = q.to(mm_dtype), E.to(mm_dtype)
    rq = torch.linalg.vector_norm(q, dim=1, dtype=acc).clamp_min_(eps).reciprocal_()
    rE = torch.linalg.vector_norm(E, dim=1, dtype=acc).clamp_min_(eps).reciprocal_()
    EA = Em[: L.a_width]
    EB = Em[L.b_range[0]: L.b_range[1]] if L.b_range else None
    lo_b = L.b_range[0] if L.b_range else 0
    grad_scale = inv_tau / B
    loss = torch.zeros((), device=dev, dtype=acc)
    none_col = torch.full((B,), -1, device=dev, dtype=torch.int64)
    if L.group_size is not None:
        grp_ar = torch.arange(L.group_size, device=dev)
    if want_grad:
        g = base.empty(B, q.shape[1], device=dev, dtype=acc)
        h = base.empty(E.shape[0], E.shape[1], device=dev, dtype=acc)
        h.zero_()
        rowdot_all = torch.zeros(B, device=dev, dtype=acc)     # segment A's sum_x G s: the dq projection's
        gs_b = torch.zeros((), device=dev, dtype=acc)            # segment B's, for dL/dtau only
        GA_buf = base.empty(min(chunk_rows, B), EA.shape[0], device=dev, dtype=mm_dtype)
        GB_buf = base.empty(min(chunk_rows, B), EB.shape[0], device=dev, dtype=mm_dtype) if EB is not None else None
    for start in range(0, B, chunk_rows):
        sl = slice(start, min(B, start + chunk_rows))
        C = sl.stop - sl.start
        pos = L.pos[sl]
        ids = dict(cid=None, pos_id=None, q_id=None)
        self_c = L.self_col[sl] if L.self_col is not None else none_col[:C]
        SA = base.mm_f32(qm[sl], EA.t())
        s_pos = SA.gather(1, pos[:, None])[:, 0] * rq[sl] * rE[pos]
        thr = s_pos + L.margin if L.margin is not None else None
        if L.cid is not None:
            ids = dict(cid=L.cid[: L.a_width], pos_id=L.pos_id[sl], q_id=L.q_id[sl])
        segA = _Segment(SA, rq[sl], rE[: L.a_width], **ids, pos=pos, has_pos=True, ex1=self_c, ex2=none_col[:C],
                        thr=thr, n_doc=L.n_doc, doc_on=L.a_doc, qry_on=L.a_qry, group=L.group)
        segs = [segA]
        if EB is not None:
            P_c = Em.index_select(0, pos)
            SB = base.mm_f32(P_c, EB.t())
            if L.cid is not None:
                ids = dict(cid=L.cid[L.b_range[0]: L.b_range[1]], pos_id=L.pos_id[sl], q_id=L.q_id[sl])
            # the anchor d_p(i) is excluded from d2d and query i from d2q (columns outside the slice match nothing)
            segs.append(_Segment(SB, rE[pos], rE[L.b_range[0]: L.b_range[1]], **ids, pos=pos - lo_b,
                                 has_pos=False, ex1=self_c - lo_b, ex2=pos - lo_b, thr=thr, n_doc=L.n_doc - lo_b,
                                 doc_on=True, qry_on=True, group=None))
        if L.log_pt is not None:
            grp_cols = pos[:, None] + grp_ar[None, :]
            s_grp = _cosines_of(segA, grp_cols)
        lse = None
        for seg in segs:
            part = stats(seg, inv_tau)
            lse = part if lse is None else torch.logaddexp(lse, part)
        loss += (lse - s_pos * inv_tau).sum() / B
        if L.log_pt is not None:
            kl, g_grp = _distill(s_grp, L.log_pt[sl], L.distill_row[sl], inv_tau)
            loss += kl
        if not want_grad:
            continue
        GA = GA_buf[:C]
        rowdot = grad_fn(segA, lse, inv_tau, grad_scale, GA)
        if L.log_pt is not None:
            # the distillation's dL/ds on the group's entries (G' holds G / |e_x|)
            GA.scatter_add_(1, grp_cols, (g_grp * rE[grp_cols]).to(GA.dtype))
            rowdot = rowdot + (g_grp * s_grp).sum(1)
        g[sl] = base.mm_f32(GA, EA)
        u_c = (qm[sl] * rq[sl, None]).to(mm_dtype)
        base.accumulate_f32_(h[: L.a_width], GA.t(), u_c, first=False)
        rowdot_all[sl] = rowdot
        if EB is not None:
            GB = GB_buf[:C]
            gs_b += grad_fn(segs[1], lse, inv_tau, grad_scale, GB).sum()
            vp_c = (P_c * rE[pos][:, None]).to(mm_dtype)
            base.accumulate_f32_(h[L.b_range[0]: L.b_range[1]], GB.t(), vp_c, first=False)
            # the anchor's own gradient: dL/dv_p(i) = sum_x G_B[i,x] e^_x, to row p(i) of E
            h.index_add_(0, pos, base.mm_f32(GB, EB) * rE[pos][:, None])
    if not want_grad:
        return loss, None, None, None
    dq = project(g, q, rq, rowdot_all)
    del g
    dE = project(h, E, rE, None)
    return loss, dq, dE, rowdot_all.sum() + gs_b


class _TermsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, E, temperature, layout, chunk_rows, backend, eps):
        tau = float(temperature)
        want_grad = any(ctx.needs_input_grad[:3])
        loss, dq, dE, gs = _terms_chunked(q, E, 1.0 / tau, layout, chunk_rows, backend, want_grad, eps)
        if want_grad:
            ctx.save_for_backward(dq, dE, (-gs / tau).reshape(()))     # dL/dtau = -(1/tau) sum G s
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        dq, dE, dtau = ctx.saved_tensors
        gq = dq * grad_out.to(dq.dtype) if ctx.needs_input_grad[0] else None
        gE = dE * grad_out.to(dE.dtype) if ctx.needs_input_grad[1] else None
        gt = dtau * grad_out if ctx.needs_input_grad[2] else None
        return gq, gE, gt, None, None, None, None


def chunk_rows_for(layout: _Layout, budget_mb, n_queries: int, backend: str) -> int:
    """Rows per chunk so that both segments' scratch (C x (width A + width B)) fits the budget."""
    width = layout.a_width + (layout.b_range[1] - layout.b_range[0] if layout.b_range else 0)
    return base.choose_chunk_rows(width, budget_mb, n_queries, backend)


def terms_loss(q, d, tau_t, opts: Options, *, pos, q_id, cid, tower_queries, tower_query_ids,
               query_offset, backend, chunk_size, memory_budget_mb, eps, default_layout):
    """One Matryoshka prefix's loss with the options in `opts` (validated shapes; see the module docstring)."""
    B, N = q.shape[0], d.shape[0]
    dev = q.device
    dirs = opts.directions
    tower = bool(dirs & {"q2q", "d2q"})
    E, self_col, T = d, None, 0
    if tower:
        tq, tq_id = q, q_id
        if tower_queries is not None:
            tq = tower_queries
            tq_id = base.ids(tower_query_ids, tq.shape[0], "tower_query_ids", dev)
        T = tq.shape[0]
        E = torch.cat([d, tq.to(d.dtype)], dim=0)
        self_col = torch.arange(B, device=dev, dtype=torch.int64) + N + query_offset
        if cid is not None or tq_id is not None:
            cid_d = cid if cid is not None else torch.full((N,), -1, device=dev, dtype=torch.int64)
            cid_q = tq_id if tq_id is not None else torch.full((T,), -1, device=dev, dtype=torch.int64)
            cid = torch.cat([cid_d, cid_q])
    pos_id = None
    if cid is not None:
        pos_id = cid[pos]
        if q_id is None:
            q_id = torch.full((B,), -1, device=dev, dtype=torch.int64)
    else:
        q_id = None
    group_size = _group_size(opts, B, N, pos, default_layout)
    log_pt = distill_row = None
    if opts.distill:
        log_pt, distill_row = _teacher_rows(opts, B, query_offset, dev)
    b_lo = 0 if "d2d" in dirs else N
    b_hi = N + T if "d2q" in dirs else N
    layout = _Layout(
        n_doc=N, pos=pos, pos_id=pos_id, q_id=q_id, cid=cid, self_col=self_col,
        a_doc="q2d" in dirs, a_qry="q2q" in dirs, a_width=N + T if "q2q" in dirs else N,
        b_range=(b_lo, b_hi) if b_hi > b_lo else None, margin=opts.margin,
        group=None if opts.in_batch else group_size, group_size=group_size if log_pt is not None else None,
        log_pt=log_pt, distill_row=distill_row)
    rows = chunk_size if chunk_size else chunk_rows_for(layout, memory_budget_mb, B, backend)
    return _TermsFunction.apply(q, E, tau_t, layout, rows, backend, eps)


def _group_size(opts: Options, B, N, pos, default_layout) -> int | None:
    """Query i's group is d[p(i) : p(i) + G]; G from group_size, else the teacher's width, else N // B."""
    need = (not opts.in_batch) or opts.distill
    G = opts.group_size
    if opts.distill:
        if G is not None and G != opts.teacher.shape[1]:
            raise ValueError(f"infonce_loss: teacher_scores has {opts.teacher.shape[1]} columns but "
                             f"group_size={G}")
        G = opts.teacher.shape[1]
    if G is None and default_layout:
        G = N // B
    if G is None:
        if need:
            raise ValueError("infonce_loss: with positive_index, in_batch_negatives=False needs group_size (the "
                             "candidates each query owns from its positive on)")
        return None
    if default_layout and G != N // B:
        raise ValueError(f"infonce_loss: the grouped layout gives each query N // B = {N // B} candidates, but "
                         f"teacher_scores / group_size say {G}")
    if need and int(pos.max()) + G > N:
        raise ValueError(f"infonce_loss: a group of {G} candidates from positive {int(pos.max())} runs past the "
                         f"{N} candidates")
    return G


def _teacher_rows(opts: Options, B, query_offset, dev):
    """log softmax(T_i/t) of this call's rows and each row's distillation weight c (0: unscored)."""
    T = opts.teacher.to(dev)
    rows_all = T.shape[0]
    if rows_all != B and not (rows_all % B == 0 and 0 <= query_offset <= rows_all - B):
        raise ValueError(f"infonce_loss: teacher_scores has {rows_all} rows: it must have one per query ({B}) or "
                         f"one per gathered query (world size x {B}) with this call's rows at "
                         f"query_offset={query_offset}")
    scored_all = ~torch.isnan(T[:, 0])
    R = int(scored_all.sum())
    mine = slice(0, B) if rows_all == B else slice(query_offset, query_offset + B)
    T = T[mine].to(torch.float64 if T.dtype == torch.float64 else torch.float32)
    scored = scored_all[mine]
    log_pt = torch.log_softmax(torch.where(scored[:, None], T, 0.0) / opts.teacher_temperature, dim=1)
    coef = opts.distill_weight * rows_all / (B * R) if R else 0.0
    return log_pt, scored.to(T.dtype) * coef
