"""Value checks of a TrainConfig, run when the config loads (config.build_dataclass calls TrainConfig.validate), so a
bad value is refused by its key before anything heavy starts: a negative learning rate must not first load a 7B
model and then fail inside torch without naming `optim.lr`.

Each check raises ValueError whose message starts with the full key; config.load_config turns it into ConfigError
and the CLI into one line with exit status 2.
"""
from __future__ import annotations

import math
import re

OPTIMIZERS = ("adamw", "paged_adamw_8bit")
SHORTHANDS = ("smollm2", "tiny-llama", "tiny-mistral", "tiny-qwen2")
# huggingface_hub's repo-id rule (optional namespace, then a name of [\w.-], at most 96 characters, no `--` or
# `..`, not starting or ending with `-` or `.`), restated so that checking a config imports nothing heavy.
_HUB_ID = re.compile(r"^(?:[\w][\w.-]{0,94}[\w]/|[\w]/)?[\w](?:[\w.-]{0,94}[\w])?$")
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _number(key: str, value, *, low=None, high=None, low_open=False, high_open=False):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{key} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{key} must be {'<' if high_open else '<='} {high}, got {value}")


def is_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and "--" not in path and ".." not in path and not path.endswith(".git")


def check_model_path(path: str, key: str = "model.path") -> str:
    """'folder', 'shorthand' or 'hub' for a usable model.path; else ValueError naming the key. A folder must exist
    (a path that is neither an existing folder, a shorthand, nor a well-formed hub id is a typo or a missing disk)."""
    import os

    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{key} must be a model folder, a shorthand ({', '.join(SHORTHANDS)}) or a hub id, "
                         f"got {path!r}")
    if path in SHORTHANDS:
        return "shorthand"
    if os.path.isdir(path):
        return "folder"
    if os.path.exists(path):
        raise ValueError(f"{key}: {path} is a file, not a model folder")
    if path.startswith("tiny-"):
        raise ValueError(f"{key}: unknown shorthand {path!r} (known: {', '.join(SHORTHANDS)})")
    if is_hub_id(path) and not path.startswith(("./", "../", "~")):
        return "hub"
    raise ValueError(f"{key}: {path} is not an existing folder, a shorthand ({', '.join(SHORTHANDS)}) or a "
                     "hub id (namespace/name)")


def check_train_values(cfg) -> None:
    """Every value of a TrainConfig whose range the types alone do not fix."""
    for key in ("steps", "log_every"):
        _number(key, getattr(cfg, key), low=1)
    _number("checkpoint_every", cfg.checkpoint_every, low=0)
    _number("seed", cfg.seed, low=0, high=2**63 - 1)
    if not cfg.output_dir or not str(cfg.output_dir).strip():
        raise ValueError("output_dir must be a folder path, got an empty string")
    if cfg.device is not None and not _DEVICE.match(cfg.device):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps (or null: auto), got {cfg.device!r}")

    b = cfg.batch
    _number("batch.queries", b.queries, low=1)
    _number("batch.negatives", b.negatives, low=0)
    if isinstance(b.chunk_tokens, str):
        if b.chunk_tokens != "auto":
            raise ValueError(f"batch.chunk_tokens must be a number of tokens or 'auto', got {b.chunk_tokens!r}")
    else:
        _number("batch.chunk_tokens", b.chunk_tokens, low=1)
    if b.max_chunk_seqs is not None:
        _number("batch.max_chunk_seqs", b.max_chunk_seqs, low=1)

    loss = cfg.loss
    _number("loss.temperature", loss.temperature, low=0, low_open=True)
    dims, weights = loss.matryoshka_dims, loss.matryoshka_weights
    if dims is not None:
        if not dims:
            raise ValueError("loss.matryoshka_dims must list at least one dimension (or be null)")
        for i, d in enumerate(dims):
            _number(f"loss.matryoshka_dims[{i}]", d, low=1)
        if len(set(dims)) != len(dims):
            raise ValueError(f"loss.matryoshka_dims must not repeat a dimension, got {dims}")
    if weights is not None:
        if dims is None:
            raise ValueError("loss.matryoshka_weights given without loss.matryoshka_dims")
        if len(weights) != len(dims):
            raise ValueError(f"loss.matryoshka_weights has {len(weights)} entries for {len(dims)} "
                             "loss.matryoshka_dims")
        for i, w in enumerate(weights):
            _number(f"loss.matryoshka_weights[{i}]", w, low=0)
        if not sum(weights) > 0:
            raise ValueError("loss.matryoshka_weights must not all be 0")

    o = cfg.optim
    _number("optim.lr", o.lr, low=0, low_open=True)
    _number("optim.weight_decay", o.weight_decay, low=0)
    _number("optim.warmup_steps", o.warmup_steps, low=0)
    _number("optim.grad_clip", o.grad_clip, low=0, low_open=True)
    if len(o.betas) != 2:
        raise ValueError(f"optim.betas must be two numbers [beta1, beta2], got {o.betas}")
    for i, beta in enumerate(o.betas):
        _number(f"optim.betas[{i}]", beta, low=0, high=1, high_open=True)
    if o.optimizer not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer must be one of {OPTIMIZERS}, got {o.optimizer!r}")

    e = cfg.eval
    _number("eval.every_steps", e.every_steps, low=0)
    if e.max_queries is not None:
        _number("eval.max_queries", e.max_queries, low=1)
    if e.data is not None and not e.data.strip():
        raise ValueError("eval.data must be 'chatterbot', a BEIR folder, or null; got an empty string")
