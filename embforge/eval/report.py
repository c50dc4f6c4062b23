"""The CPU demo's evaluation and summary (markdown).

    embforge eval heldout --model {base:CONFIG.yaml | RUN/final | minilm} --out F [--set K=V] [--small]
    embforge eval report runs/demo

`heldout` (evaluate_model here; the model loading is embforge/cli/eval.py's) scores one model on the held-out sets
(none of them trained on): chatterbot Q/A retrieval, GCIDE word -> definition retrieval and GCIDE sense-pair
similarity (embforge/eval/datasets.py). Our models get the instructions (as trained); all-MiniLM-L6-v2 gets plain
text, its own usage. `report` reads only the run's files (stages.tsv, train/metrics.jsonl, eval_*.json): nothing is
typed in.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

SETS = (("chatterbot", "chatterbot Q/A retrieval", "ndcg_at_10"),
        ("gcide", "GCIDE word -> definition retrieval", "ndcg_at_10"),
        ("gcide_sts", "GCIDE sense-pair similarity", "spearman"))
ORDER = ("base", "trained", "minilm")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def evaluate_model(encoder, *, plain: bool, max_queries: int | None = None, gcide_queries: int = 300,
                   gcide_docs: int = 1000, sts_pairs: int = 300) -> dict:
    """{set: {metric: value, "seconds": s}}. `plain`: no instructions (for models not trained with them)."""
    from embforge.eval.datasets import CHATTERBOT_INSTRUCTION, chatterbot_beir, gcide_beir, gcide_sts
    from embforge.eval.retrieval import evaluate_retrieval
    from embforge.eval.sts import evaluate_sts

    out = {}
    chat = chatterbot_beir()
    gc = gcide_beir(n_queries=gcide_queries, n_distractors=gcide_docs - gcide_queries)
    for name, ds, inst in (("chatterbot", chat, CHATTERBOT_INSTRUCTION), ("gcide", gc, None)):
        if max_queries:
            keep = sorted(ds.qrels)[:max_queries]
            ds = dataclasses.replace(ds, qrels={q: ds.qrels[q] for q in keep})
        if plain:
            ds, inst = dataclasses.replace(ds, instructions={}), None
        t0 = time.perf_counter()
        m = evaluate_retrieval(encoder, ds, instruction=inst, progress=False)
        out[name] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        out[name]["seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    # E5 applies the STS instruction to both sides; MiniLM gets the bare definitions.
    sts = evaluate_sts(encoder, gcide_sts(n_pairs=sts_pairs),
                       instruction=None if plain else "Retrieve semantically similar text")
    out["gcide_sts"] = {**sts, "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _side_by_side(run: Path) -> list[str]:
    results = {}
    for label in ORDER:
        f = run / f"eval_{label}.json"
        if f.exists():
            results[label] = json.loads(f.read_text())
    if not results:
        return ["(no eval_*.json in the run folder: the side-by-side evaluation did not run)"]
    labels = [lab for lab in ORDER if lab in results]
    names = {"base": "untrained base", "trained": "trained", "minilm": "all-MiniLM-L6-v2"}
    lines = ["| held-out set (metric) | " + " | ".join(names[lab] for lab in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for key, title, metric in SETS:
        vals = [results[lab].get(key, {}).get(metric) for lab in labels]
        lines.append(f"| {title} ({metric.replace('_at_', '@')}) | "
                     + " | ".join("n/a" if v is None else f"{v:.4f}" for v in vals) + " |")
    if {"base", "trained", "minilm"} <= set(results):
        g = [results[lab]["gcide"]["ndcg_at_10"] for lab in ("base", "trained", "minilm")]
        if g[2] > g[0]:
            lines += ["", f"Share of the base -> MiniLM gap closed on GCIDE retrieval: "
                          f"{(g[1] - g[0]) / (g[2] - g[0]):.0%}."]
    return lines


def report(run_dir: str | Path) -> str:
    import os

    import torch

    from embforge.common import git_commit   # short hash, '-dirty' when tracked files differ from HEAD

    run = Path(run_dir)
    stages = [line.split("\t") for line in (run / "stages.tsv").read_text().splitlines() if line.strip()]
    steps = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps]
    k = min(3, len(losses))
    step_s = sorted(s["seconds"] for s in steps)
    lines = [
        f"# CPU demo ({datetime.now(timezone.utc):%Y-%m-%d})",
        "",
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, Python "
        f"{platform.python_version()}; commit {git_commit()}.",
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
        "Held-out evaluation (none of these sets is trained on), side by side:",
        "",
        *_side_by_side(run),
    ]
    return "\n".join(lines) + "\n"
