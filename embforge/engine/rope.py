"""Model surgery on the RoPE position encoding: change the base / scaling (and context limits) on an HF config
before the model is built, e.g. E5's base 1e5 to reach 32k tokens (`model.rope_theta`, applied by model.py)."""
from __future__ import annotations


def rope_override(config, *, rope_theta: float | None = None, rope_scaling: dict | None = None,
                  max_position_embeddings: int | None = None, sliding_window: int | None = None):
    """Set RoPE base / scaling (and optionally context limits) on an HF config, in place; returns it.

    Works with transformers >= 5 (`config.rope_parameters`, possibly one dict per attention type) and with
    older versions (`config.rope_theta`, `config.rope_scaling`). Call it before building the model: the
    rotary frequencies are computed at construction time.
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        nested = all(isinstance(v, dict) for v in params.values()) and params
        targets = list(params.values()) if nested else [params]
        for p in targets:
            if rope_theta is not None:
                p["rope_theta"] = float(rope_theta)
            if rope_scaling:
                p.update(rope_scaling)
        config.rope_parameters = params
    else:
        if rope_theta is not None:
            config.rope_theta = float(rope_theta)
        if rope_scaling:
            config.rope_scaling = dict(rope_scaling)
    if max_position_embeddings is not None:
        config.max_position_embeddings = int(max_position_embeddings)
    if sliding_window is not None:
        config.sliding_window = int(sliding_window)
    return config
