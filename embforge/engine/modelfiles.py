"""A model's config and tokenizer without its weights: what `embforge train --dry-run` resolves, and what every run
checks before it loads a model, so a missing folder or a hub id absent from the offline cache is one line naming
`model.path`, not a traceback from deep inside transformers."""
from __future__ import annotations

import os
from pathlib import Path

from embforge.engine.checks import check_model_path


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE",
                                                                                      "TRANSFORMERS_OFFLINE"))


def check_model_files(path: str, key: str = "model.path") -> str:
    """Where `path` (a folder, a shorthand or a hub id) loads from, checked without loading weights; ValueError
    naming `key` when it cannot load. Shorthands build their offline asset (once) when missing."""
    kind = check_model_path(path, key)
    if kind == "shorthand":   # the same mapping as model.resolve_path (not imported: model imports this module)
        from embforge.engine.assets import smollm2_dir, tiny_decoder_dir
        return str(smollm2_dir() if path == "smollm2" else tiny_decoder_dir(path[len("tiny-"):]))
    if kind == "folder":
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"{key}: {path} has no config.json (not a Hugging Face model folder)")
        return path
    if offline():
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ValueError(f"{key}: {path!r} is a hub id that is not in the offline cache (HF_HUB_OFFLINE=1); "
                             "download it first (hf download ...) or give a local folder")
    return path


def load_model_files(path: str, key: str = "model.path"):
    """(transformers config, tokenizer) of a model, no weights; errors are one line naming `key`."""
    from transformers import AutoConfig, AutoTokenizer

    where = check_model_files(path, key)
    try:
        return AutoConfig.from_pretrained(where), AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{key}: {path} cannot be loaded: {first}") from None
