"""Run tracking: TensorBoard (torch.utils.tensorboard.SummaryWriter) and, when installed and asked for, W&B.

Config (`log:` in the training YAML): `tensorboard: true` writes event files to output_dir/tensorboard/;
`wandb: true` logs to W&B in offline mode unless WANDB_MODE says otherwise (no network needed; `wandb sync`
uploads later). A tracker exists on rank 0 only: the trainer creates and calls it through the one place that
decides rank 0's work.

Per optimizer step: train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/peak_memory_gb,
train/temperature (learnable temperature only), and train/loss/<dataset> when the step's batch came from one named
dataset (homogeneous sampling), so each dataset's curve is its own.
Per evaluation: eval/<data>/<metric> at the step it was taken.

Resume: the writer opens with purge_step = the checkpoint's step + 1, so steps logged after that checkpoint by the
interrupted process (they are recomputed) are dropped from the curves when read back, and each step appears once.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

# metrics.jsonl field -> scalar tag
STEP_SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                "tokens_per_s": "train/tokens_per_s", "peak_gb": "train/peak_memory_gb",
                "temperature": "train/temperature"}


@dataclass
class LogConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "embforge"

    def validate(self):
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("log.tensorboard: true needs the tensorboard package: "
                             "pip install -c constraints.txt 'embforge[track]'")
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError("log.wandb: true needs the wandb package, which is not installed (pip install wandb); "
                             "or set log.wandb: false")


class Tracker:
    """TensorBoard and/or W&B for one run; `start_step` is the step training resumes from (0 when fresh)."""

    def __init__(self, cfg: LogConfig, output_dir: str | Path, *, start_step: int = 0, config: dict | None = None):
        self.writer = self.wandb_run = None
        out = Path(output_dir)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
            if config is not None and not start_step:
                self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        if cfg.wandb:
            self.wandb_run = _wandb_run(cfg, out, config)

    @property
    def active(self) -> bool:
        return self.writer is not None or self.wandb_run is not None

    def log_step(self, rec: dict):
        step = rec["step"]
        scalars = {tag: float(rec[key]) for key, tag in STEP_SCALARS.items() if rec.get(key) is not None}
        if rec.get("dataset") is not None:       # a homogeneous batch: this step's loss is its dataset's
            scalars[f"train/loss/{rec['dataset']}"] = float(rec["loss"])
        self._log(scalars, step)

    def log_eval(self, step: int, data: str, metrics: dict):
        name = Path(str(data)).name or str(data)
        self._log({f"eval/{name}/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}, step)

    def _log(self, scalars: dict, step: int):
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _wandb_run(cfg: LogConfig, out: Path, config: dict | None):
    """One W&B run per output_dir (its id kept in output_dir/wandb_id), resumed with the training."""
    import wandb

    id_file = out / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=cfg.wandb_project, dir=str(out), id=run_id, resume="allow", config=config,
                      mode=os.environ.get("WANDB_MODE", "offline"), name=out.name)
