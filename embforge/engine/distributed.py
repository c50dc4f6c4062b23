"""Everything distributed lives here: torchrun init, the one place that decides what rank 0 does, the all-gather
whose backward returns each gathered row's gradient to its owner, strategy wrapping (DDP / FSDP2) and the refusals.

One process (plain `embforge train`, no torchrun environment) gets `Dist()`: no process group, no wrapper, no
collective; every helper below is then the identity, so a single device never pays for the distributed path.

The exact global-batch gradient, and why no 1/N or N factor appears anywhere:
    global loss   L = 1/B sum_i l_i        over all B = N*b queries of the global batch (what one process computes)
    rank r        L_r = 1/B sum_{i in rank r's b rows} l_i      (= local mean * b/B), against ALL gathered candidates
                  so sum_r L_r = L exactly.
    gathered rows each rank r backpropagates L_r into every gathered embedding; the all-gather's backward SUMS those
                  over ranks (reduce-scatter) and hands row j to its owner: owner(j) holds dL/de_j = sum_r dL_r/de_j.
    parameters    every embedding is produced by exactly one rank, so dL/dtheta = sum_r (rank r's local backward).
                  DDP therefore reduces with SUM (a comm hook replacing its default average), FSDP2 with a gradient
                  divide factor of 1 (and force-sum collectives, which gloo needs). The learnable temperature, which
                  is outside the wrapped module, is all-reduced with SUM by `sum_grads`.
Gradients synchronize once per optimizer step: GradCache's pass 2 runs every chunk but the last under `no_sync()`
(DDP) / `set_requires_gradient_sync(False)` (FSDP2).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp")
# torchrun's opt-out of sharing its rendezvous store with the workers: a shared store keeps the last restart's keys
# (pytorch/pytorch#135712), so restarted ranks can read a dead peer's address
SEPARATE_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@dataclass
class DistributedConfig:
    strategy: str = "ddp"       # ddp: base replicated per rank (LoRA / QLoRA, 4-bit included); fsdp: FSDP2 fully_shard
    timeout_s: float = 300.0    # any collective waiting longer (a dead or hung rank) fails instead of hanging forever
    backend: str = "auto"       # auto: nccl on CUDA, gloo on CPU

    def validate(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"distributed.backend must be auto, nccl or gloo, got {self.backend!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"distributed.timeout_s must be > 0, got {self.timeout_s}")


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def elastic_restart() -> int:
    """How many times torchrun has restarted this worker group (`--max-restarts`): 0 on the first launch."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def run_mode(resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """(resume, overwrite) as this process should apply them: a worker torchrun restarted after a failure resumes
    from the latest checkpoint of its output_dir (no human step), and never starts over, even when the first
    launch said --overwrite (that would delete the run it is restarting)."""
    return (True, False) if elastic_restart() > 0 else (resume, overwrite)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s dropout generators (rank 0 of any world size, and one process, use `seed`)."""
    return (seed + 1_000_003 * rank) % (2**63)


@dataclass
class Dist:
    """Where this process stands. `Dist()` is one process: every method is a no-op or the identity."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False        # a process group exists (torchrun, any world size, 1 included)

    @property
    def is_main(self) -> bool:
        """The one voice: rank 0 alone logs, evaluates, draws progress, writes metrics and checkpoints (the trainer's
        Reporter is built from this: engine/train.py)."""
        return self.rank == 0

    def on_main(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on rank 0 alone (eval, metrics, progress bar, checkpoint and model files); the other
        ranks get None and go straight on to the next collective, where they wait for rank 0."""
        return fn(*args, **kwargs) if self.is_main else None

    def log(self, msg: str):
        self.on_main(print, msg, file=sys.stderr)

    def barrier(self):
        if self.active:
            dist.barrier()

    def sum(self, x: float) -> float:
        return self._reduce(x, dist.ReduceOp.SUM)

    def max(self, x: float) -> float:
        return self._reduce(x, dist.ReduceOp.MAX)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one (e.g. a signal caught by one rank stops all at the same step)."""
        return bool(self._reduce(float(flag), dist.ReduceOp.MAX))

    def _reduce(self, x: float, op) -> float:
        if not self.active:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, op=op)
        return float(t)

    def gather_objects(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable things: RNG states)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's obj on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def comm_device(self) -> torch.device:
        if self.active and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' x stacked in rank order: [world_size * rows, ...]. Differentiable: the backward sums the
        incoming gradients over ranks and returns each rank its own rows (reduce-scatter)."""
        if not self.active:
            return x
        return _GatherRows.apply(x)

    def gather_ids(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' integer ids in rank order (no gradient)."""
        if not self.active:
            return x
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    def shutdown(self):
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ws = dist.get_world_size()
        out = x.new_empty((ws * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad):
        ws = dist.get_world_size()
        out = grad.new_empty((grad.shape[0] // ws, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM)
        return out


def init_distributed(cfg: DistributedConfig, device: str | None) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (env: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); one process otherwise.
    Returns the Dist and this rank's device (cuda:LOCAL_RANK when CUDA is used)."""
    if not launched_by_torchrun():
        return Dist(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg.validate()
    rank, ws, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ValueError("distributed.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s), **kwargs)
    d = Dist(rank, ws, local, active=True)
    if d.is_main and restarts_share_a_store():
        print(f"[embforge] torchrun --max-restarts with its shared rendezvous store: a restart can fail to connect "
              f"(pytorch/pytorch#135712); export {SEPARATE_STORE_ENV}=1 before torchrun (embforge train --nproc "
              f"--max-restarts does)", file=sys.stderr)
    return d, dev


def restarts_share_a_store() -> bool:
    """True when torchrun may restart these workers and shares its rendezvous store with them."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0)


def check_launch(cfg, world_size: int):
    """Refusals that must happen before any model loads. `cfg` is a TrainConfig."""
    d = cfg.distributed
    d.validate()
    if cfg.batch.queries % world_size:
        raise ValueError(f"batch.queries={cfg.batch.queries} (the global batch) is not divisible by the world size "
                         f"{world_size}: every rank takes an equal slice; use a multiple of {world_size}")
    if world_size == 1 and d.strategy == "ddp":
        return
    if d.strategy == "fsdp":
        refused = []
        if cfg.model.quantization == "nf4":
            refused.append("model.quantization=nf4 (bitsandbytes 4-bit weights cannot be sharded as DTensors; "
                           "use strategy ddp for QLoRA)")
        if cfg.model.lora is None:
            refused.append("model.lora=null (full fine-tuning is not implemented by embforge train)")
        if cfg.optim.optimizer != "adamw":
            refused.append(f"optim.optimizer={cfg.optim.optimizer} (only adamw runs on sharded parameters)")
        if cfg.loss.learnable_temperature:
            refused.append("loss.learnable_temperature (a plain parameter beside sharded ones in one clip/optimizer)")
        if cfg.batch.chunk_tokens == "auto":
            refused.append("batch.chunk_tokens=auto (the probe needs the whole model on one device; give a number)")
        if refused:
            raise ValueError("distributed.strategy=fsdp does not support: " + "; ".join(refused))


# ------------------------------------------------------------------------------------------------ wrapping
class _Encode(torch.nn.Module):
    """The module DDP / FSDP2 wrap: its forward calls an embedder method (forward_tokens), so the engines' forward
    hooks (DDP's reducer preparation, FSDP2's unshard) run on every GradCache forward."""

    def __init__(self, embedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.embedder, method)(*args, **kwargs)


class WrappedEmbedder:
    """The embedder as GradCache sees it on N ranks: every attribute is the embedder's, except the methods GradCache
    runs its forwards with (ROUTED), which go through the engine. A forward that bypassed the engine would leave
    DDP's gradients unreduced: when the step calls a new embedder method to embed a chunk, add its name here
    (tests/test_engine_distributed.py fails otherwise)."""

    ROUTED = ("forward_tokens", "embed_chunk")

    def __init__(self, embedder, engine, strategy: str):
        self.__dict__.update(embedder=embedder, engine=engine, strategy=strategy)

    def __getattr__(self, name):
        if name in self.ROUTED:
            return functools.partial(self.engine, name)
        return getattr(self.embedder, name)

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool):
        """Gradients are reduced across ranks only in a backward run with enabled=True (the last chunk)."""
        if enabled:
            yield
        elif self.strategy == "ddp":
            with self.engine.no_sync():
                yield
        else:
            self.engine.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.engine.set_requires_gradient_sync(True)


def grad_sync(embedder, enabled: bool):
    """The GradCache hook: DDP/FSDP2 skip their reduction unless enabled; a plain embedder does nothing."""
    hook = getattr(embedder, "grad_sync", None)
    return hook(enabled) if hook is not None else contextlib.nullcontext()


def _sum_allreduce_hook(state, bucket):
    # DDP's default hook divides by world size; our per-rank losses already sum to the global loss (see module doc).
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap(embedder, dist_: Dist, strategy: str):
    """The embedder unchanged for one process; otherwise a WrappedEmbedder around DDP or FSDP2."""
    if not dist_.active:
        return embedder
    if strategy == "ddp":
        # Every rank loaded the same base from the same files and seeded LoRA's init identically; broadcasting the
        # trainable parameters from rank 0 makes that a guarantee. DDP's own init sync would broadcast the whole
        # frozen base too (gigabytes for 7B), so it is off.
        for p in embedder.trainable_parameters():
            dist.broadcast(p.data, src=0)
        dev = embedder.device
        engine = torch.nn.parallel.DistributedDataParallel(
            _Encode(embedder), device_ids=[dev.index] if dev.type == "cuda" else None, init_sync=False,
            forward_sync_buffers=False)   # buffers (rotary tables) are constants: nothing to broadcast per forward
        engine.register_comm_hook(None, _sum_allreduce_hook)
        return WrappedEmbedder(embedder, engine, "ddp")
    return WrappedEmbedder(embedder, _fully_shard(embedder, dist_), "fsdp")


def _fully_shard(embedder, dist_: Dist):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    dev = embedder.device
    mesh = init_device_mesh(dev.type, (dist_.world_size,))
    base = embedder.model.get_base_model() if hasattr(embedder.model, "get_base_model") else embedder.model
    layer_types = set(getattr(base, "_no_split_modules", None) or [])
    for m in list(embedder.model.modules()):
        if type(m).__name__ in layer_types:     # one FSDP unit per decoder layer: peak memory ~ one layer unsharded
            fully_shard(m, mesh=mesh)
    root = fully_shard(_Encode(embedder), mesh=mesh)
    for m in root.modules():
        if isinstance(m, FSDPModule):
            # Per module: the setting on the root does not reach the layers' parameter groups (measured).
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)   # gloo has no PREMUL_SUM
    return root


def sum_grads(params, dist_: Dist):
    """SUM-reduce the .grad of parameters outside the wrapped module (the learnable temperature)."""
    if not dist_.active:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a parameter or gradient; FSDP2's DTensors are gathered (a collective: every rank calls)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
