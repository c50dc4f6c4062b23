"""Evaluation during training: the hook `embforge train` hands the trainer (embforge/cli/train.py wires it), so the
trainer never imports evaluation code and evaluation never imports the trainer."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from embforge.common import append_jsonl


def evaluate(embedder, data: str, out_dir: str | Path, step: int, *, instruction: str | None = None,
             max_queries: int | None = None, record: bool = True) -> dict:
    """Retrieval metrics of `embedder` on `data` ("chatterbot" or a BEIR folder); with `record` also appended to
    out_dir/eval.jsonl as result records (model, data, metric, value, commit, step), so a run's whole before /
    every-N / after history stays on disk. Under torchrun every rank calls this with its RankShardedEncoder (each
    encodes its share) and only rank 0 records."""
    from embforge.eval.beir import load_beir
    from embforge.eval.datasets import CHATTERBOT_INSTRUCTION, chatterbot_beir
    from embforge.eval.results import make_records
    from embforge.eval.retrieval import evaluate_retrieval

    out_dir = Path(out_dir)
    if data == "chatterbot":
        ds = chatterbot_beir(out_dir / "eval_chatterbot" if record else None)
        instruction = instruction or CHATTERBOT_INSTRUCTION
    else:
        ds = load_beir(data)
    if max_queries:  # a fixed subset (sorted ids), so every evaluation of the run scores the same queries
        keep = sorted(ds.qrels)[:max_queries]
        ds = dataclasses.replace(ds, qrels={q: ds.qrels[q] for q in keep})
    t0 = time.perf_counter()
    metrics = evaluate_retrieval(embedder, ds, instruction=instruction, progress=False)  # encode restores mode
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    if not record:
        return metrics
    append_jsonl(out_dir / "eval.jsonl", *make_records(str(out_dir), data, metrics, step=step,
                                                        instruction=instruction))
    print(f"[train] eval at step {step}: nDCG@10 {metrics.get('ndcg_at_10', float('nan')):.4f} "
          f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return metrics
