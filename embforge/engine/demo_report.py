"""The CPU demo's summary (markdown): machine, stage times, loss curve, before/after retrieval table.

`python -m embforge.engine.demo_report runs/demo` after scripts/demo.sh; everything printed is read from the run's
own files (stages.tsv, train/metrics.jsonl, train_result.json), nothing is typed in.
"""
from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

METRICS = ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_100", "map_at_100")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(run_dir: str | Path) -> str:
    import os

    import torch

    from embforge.eval.results import git_commit

    run = Path(run_dir)
    stages = [line.split("\t") for line in (run / "stages.tsv").read_text().splitlines() if line.strip()]
    steps = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run / "train_result.json").read_text())
    before, after = result["eval"].get("before", {}), result["eval"].get("after", {})
    losses = [s["loss"] for s in steps]
    k = min(3, len(losses))
    step_s = sorted(s["seconds"] for s in steps)
    lines = [
        f"# CPU demo ({datetime.now(timezone.utc):%Y-%m-%d})",
        "",
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, Python "
        f"{platform.python_version()}; commit {git_commit() or 'unknown'}.",
        "",
        "| stage | seconds |", "|---|---:|",
        *[f"| {name} | {sec} |" for name, sec in stages],
        f"| **total** | **{sum(int(sec) for _, sec in stages)}** |",
        "",
        f"Training: {len(steps)} steps, {steps[0]['chunks']} GradCache chunks per step, median step "
        f"{step_s[len(step_s) // 2]:.1f} s, median {sorted(s['tokens_per_s'] for s in steps)[len(steps) // 2]:.0f} "
        f"tokens/s. Loss (mean of the first / last {k} steps): {sum(losses[:k]) / k:.3f} -> "
        f"{sum(losses[-k:]) / k:.3f}.",
        "",
        "Loss per step: " + ", ".join(f"{x:.3f}" for x in losses),
        "",
        "Chatterbot Q/A retrieval (English chatterbot-corpus, answers as the corpus), before and after training:",
        "",
        "| metric | before | after |", "|---|---:|---:|",
        *[f"| {m} | {before[m]:.4f} | {after[m]:.4f} |" for m in METRICS if m in before and m in after],
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(report(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
