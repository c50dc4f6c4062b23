"""Pooling of decoder hidden states into one embedding per sequence, fused with L2 normalization.

last_token_pool         hidden [B, T, H] + attention_mask [B, T]  -> [B, H]   (left or right padding)
last_token_pool_packed  hidden [total, H] + cu_seqlens [B + 1]    -> [B, H]   (varlen / packed batches)
mean_pool               hidden [B, T, H] + attention_mask [B, T]  -> [B, H]   (masked mean)
mean_pool_packed        hidden [total, H] + cu_seqlens [B + 1]    -> [B, H]   (mean of each packed sequence)

Why these kernels. A causal decoder's last real token has seen the whole text, so it is the embedding. Padding
may sit on either side, and the pad token is usually EOS, so the position is found from the mask (the last
position whose mask is non-zero), never from token ids. The pooled row is tiny next to the hidden states, so the
work is memory-bound; what matters is (1) one pass that finds the position, gathers the row, computes the norm in
fp32 and writes the result, and (2) a backward that touches only the pooled rows: the hidden-state gradient is
zero everywhere else, so it is allocated zero-filled once and the kernel scatters B rows into it.

Math (y = x / max(|x|, eps), r = 1 / max(|x|, eps)):
    dy/dx . g = r (g - (u.g) u) = r g - r^3 (x.g) x     when |x| >= eps
              = r g                                      when |x| <  eps (the clamp is constant there; as in
                                                          F.normalize, whose clamp_min passes no gradient)
The backward recomputes |x| from the saved pooled rows with the same reduction order as the forward, so r is
bit-identical and nothing but the [B, H] rows and [B] indices is saved (not the [B, T, H] hidden states, which
autograd would otherwise keep alive until backward).

Output dtype: the input dtype by default (the gradient then flows back in the dtype the model produced), or
`out_dtype=torch.float32` for callers that cache fp32 embeddings (e.g. Embedder.encode); either way the norm and
the scaling are computed in fp32 and rounded once at the store. float64 inputs always take the torch path (the
kernels compute in fp32).

Masks: bool or integer; any non-zero entry counts as a real token (mean pooling is an unweighted mean over those
positions). A row with no real token is an error, never a silent NaN or zero vector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from embforge.kernels.utils import resolve_backend

# Tests set this to fill every output buffer with NaN on allocation, proving the kernels write all they return.
POISON_BUFFERS = False

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _empty(*shape, device, dtype):
    out = torch.empty(*shape, device=device, dtype=dtype)
    if POISON_BUFFERS:
        out.fill_(float("nan") if dtype.is_floating_point else -7)
    return out


def _row_block(H: int) -> int:
    # Whole row per iteration up to 2048 elements; wider rows loop (the second sweep then hits L1/L2).
    return min(2048, triton.next_power_of_2(max(H, 16)))


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _normalize_row(src, stride_src, dst, stride_dst, save, H, eps,
                   NORMALIZE: tl.constexpr, SAVE: tl.constexpr, BLOCK_H: tl.constexpr):
    """dst[:] = src[:] / max(|src|, eps) (or a plain copy), fp32 math, one rounding at the store.
    SAVE also copies the raw row (input dtype) to `save` for the backward."""
    offs = tl.arange(0, BLOCK_H)
    if NORMALIZE:
        sq = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + offs
            x = tl.load(src + h * stride_src, mask=h < H, other=0.0).to(tl.float32)
            sq += x * x
        r = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), eps)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + offs
        x = tl.load(src + h * stride_src, mask=h < H, other=0.0)
        if SAVE:
            tl.store(save + h, x, mask=h < H)
        y = x.to(tl.float32)
        if NORMALIZE:
            y = y * r
        tl.store(dst + h * stride_dst, y.to(dst.dtype.element_ty), mask=h < H)


@triton.jit
def _normalize_row_bwd(x_row, g_row, stride_g, dst, stride_dst, H, eps,
                       NORMALIZE: tl.constexpr, BLOCK_H: tl.constexpr):
    """dst[:] = d(x/max(|x|,eps))/dx^T g  (or g itself without NORMALIZE); x_row is contiguous."""
    offs = tl.arange(0, BLOCK_H)
    if NORMALIZE:
        # Same reduction order as _normalize_row, so r is the forward's r bit for bit.
        sq = tl.zeros([BLOCK_H], tl.float32)
        xg = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h = h0 + offs
            x = tl.load(x_row + h, mask=h < H, other=0.0).to(tl.float32)
            g = tl.load(g_row + h * stride_g, mask=h < H, other=0.0).to(tl.float32)
            sq += x * x
            xg += x * g
        norm = tl.sqrt(tl.sum(sq, axis=0))
        r = 1.0 / tl.maximum(norm, eps)
        # Radial term r^3 (x.g); zero where the norm was clamped to eps (the output is then x/eps, linear in x).
        c = tl.where(norm >= eps, r * r * r * tl.sum(xg, axis=0), 0.0)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + offs
        g = tl.load(g_row + h * stride_g, mask=h < H, other=0.0).to(tl.float32)
        if NORMALIZE:
            x = tl.load(x_row + h, mask=h < H, other=0.0).to(tl.float32)
            g = g * r - c * x
        tl.store(dst + h * stride_dst, g.to(dst.dtype.element_ty), mask=h < H)


@triton.jit
def _last_token_fwd_kernel(
    hid_ptr, stride_hb, stride_ht, stride_hh,   # [B, T, H] padded, or [total, H] packed (stride_hb = 0)
    sel_ptr, stride_sb, stride_st,              # padded: mask [B, T]; packed: cu_seqlens [B + 1]
    out_ptr, stride_ob,                         # [B, H] out
    idx_ptr,                                    # [B] int64 out: pooled position (-1: no real token)
    save_ptr,                                   # [B, H] out: raw pooled rows (only if SAVE)
    T, H, eps,
    PACKED: tl.constexpr, NORMALIZE: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    if PACKED:
        idx = tl.load(sel_ptr + (b + 1) * stride_sb).to(tl.int64) - 1
    else:
        # Last non-zero mask entry: max over t of (t if mask else -1); handles left, right or ragged padding.
        offs_t = tl.arange(0, BLOCK_T)
        best = tl.full([BLOCK_T], -1, tl.int64)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            m = tl.load(sel_ptr + b * stride_sb + t * stride_st, mask=t < T, other=0)
            best = tl.maximum(best, tl.where(m != 0, t.to(tl.int64), -1))
        idx = tl.max(best, axis=0)
    tl.store(idx_ptr + b, idx)
    # A row without real tokens is reported by the host; never read hidden[b, -1].
    if idx >= 0:
        _normalize_row(hid_ptr + b * stride_hb + idx * stride_ht, stride_hh, out_ptr + b * stride_ob, 1,
                       save_ptr + b * H, H, eps, NORMALIZE, SAVE, BLOCK_H)


@triton.jit
def _last_token_bwd_kernel(
    dhid_ptr, stride_db, stride_dt,     # [B, T, H] / [total, H] zero-filled gradient, contiguous rows
    g_ptr, stride_gb, stride_gh,        # [B, H] upstream gradient
    x_ptr,                              # [B, H] saved raw pooled rows (only read with NORMALIZE)
    idx_ptr, H, eps,
    NORMALIZE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.load(idx_ptr + b)
    _normalize_row_bwd(x_ptr + b * H, g_ptr + b * stride_gb, stride_gh, dhid_ptr + b * stride_db + idx * stride_dt,
                       1, H, eps, NORMALIZE, BLOCK_H)


@triton.jit
def _mean_fwd_kernel(
    hid_ptr, stride_hb, stride_ht, stride_hh,   # [B, T, H]
    mask_ptr, stride_mb, stride_mt,             # [B, T]
    mean_ptr, stride_ob,                        # [B, H] out: masked mean (fp32, or the output dtype)
    cnt_ptr,                                    # [B] int32 out: number of real tokens
    T, H,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Grid (B, H / BLOCK_H): a [BLOCK_T, BLOCK_H] tile per step keeps many loads in flight across the whole GPU
    # (one program per row would leave most SMs idle at small B while streaming B*T*H elements).
    b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    t = tl.arange(0, BLOCK_T)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_row = mask_ptr + b * stride_mb
    # A 2-D accumulator reduced once at the end: a per-step reduction over T would cross warps (shared memory
    # and a barrier) on every step.
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    cnt = tl.zeros([BLOCK_T], tl.int32)
    # The hidden-state load depends on the mask (padding is never read), so the mask of the next step is
    # fetched while this step's tile is in flight: otherwise every step waits for two memory round trips.
    keep = tl.load(mask_row + t * stride_mt, mask=t < T, other=0) != 0
    for t0 in range(0, T, BLOCK_T):
        x = tl.load(hid_ptr + b * stride_hb + t[:, None] * stride_ht + h[None, :] * stride_hh,
                    mask=keep[:, None] & (h[None, :] < H), other=0.0)
        t_next = t + BLOCK_T
        keep_next = tl.load(mask_row + t_next * stride_mt, mask=t_next < T, other=0) != 0
        acc += x.to(tl.float32)
        cnt += keep.to(tl.int32)
        t = t_next
        keep = keep_next
    n = tl.sum(cnt, axis=0)
    total = tl.sum(acc, axis=0)
    # n == 0 is reported by the host; dividing by max(n, 1) keeps this program free of 0/0.
    tl.store(mean_ptr + b * stride_ob + h, (total / tl.maximum(n, 1).to(tl.float32)).to(mean_ptr.dtype.element_ty),
             mask=h < H)
    if pid_h == 0:
        tl.store(cnt_ptr + b, n)


@triton.jit
def _normalize_rows_kernel(src_ptr, stride_sb, out_ptr, stride_ob, H, eps, BLOCK_H: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    _normalize_row(src_ptr + b * stride_sb, 1, out_ptr + b * stride_ob, 1, src_ptr, H, eps, True, False, BLOCK_H)


@triton.jit
def _normalize_rows_bwd_kernel(x_ptr, g_ptr, stride_gb, stride_gh, dst_ptr, H, eps, BLOCK_H: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    _normalize_row_bwd(x_ptr + b * H, g_ptr + b * stride_gb, stride_gh, dst_ptr + b * H, 1, H, eps, True, BLOCK_H)


@triton.jit
def _mean_bwd_kernel(
    dhid_ptr, stride_db, stride_dt,     # [B, T, H] out, contiguous: every entry written (0 at padding)
    dmean_ptr, stride_gb, stride_gh,    # [B, H] gradient w.r.t. the mean
    mask_ptr, stride_mb, stride_mt, cnt_ptr,
    T, H,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    inv_n = 1.0 / tl.maximum(tl.load(cnt_ptr + b), 1).to(tl.float32)
    keep = tl.load(mask_ptr + b * stride_mb + t * stride_mt, mask=t < T, other=0) != 0
    g = tl.load(dmean_ptr + b * stride_gb + h * stride_gh, mask=h < H, other=0.0).to(tl.float32) * inv_n
    d = tl.where(keep[:, None], g[None, :], 0.0)
    tl.store(dhid_ptr + b * stride_db + t[:, None] * stride_dt + h[None, :], d.to(dhid_ptr.dtype.element_ty),
             mask=(t[:, None] < T) & (h[None, :] < H))


@triton.jit
def _mean_packed_fwd_kernel(
    hid_ptr, stride_ht, stride_hh,      # [total, H]
    cu_ptr,                             # [B + 1] sequence boundaries
    mean_ptr, stride_ob,                # [B, H] out
    H,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Grid (B, H / BLOCK_H): one sequence's rows are contiguous, so no mask is read at all.
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        x = tl.load(hid_ptr + t[:, None] * stride_ht + h[None, :] * stride_hh,
                    mask=(t[:, None] < end) & (h[None, :] < H), other=0.0)
        acc += x.to(tl.float32)
    n = tl.maximum(end - start, 1).to(tl.float32)   # empty sequences are rejected by the host
    tl.store(mean_ptr + b * stride_ob + h, (tl.sum(acc, axis=0) / n).to(mean_ptr.dtype.element_ty), mask=h < H)


@triton.jit
def _mean_packed_bwd_kernel(
    dhid_ptr, stride_dt,                # [total, H] out, contiguous, zero-filled (rows past the last sequence)
    dmean_ptr, stride_gb, stride_gh,    # [B, H]
    cu_ptr, H,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    inv_n = 1.0 / tl.maximum(end - start, 1).to(tl.float32)
    g = tl.load(dmean_ptr + b * stride_gb + h * stride_gh, mask=h < H, other=0.0).to(tl.float32) * inv_n
    tile = tl.zeros([BLOCK_T, BLOCK_H], tl.float32) + g[None, :]
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tl.store(dhid_ptr + t[:, None] * stride_dt + h[None, :], tile.to(dhid_ptr.dtype.element_ty),
                 mask=(t[:, None] < end) & (h[None, :] < H))


# ----------------------------------------------------------------------------------------------------------
# autograd Functions (Triton backend)
# ----------------------------------------------------------------------------------------------------------
def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    # Triton loads bool pointers as int1, which the interpreter and some versions handle poorly; reinterpret the
    # bytes instead (no copy).
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class _LastTokenPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, selector, packed, normalize, eps, out_dtype):
        B = selector.shape[0] - 1 if packed else hidden.shape[0]
        H = hidden.shape[-1]
        T = 0 if packed else hidden.shape[1]
        out = _empty(B, H, device=hidden.device, dtype=out_dtype)
        idx = _empty(B, device=hidden.device, dtype=torch.int64)
        save = normalize and ctx.needs_input_grad[0]
        rows = _empty(B, H, device=hidden.device, dtype=hidden.dtype) if save else out
        sel = selector if packed else _mask_arg(selector)
        if packed:
            strides_h = (0, hidden.stride(0), hidden.stride(1))
            strides_s = (sel.stride(0), 0)
        else:
            strides_h = (hidden.stride(0), hidden.stride(1), hidden.stride(2))
            strides_s = (sel.stride(0), sel.stride(1))
        if B > 0:
            _last_token_fwd_kernel[(B,)](
                hidden, *strides_h, sel, *strides_s, out, out.stride(0), idx, rows, T, H, eps,
                PACKED=packed, NORMALIZE=normalize, SAVE=save,
                BLOCK_T=min(1024, triton.next_power_of_2(max(T, 16))), BLOCK_H=_row_block(H),
                num_warps=4,
            )
        if not packed:
            _raise_if_empty_rows(idx < 0, "last_token_pool", "attention_mask")
        ctx.save_for_backward(idx, rows if save else None)
        ctx.meta = (packed, normalize, eps, hidden.shape, hidden.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        idx, rows = ctx.saved_tensors
        packed, normalize, eps, shape, dtype = ctx.meta
        # Only the pooled rows receive gradient: zero-fill once, then scatter B rows.
        dhid = torch.zeros(shape, device=grad_out.device, dtype=dtype)
        B, H = grad_out.shape
        if B > 0:
            stride_db, stride_dt = (0, dhid.stride(0)) if packed else (dhid.stride(0), dhid.stride(1))
            _last_token_bwd_kernel[(B,)](
                dhid, stride_db, stride_dt, grad_out, grad_out.stride(0), grad_out.stride(1),
                rows if normalize else grad_out, idx, H, eps,
                NORMALIZE=normalize, BLOCK_H=_row_block(H), num_warps=4,
            )
        return dhid, None, None, None, None, None


# (BLOCK_T, BLOCK_H, num_warps) of the mean-pooling forward by element size, from a sweep on one H100 (2.2 TB/s
# bf16, 2.6 TB/s fp32 at B=512, T=512, H=4096; the worst configurations were 2x slower).
MEAN_FWD_CONFIG = {2: (16, 256, 4), 4: (16, 128, 4)}


def _mean_blocks(T: int, H: int, elem_size: int):
    bt, bh, warps = MEAN_FWD_CONFIG.get(elem_size, MEAN_FWD_CONFIG[4])
    return min(bt, triton.next_power_of_2(max(T, 1))), min(bh, triton.next_power_of_2(max(H, 16))), warps


class _MeanPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, mask, normalize, eps, out_dtype):
        B, T, H = hidden.shape
        m = _mask_arg(mask)
        # The normalized path needs the fp32 mean as an intermediate (and saves it for the backward).
        mean = _empty(B, H, device=hidden.device, dtype=torch.float32 if normalize else out_dtype)
        cnt = _empty(B, device=hidden.device, dtype=torch.int32)
        BT, BH, warps = _mean_blocks(T, H, hidden.element_size())
        if B > 0:
            _mean_fwd_kernel[(B, triton.cdiv(H, BH))](
                hidden, hidden.stride(0), hidden.stride(1), hidden.stride(2), m, m.stride(0), m.stride(1),
                mean, mean.stride(0), cnt, T, H, BLOCK_T=BT, BLOCK_H=BH, num_warps=warps,
            )
        _raise_if_empty_rows(cnt == 0, "mean_pool", "attention_mask")
        out = mean
        if normalize:
            out = _empty(B, H, device=hidden.device, dtype=out_dtype)
            if B > 0:
                _normalize_rows_kernel[(B,)](mean, mean.stride(0), out, out.stride(0), H, eps,
                                             BLOCK_H=_row_block(H), num_warps=4)
        ctx.save_for_backward(m, cnt, mean if normalize else None)
        ctx.meta = (normalize, eps, hidden.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        m, cnt, mean = ctx.saved_tensors
        normalize, eps, dtype = ctx.meta
        B, T = m.shape
        H = grad_out.shape[1]
        dmean = grad_out
        if normalize and B > 0:
            dmean = _empty(B, H, device=grad_out.device, dtype=torch.float32)
            _normalize_rows_bwd_kernel[(B,)](mean, grad_out, grad_out.stride(0), grad_out.stride(1), dmean, H, eps,
                                             BLOCK_H=_row_block(H), num_warps=4)
        # Every position gets a gradient (mask/n or 0), so the buffer needs no zero-fill.
        dhid = _empty(B, T, H, device=grad_out.device, dtype=dtype)
        BT, BH = 32, min(128, triton.next_power_of_2(max(H, 16)))
        if B > 0 and T > 0:
            _mean_bwd_kernel[(B, triton.cdiv(T, BT), triton.cdiv(H, BH))](
                dhid, dhid.stride(0), dhid.stride(1), dmean, dmean.stride(0), dmean.stride(1),
                m, m.stride(0), m.stride(1), cnt, T, H, BLOCK_T=BT, BLOCK_H=BH, num_warps=4,
            )
        return dhid, None, None, None, None


class _MeanPoolPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, cu_seqlens, normalize, eps, out_dtype):
        B, H = cu_seqlens.shape[0] - 1, hidden.shape[1]
        mean = _empty(B, H, device=hidden.device, dtype=torch.float32 if normalize else out_dtype)
        BT, BH, warps = _mean_blocks(1 << 30, H, hidden.element_size())
        _mean_packed_fwd_kernel[(B, triton.cdiv(H, BH))](
            hidden, hidden.stride(0), hidden.stride(1), cu_seqlens, mean, mean.stride(0), H,
            BLOCK_T=BT, BLOCK_H=BH, num_warps=warps)
        out = mean
        if normalize:
            out = _empty(B, H, device=hidden.device, dtype=out_dtype)
            _normalize_rows_kernel[(B,)](mean, mean.stride(0), out, out.stride(0), H, eps,
                                         BLOCK_H=_row_block(H), num_warps=4)
        ctx.save_for_backward(cu_seqlens, mean if normalize else None)
        ctx.meta = (normalize, eps, hidden.shape, hidden.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        cu, mean = ctx.saved_tensors
        normalize, eps, shape, dtype = ctx.meta
        B, H = grad_out.shape
        dmean = grad_out
        if normalize:
            dmean = _empty(B, H, device=grad_out.device, dtype=torch.float32)
            _normalize_rows_bwd_kernel[(B,)](mean, grad_out, grad_out.stride(0), grad_out.stride(1), dmean, H, eps,
                                             BLOCK_H=_row_block(H), num_warps=4)
        # Zero-filled: rows after the last sequence (alignment padding) get no gradient.
        dhid = torch.zeros(shape, device=grad_out.device, dtype=dtype)
        BH = min(128, triton.next_power_of_2(max(H, 16)))
        _mean_packed_bwd_kernel[(B, triton.cdiv(H, BH))](
            dhid, dhid.stride(0), dmean, dmean.stride(0), dmean.stride(1), cu, H, BLOCK_T=32, BLOCK_H=BH,
            num_warps=4)
        return dhid, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Plain-PyTorch references (the CPU path, float64 inputs, and what the kernels are benchmarked against)
# ----------------------------------------------------------------------------------------------------------
def _finish(x: torch.Tensor, normalize: bool, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(acc)
    return (F.normalize(x, dim=-1, eps=eps) if normalize else x).to(out_dtype)


def last_token_pool_torch(hidden, attention_mask, *, normalize=True, eps=1e-6, out_dtype=None):
    """Eager gather + normalize; autograd's index backward also writes only the pooled rows."""
    idx = last_token_index(attention_mask)
    _raise_if_empty_rows(idx < 0, "last_token_pool", "attention_mask")
    rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    return _finish(rows, normalize, eps, out_dtype or hidden.dtype)


def last_token_pool_packed_torch(hidden, cu_seqlens, *, normalize=True, eps=1e-6, out_dtype=None):
    rows = hidden[cu_seqlens[1:].long() - 1]
    return _finish(rows, normalize, eps, out_dtype or hidden.dtype)


def mean_pool_packed_torch(hidden, cu_seqlens, *, normalize=True, eps=1e-6, out_dtype=None):
    """Segment sums by index_add over each row's sequence id (rows past the last sequence are left out)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_of_row = torch.repeat_interleave(torch.arange(lengths.shape[0], device=hidden.device), lengths)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    sums = torch.zeros(lengths.shape[0], hidden.shape[1], device=hidden.device, dtype=acc)
    sums = sums.index_add(0, seq_of_row, hidden[: seq_of_row.shape[0]].to(acc))
    return _finish(sums / lengths.unsqueeze(-1).to(acc), normalize, eps, out_dtype or hidden.dtype)


def mean_pool_torch(hidden, attention_mask, *, normalize=True, eps=1e-6, out_dtype=None):
    m = (attention_mask != 0)
    n = m.sum(1)
    _raise_if_empty_rows(n == 0, "mean_pool", "attention_mask")
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    mean = (hidden.to(acc) * m.unsqueeze(-1).to(acc)).sum(1) / n.unsqueeze(-1).to(acc)
    return _finish(mean, normalize, eps, out_dtype or hidden.dtype)


# ----------------------------------------------------------------------------------------------------------
# Checks and public functions
# ----------------------------------------------------------------------------------------------------------
def _raise_if_empty_rows(bad: torch.Tensor, fn: str, what: str):
    # One device->host sync per call; worth it: an empty row would otherwise become a silent zero/NaN embedding.
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:10].tolist()
        raise ValueError(f"{fn}: {what} has no non-zero entry in row(s) {rows}"
                         f"{' ...' if int(bad.sum()) > 10 else ''}; every sequence needs at least one real token")


def _check_hidden(fn, hidden, ndim, out_dtype):
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{fn}: hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != ndim:
        want = "[B, T, H]" if ndim == 3 else "[total, H]"
        raise ValueError(f"{fn}: hidden must be {ndim}-D {want}, got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: hidden must be float32/bfloat16/float16/float64, got {hidden.dtype}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{fn}: hidden has width H=0: shape {tuple(hidden.shape)}")
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: out_dtype must be a floating dtype, got {out_dtype}")


def _check_mask(fn, hidden, mask):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype not in _INT_DTYPES:
        raise TypeError(f"{fn}: attention_mask must be bool or integer (1 = real token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{fn}: attention_mask shape {tuple(mask.shape)} does not match hidden [B, T] = "
                         f"{tuple(hidden.shape[:2])}")
    if mask.device != hidden.device:
        raise ValueError(f"{fn}: attention_mask is on {mask.device} but hidden is on {hidden.device}")


def _check_packed(fn, hidden, cu_seqlens, out_dtype):
    _check_hidden(fn, hidden, 2, out_dtype)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{fn}: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in _INT_DTYPES[1:]:
        raise TypeError(f"{fn}: cu_seqlens must hold integers, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{fn}: cu_seqlens must be 1-D [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"{fn}: cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    # One device->host transfer for all three checks.
    first, last, n_bad = torch.stack([cu_seqlens[0].long(), cu_seqlens[-1].long(), (lengths <= 0).sum()]).tolist()
    if first != 0:
        raise ValueError(f"{fn}: cu_seqlens must start at 0, got {first}")
    if n_bad:
        bad = torch.nonzero(lengths <= 0).flatten()[:10].tolist()
        raise ValueError(f"{fn}: cu_seqlens must be strictly increasing; sequence(s) {bad} are empty or negative")
    if last > hidden.shape[0]:
        raise ValueError(f"{fn}: cu_seqlens ends at {last} but hidden has only {hidden.shape[0]} rows")


def _pick(backend, hidden):
    backend = resolve_backend(backend, hidden.device)
    # The kernels compute in fp32; float64 (e.g. gradcheck) keeps its precision on the torch path.
    return "torch" if hidden.dtype == torch.float64 else backend


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] int64 index of the last position whose mask is non-zero (left, right or ragged padding); -1 if none."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device)
    return torch.where(attention_mask != 0, pos, -1).amax(dim=1)


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, *, normalize: bool = True,
                    backend: str = "auto", eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Embedding of each sequence = hidden state at its last real token, L2-normalized (norm clamped to eps).

    hidden [B, T, H] (fp32/bf16/fp16/fp64); attention_mask [B, T] bool/int, non-zero = real token, padding on
    either side. Returns [B, H] in out_dtype (default: hidden.dtype). The gradient w.r.t. hidden is non-zero
    only at the pooled positions. backend: "auto" (Triton on CUDA, torch elsewhere), "triton", "torch".
    """
    fn = "last_token_pool"
    _check_hidden(fn, hidden, 3, out_dtype)
    _check_mask(fn, hidden, attention_mask)
    if hidden.shape[1] == 0:
        raise ValueError(f"{fn}: hidden has no positions (T=0): shape {tuple(hidden.shape)}")
    if _pick(backend, hidden) == "torch":
        return last_token_pool_torch(hidden, attention_mask, normalize=normalize, eps=eps, out_dtype=out_dtype)
    return _LastTokenPoolFunction.apply(hidden, attention_mask, False, normalize, float(eps),
                                        out_dtype or hidden.dtype)


def last_token_pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, *, normalize: bool = True,
                           backend: str = "auto", eps: float = 1e-6,
                           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Last-token pooling of packed sequences: sequence i spans hidden[cu_seqlens[i]:cu_seqlens[i+1]].

    hidden [total, H]; cu_seqlens [B + 1] integer, starting at 0, strictly increasing (no empty sequence),
    ending at most at total (trailing alignment padding is allowed). Returns [B, H] in out_dtype.
    """
    fn = "last_token_pool_packed"
    _check_packed(fn, hidden, cu_seqlens, out_dtype)
    if _pick(backend, hidden) == "torch":
        return last_token_pool_packed_torch(hidden, cu_seqlens, normalize=normalize, eps=eps, out_dtype=out_dtype)
    return _LastTokenPoolFunction.apply(hidden, cu_seqlens, True, normalize, float(eps), out_dtype or hidden.dtype)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, *, normalize: bool = True, backend: str = "auto",
              eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Masked mean of hidden [B, T, H] over the positions where attention_mask [B, T] is non-zero (fp32
    accumulation), then optionally L2-normalized. Returns [B, H] in out_dtype (default: hidden.dtype)."""
    fn = "mean_pool"
    _check_hidden(fn, hidden, 3, out_dtype)
    _check_mask(fn, hidden, attention_mask)
    if hidden.shape[1] == 0:
        raise ValueError(f"{fn}: hidden has no positions (T=0): shape {tuple(hidden.shape)}")
    if _pick(backend, hidden) == "torch":
        return mean_pool_torch(hidden, attention_mask, normalize=normalize, eps=eps, out_dtype=out_dtype)
    return _MeanPoolFunction.apply(hidden, attention_mask, normalize, float(eps), out_dtype or hidden.dtype)


def mean_pool_packed(hidden: torch.Tensor, cu_seqlens: torch.Tensor, *, normalize: bool = True,
                     backend: str = "auto", eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean of each packed sequence hidden[cu_seqlens[i]:cu_seqlens[i+1]] (fp32 accumulation), then optionally
    L2-normalized. Same cu_seqlens contract as last_token_pool_packed. Returns [B, H] in out_dtype."""
    fn = "mean_pool_packed"
    _check_packed(fn, hidden, cu_seqlens, out_dtype)
    if _pick(backend, hidden) == "torch":
        return mean_pool_packed_torch(hidden, cu_seqlens, normalize=normalize, eps=eps, out_dtype=out_dtype)
    return _MeanPoolPackedFunction.apply(hidden, cu_seqlens, normalize, float(eps), out_dtype or hidden.dtype)
