"""InfoNCE with issue 22's terms on vs off: time and peak memory of forward+backward (CPU; CUDA when present).

    python bench/bench_infonce_terms.py [--device cpu|cuda] [--B 2048] [--N 4096] [--H 576] [--budget-mb 64]

Times: round-robin over the configurations in one process (a shared machine's load hits all alike). Peak
memory: one fresh subprocess per configuration on CPU, so the RSS high-water mark belongs to it.
Configurations:
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
import subprocess
import sys
import time
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


def setup(config: str, B: int, N: int, H: int, budget_mb: float, device: str):
    """Inputs and a forward+backward closure for one configuration."""
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
    return run, backend


def peak_memory(config: str, B: int, N: int, H: int, budget_mb: float, device: str) -> float:
    """MB above the inputs during one forward+backward (CPU: call in a fresh process)."""
    run, _ = setup(config, B, N, H, budget_mb, device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import gc
    gc.collect()
    base = common.current_rss_mb()
    common.reset_peak_rss()
    run()
    return max(0.0, common.peak_rss_mb() - base)


def timings(configs, B, N, H, budget_mb, device, reps) -> dict:
    """Round-robin over the configurations (rep 1 of each, then rep 2, ...), so that a change in the load of a
    shared machine hits every configuration alike; one untimed warm-up call each."""
    runs = {c: setup(c, B, N, H, budget_mb, device)[0] for c in configs}
    if device == "cuda":
        return {c: common.time_fn(runs[c], device) for c in configs}
    for run in runs.values():
        run()
    samples = {c: [] for c in configs}
    for _ in range(reps):
        for c in configs:
            t0 = time.perf_counter()
            runs[c]()
            samples[c].append((time.perf_counter() - t0) * 1e3)
    return {c: common.quantiles(samples[c]) for c in configs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--B", type=int, default=2048)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--H", type=int, default=576)
    p.add_argument("--budget-mb", type=float, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--append", action="store_true", help="add the rows to an existing CSV (another shape)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(peak_memory(*json.loads(a.one))))
        return 0
    peaks = {}
    for config in a.configs:
        args = [config, a.B, a.N, a.H, a.budget_mb, a.device]
        if a.device == "cuda":
            peaks[config] = peak_memory(*args)
            continue
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(args)], capture_output=True, text=True,
                             timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"{config}: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        peaks[config] = float(out.stdout.strip().splitlines()[-1])
    times = timings(a.configs, a.B, a.N, a.H, a.budget_mb, a.device, a.reps)
    env = common.env_columns(a.device)
    rows = []
    for config in a.configs:
        rows.append({"config": config, "kwargs": json.dumps(CONFIGS[config]), "B": a.B, "N": a.N, "H": a.H,
                     "dtype": "float32", "budget_mb": a.budget_mb, "backend": "triton" if a.device == "cuda" else
                     "torch", **times[config], "vs_plain": round(times[config]["median_ms"]
                                                                 / times.get("plain", times[config])["median_ms"], 2),
                     "peak_mem_mb": round(peaks[config], 1), "threads": torch.get_num_threads(), "reps": a.reps,
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), **env})
        print(f"{config:10s} {times[config]['median_ms']:9.1f} ms (p20 {times[config]['p20_ms']:.1f}, p80 "
              f"{times[config]['p80_ms']:.1f}) {peaks[config]:8.1f} MB", file=sys.stderr, flush=True)
    path = Path(a.out_dir) / f"infonce_terms_{a.device}.csv"
    if a.append and path.exists():
        rows = common.read_csv(path) + rows
    common.write_csv(rows, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
