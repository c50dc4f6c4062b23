"""InfoNCE with issue 22's terms on vs off: time and peak memory of forward+backward (CPU; CUDA when present).

    python bench/bench_infonce_terms.py [--device cpu|cuda] [--B 2048] [--N 4096] [--H 576] [--budget-mb 64]

Configurations (one fresh subprocess each on CPU, so the RSS high-water mark belongs to it):
  plain        q2d only (the plain kernel)
  margin       false_negative_margin=0.1 (the terms path with segment A only)
  own-group    in_batch_negatives=False
  distill      teacher_scores [B, G], distill_weight=1
  gte          directions q2d, q2q, d2q, d2d (segments A and B, each C x (N + B))
  all          gte + margin + distillation
Writes infonce_terms_<device>.csv. Peak memory is above the inputs (CPU: RSS high-water mark; CUDA:
max_memory_allocated), so it holds the chunk scratch plus the O((B + N) H) gradients.
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
from embforge.kernels.infonce import infonce_loss  # noqa: E402

ALL = ("q2d", "q2q", "d2q", "d2d")
CONFIGS = {
    "plain": {},
    "margin": dict(false_negative_margin=0.1),
    "own-group": dict(in_batch_negatives=False),
    "distill": dict(distill_weight=1.0, teacher_temperature=0.5, teacher="yes"),
    "gte": dict(directions=ALL),
    "all": dict(directions=ALL, false_negative_margin=0.1, distill_weight=1.0, teacher_temperature=0.5,
                teacher="yes"),
}


def measure(config: str, B: int, N: int, H: int, budget_mb: float, device: str, reps: int) -> dict:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, generator=g).to(dev).requires_grad_()
    d = torch.randn(N, H, generator=g).to(dev).requires_grad_()
    kw = dict(CONFIGS[config])
    if kw.pop("teacher", None):
        kw["teacher_scores"] = torch.randn(B, N // B, generator=g).to(dev)
    backend = "triton" if dev.type == "cuda" else "torch"

    def run():
        q.grad = d.grad = None
        infonce_loss(q, d, 0.05, backend=backend, memory_budget_mb=budget_mb, **kw).backward()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        import gc
        gc.collect()
        base = common.current_rss_mb()
        common.reset_peak_rss()
    run()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = max(0.0, common.peak_rss_mb() - base)
    t = common.time_fn(run, dev, warmup=0, reps=reps)
    return {"config": config, "kwargs": json.dumps({k: v for k, v in CONFIGS[config].items()}), "B": B, "N": N,
            "H": H, "dtype": "float32", "budget_mb": budget_mb, "backend": backend, **t,
            "peak_mem_mb": round(peak, 1), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "status": "ok"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--B", type=int, default=2048)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--H", type=int, default=576)
    p.add_argument("--budget-mb", type=float, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--append", action="store_true", help="add the rows to an existing CSV (another shape)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(*json.loads(a.one))))
        return 0
    rows = []
    for i, config in enumerate(a.configs):
        args = [config, a.B, a.N, a.H, a.budget_mb, a.device, a.reps]
        if a.device == "cuda":
            row = measure(*args)
        else:
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps(args)], capture_output=True,
                                 text=True, timeout=1800)
            if out.returncode != 0:
                err = (out.stderr.strip().splitlines() or ["?"])[-1]
                row = {"config": config, "B": a.B, "N": a.N, "H": a.H, "status": f"error: {err[:200]}"}
            else:
                row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(common.env_columns(a.device))
        rows.append(row)
        print(f"[{i + 1}/{len(a.configs)}] {config:10s} {row.get('median_ms', float('nan')):9.1f} ms "
              f"{row.get('peak_mem_mb', float('nan')):8.1f} MB  {row['status']}", file=sys.stderr, flush=True)
    path = Path(a.out_dir) / f"infonce_terms_{a.device}.csv"
    if a.append and path.exists():
        rows = common.read_csv(path) + rows
    common.write_csv(rows, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
