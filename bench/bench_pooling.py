"""Benchmark the pooling kernels: Triton vs eager PyTorch (gather + F.normalize, masked mean), fwd / bwd / full.

    python bench/bench_pooling.py [--device cuda|cpu] [--out CSV] [--quick] [--include-interpreter]

Writes one CSV row per (kernel, provider, mode, shape) and a PNG plot beside the CSV. Also importable:
`run(device, out_dir, quick) -> list[dict]` (used by `embforge bench`).

Timing: triton.testing.do_bench on CUDA (L2 flushed between runs, median/p20/p80 of its samples); a wall-clock
loop on CPU. On CPU only the torch provider runs by default: the Triton interpreter executes each program in
Python, so its timings say nothing about the kernel (--include-interpreter runs it anyway, tiny shapes only).
peak_mem_mb: memory at the peak of one call above what was held before it (inputs, and for bwd the forward's
outputs, excluded): max_memory_allocated on CUDA, the process's RSS high-water mark on CPU (Linux clear_refs;
freed pages the allocator reuses are not counted again, so CPU figures are a lower bound).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
if __name__ == "__main__" and "--include-interpreter" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
from embforge.bench import common  # noqa: E402

KERNELS = ["last_token_pool", "last_token_pool_packed", "mean_pool", "mean_pool_packed"]
MODES = ["fwd", "bwd", "full"]


def _shapes(device: str, quick: bool, interpreter: bool):
    """(B, T, H) grid. GPU: embedding-training sizes (H of 1B-8B decoders, GradCache chunks of ~64k-1M tokens)."""
    if interpreter:
        return [(4, 16, 64)]
    if device == "cuda":
        if quick:
            return [(64, 512, 1024), (512, 512, 4096)]
        return [(64, 512, 1024), (64, 512, 4096), (512, 512, 1024), (512, 512, 4096), (1024, 512, 4096),
                (32, 4096, 4096)]
    if quick:
        return [(8, 128, 256), (32, 128, 1024)]
    return [(8, 128, 256), (32, 128, 1024), (64, 256, 2048)]


def _inputs(kernel: str, B: int, T: int, H: int, dtype, device, seed=0):
    """Hidden states with left padding (the usual layout for decoder embedders), lengths uniform in [T/4, T]."""
    g = torch.Generator().manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)  # fill on the device: GBs of randn on a CPU take long
    lengths = torch.randint(max(1, T // 4), T + 1, (B,), generator=g)
    if kernel.endswith("_packed"):
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
        hidden = torch.randn(int(cu[-1]), H, device=device, dtype=dtype, generator=gd)
        return hidden, cu.to(device)
    hidden = torch.randn(B, T, H, device=device, dtype=dtype, generator=gd)
    mask = (torch.arange(T)[None, :] >= T - lengths[:, None]).to(torch.int64)
    return hidden, mask.to(device)


def _timer(device: str):
    if device == "cuda":
        import triton.testing

        def bench(fn, grad_to_none):
            med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
            return med, p20, p80
        return bench

    def bench_cpu(fn, grad_to_none, budget_s=0.5, max_reps=50):
        for _ in range(2):
            fn()
        samples = []
        start = time.perf_counter()
        while len(samples) < max_reps and (len(samples) < 5 or time.perf_counter() - start < budget_s):
            for x in grad_to_none:
                x.grad = None
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        q = common.quantiles(samples)
        return q["median_ms"], q["p20_ms"], q["p80_ms"]
    return bench_cpu


def _peak_mb(fn, device: str, grad_to_none):
    for x in grad_to_none:
        x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)
    if not common.reset_peak_rss():
        return ""
    base = common.current_rss_mb()
    fn()
    return round(max(0.0, common.peak_rss_mb() - base), 2)


def _bench_one(kernel, provider, B, T, H, dtype, device, bench):
    import embforge.kernels as K
    fn = getattr(K, kernel)
    hidden, sel = _inputs(kernel, B, T, H, dtype, device)
    hidden.requires_grad_(True)
    call = lambda: fn(hidden, sel, backend=provider)  # noqa: E731
    out = call()
    grad = torch.randn_like(out)
    rows = []
    for mode in MODES:
        if mode == "fwd":
            run_fn = lambda: call()  # noqa: E731
            with torch.no_grad():  # what encode() pays: no autograd bookkeeping, no saved rows
                times = bench(run_fn, [])
                peak = _peak_mb(run_fn, device, [])
        elif mode == "bwd":
            run_fn = lambda: out.backward(grad, retain_graph=True)  # noqa: E731
            times = bench(run_fn, [hidden])
            peak = _peak_mb(run_fn, device, [hidden])
        else:
            run_fn = lambda: call().backward(grad)  # noqa: E731
            times = bench(run_fn, [hidden])
            peak = _peak_mb(run_fn, device, [hidden])
        rows.append(dict(kernel=kernel, provider=provider, mode=mode, B=B, T=T, H=H,
                         dtype=str(dtype).replace("torch.", ""), median_ms=round(times[0], 4),
                         p20_ms=round(times[1], 4), p80_ms=round(times[2], 4), peak_mem_mb=peak))
    del hidden, sel, out, grad
    return rows


def run(device: str = "cpu", out_dir: str | Path = "bench/results", quick: bool = False, *,
        out: str | Path | None = None, include_interpreter: bool = False) -> list[dict]:
    """Benchmark every kernel x provider x mode on `device`; write CSV (+ PNG) and return the rows."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_pooling: --device cuda but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"bench_pooling: device must be 'cpu' or 'cuda', got {device!r}")
    interpreter = device == "cpu" and include_interpreter
    if interpreter and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("bench_pooling: --include-interpreter needs TRITON_INTERPRET=1 set before triton is "
                           "imported")
    providers = ["triton", "torch"] if device == "cuda" or interpreter else ["torch"]
    dtypes = [torch.bfloat16, torch.float32] if device == "cuda" else [torch.float32]
    bench = _timer(device)
    env = common.env_columns(device)
    rows = []
    shapes = _shapes(device, quick, interpreter)
    for kernel in KERNELS:
        for (B, T, H) in shapes:
            for dtype in dtypes:
                for provider in providers:
                    for r in _bench_one(kernel, provider, B, T, H, dtype, device, bench):
                        r.update(env)
                        rows.append(r)
                        print(f"{kernel:24s} {provider:6s} {r['mode']:4s} B={B:5d} T={T:5d} H={H:5d} "
                              f"{r['dtype']:8s} {r['median_ms']:9.4f} ms  peak {r['peak_mem_mb']} MB",
                              file=sys.stderr)
                if device == "cuda":
                    torch.cuda.empty_cache()
    csv_path = Path(out) if out else Path(out_dir) / f"pooling_{device}.csv"
    common.write_csv(rows, csv_path)
    plot(rows, csv_path.with_suffix(".png"))
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}", file=sys.stderr)
    return rows


def plot(rows: list[dict], path: Path):
    """One panel per kernel x mode: median time per shape, one line per provider and dtype (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(KERNELS), len(MODES), figsize=(5 * len(MODES), 3.6 * len(KERNELS)), squeeze=False)
    for i, kernel in enumerate(KERNELS):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            sel = [r for r in rows if r["kernel"] == kernel and r["mode"] == mode]
            shapes = sorted({(r["B"], r["T"], r["H"]) for r in sel})
            for key in sorted({(r["provider"], r["dtype"]) for r in sel}):
                pts = {(r["B"], r["T"], r["H"]): r["median_ms"] for r in sel if (r["provider"], r["dtype"]) == key}
                xs = [k for k, s in enumerate(shapes) if s in pts]
                ax.plot(xs, [pts[shapes[k]] for k in xs], marker="o", label=f"{key[0]} {key[1]}")
            ax.set_xticks(range(len(shapes)), [f"{b}x{t}x{h}" for b, t, h in shapes], rotation=30, fontsize=7)
            ax.set_yscale("log")
            ax.set_title(f"{kernel} {mode}", fontsize=9)
            ax.set_ylabel("median ms")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    if rows:
        r0 = rows[0]
        fig.suptitle(f"pooling on {r0['device']} ({r0['date'][:10]}, commit {r0['commit']}; {r0['versions']})",
                     fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="CSV path (default bench/results/pooling_<device>.csv); the PNG goes beside it")
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--include-interpreter", action="store_true",
                    help="on CPU also run the Triton provider in the interpreter (sets TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    run(args.device, REPO / "bench" / "results", args.quick, out=args.out, include_interpreter=args.include_interpreter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
