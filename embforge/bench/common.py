"""Shared benchmark plumbing: timing, peak memory, environment facts, CSV rows and plots.

Rows follow Liger-Kernel's long format so one CSV holds every kernel and provider:
kernel, provider, mode, B, N, H, dtype, median_ms, p20_ms, p80_ms, peak_mem_mb, plus free-form extra columns,
and device / versions / commit / date on every row so a CSV is self-describing.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from embforge.common import git_commit, open_atomic
from embforge.engine.precision import auto_dtype, cpu_capability


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # the capability is part of the name: the same CPU code runs at very different speeds with and without bf16
    return f"cpu:{platform.processor() or platform.machine()}x{os.cpu_count()} ({cpu_capability()})"


def versions() -> str:
    parts = [f"python={platform.python_version()}", f"torch={torch.__version__}"]
    for mod in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "sentence_transformers"):
        try:
            m = __import__(mod)
            parts.append(f"{mod}={getattr(m, '__version__', '?')}")
        except Exception:
            pass
    if torch.version.cuda:
        parts.append(f"cuda={torch.version.cuda}")
    return ";".join(parts)


def env_columns(device) -> dict:
    return {"device": device_name(device), "versions": versions(), "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def quantiles(samples_ms: list[float]) -> dict:
    s = sorted(samples_ms)
    def q(p):
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]
    return {"median_ms": statistics.median(s), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def time_fn(fn: Callable[[], object], device, *, warmup: int = 2, reps: int = 5,
            setup: Callable[[], object] | None = None) -> dict:
    """Median/p20/p80 wall time of fn() in ms. On CUDA, triton's do_bench (flushes L2, CUDA events)."""
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8],
                                     grad_to_none=None)
        return {"median_ms": ms[0], "p20_ms": ms[1], "p80_ms": ms[2]}
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    samples = []
    for _ in range(reps):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles(samples)


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: write 5 to clear_refs). False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """High-water resident set size of this process since start or the last reset_peak_rss()."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open_atomic(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def device_slug(device) -> str:
    """File-name key of a device for stored baselines: 'cpu' for any CPU (timings there are judged relative to a
    same-run matmul), else the GPU's name, e.g. 'nvidia-h100-80gb-hbm3'."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    import re
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def reference_matmul(device, *, reps: int = 7) -> dict:
    """Median time and rate of one dense square matmul in the working dtype of the device (`dtype: auto`: bf16 8192^3
    on CUDA; 1024^3 on CPU, bf16 only where the CPU has native bf16): the same-run yardstick that makes CPU timings comparable across runs and machines."""
    device = torch.device(device)
    dtype, n = auto_dtype(device), (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    t = time_fn(lambda: a @ b, device, warmup=2, reps=reps)
    return {"matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""), "matmul_ms": t["median_ms"],
            "matmul_tflops": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12}
