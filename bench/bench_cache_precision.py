"""Error of a bf16 GradCache embedding cache (what contrastive_step's cache_dtype="auto" picks on CUDA for a bf16
model) against the fp32 cache, measured on CPU with the CUDA arithmetic emulated.

    python bench/bench_cache_precision.py [--out-dir bench/results]

On CUDA a bf16 cache makes the InfoNCE matmuls take bf16 inputs with fp32 accumulation and write G' in bf16
(kernels/utils.py matmul_dtype). On CPU the kernel computes in fp32 whatever the input dtype, so here its matmul dtype is
patched to the input's dtype, as on CUDA: bf16 products are exact in fp32, so this is the CUDA arithmetic up to
summation order. Embeddings: bf16-rounded raw vectors (a bf16 model's pooled states), anisotropic (any two at cosine
~0.5, a positive ~0.57 with its query), temperature 0.02. Errors are relative to a float64 reference on the same inputs:
loss (absolute difference / |loss|), dL/dq and dL/dd (Frobenius norm of the difference / norm of the reference).
Writes cache_precision_cpu.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = [(64, 4, 576), (256, 4, 1024), (128, 8, 4096)]   # (queries B, documents per query G, width H)


def embeddings(B: int, G: int, H: int, seed: int = 0):
    """Anisotropic like a decoder's pooled states: a shared direction gives any two vectors cosine ~0.5, and a
    positive shares 0.15 of its query's own part (cosine ~0.57), so the loss sits at a few nats, not near 0."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(H, generator=g)
    q_own = torch.randn(B, H, generator=g)
    d_own = torch.randn(B, G, H, generator=g)
    d_own[:, 0] = 0.15 * q_own + (1 - 0.15 ** 2) ** 0.5 * d_own[:, 0]   # positive first
    q, d = 3 * (c + q_own), 3 * (c + d_own)
    return q.bfloat16().double(), d.reshape(B * G, H).bfloat16().double()


def loss_and_grads(q, d, dtype, emulate_cuda: bool):
    import embforge.kernels.infonce as K
    import embforge.kernels.utils as U
    saved = U.matmul_dtype
    if emulate_cuda:
        U.matmul_dtype = lambda x: x.dtype
    try:
        qq, dd = (x.detach().to(dtype).clone().requires_grad_() for x in (q, d))
        loss = K.infonce_loss(qq, dd, 0.02, backend="torch")
        loss.backward()
    finally:
        U.matmul_dtype = saved
    return loss.double().item(), qq.grad.double(), dd.grad.double()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    from embforge.bench.common import env_columns, write_csv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    rows = []
    for B, G, H in SHAPES:
        q, d = embeddings(B, G, H)
        ref = loss_and_grads(q, d, torch.float64, False)
        for name, dtype, emulate in (("fp32", torch.float32, False), ("bf16-cuda-arith", torch.bfloat16, True)):
            loss, dq, dd = loss_and_grads(q, d, dtype, emulate)
            rows.append(dict(B=B, G=G, H=H, cache=name, loss=round(ref[0], 6),
                             loss_rel_err=f"{abs(loss - ref[0]) / abs(ref[0]):.3e}",
                             dq_rel_err=f"{rel(dq, ref[1]):.3e}", dd_rel_err=f"{rel(dd, ref[2]):.3e}",
                             cpu_capability=torch.backends.cpu.get_cpu_capability(), **env_columns("cpu")))
            print({k: rows[-1][k] for k in ("B", "G", "H", "cache", "loss_rel_err", "dq_rel_err", "dd_rel_err")})
    out = write_csv(rows, Path(args.out_dir) / "cache_precision_cpu.csv")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
