"""Peak RSS of one GradCache training step vs effective batch on SmolLM2-135M (CPU), at a fixed chunk budget.

    python bench/bench_step_memory.py [--batches 32,128,512] [--chunk-tokens 1024] [--out-dir bench/results]

Claim under test (issue 3): with a fixed chunk budget, a step's memory grows only with the embedding cache
(fp32 [sequences x hidden], plus its gradient), not with activations, which exist for one chunk at a time.
Each batch size runs in a fresh process (the RSS high-water mark is per process): load the model, run a 4-query
warm-up step (allocator and lazy init), then reset the high-water mark and run one contrastive_step + AdamW step.
Columns: peak_rss_mb (absolute), step_extra_mb (peak above the RSS just before the step), cache_mb (the embedding
cache and its gradient: what may grow), saved_act_peak_mb (bytes autograd kept for the largest chunk: what must not
grow). Data: the engine's offline demo set (Python stdlib docstrings; query, positive, one hard negative; repeated
beyond its ~440 examples), truncated to short lengths so the 512-query step finishes in minutes on 2 cores.
Writes step_memory_cpu.csv and step_memory_cpu.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUERY_MAX, DOC_MAX = 32, 48


def _batch(n: int, seed: int = 0):
    from embforge.data import sources
    from embforge.data.records import read_examples
    from embforge.engine import ContrastiveBatch
    with tempfile.TemporaryDirectory() as tmp:
        sources.build(Path(tmp) / "demo.jsonl", seed=seed)
        examples = [e for e in read_examples(Path(tmp) / "demo.jsonl") if e.negatives]
    # The demo set has ~440 examples: larger batches cycle through it, and the engine masks the repeated texts as
    # negatives (that changes the loss, not the memory, which is what is measured here).
    ex = [examples[i % len(examples)] for i in range(n)]
    docs = [d for e in ex for d in (e.positive, e.negatives[0])]
    return ContrastiveBatch([e.query for e in ex], [e.instruction for e in ex], docs)


def measure_one(n_queries: int, chunk_tokens: int) -> dict:
    import torch

    from embforge.bench import common
    from embforge.bench.tracker import Tracker
    from embforge.engine import Embedder, ModelConfig, contrastive_step
    emb = Embedder.from_config(ModelConfig(path="smollm2", query_max_length=QUERY_MAX, doc_max_length=DOC_MAX),
                               device="cpu")
    emb.train()
    opt = torch.optim.AdamW(emb.trainable_parameters(), lr=1e-4)
    contrastive_step(emb, _batch(4, seed=1), chunk_tokens=chunk_tokens)  # warm-up, off the record
    opt.step()
    opt.zero_grad(set_to_none=True)
    batch = _batch(n_queries)
    tracker = Tracker(emb, track_saved=True)
    gc.collect()
    before = common.current_rss_mb()
    common.reset_peak_rss()
    t0 = time.perf_counter()
    with tracker.step() as trace:
        r = contrastive_step(emb, batch, chunk_tokens=chunk_tokens)
    opt.step()
    opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    peak = common.peak_rss_mb()
    n_seqs = len(batch.queries) + len(batch.documents)
    return {"effective_batch": n_queries, "sequences": n_seqs, "chunk_tokens": chunk_tokens,
            "query_max_length": QUERY_MAX, "doc_max_length": DOC_MAX, "real_tokens": r.tokens,
            "chunks": r.n_chunks, **trace.summary(),
            "cache_mb": round(2 * n_seqs * emb.hidden_size * 4 / 2**20, 2),
            "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "step_extra_mb": round(peak - before, 1), "step_s": round(seconds, 1), "status": "ok"}


def run(device: str = "cpu", out_dir: str | Path = REPO / "bench" / "results", quick: bool = False,
        batches: list[int] | None = None, chunk_tokens: int = 1024) -> list[dict]:
    from embforge.bench import common
    if device != "cpu":
        raise ValueError("bench_step_memory measures host RSS: CPU only")
    batches = batches or ([8, 32] if quick else [32, 128, 512])
    env = common.env_columns("cpu")
    rows = []
    for n in batches:
        cmd = [sys.executable, __file__, "--one", json.dumps([n, chunk_tokens])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=dict(os.environ))
        if out.returncode != 0:
            err = (out.stderr.strip().splitlines() or ["?"])[-1]
            row = {"effective_batch": n, "chunk_tokens": chunk_tokens, "status": f"error: {err[:300]}"}
        else:
            row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(env)
        rows.append(row)
        print(f"batch {n}: {row.get('peak_rss_mb')} MB peak, +{row.get('step_extra_mb')} MB in the step, "
              f"cache {row.get('cache_mb')} MB, saved activations {row.get('saved_act_peak_mb')} MB/chunk, "
              f"{row.get('step_s')} s  {row['status']}", file=sys.stderr, flush=True)
    out_dir = Path(out_dir)
    common.write_csv(rows, out_dir / "step_memory_cpu.csv")
    (out_dir / "step_memory_cpu.md").write_text(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    head = ok[0] if ok else rows[0]
    lines = [f"One GradCache step (contrastive_step + AdamW) on SmolLM2-135M, fp32, CPU; chunk budget "
             f"{head.get('chunk_tokens')} padded tokens; queries <= {QUERY_MAX}, documents <= {DOC_MAX} tokens; "
             f"query + positive + 1 hard negative from the offline demo set.",
             f"Measured {head.get('date', '')[:10]} on {head.get('device')} ({head.get('versions')}), "
             f"commit {head.get('commit')}, by `python bench/bench_step_memory.py`.", "",
             "| effective batch | sequences | real tokens | chunks | peak RSS MB | step extra MB | embedding cache + "
             "grad MB | saved activations / chunk MB | largest chunk tokens | step s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['effective_batch']} | {r['status']} |||||||||")
            continue
        lines.append(f"| {r['effective_batch']} | {r['sequences']} | {r['real_tokens']} | {r['chunks']} | "
                     f"{r['peak_rss_mb']} | {r['step_extra_mb']} | {r['cache_mb']} | {r['saved_act_peak_mb']} | "
                     f"{r['max_chunk_padded_tokens']} | {r['step_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default=None, help="comma-separated effective batches (default 32,128,512)")
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        n, chunk = json.loads(a.one)
        print(json.dumps(measure_one(n, chunk)))
        return 0
    batches = [int(b) for b in a.batches.split(",")] if a.batches else None
    run("cpu", a.out_dir, a.quick, batches, a.chunk_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
