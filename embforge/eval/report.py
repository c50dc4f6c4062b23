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
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

SETS = (("chatterbot", "chatterbot Q/A retrieval", "ndcg_at_10"),
        ("gcide", "GCIDE word -> definition retrieval", "ndcg_at_10"),
        ("gcide_sts", "GCIDE sense-pair similarity", "spearman"),
        ("fortunes", "fortunes same-topic retrieval (general English)", "ndcg_at_10"))
ORDER = ("base", "trained", "minilm")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def sample_queries(qrels: dict, n: int) -> list[str]:
    """`n` query ids drawn with a fixed seed (the same every run), sorted: the first ids in order would be the
    first topics only (chatterbot's ids follow its files)."""
    import random
    return sorted(random.Random(0).sample(sorted(qrels), min(n, len(qrels))))


def sample_corpus(ds, n: int):
    """`ds` searching `n` documents: every judged query's relevant ones plus a fixed-seed sample of the others as
    distractors (the same every run)."""
    import random
    relevant = {d for rel in ds.qrels.values() for d in rel}
    others = sorted(set(ds.corpus) - relevant)
    keep = relevant | set(random.Random(0).sample(others, max(0, min(n - len(relevant), len(others)))))
    return dataclasses.replace(ds, corpus={d: t for d, t in ds.corpus.items() if d in keep})


def evaluate_model(encoder, *, plain: bool, max_queries: int | None = None, gcide_queries: int = 300,
                   gcide_docs: int = 1000, sts_pairs: int = 300, chatterbot_docs: int | None = None,
                   only: list[str] | None = None) -> dict:
    """{set: {metric: value, "seconds": s}}. `plain`: no instructions (for models not trained with them).
    `chatterbot_docs`: search that many of chatterbot's answers (the judged queries' own + distractors), all when
    None. `only`: the names (SETS' keys) of the sets to score; all when None."""
    from embforge.eval.datasets import (CHATTERBOT_INSTRUCTION, chatterbot_beir, fortunes_beir, gcide_beir,
                                        gcide_sts)
    from embforge.eval.retrieval import evaluate_retrieval
    from embforge.eval.sts import evaluate_sts

    names = [key for key, _title, _metric in SETS]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown held-out set(s) {', '.join(unknown)}; known: {', '.join(names)}")
    wanted = set(only or names)
    out = {}
    sets = []
    if "chatterbot" in wanted:
        sets.append(("chatterbot", chatterbot_beir(), CHATTERBOT_INSTRUCTION))
    if "gcide" in wanted:
        sets.append(("gcide", gcide_beir(n_queries=gcide_queries, n_distractors=gcide_docs - gcide_queries), None))
    if "fortunes" in wanted:
        try:
            sets.append(("fortunes", fortunes_beir(), None))
        except FileNotFoundError as e:   # the Debian package is installed best effort (scripts/setup.sh)
            print(f"[heldout] skipping the fortunes set: {e}", file=sys.stderr)
    for name, ds, inst in sets:
        if max_queries:
            keep = sample_queries(ds.qrels, max_queries)
            ds = dataclasses.replace(ds, qrels={q: ds.qrels[q] for q in keep})
        if name == "chatterbot" and chatterbot_docs:
            ds = sample_corpus(ds, chatterbot_docs)
        if plain:
            ds, inst = dataclasses.replace(ds, instructions={}), None
        t0 = time.perf_counter()
        m = evaluate_retrieval(encoder, ds, instruction=inst, progress=False)
        out[name] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        out[name]["seconds"] = round(time.perf_counter() - t0, 1)
    if "gcide_sts" in wanted:
        t0 = time.perf_counter()
        # E5 applies the STS instruction to both sides; MiniLM gets the bare definitions.
        sts = evaluate_sts(encoder, gcide_sts(n_pairs=sts_pairs),
                           instruction=None if plain else "Retrieve semantically similar text")
        out["gcide_sts"] = {**sts, "seconds": round(time.perf_counter() - t0, 1)}
    return out


def strongest_base(run: Path) -> tuple[dict, dict]:
    """The untrained base at its best on each set over every configuration evaluated (eval_base*.json: the trained
    configuration's pooling/attention and others, e.g. plain mean pooling with causal attention), and which
    configuration that was per set. Comparing the trained model with only its own untrained configuration would
    flatter it."""
    variants = {f.stem[len("eval_"):]: json.loads(f.read_text()) for f in sorted(run.glob("eval_base*.json"))}
    best, which = {}, {}
    for key, _title, metric in SETS:
        scored = [(v[key][metric], name) for name, v in variants.items() if metric in v.get(key, {})]
        if scored:
            value, name = max(scored)
            best[key], which[key] = {metric: value}, name
    return best, which


def _side_by_side(run: Path) -> list[str]:
    results = {}
    for label in ORDER:
        f = run / f"eval_{label}.json"
        if f.exists():
            results[label] = json.loads(f.read_text())
    base, which = strongest_base(run)
    if base:
        results["base"] = base
    if not results:
        return ["(no eval_*.json in the run folder: the side-by-side evaluation did not run)"]
    labels = [lab for lab in ORDER if lab in results]
    names = {"base": "untrained base (strongest)", "trained": "trained", "minilm": "all-MiniLM-L6-v2"}
    lines = ["| held-out set (metric) | " + " | ".join(names[lab] for lab in labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for key, title, metric in SETS:
        vals = [results[lab].get(key, {}).get(metric) for lab in labels]
        lines.append(f"| {title} ({metric.replace('_at_', '@')}) | "
                     + " | ".join("n/a" if v is None else f"{v:.4f}" for v in vals) + " |")
    if which:
        lines += ["", "Untrained base: the best of its evaluated configurations on each set ("
                  + ", ".join(f"{key}: {name}" for key, name in which.items()) + ")."]
    if {"base", "trained", "minilm"} <= set(results) and "gcide" in results["base"]:
        g = [results[lab]["gcide"]["ndcg_at_10"] for lab in ("base", "trained", "minilm")]
        if g[2] > g[0]:
            lines += ["", f"Share of the base -> MiniLM gap closed on GCIDE retrieval: "
                          f"{(g[1] - g[0]) / (g[2] - g[0]):.0%}."]
    return lines


def _synth_section(run: Path) -> list[str]:
    """The E5 path in the demo: what the local LLM wrote, what validation kept, and one kept example."""
    report_file, data_file = run / "synth" / "synth.report.json", run / "synth" / "synth.jsonl"
    if not report_file.exists():
        return []
    rep = json.loads(report_file.read_text())
    outcomes = rep.get("example_outcomes", {})
    accepted = sum(n for k, n in outcomes.items() if k.startswith("accepted"))
    rejected = {k.split(":", 1)[1]: n for k, n in outcomes.items() if k.startswith("rejected")}
    total = accepted + sum(rejected.values())
    lines = ["", "Synthetic data (E5 two-step prompting against the local llama.cpp server, "
             f"{rep.get('model', '?')}): {accepted} of {total} generated examples kept"
             + (f" ({accepted / total:.0%})" if total else "") + "; rejected by reason: "
             + (", ".join(f"{k} {n}" for k, n in sorted(rejected.items())) or "none") + "."]
    if accepted and data_file.exists():
        first = json.loads(data_file.read_text().splitlines()[0])
        sample = {k: first.get(k) for k in ("instruction", "query", "positive", "negatives")}
        lines += ["", "A kept example: `" + json.dumps(sample, ensure_ascii=False)[:600] + "`"]
    return lines


def _per_dataset(steps: list[dict]) -> list[str]:
    """"Per dataset (steps, mean loss): a 12 (0.812), b 4 (1.020)." from metrics.jsonl's `dataset` field."""
    seen: dict[str, list[float]] = {}
    for s in steps:
        if "dataset" in s:
            seen.setdefault(s["dataset"], []).append(s["loss"])
    if not seen:
        return []
    return ["Per dataset (steps, mean loss): " + ", ".join(f"{name} {len(v)} ({sum(v) / len(v):.3f})"
                                                          for name, v in seen.items()) + ".", ""]


def _sizes(run: Path) -> list[str]:
    """What the side-by-side scored: the sets' sizes as the first eval file recorded them."""
    files = sorted(run.glob("eval_*.json"))
    if not files:
        return []
    res = json.loads(files[0].read_text())
    parts = []
    for key, _title, _metric in SETS:
        r = res.get(key, {})
        if "num_pairs" in r:
            parts.append(f"{key} {r['num_pairs']} pairs")
        elif "num_queries" in r:
            parts.append(f"{key} {r['num_queries']} queries / {r.get('num_docs')} documents")
    return ["", "Set sizes: " + ", ".join(parts) + "."] if parts else []


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
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}, Python "
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
        *_per_dataset(steps),
        "Held-out evaluation (none of these sets is trained on), side by side:",
        "",
        *_side_by_side(run),
        *_sizes(run),
        *_synth_section(run),
    ]
    return "\n".join(lines) + "\n"
