"""`embforge train`'s recipe: a plain loop around the GradCache step.

    run = setup(cfg)                                          # model, optimizer, schedule (+ checkpoint on resume)
    for step in range(start, steps):
        batch, position = batches(position)                   # the global batch at a position: resumable exactly
        result = train_step(run, shard_batch(batch))          # GradCache step, clip, optimizer and schedule
        reporter.step(metrics); maybe evaluate; maybe checkpoint

The trainer is given its data (`batches`, a BatchSource) and its evaluation (`evaluate(embedder, step)`, optional):
embforge/cli/train.py `run_training` wires the JSONL reader (embforge/data) and the retrieval evaluation
(embforge/eval) in, so this module knows neither.

Checkpoints (every N steps, and on SIGINT/SIGTERM) hold the adapter, optimizer, scheduler, every RNG state, the data
position and the config, written atomically (FSDP2: sharded, by every rank: engine/checkpoint.py), so `--resume`
continues with exactly the loss curve of an uninterrupted run; a worker torchrun restarts resumes by itself.

Under torchrun (docs/distributed.md) every rank reads the same global batch at the same position and takes its
slice (batch.shard_batch), so the data order does not depend on the world size. Rank 0's work (progress bar,
metrics.jsonl, logs, evaluations, checkpoint and model files) goes through one Reporter, which is silent on the other
ranks; collectives are called by every rank, here, in the same order.
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
from typing import Callable, Protocol

import torch

from embforge.common import append_jsonl, atomic_write_text
from embforge.config import ConfigError
from embforge.engine.batch import ContrastiveBatch, shard_batch
from embforge.engine.checks import check_train_values
from embforge.engine.checkpoint import (latest_checkpoint, load_checkpoint, new_checkpoint_dir, publish_checkpoint,
                                       remove_unpublished, restore_rng, rng_states, save_checkpoint, save_shards,
                                       save_sharded_trainer_state)
from embforge.engine.distributed import (Dist, DistributedConfig, check_launch, elastic_restart, full_tensor,
                                         init_distributed, rank_seed, run_mode, sum_grads, wrap)
from embforge.engine.gradcache import StepResult, auto_chunk_tokens, contrastive_step
from embforge.engine.launch import check_same_launch, launch_fingerprint
from embforge.engine.model import Embedder, ModelConfig
from embforge.engine.rank_encoder import RankShardedEncoder
from embforge.engine.rundir import prepare_output_dir, trim_steps
from embforge.engine.temperature import Temperature
from embforge.engine.tracking import LogConfig, Tracker


@dataclass
class DatasetSpec:
    """A `data.train` entry given as a mapping (a bare path is DatasetSpec(path=...)); embforge/data/mixture.py
    resolves it (files, default name and weight) and samples from it (docs/train.md, "Datasets and mixtures")."""
    path: str                              # a JSONL file, a directory of *.jsonl shards, or a glob
    name: str | None = None                # default: the file stem
    weight: float | None = None            # default: the dataset's size (proportional sampling)
    instruction: str | None = None         # given to the records that carry none
    negatives: int | None = None           # default: batch.negatives
    in_batch_negatives: bool = True        # false: each query sees only its own positive and hard negatives

    def validate(self):
        if not self.path.strip():
            raise ConfigError("path: must not be empty")
        if self.name is not None and not self.name.strip():
            raise ConfigError("name: must not be empty")
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"weight: must be a number > 0, got {self.weight}")
        if self.negatives is not None and self.negatives < 0:
            raise ConfigError(f"negatives: must be >= 0, got {self.negatives}")


@dataclass
class DataConfig:
    train: list[str | DatasetSpec] = field(default_factory=list)   # JSONL paths (ours or raw E5 formats) or specs
    skip_bad_lines: bool = False


@dataclass
class BatchConfig:
    queries: int = 64                  # queries per optimizer step (effective batch)
    negatives: int = 1                 # hard negatives per query (missing ones are filled from other examples)
    chunk_tokens: int | str = 4096     # GradCache chunk budget: real tokens when packed, else padded; or "auto"
    max_chunk_seqs: int | None = None
    packing: bool | str = "auto"       # padding-free packed chunks; auto: on wherever exact (engine/packing.py)
    sampling: str | None = None        # homogeneous | mixed; default: homogeneous for several datasets, else mixed


@dataclass
class LossConfig:
    """infonce_loss's options (docs/train.md "Loss" states each term; kernels/infonce_terms.py computes them)."""
    temperature: float = 0.02
    learnable_temperature: bool = False
    same_tower: bool = False           # a synonym for adding q2q to directions
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None
    directions: list[str] = field(default_factory=lambda: ["q2d"])   # any of q2d, q2q, d2q, d2d (GTE's partition)
    false_negative_margin: float | None = None   # drop a negative whose cosine exceeds the positive's + this
    in_batch_negatives: bool = True    # false: each query's negatives are its own group's documents only
    teacher_temperature: float = 1.0   # softmax(teacher scores / this): the distillation target
    distill_weight: float = 0.0        # > 0: distil from the records' "scores" (a KL term per scored query)

    def validate(self):
        """Refuse at config load, naming the key (the same rules infonce_loss applies at the first step)."""
        from embforge.kernels.infonce_terms import DIRECTIONS
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad or not self.directions:
            raise ValueError(f"loss.directions: {bad or self.directions} is not a non-empty list of "
                             f"{', '.join(DIRECTIONS)}")
        if len(set(self.directions)) != len(self.directions):
            raise ValueError(f"loss.directions: {self.directions} names a direction twice")
        if self.false_negative_margin is not None and not math.isfinite(self.false_negative_margin):
            raise ValueError(f"loss.false_negative_margin: must be a finite number or null, got "
                             f"{self.false_negative_margin}")
        if not self.in_batch_negatives and (set(self.directions) != {"q2d"} or self.same_tower):
            raise ValueError("loss.in_batch_negatives: false keeps only each query's own group (q2d); it cannot "
                             f"be combined with loss.directions {self.directions} or loss.same_tower")
        if not (math.isfinite(self.teacher_temperature) and self.teacher_temperature > 0):
            raise ValueError(f"loss.teacher_temperature: must be a number > 0, got {self.teacher_temperature}")
        if not (math.isfinite(self.distill_weight) and self.distill_weight >= 0):
            raise ValueError(f"loss.distill_weight: must be a number >= 0, got {self.distill_weight}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"loss.temperature: must be a number > 0, got {self.temperature}")


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
    data: str | None = None            # "chatterbot", a BEIR folder, or None (what the `evaluate` hook scores)
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
        if self.batch.sampling not in (None, "homogeneous", "mixed"):
            raise ValueError(f"batch.sampling must be homogeneous or mixed, got {self.batch.sampling!r}")
        if self.batch.packing not in (True, False, "auto"):
            raise ValueError(f"batch.packing must be true, false or 'auto', got {self.batch.packing!r}")
        if self.optim.decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"optim.decay must be linear, cosine or constant, got {self.optim.decay!r}")
        check_train_values(self)


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


class BatchSource(Protocol):
    """The trainer's data: `batches(position) -> (global ContrastiveBatch at that position, next position)`.
    Position-indexed, so the position a checkpoint stores resumes the exact sequence (embforge/data/batches.py). A
    position is an int or a small dict of builtins (the multi-dataset sampler's per-dataset positions)."""

    notes: list[str]      # lines for the log (bad lines skipped, ...): rank 0 prints and every rank empties it,
                          # before training and after each batch
    files: list           # optional: the files it reads (each rank's copy is compared with rank 0's at launch)

    def __call__(self, position): ...


# (encoder, step, record) -> metrics. Run by every rank under torchrun, each encoding its share (the encoder is a
# RankShardedEncoder, engine/rank_encoder.py); `record` is True on rank 0 alone (it writes eval.jsonl and logs).
Evaluate = Callable[..., dict]


# ------------------------------------------------------------------------------------------------ setup
@dataclass
class Run:
    """What setup() builds and the loop uses."""
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    out: Path
    embedder: Embedder
    step_embedder: object              # the embedder, or its DDP / FSDP2 wrapper on N ranks
    temperature: Temperature
    params: list                       # clipped together: LoRA weights (+ log tau)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    chunk_tokens: int | str

    @property
    def fsdp(self) -> bool:
        return self.dist.active and self.cfg.distributed.strategy == "fsdp"


@dataclass
class Progress:
    """What a checkpoint saves besides the weights and optimizer."""
    step: int = 0
    position: int | dict = 0
    losses: list[float] = field(default_factory=list)
    evals: dict = field(default_factory=dict)
    datasets: list[str | None] = field(default_factory=list)   # each step's batch.dataset (aligned with losses)

    def per_dataset(self) -> dict:
        """{dataset: {"steps", "mean_loss"}} over the steps whose batch named its dataset."""
        out: dict[str, dict] = {}
        for name, loss in zip(self.datasets, self.losses):
            if name is not None:
                d = out.setdefault(name, {"steps": 0, "mean_loss": 0.0})
                d["steps"] += 1
                d["mean_loss"] += (loss - d["mean_loss"]) / d["steps"]
        return out


def setup_model(cfg: TrainConfig, dist_: Dist, device: torch.device) -> Embedder:
    torch.manual_seed(cfg.seed)                  # identical LoRA init on every rank
    embedder = Embedder.from_config(cfg.model, device)
    embedder.set_packing(cfg.batch.packing)
    embedder.model.train()
    if dist_.rank > 0:
        # Per-rank dropout streams; rank 0 continues the single-process stream (so world size 1 == one process).
        torch.manual_seed(rank_seed(cfg.seed, dist_.rank))
    return embedder


def setup(cfg: TrainConfig, dist_: Dist, device: torch.device) -> Run:
    """Model, distributed wrapper, temperature, optimizer and schedule."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    embedder = setup_model(cfg, dist_, device)
    chunk_tokens = cfg.batch.chunk_tokens
    if dist_.active and chunk_tokens == "auto":
        chunk_tokens = auto_chunk_tokens(embedder)   # probe the plain model: the wrapper would communicate
    step_embedder = wrap(embedder, dist_, cfg.distributed.strategy)
    params = embedder.trainable_parameters()     # after wrap: FSDP2 replaced them with sharded DTensors
    temperature = Temperature(cfg.loss.temperature, cfg.loss.learnable_temperature, device)
    optimizer = make_optimizer([{"params": params}, *temperature.param_groups()], cfg.optim, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return Run(cfg, dist_, device, out, embedder, step_embedder, temperature, params + temperature.parameters(),
               optimizer, scheduler, chunk_tokens)


def resume_from_checkpoint(run: Run, reporter: "Reporter") -> Progress:
    """Rank 0 picks the latest checkpoint; every rank loads it (output_dir must be shared between nodes)."""
    dist_ = run.dist
    ckpt = dist_.broadcast_object(latest_checkpoint(run.out))
    if ckpt is None:
        reporter.log(f"[train] --resume: no checkpoint in {run.out}, starting fresh")
        return Progress()
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"rank {dist_.rank}: checkpoint {ckpt} (chosen by rank 0) is not visible here; "
                                "output_dir must be on a filesystem shared by all nodes")
    state = load_checkpoint(ckpt, run.embedder, run.optimizer, run.scheduler, run.temperature.log_tau)
    losses = state["losses"]
    datasets = state.get("datasets") or []
    datasets = [None] * (len(losses) - len(datasets)) + datasets     # older checkpoints kept no dataset names
    progress = Progress(state["step"], state["position"], losses, state.get("evals", {}), datasets)
    note = restore_rng(state, dist_.rank, dist_.world_size, run.cfg.seed, progress.step)
    if note:
        reporter.log(note)
    reporter.log(f"[train] resumed from {ckpt} at step {progress.step}")
    return progress


# ------------------------------------------------------------------------------------------------ one step
def train_step(run: Run, batch: ContrastiveBatch) -> tuple[StepResult, dict]:
    """One optimizer step on this rank's slice of the global batch; returns the result and the step's metrics
    (global values: the reductions are collectives every rank calls)."""
    cfg, dist_ = run.cfg, run.dist
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    lc = cfg.loss
    # in_batch_negatives is off when the config or the batch (a dataset's in_batch_negatives: false) says so:
    # contrastive_step ANDs loss.in_batch_negatives with batch.in_batch_negatives.
    res = contrastive_step(run.step_embedder, batch, temperature=run.temperature(), chunk_tokens=run.chunk_tokens,
                           max_chunk_seqs=cfg.batch.max_chunk_seqs, same_tower=lc.same_tower,
                           matryoshka_dims=lc.matryoshka_dims, matryoshka_weights=lc.matryoshka_weights,
                           directions=lc.directions, false_negative_margin=lc.false_negative_margin,
                           in_batch_negatives=lc.in_batch_negatives, teacher_temperature=lc.teacher_temperature,
                           distill_weight=lc.distill_weight, dist=dist_)
    sum_grads(run.temperature.parameters(), dist_)   # outside the wrapped module: reduced here, with SUM
    # The reduced gradients are the global ones, so this is the global pre-clip norm on every rank.
    gnorm = full_tensor(torch.nn.utils.clip_grad_norm_(run.params, cfg.optim.grad_clip))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else 0.0
    tokens, computed = int(dist_.sum(res.tokens)), int(dist_.sum(res.padded_tokens))
    peak = dist_.max(peak)
    rec = {"loss": res.loss, "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(gnorm),
           "tokens_per_s": tokens / dt, "chunks": res.n_chunks, "seconds": dt, "peak_gb": peak,
           "real_tokens": tokens, "computed_tokens": computed, "packed": res.packed,
           **{f"t_{k}": v for k, v in res.timings.items()}}
    if batch.dataset is not None:
        rec["dataset"] = batch.dataset
    if dist_.active:
        rec["world_size"] = dist_.world_size
    if run.temperature.learnable:
        rec["temperature"] = run.temperature.current()
    return res, rec


# ------------------------------------------------------------------------------------------------ rank 0's voice
class Reporter:
    """Rank 0's work: log lines, the progress bar, metrics.jsonl, tracking (TensorBoard / W&B), evaluations,
    checkpoint and model files. `Reporter.for_rank(dist_, ...)` gives this on rank 0 and a SilentReporter on the
    others."""

    def __init__(self, out: Path, *, progress: bool, evaluate: Evaluate | None, log: LogConfig | None = None,
                 config: dict | None = None, eval_name: str | None = None):
        self.out, self.metrics_path = out, out / "metrics.jsonl"
        self.progress, self.evaluate_fn, self.bar = progress, evaluate, None
        self.log_cfg, self.config, self.eval_name = log or LogConfig(), config, eval_name
        self.tracker, self.start_step = None, 0

    @staticmethod
    def for_rank(dist_: Dist, out: Path, *, progress: bool, evaluate: Evaluate | None, **tracking) -> "Reporter":
        if dist_.is_main:
            return Reporter(out, progress=progress, evaluate=evaluate, **tracking)
        return SilentReporter(evaluate)

    def _track(self) -> Tracker | None:
        """The tracker, opened on first use: by then `start_step` is known (an evaluation before training only
        happens on a fresh run), which is where a resumed run's curves continue from."""
        if self.tracker is None and (self.log_cfg.tensorboard or self.log_cfg.wandb):
            self.tracker = Tracker(self.log_cfg, self.out, start_step=self.start_step, config=self.config)
        return self.tracker

    def log(self, msg: str):
        print(msg, file=sys.stderr)

    def resume_at(self, step: int):
        """Logs hold this run up to `step` only: what a crash after the last checkpoint wrote is redone; a
        checkpoint a crash left half-written goes."""
        remove_unpublished(self.out)
        for log in (self.metrics_path, self.metrics_path.with_name("eval.jsonl")):
            trim_steps(log, step)

    def start(self, initial: int, total: int):
        self.start_step = initial
        if initial and self.metrics_path.exists():
            # steps logged after the checkpoint by the interrupted process are recomputed: each step once
            lines = [line for line in self.metrics_path.read_text().splitlines()
                     if line.strip() and json.loads(line)["step"] <= initial]
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in lines))
        if self.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr)

    def step(self, rec: dict, per_dataset: dict | None = None):
        append_jsonl(self.metrics_path, rec)
        if self._track():
            self.tracker.log_step(rec)
        if self.bar:
            self.bar.update(1)
            extra = {"data": format_per_dataset(per_dataset)} if per_dataset else {}
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                 chunks=rec["chunks"], mem=f"{rec['peak_gb']:.1f}G", **extra)

    def evaluate(self, embedder: Embedder, step: int) -> dict | None:
        metrics = self.evaluate_fn(embedder, step, record=True)
        embedder.model.train()
        if self._track():
            self.tracker.log_eval(step, self.eval_name or "eval", metrics)
        return metrics

    def save_checkpoint(self, run: Run, step: int, state: dict):
        save_checkpoint(run.out, step, run.embedder, run.optimizer, run.scheduler, run.temperature.log_tau, state)

    def new_checkpoint_dir(self, run: Run) -> Path:
        """The temp folder every rank writes its shards into (rank 0 makes it; train() broadcasts its name)."""
        return new_checkpoint_dir(run.out)

    def publish_sharded_checkpoint(self, run: Run, tmp: Path, step: int, state: dict):
        save_sharded_trainer_state(tmp, run.scheduler, run.temperature.log_tau, state)
        publish_checkpoint(tmp, run.out, step)

    def save_model(self, embedder: Embedder, path: Path, adapter_state_dict: dict | None):
        embedder.save_pretrained(path, adapter_state_dict=adapter_state_dict)

    def close(self):
        if self.bar:
            self.bar.close()
        if self.tracker is not None:
            self.tracker.close()


def format_per_dataset(per_dataset: dict) -> str:
    """`name steps/mean loss` per dataset, e.g. "synthetic 12/0.812 msmarco 4/1.020"."""
    return " ".join(f"{name} {d['steps']}/{d['mean_loss']:.3f}" for name, d in per_dataset.items())


class SilentReporter(Reporter):
    """Every other rank: nothing to say, nothing to write; it evaluates with rank 0 (its share of the encoding)
    without recording, and otherwise waits for rank 0 in the next collective."""

    def __init__(self, evaluate: Evaluate | None = None):
        self.bar = self.tracker = None
        self.evaluate_fn = evaluate

    def log(self, msg): pass
    def resume_at(self, step): pass
    def start(self, initial, total): pass
    def step(self, rec, per_dataset=None): pass
    def evaluate(self, embedder, step):
        return None if self.evaluate_fn is None else self.evaluate_fn(embedder, step, record=False)
    def save_checkpoint(self, run, step, state): pass
    def new_checkpoint_dir(self, run): return None
    def publish_sharded_checkpoint(self, run, tmp, step, state): pass
    def save_model(self, embedder, path, adapter_state_dict): pass


# ------------------------------------------------------------------------------------------------ the loop
class StopOnSignal:
    """SIGINT / SIGTERM set a flag; the loop checkpoints after the current step and returns."""

    def __init__(self, rank: int):
        self.rank, self.flag = rank, False

    def __enter__(self):
        self.old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _on_signal(self, signum, frame):
        self.flag = True
        print(f"\n[train] rank {self.rank}: signal {signum}: checkpointing after this step", file=sys.stderr)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def log_notes(batches: BatchSource, reporter: Reporter):
    """The batch source's new log lines: rank 0 prints them; every rank empties its list (the same on every rank)."""
    while batches.notes:
        reporter.log(batches.notes.pop(0))


def checkpoint(run: Run, progress: Progress, reporter: Reporter, step: int):
    rng = run.dist.gather_objects(rng_states())      # every rank's generators (a collective: all ranks call)
    state = {"step": step, "position": progress.position, "losses": progress.losses, "datasets": progress.datasets,
             "rng": rng[0], "rng_ranks": rng, "world_size": run.dist.world_size, "evals": progress.evals,
             "config": dataclasses.asdict(run.cfg), "strategy": run.cfg.distributed.strategy if run.dist.active
             else "single"}
    if run.fsdp:
        # Sharded: every rank writes its shards (torch.distributed.checkpoint, a collective) into the temp folder
        # rank 0 made, then rank 0 adds trainer.pt and publishes the folder with one rename.
        tmp = run.dist.broadcast_object(reporter.new_checkpoint_dir(run))
        save_shards(tmp, run.embedder.model, run.optimizer)
        reporter.publish_sharded_checkpoint(run, tmp, step, state)
    else:
        reporter.save_checkpoint(run, step, state)
    run.dist.barrier()                               # nobody runs ahead of a checkpoint still being written


def save_final(run: Run, reporter: Reporter):
    """Rank 0 writes the final model; FSDP2's sharded LoRA weights are gathered first (a collective)."""
    embedder = run.embedder
    state = None
    if any(hasattr(p, "full_tensor") for p in embedder.trainable_parameters()):
        state = {n: full_tensor(p.detach()).cpu() for n, p in embedder.model.named_parameters() if p.requires_grad}
    reporter.save_model(embedder, run.out / "final", state)
    run.dist.barrier()


def train(cfg: TrainConfig, batches: BatchSource, *, evaluate: Evaluate | None = None, resume: bool = False,
          overwrite: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Run training; returns {"losses": [...], "eval": {...}, "main": whether this process is the one that speaks}
    (+ "embedder" when finished, "stopped_at" when interrupted). `stop_after` simulates an interruption (tests).
    An output_dir holding a run needs `resume` (continue it) or `overwrite` (start over; engine/rundir.py).
    Under torchrun this runs on every rank (see distributed.py); one process otherwise."""
    resume, overwrite = run_mode(resume, overwrite)
    dist_, device = init_distributed(cfg.distributed, cfg.device)
    if dist_.active:
        check_launch(cfg, dist_.world_size)      # before any model loads (one process: nothing to refuse)
        check_same_launch(dist_, launch_fingerprint(cfg, getattr(batches, "files", ())))
    prepare_output_dir(cfg.output_dir, dist_, resume=resume, overwrite=overwrite)
    run = setup(cfg, dist_, device)
    reporter = Reporter.for_rank(dist_, run.out, progress=progress, evaluate=evaluate, log=cfg.log,
                                 config=dataclasses.asdict(cfg), eval_name=cfg.eval.data)
    if elastic_restart():
        reporter.log(f"[train] torchrun restart {elastic_restart()}: resuming from the latest checkpoint")
    log_notes(batches, reporter)
    state = resume_from_checkpoint(run, reporter) if resume else Progress()
    reporter.resume_at(state.step)
    # Under torchrun every rank evaluates, each encoding its share; one process evaluates with the embedder itself.
    eval_encoder = RankShardedEncoder(run.embedder, run.step_embedder, dist_) if dist_.active else run.embedder

    def maybe_evaluate(key: str, step: int):
        if evaluate is not None:
            metrics = reporter.evaluate(eval_encoder, step)
            if metrics is not None:
                state.evals[key] = metrics

    if cfg.eval.before_training and state.step == 0:
        maybe_evaluate("before", 0)
    reporter.start(state.step, cfg.steps)
    try:
        with StopOnSignal(dist_.rank) as stop:
            for step in range(state.step, cfg.steps):
                batch, state.position = batches(state.position)
                log_notes(batches, reporter)
                result, rec = train_step(run, shard_batch(batch, dist_))
                state.losses.append(result.loss)
                state.datasets.append(batch.dataset)
                stop.flag = dist_.any(stop.flag)          # one rank's signal stops every rank at this step
                reporter.step({"step": step + 1, **rec}, state.per_dataset())
                done = step + 1
                if cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done < cfg.steps:
                    maybe_evaluate(f"step{done}", done)
                interrupted = stop.flag or (stop_after is not None and done == stop_after)
                if interrupted or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                    checkpoint(run, state, reporter, done)
                if interrupted:
                    return {"losses": state.losses, "eval": state.evals, "datasets": state.per_dataset(),
                            "stopped_at": done, "main": dist_.is_main}
        maybe_evaluate("after", cfg.steps)
        checkpoint(run, state, reporter, cfg.steps)
        save_final(run, reporter)
        per_dataset = state.per_dataset()
        if per_dataset:
            reporter.log(f"[train] per dataset (steps/mean loss): {format_per_dataset(per_dataset)}")
        return {"losses": state.losses, "eval": state.evals, "datasets": per_dataset, "embedder": run.embedder,
                "main": dist_.is_main}
    finally:
        reporter.close()
