"""End-to-end GradCache training step on a Mistral-shaped model: ours, the sentence-transformers peer, the levers.

    python bench/bench_e2e.py [--device cuda|cpu] [--part e2e|e2e_big] [--quick] [--out-dir bench/results]
                              [--budget-s S] [--levers baseline,peer,...] [--model-cache DIR]

CUDA: Mistral-7B shape (random weights written once as bf16 from the GPU), nf4 + LoRA r=16 on all seven
projections, 256 queries + 512 documents (positive + hard negative) per step, queries 16-64 tokens, documents
lognormal 64-512 tokens. `--part e2e_big`: 2048 queries + 4096 documents per step (the 80 GB memory target).
CPU: the same code on a small Mistral-shaped model (CI-sized). The logic lives in embforge/bench/e2e.py (also run
by `embforge bench`); docs/bench.md states the FLOP formulas and what each column means.
Writes <part>_<device>.csv, .jsonl (a row as soon as it is measured) and .png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The e2e share of one 10-minute GPU call, model writing and loading included. A lever is skipped when the time
# spent plus its estimate (its cost factor x the headline's measured time) would pass this; the rest of the 600 s
# covers the suite's wheel install, imports and an estimate that comes out short.
CUDA_BUDGET_S = 480


def main(argv=None) -> int:
    import torch

    from embforge.bench import e2e
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--part", choices=["e2e", "e2e_big"], default="e2e")
    p.add_argument("--quick", action="store_true", help="fewer measured steps (and CI-sized on CPU)")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"skip a lever when time spent + its estimate would pass this (CUDA default {CUDA_BUDGET_S})")
    p.add_argument("--levers", default=None, help="comma-separated subset of the levers (default: all)")
    p.add_argument("--model-cache", default=None, help="where the random-weight model folder is written")
    p.add_argument("--profile", action="store_true",
                   help="profile one extra baseline step (torch.profiler table in <part>_profile_<device>.txt)")
    a = p.parse_args(argv)
    budget = a.budget_s if a.budget_s is not None else (CUDA_BUDGET_S if a.device == "cuda" else None)
    rows = e2e.run(a.device, a.out_dir, a.quick, part=a.part, model_cache=a.model_cache, budget_s=budget,
                   levers=a.levers.split(",") if a.levers else None, profile=a.profile)
    for r in rows:
        print(f"{r['lever']:30s} {r['status'][:60]:60s} tokens/s={r.get('tokens_per_s', '')} "
              f"mfu={r.get('mfu', '')} hfu={r.get('hfu', '')} peak={r.get('peak_mem_mb', '')} MB "
              f"speedup_vs_peer={r.get('speedup_vs_peer', '')}")
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
