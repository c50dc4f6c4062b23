"""Helpers the InfoNCE kernels share (infonce.py: the q2d/q2q loss; infonce_terms.py: the enlarged partition,
margins, own-group and distillation): scratch sizing, fp32-accumulating matmuls, the fused gradient projection through
the L2 normalization, id checks and backend choice. Shared helpers live here only (Liger-Kernel's ops/utils.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Scratch bytes per similarity entry held at once. Triton: fp32 S plus G' in the matmul dtype (<= 4 bytes).
# torch: S, a logits buffer, logsumexp's temporary, G', and a byte of mask.
_SCRATCH_BYTES_PER_ENTRY = {"triton": 8, "torch": 17}
DEFAULT_MEMORY_BUDGET_MB = 1024
# Tests set this to fill every scratch/output buffer with NaN on allocation, proving kernels write all they read.
POISON_BUFFERS = False


def empty(*shape, device, dtype):
    out = torch.empty(*shape, device=device, dtype=dtype)
    if POISON_BUFFERS:
        out.fill_(float("nan"))
    return out



# ----------------------------------------------------------------------------------------------------------
# Gradient through the L2 normalization, fused: out_r = alpha_r * (y_r - beta_r * x_r), written in x's dtype.
#   dq: y = g (fp32), alpha = 1/|q|, beta = (sum_j G_ij s_ij)/|q|           (beta given)
#   dd: y = h',       alpha = 1,     beta = (d.h')/|d|^2                       (beta computed from the row dot)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _project_rows_kernel(Y_ptr, X_ptr, OUT_ptr, r_ptr, c_ptr, H, stride_y, stride_x, stride_o,
                         HAS_C: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    r = tl.load(r_ptr + row)
    if HAS_C:
        alpha = r
        beta = tl.load(c_ptr + row) * r
    else:
        dot = tl.zeros([BLOCK_H], tl.float32)
        for start in range(0, H, BLOCK_H):
            cols = start + offs
            m = cols < H
            y = tl.load(Y_ptr + row * stride_y + cols, mask=m, other=0.0)
            x = tl.load(X_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            dot += x * y
        alpha = 1.0
        beta = tl.sum(dot, axis=0) * r * r
    for start in range(0, H, BLOCK_H):
        cols = start + offs
        m = cols < H
        y = tl.load(Y_ptr + row * stride_y + cols, mask=m, other=0.0)
        x = tl.load(X_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT_ptr + row * stride_o + cols, (alpha * (y - beta * x)).to(OUT_ptr.dtype.element_ty), mask=m)


def project_triton(y, x, r, c):
    if y.dtype == torch.float64:
        return project_torch(y, x, r, c)
    R, H = y.shape
    if x.stride(1) != 1:  # the kernel walks rows with unit column stride (prefix slices already have it)
        x = x.contiguous()
    out = empty(R, H, device=y.device, dtype=x.dtype)
    block_h = min(4096, triton.next_power_of_2(H))
    _project_rows_kernel[(R,)](y, x, out, r, c if c is not None else r, H, y.stride(0), x.stride(0),
                               out.stride(0), HAS_C=c is not None, BLOCK_H=block_h,
                               num_warps=8 if block_h >= 2048 else 4)
    return out


def project_torch(y, x, r, c):
    xf = x.to(y.dtype)
    if c is not None:
        return ((y - (c * r)[:, None] * xf) * r[:, None]).to(x.dtype)
    beta = (xf * y).sum(1) * r * r
    return (y - beta[:, None] * xf).to(x.dtype)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 accumulation for fp32/bf16/fp16; float64 inputs (gradcheck) stay float64 end to end.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    # On CPU, bf16 matmuls are slow and less exact: compute in the accumulation dtype there.
    return x.dtype if x.is_cuda else acc_dtype(x)


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (bf16/fp16 tensor cores on GPU)."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return (a.float() @ b.float())


def choose_chunk_rows(n_candidates: int, memory_budget_mb: float | None, n_queries: int,
                      backend: str = "triton") -> int:
    """Rows per chunk so that the C x N scratch fits the budget; independent of the number of queries."""
    budget = (memory_budget_mb or DEFAULT_MEMORY_BUDGET_MB) * 2**20
    per_row = n_candidates * _SCRATCH_BYTES_PER_ENTRY[backend]
    rows = int(budget // per_row)
    if rows < 1:
        raise ValueError(f"memory_budget_mb={memory_budget_mb} is too small for one row of "
                         f"{n_candidates} candidates (needs {per_row / 2**20:.2f} MB)")
    if rows >= 64:
        rows -= rows % 64  # keep matmul shapes tensor-core friendly
    return max(1, min(rows, n_queries))


def accumulate_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool):
    """acc (+)= a @ b with fp32 accumulation; on CUDA one GEMM with beta=1 (no temporary, no extra pass)."""
    if first:
        if a.dtype in (torch.float32, torch.float64):
            torch.mm(a, b, out=acc)
        else:
            acc.copy_(mm_f32(a, b))
        return
    if a.dtype in (torch.float32, torch.float64):
        acc.addmm_(a, b)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        acc += mm_f32(a, b)


def ids(x, n, name, device):
    if x is None:
        return None
    x = torch.as_tensor(x, device=device)
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"infonce_loss: {name} must hold integer ids, got {x.dtype}")
    if x.shape != (n,):
        raise ValueError(f"infonce_loss: {name} must have shape ({n},), got {tuple(x.shape)}")
    return x.to(torch.int64)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda":
        import os
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 to run on CPU")
    return backend
