"""InfoNCE microbenchmark: fused/chunked kernel vs eager PyTorch vs torch.compile.

    python bench/bench_infonce.py [--device cpu|cuda] [--quick] [--out-dir bench/results]

Writes infonce_<device>.csv (one row per kernel/provider/mode/shape) and infonce_<device>.png.
Providers:
  triton   embforge.infonce_loss(backend="triton")  (CUDA; Triton epilogue + tensor-core matmuls)
  chunked  embforge.infonce_loss(backend="torch")   (the same row-chunk algorithm in torch ops)
  eager    normalize -> B x N matmul -> cross_entropy
  compile  torch.compile(eager)
Modes: fwd (no grad), bwd (backward alone, graph retained), full (forward + backward).
FLOPs counted as 2BNH forward + 4BNH backward (the issue's convention); TFLOP/s reported for fwd and full.
CPU peak memory is the RSS high-water mark of a fresh subprocess above its RSS once inputs exist; CUDA peak
memory is max_memory_allocated above the inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embforge.bench import common  # noqa: E402
from embforge.kernels.infonce import infonce_loss, infonce_loss_eager  # noqa: E402

# The target budget on GPU; on CPU a small one, so the flat scratch is visible at CI-sized shapes.
SCRATCH_BUDGET_MB = {"cuda": 2048, "cpu": 32}
_compiled = {}


def loss_fn(provider: str, device_type: str):
    if provider in ("triton", "chunked"):
        backend = "triton" if provider == "triton" else "torch"
        budget = SCRATCH_BUDGET_MB[device_type]
        return lambda q, d: infonce_loss(q, d, 0.02, backend=backend, memory_budget_mb=budget)
    if provider == "eager":
        return lambda q, d: infonce_loss_eager(q, d, 0.02)
    if provider == "compile":
        # bwd mode re-runs backward on a retained graph, which donated buffers forbid
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
        if "fn" not in _compiled:
            _compiled["fn"] = torch.compile(infonce_loss_eager)
        return lambda q, d: _compiled["fn"](q, d, 0.02)
    raise ValueError(provider)


def make_inputs(B, N, H, dtype, device, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, H, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    d = torch.randn(N, H, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return q, d


def measure(provider, mode, B, N, H, dtype, device, reps=5) -> dict:
    """Time and peak memory of one configuration, in this process."""
    device = torch.device(device)
    fn = loss_fn(provider, device.type)
    q, d = make_inputs(B, N, H, dtype, device, requires_grad=mode != "fwd")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        import gc
        gc.collect()
        base = common.current_rss_mb()
        common.reset_peak_rss()

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, d)
    elif mode == "full":
        def run():
            q.grad = d.grad = None
            fn(q, d).backward()
    else:  # bwd: backward alone on a retained graph
        loss = fn(q, d)

        def run():
            q.grad = d.grad = None
            loss.backward(retain_graph=True)
    run()  # first call: compilation / autotuning, and the memory high-water mark
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = max(0.0, common.peak_rss_mb() - base)
    t = common.time_fn(run, device, reps=reps)
    flops = {"fwd": 2, "bwd": 4, "full": 6}[mode] * B * N * H
    return {"kernel": "infonce", "provider": provider, "mode": mode, "B": B, "N": N, "H": H,
            "dtype": str(dtype).replace("torch.", ""), **t, "peak_mem_mb": round(peak, 1),
            "tflops": round(flops / (t["median_ms"] * 1e-3) / 1e12, 2), "status": "ok"}


def measure_subprocess(provider, mode, B, N, H, dtype, reps) -> dict:
    """CPU: a fresh process per configuration so the RSS high-water mark belongs to that configuration."""
    cmd = [sys.executable, __file__, "--one", json.dumps([provider, mode, B, N, H, str(dtype), reps])]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"kernel": "infonce", "provider": provider, "mode": mode, "B": B, "N": N, "H": H,
                "dtype": str(dtype).replace("torch.", ""), "status": f"error: {err[:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def matmul_rate(device, dtype=torch.bfloat16, n=8192) -> float:
    """Dense matmul TFLOP/s on this device in this run: the yardstick for the kernel's efficiency."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = common.time_fn(lambda: a @ b, device)
    return 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12


def configs(device: str, quick: bool):
    if device == "cuda":
        dtype, H = torch.bfloat16, 4096
        shapes = [(2048, 4096), (8192, 16384), (32768, 65536), (65536, 131072)]
        if quick:
            shapes = [(2048, 4096), (8192, 16384)]
        providers = ["triton", "chunked", "eager", "compile"]
    else:
        dtype, H = torch.float32, 256
        shapes = [(256, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]
        if quick:
            shapes = [(128, 256), (256, 512), (512, 1024)]
        providers = ["chunked", "eager"] if quick else ["chunked", "eager", "compile"]
    for B, N in shapes:
        for provider in providers:
            if provider == "compile" and B > (8192 if device == "cuda" else 2048):
                continue  # eager's B x N logits no longer fit; compiling it again per shape only costs time
            for mode in ("fwd", "bwd", "full"):
                yield provider, mode, B, N, H, dtype


def run(device: str = "cpu", out_dir: str | Path = "bench/results", quick: bool = False,
        progress: bool = True) -> list[dict]:
    env = common.env_columns(device)
    rows = []
    cfgs = list(configs(device, quick))
    skip_larger = set()  # (provider, mode) that ran out of memory: larger shapes will too
    for i, (provider, mode, B, N, H, dtype) in enumerate(cfgs):
        if (provider, mode) in skip_larger:
            row = {"kernel": "infonce", "provider": provider, "mode": mode, "B": B, "N": N, "H": H,
                   "dtype": str(dtype).replace("torch.", ""), "status": "oom (smaller shape already did)"}
        elif device == "cuda":
            try:
                row = measure(provider, mode, B, N, H, dtype, device)
            except torch.OutOfMemoryError:
                row = {"kernel": "infonce", "provider": provider, "mode": mode, "B": B, "N": N, "H": H,
                       "dtype": str(dtype).replace("torch.", ""), "status": "oom"}
                skip_larger.add((provider, mode))
            except Exception as e:  # one broken provider must not lose the other rows
                row = {"kernel": "infonce", "provider": provider, "mode": mode, "B": B, "N": N, "H": H,
                       "dtype": str(dtype).replace("torch.", ""), "status": f"error: {type(e).__name__}: {e}"[:300]}
            torch.cuda.empty_cache()
        else:
            row = measure_subprocess(provider, mode, B, N, H, dtype, reps=3 if quick else 5)
        row.update(env)
        rows.append(row)
        if progress:
            print(f"[{i + 1}/{len(cfgs)}] {provider:8s} {mode:4s} B={B:<6d} N={N:<7d} "
                  f"{row.get('median_ms', float('nan')):9.2f} ms  {row.get('peak_mem_mb', float('nan')):9.1f} MB"
                  f"  {row['status']}", file=sys.stderr, flush=True)
    if device == "cuda":
        rate = matmul_rate(device)
        for r in rows:
            r["matmul_tflops"] = round(rate, 1)
            if r.get("status") == "ok":
                r["frac_of_matmul"] = round(r["tflops"] / rate, 3)
    tag = "cuda" if device == "cuda" else "cpu"
    out_dir = Path(out_dir)
    common.write_csv(rows, out_dir / f"infonce_{tag}.csv")
    plot(rows, out_dir / f"infonce_{tag}.png")
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r.get("status") == "ok" and r["mode"] == "full"]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for provider in sorted({r["provider"] for r in ok}):
        pts = sorted((int(r["B"]), float(r["median_ms"]), float(r["peak_mem_mb"])) for r in ok
                     if r["provider"] == provider)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        axes[1].plot([p[0] for p in pts], [max(p[2], 0.1) for p in pts], marker="o", label=provider)
    for ax, ylabel in zip(axes, ["forward+backward median ms", "peak extra memory MB"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("B queries (N = 2B candidates)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    r0 = ok[0]
    fig.suptitle(f"InfoNCE fwd+bwd, H={r0['H']} {r0['dtype']} on {r0['device']} ({r0['date'][:10]}, {r0['commit']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="CI-sized shapes")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        provider, mode, B, N, H, dtype, reps = json.loads(a.one)
        print(json.dumps(measure(provider, mode, B, N, H, getattr(torch, dtype.split(".")[-1]), "cpu", reps)))
        return 0
    run(a.device, a.out_dir, a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
