"""How a saved model folder names its base model, so that the folder can be copied to another machine (or the
asset cache moved) and still load: the name the user gave (a shorthand such as `smollm2`, a hub id), a path relative
to the model folder when the base lies beside it (`../base`), else the folder's absolute path. Never the resolved
location of a shorthand's cached asset, which is only valid on the machine that built it."""
from __future__ import annotations

import os
from pathlib import Path

from embforge.engine.assets import SMOLLM2_NAME
from embforge.engine.checks import check_model_path


def base_reference(path: str, model_dir: str | Path) -> str:
    """The base's name as stored in `model_dir`/embforge_config.json."""
    if check_model_path(path) != "folder":
        return path                                       # shorthand or hub id: as the user named it
    base, home = Path(path).resolve(), Path(model_dir).resolve()
    if base.is_relative_to(home.parent):                  # beside the model folder (or inside it): travels with it
        return "./" + os.path.relpath(base, home) if base.is_relative_to(home) else os.path.relpath(base, home)
    return str(base)


def locate_base(stored: str, model_dir: str | Path) -> str:
    """The base a saved folder names, as a loadable model.path: relative paths are taken from the model folder;
    SmolLM2's resolved asset location from an older embforge that no longer exists becomes `smollm2` again (the same
    weights, rebuilt from the same gguf). Old tiny test decoders are not mapped back: their tokenizer changed, so the
    shorthand now builds a different model."""
    if stored.startswith(("./", "../")):
        return str((Path(model_dir) / stored).resolve())
    if os.path.isabs(stored) and not os.path.isdir(stored):
        if Path(stored).name == SMOLLM2_NAME:
            return "smollm2"
    return stored
