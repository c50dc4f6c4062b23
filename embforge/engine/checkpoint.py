"""Atomic checkpoints: everything goes into a temp folder, each file fsynced, then one rename publishes it.

A crash at any point leaves either the previous checkpoint or the new one, never a half-written folder.
Layout: <output_dir>/checkpoints/step-000123/{adapter.safetensors, trainer.pt}
trainer.pt holds plain data only (state dicts, tensors, RNG states, the config as a dict): no embforge class is
pickled, so moving code never breaks loading an older checkpoint.

The random generators (Python, NumPy, torch CPU and CUDA) of every rank are captured here too, and restored on
resume, so a resumed run draws exactly the dropout masks of an uninterrupted one.

FSDP2 runs (whose LoRA weights and optimizer state are sharded DTensors) write the same step folder with
torch.distributed.checkpoint instead of adapter.safetensors: step-000123/{sharded/, trainer.pt}, where sharded/ holds
every rank's shards (`__<rank>_0.distcp`) and the DCP `.metadata`, keyed by parameter name (the optimizer state too,
via get_state_dict), so a load on any number of ranks, or on one process, reshards them. Every rank writes its shards
into the temp folder rank 0 made; rank 0 then adds trainer.pt (scheduler, every rank's RNG, data position) and
publishes the folder with the same one rename.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from embforge.engine.distributed import rank_seed


def _trainable_state(embedder) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in embedder.model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_checkpoint_dir(output_dir) -> Path:
    """An empty temp folder under <output_dir>/checkpoints: a checkpoint is written here, then published."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))


def publish_checkpoint(tmp: Path, output_dir, step: int, keep: int = 2) -> Path:
    """fsync every file and folder of `tmp`, then one rename makes it step-<step>; older steps beyond `keep` go."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    for f in sorted(Path(tmp).rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            _fsync_dir(f)
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def trainer_state(optimizer, scheduler, log_tau, state: dict) -> dict:
    """trainer.pt's content; `optimizer` None for sharded checkpoints (its state is in sharded/)."""
    return {"optimizer": None if optimizer is None else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "log_tau": None if log_tau is None else log_tau.detach().cpu(), **state}


def save_checkpoint(output_dir, step: int, embedder, optimizer, scheduler, log_tau, state: dict, keep: int = 2):
    tmp = new_checkpoint_dir(output_dir)
    save_file(_trainable_state(embedder), tmp / "adapter.safetensors")
    torch.save(trainer_state(optimizer, scheduler, log_tau, state), tmp / "trainer.pt")
    return publish_checkpoint(tmp, output_dir, step, keep)


# ------------------------------------------------------------------------------------------------ sharded (DCP)
SHARDS = "sharded"
_DSD_OPTIONS = dict(ignore_frozen_params=True)   # the base is never saved: it is reloaded from its files


def _state_dicts(model, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(**_DSD_OPTIONS))


def save_shards(tmp: Path, model, optimizer):
    """Every rank writes its shards of the trainable weights and their optimizer state into tmp/sharded (a
    collective: all ranks call it, in the temp folder rank 0 made)."""
    import torch.distributed.checkpoint as dcp
    model_sd, optim_sd = _state_dicts(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=Path(tmp) / SHARDS)


def save_sharded_trainer_state(tmp: Path, scheduler, log_tau, state: dict):
    """Rank 0's part of a sharded checkpoint: trainer.pt beside the shards."""
    torch.save(trainer_state(None, scheduler, log_tau, state), Path(tmp) / "trainer.pt")


def is_sharded(path) -> bool:
    return (Path(path) / SHARDS).is_dir()


def load_shards(path: Path, model, optimizer):
    """The sharded weights and optimizer state into `model` / `optimizer` as they are now (FSDP2 on any number of
    ranks, DDP, or one process): DCP reads each rank's part of every tensor, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    model_sd, optim_sd = _state_dicts(model, optimizer)
    try:
        dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=Path(path) / SHARDS)
    except Exception as e:   # DCP wraps each rank's failure; the first line names the missing key
        raise ValueError(f"{path}: sharded checkpoint does not match this model: {str(e).splitlines()[0]}") from e
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(**_DSD_OPTIONS, strict=False))   # strict: the base is not in it


def remove_unpublished(output_dir):
    """Temp folders a crash left mid-write (never loaded: only step-* folders are); called by rank 0 on resume,
    before this run writes any."""
    for tmp in (Path(output_dir) / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(output_dir) -> Path | None:
    steps = sorted((Path(output_dir) / "checkpoints").glob("step-*"))
    return steps[-1] if steps else None


def load_checkpoint(path, embedder, optimizer, scheduler, log_tau) -> dict:
    path = Path(path)
    sharded_params = any(hasattr(p, "full_tensor") for p in embedder.model.parameters())  # FSDP2 DTensors
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    if is_sharded(path):
        load_shards(path, embedder.model, optimizer)
        state.pop("optimizer")
    elif sharded_params:
        raise ValueError(f"{path}: written by a DDP or one-process run (adapter.safetensors); distributed.strategy="
                         "fsdp resumes only sharded checkpoints (resume it with strategy ddp or on one process)")
    else:
        weights = load_file(path / "adapter.safetensors")
        named = dict(embedder.model.named_parameters())
        missing = [n for n in weights if n not in named]
        if missing:
            raise ValueError(f"{path}: checkpoint holds parameters this model lacks, e.g. {missing[0]}")
        with torch.no_grad():
            for n, w in weights.items():
                named[n].copy_(w.to(named[n].device))
        optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    tau = state.pop("log_tau")
    if log_tau is not None and tau is not None:
        with torch.no_grad():
            log_tau.copy_(tau)
    return state


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def restore_rng(state: dict, rank: int, world_size: int, seed: int, step: int) -> str | None:
    """Every rank gets back its own generators. A checkpoint from another world size cannot hold this rank's
    stream: the data order is unaffected (global position), and each rank's generators are re-derived from
    (seed, rank, step), so the run continues correctly but not bit-identically to an uninterrupted one; the
    returned note says so (None when the streams were restored exactly)."""
    ranks = state.get("rng_ranks") or [state["rng"]]      # older checkpoints: one process
    if len(ranks) == world_size:
        set_rng_states(ranks[rank])
        return None
    torch.manual_seed(rank_seed(seed, rank) + 7919 * step)
    return (f"[train] checkpoint written by {len(ranks)} rank(s), resuming on {world_size}: same data order; "
            f"dropout generators re-derived from (seed, rank, step {step})")
