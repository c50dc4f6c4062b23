"""A checked launch: before any model loads, every rank compares what it is about to run with rank 0.

Ranks that silently run different configs, code or data still exchange gradients of the right shapes, so nothing
fails; the run just trains on nonsense. So every rank builds a fingerprint (its resolved config key by key, the
embforge version and git commit, each training file's size and content hash), one all_gather_object brings every
rank's fingerprint to every rank, and all ranks raise the same error naming what differs. One process never gets
here (train() calls it only when a process group exists).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from embforge.common import git_commit


class LaunchMismatch(ValueError):
    """Ranks were launched with different configs, code or data (`embforge train` reports it as a one-line error)."""


def _flatten(obj, prefix: str, out: dict):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = repr(obj)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """`<size> bytes, blake2b <hex>` of a file's whole content (every rank reads its own copy once)."""
    h = hashlib.blake2b(digest_size=16)
    size = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return f"{size} bytes, blake2b {h.hexdigest()}"


def launch_fingerprint(cfg, files=()) -> dict[str, str]:
    """{what: value} for a TrainConfig `cfg` and the training files: `config.<key>` per resolved config value,
    `embforge.version` / `embforge.commit`, `data <path>` per file."""
    from embforge import __version__

    out: dict[str, str] = {}
    _flatten(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg), "config", out)
    out["embforge.version"] = __version__
    out["embforge.commit"] = git_commit()
    for path in files:
        out[f"data {path}"] = file_digest(Path(path))
    return out


def fingerprint_differences(fingerprints: list[dict]) -> list[str]:
    """One line per rank whose fingerprint differs from rank 0's, naming each differing key and both values."""
    ref = fingerprints[0]
    lines = []
    for rank, fp in enumerate(fingerprints[1:], 1):
        keys = sorted(k for k in ref.keys() | fp.keys() if ref.get(k) != fp.get(k))
        if keys:
            shown = "; ".join(f"{k}: {fp.get(k, '<missing>')} (rank 0: {ref.get(k, '<missing>')})" for k in keys[:4])
            more = f"; and {len(keys) - 4} more" if len(keys) > 4 else ""
            lines.append(f"rank {rank} differs from rank 0 in {shown}{more}")
    return lines


def check_same_launch(dist_, fingerprint: dict) -> None:
    """Every rank's fingerprint against rank 0's (one collective); every rank raises the same LaunchMismatch, so
    none is left waiting in a later collective."""
    if not dist_.active:
        return
    lines = fingerprint_differences(dist_.gather_objects(fingerprint))
    if lines:
        raise LaunchMismatch("ranks were launched with different configs, code or data: " + " | ".join(lines))
