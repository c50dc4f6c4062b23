"""Seconds per training step of the CPU demo's recipe under LoRA and GradCache levers (SmolLM2-135M, CPU).

    python bench/bench_demo_step.py [--config configs/cpu-demo.yaml] [--reps 3] [--out-dir bench/results]

Why: on 2 CPU cores the demo's training step decides whether the demo fits its 15 minutes. Three levers are timed
on one fixed batch of the demo's data (the config's queries x (positive + negatives), built by data/sources.py + the
hashing miner when runs/demo/train.mined.jsonl is absent):
  - LoRA dropout: in train mode peft draws a Bernoulli mask for the input of every adapted projection (210 of them
    on SmolLM2), and CPU Bernoulli sampling is slow; dropout 0 skips it;
  - adapted layers (model.lora.layers): without adapters below layer k the backward pass stops at layer k;
  - GradCache chunk size (batch.max_chunk_seqs): fewer, larger chunks vs padding.
Each variant loads the model fresh (same seed), runs one warm-up step off the record, then --reps timed
contrastive_step calls (forward pass 1, loss, replayed forward + backward pass 2). Writes demo_step_cpu.csv and
demo_step_cpu.md.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (label, --set overrides); the first row is the recipe as the demo had it before these levers were measured.
VARIANTS = [
    ("dropout 0.05, all 30 layers, chunks of 8",
     ["model.lora.dropout=0.05", "model.lora.layers=null", "batch.max_chunk_seqs=8"]),
    ("dropout 0, all 30 layers, chunks of 8", ["model.lora.dropout=0.0", "model.lora.layers=null",
                                               "batch.max_chunk_seqs=8"]),
    ("dropout 0, all 30 layers, chunks of 16", ["model.lora.dropout=0.0", "model.lora.layers=null",
                                                "batch.max_chunk_seqs=16"]),
    ("dropout 0, top 15 layers, chunks of 8", ["model.lora.dropout=0.0", "model.lora.layers=top:15",
                                               "batch.max_chunk_seqs=8"]),
    ("dropout 0, top 15 layers, chunks of 16", ["model.lora.dropout=0.0", "model.lora.layers=top:15",
                                                "batch.max_chunk_seqs=16"]),
]


def _data(path: Path) -> Path:
    if path.exists():
        return path
    from embforge.data.sources import build
    raw = path.with_name("train.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    build(raw, cap_per_source=1200)
    subprocess.run([sys.executable, "-m", "embforge", "mine", "--data", str(raw), "--out", str(path),
                    "--model", "hashing", "--ranks", "10-100", "--negatives", "1", "--margin", "0.95"], check=True)
    return path


def measure(config: str, overrides: list[str], data: Path, reps: int) -> dict:
    import torch

    from embforge.config import load_config
    from embforge.data.records import ExampleFile, batch_at
    from embforge.engine.batch import to_batch
    from embforge.engine.gradcache import contrastive_step
    from embforge.engine.model import Embedder
    from embforge.engine.train import TrainConfig
    cfg = load_config(TrainConfig, config, overrides)
    torch.manual_seed(0)
    emb = Embedder.from_config(cfg.model, "cpu")
    emb.set_packing(cfg.batch.packing)
    emb.model.train()
    examples, _ = batch_at(ExampleFile([data]), 0, cfg.batch.queries, cfg.seed)
    batch = to_batch(examples, cfg.batch.negatives)

    def step():
        t0 = time.perf_counter()
        r = contrastive_step(emb, batch, temperature=cfg.loss.temperature, chunk_tokens=cfg.batch.chunk_tokens,
                             max_chunk_seqs=cfg.batch.max_chunk_seqs)
        emb.model.zero_grad(set_to_none=True)
        return r, time.perf_counter() - t0

    step()   # warm-up: allocator, lazy init
    runs = [step() for _ in range(reps)]
    r = runs[-1][0]
    return {"step_s": statistics.median(t for _, t in runs), "min_s": min(t for _, t in runs),
            "pass1_s": statistics.median(x.timings["pass1"] for x, _ in runs),
            "pass2_s": statistics.median(x.timings["pass2"] for x, _ in runs),
            "chunks": r.n_chunks, "sequences": len(batch.queries) + len(batch.documents),
            "real_tokens": r.tokens, "computed_tokens": r.padded_tokens,
            "trainable_params": sum(p.numel() for p in emb.trainable_parameters())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/cpu-demo.yaml")
    p.add_argument("--data", default="runs/demo/train.mined.jsonl")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default="bench/results")
    args = p.parse_args(argv)
    from embforge.bench import common
    data = _data(Path(args.data))
    rows = []
    for label, overrides in VARIANTS:
        m = measure(args.config, overrides, data, args.reps)
        rows.append({"variant": label, **{k: round(v, 2) if isinstance(v, float) else v for k, v in m.items()},
                     **common.env_columns("cpu")})
        print(f"{label}: {m['step_s']:.1f} s/step (pass1 {m['pass1_s']:.1f}, pass2 {m['pass2_s']:.1f}, "
              f"{m['chunks']} chunks)", flush=True)
    out = Path(args.out_dir)
    common.write_csv(rows, out / "demo_step_cpu.csv")
    base = rows[0]["step_s"]
    env = rows[0]
    lines = [f"One training step of `{args.config}`'s recipe (its batch: {rows[0]['sequences']} sequences, "
             f"{rows[0]['real_tokens']} real tokens) on SmolLM2-135M, bf16 base, CPU; median of {args.reps} steps "
             "after a warm-up.",
             f"Measured {env['date']} on {env['device']} ({env['versions']}), commit {env['commit']}, by "
             "`python bench/bench_demo_step.py`.", "",
             "| variant | s/step | vs first row | pass 1 s | pass 2 s | chunks | computed tokens | trainable params |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['step_s']} | {base / r['step_s']:.2f}x | {r['pass1_s']} | "
                     f"{r['pass2_s']} | {r['chunks']} | {r['computed_tokens']} | {r['trainable_params']:,} |")
    (out / "demo_step_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
