"""Atomic checkpoints: everything goes into a temp folder, each file fsynced, then one rename publishes it.

A crash at any point leaves either the previous checkpoint or the new one, never a half-written folder.
Layout: <output_dir>/checkpoints/step-000123/{adapter.safetensors, trainer.pt}
trainer.pt holds plain data only (state dicts, tensors, RNG states, the config as a dict): no embforge class is
pickled, so moving code never breaks loading an older checkpoint.

The random generators (Python, NumPy, torch CPU and CUDA) of every rank are captured here too, and restored on
resume, so a resumed run draws exactly the dropout masks of an uninterrupted one.
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


def save_checkpoint(output_dir, step: int, embedder, optimizer, scheduler, log_tau, state: dict, keep: int = 2):
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    save_file(_trainable_state(embedder), tmp / "adapter.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "log_tau": None if log_tau is None else log_tau.detach().cpu(), **state}, tmp / "trainer.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir) -> Path | None:
    steps = sorted((Path(output_dir) / "checkpoints").glob("step-*"))
    return steps[-1] if steps else None


def load_checkpoint(path, embedder, optimizer, scheduler, log_tau) -> dict:
    path = Path(path)
    weights = load_file(path / "adapter.safetensors")
    named = dict(embedder.model.named_parameters())
    missing = [n for n in weights if n not in named]
    if missing:
        raise ValueError(f"{path}: checkpoint holds parameters this model lacks, e.g. {missing[0]}")
    with torch.no_grad():
        for n, w in weights.items():
            named[n].copy_(w.to(named[n].device))
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
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
