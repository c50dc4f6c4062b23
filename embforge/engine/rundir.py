"""One run per output_dir: a second run into a folder that already holds one is refused unless it continues it
(--resume) or starts over (--overwrite: the old run's files are removed before anything new is written), and a
resumed run's metrics.jsonl / eval.jsonl drop the lines past the checkpoint it resumed from, so neither file ever
holds two runs (or two `step N` lines)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from embforge.common import open_atomic

# What `embforge train` writes into output_dir (engine/train.py, eval/training.py); nothing else is touched.
RUN_FILES = ("metrics.jsonl", "eval.jsonl", "checkpoints", "final", "eval_chatterbot")


def run_files(out: str | Path) -> list[Path]:
    out = Path(out)
    return [out / name for name in RUN_FILES if (out / name).exists()]


def check_output_dir(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> list[Path]:
    """The run files in `out` (read only); ValueError when they exist and neither flag says what to do with them."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in output_dir, --overwrite starts over: give one of them")
    found = run_files(out)
    if found and not (resume or overwrite):
        raise ValueError(f"output_dir {out} already holds a run ({', '.join(p.name for p in found)}): "
                         "--resume continues it, --overwrite starts over (removing it), or set another output_dir")
    return found


def prepare_output_dir(out: str | Path, dist_, *, resume: bool = False, overwrite: bool = False) -> None:
    """check_output_dir, then on --overwrite the old run's files removed; by the one voice (rank 0), the others
    wait for it and get its verdict."""
    error = None
    if dist_.is_main:
        try:
            found = check_output_dir(out, resume=resume, overwrite=overwrite)
            if overwrite:
                for path in found:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        except ValueError as e:
            error = str(e)
    error = dist_.broadcast_object(error)
    dist_.barrier()
    if error:
        raise ValueError(error)


def trim_steps(path: str | Path, last_step: int) -> None:
    """Drop the records of a JSONL log whose `step` is past `last_step` (what a resume from that step redoes)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(keep) != len(lines):
        with open_atomic(path) as f:
            f.writelines(keep)
