"""fp32 vs bf16 on this CPU: a dense matmul at the demo model's shapes and one forward of the demo's chunk.

    python bench/bench_precision_cpu.py [--out bench/results/precision_cpu.md] [--no-model]

Why: `dtype: auto` (embforge/engine/precision.py) picks bf16 on CPU only where the CPU multiplies bf16 natively
(AVX512-BF16 or AMX). This measures the gap that decision rests on, on the machine at hand, and appends a row naming
the CPU capability, versions and date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import torch

from embforge.bench.common import device_name, versions
from embforge.engine.precision import cpu_capability, cpu_native_bf16


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_gflops(dtype: torch.dtype, m: int = 768, k: int = 576, n: int = 1536, reps: int = 5) -> float:
    """SmolLM2-135M's MLP up-projection at 16 sequences x 48 tokens."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    return 2 * m * k * n / _median_s(lambda: a @ b, reps) / 1e9


def chunk_forward_s(dtype: torch.dtype, reps: int = 3) -> float:
    """One no-grad forward of SmolLM2-135M on 16 sequences of 48 tokens (the demo's chunk)."""
    from embforge.engine.model import Embedder, ModelConfig
    name = str(dtype).replace("torch.", "")
    emb = Embedder.from_config(ModelConfig(path="smollm2", dtype=name, lora=None, pooling="mean"), device="cpu")
    seqs = [[(7 * i + j) % 1000 + 10 for j in range(48)] for i in range(16)]
    with torch.no_grad():
        return _median_s(lambda: emb.embed_chunk(seqs), reps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/precision_cpu.md")
    ap.add_argument("--no-model", action="store_true", help="matmuls only (no SmolLM2 forward)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    row = {"date": dt.date.today().isoformat(), "device": device_name("cpu"), "capability": cpu_capability(),
           "native_bf16": cpu_native_bf16(), "threads": torch.get_num_threads(),
           "fp32_gflops": matmul_gflops(torch.float32), "bf16_gflops": matmul_gflops(torch.bfloat16)}
    if not args.no_model:
        row["fp32_chunk_s"] = chunk_forward_s(torch.float32)
        row["bf16_chunk_s"] = chunk_forward_s(torch.bfloat16)
    line = ("| {date} | {device} | {capability} | {native_bf16} | {threads} | {fp32_gflops:.1f} | {bf16_gflops:.1f} | "
            .format(**row) + (f"{row['fp32_chunk_s']:.2f} | {row['bf16_chunk_s']:.2f} |" if "fp32_chunk_s" in row
                              else "- | - |"))
    out = Path(args.out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# fp32 vs bf16 on CPU (bench/bench_precision_cpu.py)\n\n"
                       "Dense matmul 768x576 @ 576x1536 (SmolLM2-135M's MLP at 16 x 48 tokens), median of 5; one no-grad\n"
                       "forward of SmolLM2-135M on 16 sequences x 48 tokens, median of 3. `dtype: auto` picks bf16 only\n"
                       "where `native bf16` is True.\n\n"
                       "| date | device | capability | native bf16 | threads | fp32 GFLOP/s | bf16 GFLOP/s | "
                       "fp32 chunk s | bf16 chunk s |\n|---|---|---|---|---:|---:|---:|---:|---:|\n")
    with out.open("a") as f:
        f.write(line + f"  <!-- {versions()} -->\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
