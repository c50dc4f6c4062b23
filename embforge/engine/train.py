"""`embforge train`: a plain, readable recipe loop around the GradCache step.

    for step in range(steps):
        batch  = next examples (position-indexed: resumable exactly)
        result = contrastive_step(embedder, batch)           # gradients in .grad
        clip, optimizer.step(), scheduler.step(), zero_grad
        log; maybe evaluate; maybe checkpoint

Checkpoints (every N steps, and on SIGINT/SIGTERM) hold the adapter, optimizer, scheduler, every RNG state, the data
position and the config, written atomically, so `--resume` continues with exactly the loss curve of an
uninterrupted run.

Under torchrun (docs/distributed.md) every rank reads the same global batch at the same position and takes its
slice (distributed.shard_batch), so the data order does not depend on the world size; rank 0 alone logs, evaluates,
draws the bar, writes metrics.jsonl and checkpoints (holding every rank's RNG state); all ranks wait for it.
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
from embforge.engine.distributed import (DistributedConfig, check_launch, full_tensor, init_distributed, rank_seed,
                                         shard_batch, sum_grads, wrap)
from embforge.engine.gradcache import ContrastiveBatch, auto_chunk_tokens, contrastive_step
from embforge.engine.model import Embedder, ModelConfig
from embforge.engine.tracking import LogConfig, Tracker


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)   # used only under torchrun
    log: LogConfig = field(default_factory=LogConfig)   # TensorBoard / W&B (engine/tracking.py)
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


def _restore_rng(state: dict, dist_, cfg: TrainConfig, step: int):
    """Every rank gets back its own generators. A checkpoint from another world size cannot hold this rank's
    stream: the data order is unaffected (global position), and each rank's generators are re-derived from
    (seed, rank, step), so the run continues correctly but not bit-identically to an uninterrupted one."""
    ranks = state.get("rng_ranks") or [state["rng"]]      # older checkpoints: one process
    if len(ranks) == dist_.world_size:
        _set_rng_states(ranks[dist_.rank])
        return
    torch.manual_seed(rank_seed(cfg.seed, dist_.rank) + 7919 * step)
    dist_.log(f"[train] checkpoint written by {len(ranks)} rank(s), resuming on {dist_.world_size}: same data "
              f"order; dropout generators re-derived from (seed, rank, step {step})")


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run training; returns {"losses": [...], "eval": {...}, "main": whether this process is the one that speaks}.
    `stop_after` simulates an interruption (tests). Under torchrun this runs on every rank (see distributed.py); one
    process otherwise."""
    dist_, device = init_distributed(cfg.distributed, cfg.device)
    if dist_.active:
        check_launch(cfg, dist_.world_size)      # before any model loads (one process: nothing to refuse)
    fsdp = dist_.active and cfg.distributed.strategy == "fsdp"
    if fsdp and resume:
        raise ValueError("--resume with distributed.strategy=fsdp is not supported (no resumable sharded "
                         "checkpoints); use strategy ddp")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)                  # identical LoRA init on every rank
    embedder = Embedder.from_config(cfg.model, device)
    embedder.set_packing(cfg.batch.packing)
    embedder.model.train()
    if dist_.rank > 0:
        # Per-rank dropout streams; rank 0 continues the single-process stream (so world size 1 == one process).
        torch.manual_seed(rank_seed(cfg.seed, dist_.rank))
    data = ExampleFile(cfg.data.train, skip_bad_lines=cfg.data.skip_bad_lines)
    if data.skipped:
        dist_.log(f"[train] skipped {len(data.skipped)} bad lines; first: {data.skipped[0]}")
    chunk_tokens = cfg.batch.chunk_tokens
    if dist_.active and chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(embedder)   # probe the plain model: the wrapper would communicate
    step_embedder = wrap(embedder, dist_, cfg.distributed.strategy)
    params = embedder.trainable_parameters()     # after wrap: FSDP2 replaced them with sharded DTensors
    groups = [{"params": params}]
    log_tau = None
    if cfg.loss.learnable_temperature:
        log_tau = torch.nn.Parameter(torch.tensor(math.log(cfg.loss.temperature), device=device))
        params = params + [log_tau]
        # No weight decay on the temperature: decay would pull log(tau) toward 0, i.e. tau toward 1.
        groups.append({"params": [log_tau], "weight_decay": 0.0})
    optimizer = make_optimizer(groups, cfg.optim, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start_step, position, losses = 0, 0, []
    metrics_path = out / "metrics.jsonl"
    evals = {}

    # Rank 0 picks the checkpoint; every rank loads it (output_dir must be shared between nodes).
    ckpt = dist_.broadcast_object(latest_checkpoint(out) if resume else None)
    if ckpt is not None:
        if not Path(ckpt).exists():
            raise FileNotFoundError(f"rank {dist_.rank}: checkpoint {ckpt} (chosen by rank 0) is not visible here; "
                                    "output_dir must be on a filesystem shared by all nodes")
        state = load_checkpoint(ckpt, embedder, optimizer, scheduler, log_tau)
        start_step, position, losses = state["step"], state["position"], state["losses"]
        evals = state.get("evals", {})
        _restore_rng(state, dist_, cfg, start_step)
        dist_.on_main(_drop_steps_after, metrics_path, start_step)   # they are recomputed: log each step once
        dist_.log(f"[train] resumed from {ckpt} at step {start_step}")
    elif resume:
        dist_.log(f"[train] --resume: no checkpoint in {out}, starting fresh")
    tracker = None
    if cfg.log.tensorboard or cfg.log.wandb:
        tracker = dist_.on_main(Tracker, cfg.log, out, start_step=start_step, config=dataclasses.asdict(cfg))

    def run_eval(key: str, step: int):    # rank 0 alone (Dist.on_main); the others wait in the next collective
        def run():
            evals[key] = evaluate(embedder, cfg.eval, out, step)
            if tracker is not None:
                tracker.log_eval(step, cfg.eval.data, evals[key])
            embedder.model.train()
        dist_.on_main(run)

    if cfg.eval.data and cfg.eval.before_training and start_step == 0:
        run_eval("before", 0)

    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True
        print(f"\n[train] rank {dist_.rank}: signal {signum}: checkpointing after this step", file=sys.stderr)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint(step):
        rng = dist_.gather_objects(_rng_states())     # every rank's generators (a collective: all ranks call)
        dist_.on_main(save_checkpoint, out, step, embedder, optimizer, scheduler, log_tau,
                      {"step": step, "position": position, "losses": losses, "rng": rng[0], "rng_ranks": rng,
                       "world_size": dist_.world_size, "evals": evals, "config": dataclasses.asdict(cfg)})
        dist_.barrier()                               # nobody runs ahead of a checkpoint still being written

    bar = None
    if progress:
        from tqdm import tqdm
        bar = dist_.on_main(tqdm, total=cfg.steps, initial=start_step, desc="train", unit="step", file=sys.stderr)
    try:
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            examples, position = batch_at(data, position, cfg.batch.queries, cfg.seed)
            batch = shard_batch(to_batch(examples, cfg.batch.negatives, cfg.seed), dist_)
            tau = log_tau.exp() if log_tau is not None else cfg.loss.temperature
            res = contrastive_step(step_embedder, batch, temperature=tau, chunk_tokens=chunk_tokens,
                                   max_chunk_seqs=cfg.batch.max_chunk_seqs, same_tower=cfg.loss.same_tower,
                                   matryoshka_dims=cfg.loss.matryoshka_dims,
                                   matryoshka_weights=cfg.loss.matryoshka_weights, dist=dist_)
            if log_tau is not None:
                sum_grads([log_tau], dist_)           # outside the wrapped module: reduced here, with SUM
            # The reduced gradients are the global ones, so this is the global pre-clip norm on every rank.
            gnorm = full_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            losses.append(res.loss)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            tokens, computed = int(dist_.sum(res.tokens)), int(dist_.sum(res.padded_tokens))
            peak = dist_.max(peak)
            stop["flag"] = dist_.any(stop["flag"])   # one rank's signal stops every rank at this step
            rec = {"step": step + 1, "loss": res.loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(gnorm),
                   "tokens_per_s": tokens / dt, "chunks": res.n_chunks, "seconds": dt, "peak_gb": peak,
                   "real_tokens": tokens, "computed_tokens": computed, "packed": res.packed,
                   **{f"t_{k}": v for k, v in res.timings.items()}}
            if dist_.active:
                rec["world_size"] = dist_.world_size
            if log_tau is not None:
                rec["temperature"] = float(log_tau.exp())
            dist_.on_main(_append_jsonl, metrics_path, rec)
            if tracker is not None:              # exists on rank 0 only
                tracker.log_step(rec)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                chunks=res.n_chunks, mem=f"{peak:.1f}G")
            done = step + 1
            if cfg.eval.data and cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done < cfg.steps:
                run_eval(f"step{done}", done)
            interrupted = stop["flag"] or (stop_after is not None and done == stop_after)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and not fsdp) or (interrupted and not fsdp):
                checkpoint(done)
            if interrupted:
                return {"losses": losses, "eval": evals, "stopped_at": done, "main": dist_.is_main}
        if cfg.eval.data:
            run_eval("after", cfg.steps)
        if not fsdp:
            checkpoint(cfg.steps)
        _save_final(embedder, out / "final", dist_)
        return {"losses": losses, "eval": evals, "embedder": embedder, "main": dist_.is_main}
    finally:
        if bar:
            bar.close()
        if tracker is not None:
            tracker.close()
        for s, h in old.items():
            signal.signal(s, h)


def _drop_steps_after(path: Path, step: int):
    """Keep the metrics of steps <= `step` (the checkpoint resumed from), rewritten atomically."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _append_jsonl(path: Path, rec: dict):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _save_final(embedder, path: Path, dist_):
    """Rank 0 writes the final model; FSDP2's sharded LoRA weights are gathered first (a collective)."""
    sharded = any(hasattr(p, "full_tensor") for p in embedder.trainable_parameters())
    state = None
    if sharded:
        state = {n: full_tensor(p.detach()).cpu() for n, p in embedder.model.named_parameters() if p.requires_grad}
    dist_.on_main(embedder.save_pretrained, path, adapter_state_dict=state)
    dist_.barrier()
