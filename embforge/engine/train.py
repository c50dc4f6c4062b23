"""`embforge train`: a plain, readable recipe loop around the GradCache step.

    for step in range(steps):
        batch  = next examples (position-indexed: resumable exactly)
        result = contrastive_step(embedder, batch)           # gradients in .grad
        clip, optimizer.step(), scheduler.step(), zero_grad
        log; maybe evaluate; maybe checkpoint

Checkpoints (every N steps, and on SIGINT/SIGTERM) hold the adapter, optimizer, scheduler, every RNG state, the data
position and the config, written atomically, so `--resume` continues with exactly the loss curve of an
uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embforge.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from embforge.engine.data import ExampleFile, batch_at
from embforge.engine.gradcache import ContrastiveBatch, contrastive_step
from embforge.engine.model import Embedder, ModelConfig


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)     # JSONL files (ours or raw E5 formats)
    skip_bad_lines: bool = False


@dataclass
class BatchConfig:
    queries: int = 64                  # queries per optimizer step (effective batch)
    negatives: int = 1                 # hard negatives per query (missing ones are filled from other examples)
    chunk_tokens: int | str = 4096     # GradCache chunk budget: real tokens when packed, else padded; or "auto"
    max_chunk_seqs: int | None = None
    packing: bool | str = "auto"       # padding-free packed chunks; auto: on wherever exact (engine/packing.py)


@dataclass
class LossConfig:
    temperature: float = 0.02
    learnable_temperature: bool = False
    same_tower: bool = False
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    decay: str = "linear"              # linear | cosine | constant
    grad_clip: float = 1.0
    optimizer: str = "adamw"           # adamw | paged_adamw_8bit (bitsandbytes)


@dataclass
class EvalConfig:
    data: str | None = None            # "chatterbot", a BEIR folder, or None
    before_training: bool = True
    every_steps: int = 0               # 0: only before and after
    instruction: str | None = None
    max_queries: int | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    steps: int = 100
    seed: int = 0
    output_dir: str = "runs/default"
    checkpoint_every: int = 50
    log_every: int = 1
    device: str | None = None

    def validate(self):
        if not self.data.train:
            raise ValueError("data.train: give at least one training JSONL file")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch.packing not in (True, False, "auto"):
            raise ValueError(f"batch.packing must be true, false or 'auto', got {self.batch.packing!r}")
        if self.optim.decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"optim.decay must be linear, cosine or constant, got {self.optim.decay!r}")


def lr_lambda(cfg: TrainConfig):
    warm, total = cfg.optim.warmup_steps, cfg.steps

    def f(step):
        if step < warm:
            return (step + 1) / max(1, warm)
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.optim.decay == "linear":
            return 1.0 - frac
        if cfg.optim.decay == "cosine":
            return 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0
    return f


def make_optimizer(params, cfg: OptimConfig, device):
    if cfg.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def to_batch(examples, negatives: int, rng_seed: int) -> ContrastiveBatch:
    """Grouped layout: each query owns [positive, K hard negatives]; short lists are filled with other examples'
    positives (still valid negatives, and the duplicate-text masking guards accidental matches)."""
    docs = []
    for i, ex in enumerate(examples):
        negs = list(ex.negatives[:negatives])
        j = 1
        while len(negs) < negatives:
            negs.append(examples[(i + j) % len(examples)].positive)
            j += 1
        docs += [ex.positive] + negs
    return ContrastiveBatch([e.query for e in examples], [e.instruction for e in examples], docs)


def _rng_states():
    import random

    import numpy as np
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(s):
    import random

    import numpy as np
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def evaluate(embedder, cfg: EvalConfig, out_dir: Path, step: int) -> dict:
    """Retrieval metrics on the eval set; also appended to out_dir/eval.jsonl as result records (model, data,
    metric, value, commit, step), so a run's whole before / every-N / after history stays on disk."""
    from embforge.eval.beir import load_beir
    from embforge.eval.datasets import CHATTERBOT_INSTRUCTION, chatterbot_beir
    from embforge.eval.results import make_records
    from embforge.eval.retrieval import evaluate_retrieval

    if cfg.data == "chatterbot":
        data = chatterbot_beir(out_dir / "eval_chatterbot")
        instruction = cfg.instruction or CHATTERBOT_INSTRUCTION
    else:
        data, instruction = load_beir(cfg.data), cfg.instruction
    if cfg.max_queries:  # a fixed subset (sorted ids), so every evaluation of the run scores the same queries
        keep = sorted(data.qrels)[: cfg.max_queries]
        data = dataclasses.replace(data, qrels={q: data.qrels[q] for q in keep})
    t0 = time.perf_counter()
    metrics = evaluate_retrieval(embedder, data, instruction=instruction, progress=False)  # encode restores mode
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    records = make_records(str(out_dir), cfg.data, metrics, step=step, instruction=instruction)
    with open(out_dir / "eval.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"[train] eval at step {step}: nDCG@10 {metrics.get('ndcg_at_10', float('nan')):.4f} "
          f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return metrics


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run training; returns {"losses": [...], "eval": {...}}. `stop_after` simulates an interruption (tests)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embedder = Embedder.from_config(cfg.model, device)
    embedder.set_packing(cfg.batch.packing)
    embedder.model.train()
    data = ExampleFile(cfg.data.train, skip_bad_lines=cfg.data.skip_bad_lines)
    if data.skipped:
        print(f"[train] skipped {len(data.skipped)} bad lines; first: {data.skipped[0]}", file=sys.stderr)
    params = embedder.trainable_parameters()
    log_tau = None
    if cfg.loss.learnable_temperature:
        log_tau = torch.nn.Parameter(torch.tensor(math.log(cfg.loss.temperature), device=device))
        params = params + [log_tau]
    optimizer = make_optimizer(params, cfg.optim, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start_step, position, losses = 0, 0, []
    metrics_path = out / "metrics.jsonl"
    evals = {}

    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, embedder, optimizer, scheduler, log_tau)
        start_step, position, losses = state["step"], state["position"], state["losses"]
        evals = state.get("evals", {})
        _set_rng_states(state["rng"])
        print(f"[train] resumed from {ckpt} at step {start_step}", file=sys.stderr)
    elif resume:
        print(f"[train] --resume: no checkpoint in {out}, starting fresh", file=sys.stderr)

    if cfg.eval.data and cfg.eval.before_training and start_step == 0:
        evals["before"] = evaluate(embedder, cfg.eval, out, 0)
        embedder.model.train()

    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True
        print(f"\n[train] signal {signum}: checkpointing after this step", file=sys.stderr)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint(step):
        save_checkpoint(out, step, embedder, optimizer, scheduler, log_tau,
                        {"step": step, "position": position, "losses": losses, "rng": _rng_states(),
                         "evals": evals, "config": dataclasses.asdict(cfg)})

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", file=sys.stderr)
    try:
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            examples, position = batch_at(data, position, cfg.batch.queries, cfg.seed)
            batch = to_batch(examples, cfg.batch.negatives, cfg.seed)
            tau = log_tau.exp() if log_tau is not None else cfg.loss.temperature
            res = contrastive_step(embedder, batch, temperature=tau, chunk_tokens=cfg.batch.chunk_tokens,
                                   max_chunk_seqs=cfg.batch.max_chunk_seqs, same_tower=cfg.loss.same_tower,
                                   matryoshka_dims=cfg.loss.matryoshka_dims,
                                   matryoshka_weights=cfg.loss.matryoshka_weights)
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            losses.append(res.loss)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            rec = {"step": step + 1, "loss": res.loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(gnorm),
                   "tokens_per_s": res.tokens / dt, "chunks": res.n_chunks, "seconds": dt, "peak_gb": peak,
                   "real_tokens": res.tokens, "computed_tokens": res.padded_tokens, "packed": res.packed,
                   **{f"t_{k}": v for k, v in res.timings.items()}}
            if log_tau is not None:
                rec["temperature"] = float(log_tau.exp())
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                chunks=res.n_chunks, mem=f"{peak:.1f}G")
            done = step + 1
            if cfg.eval.data and cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done < cfg.steps:
                evals[f"step{done}"] = evaluate(embedder, cfg.eval, out, done)
                embedder.model.train()
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stop["flag"] \
                    or (stop_after is not None and done == stop_after):
                checkpoint(done)
            if stop["flag"] or (stop_after is not None and done == stop_after):
                return {"losses": losses, "eval": evals, "stopped_at": done}
        if cfg.eval.data:
            evals["after"] = evaluate(embedder, cfg.eval, out, cfg.steps)
        checkpoint(cfg.steps)
        embedder.save_pretrained(out / "final")
        return {"losses": losses, "eval": evals, "embedder": embedder}
    finally:
        if bar:
            bar.close()
        for s, h in old.items():
            signal.signal(s, h)
