"""`model.attention: causal | bidirectional` for decoder backbones (the LLM2Vec / NV-Embed / GritLM choice).

How transformers 5 decides (read in transformers 5.23: utils/generic.py, masking_utils.py,
integrations/sdpa_attention.py):
- the model's forward wrapper passes `config.is_causal` on as the `is_causal` kwarg of every attention call, and
  sdpa / flash attention use that kwarg before the layer's own `is_causal` attribute (True from __init__);
- `create_causal_mask` returns `create_bidirectional_mask(...)` when `config.is_causal` is False: padding only
  (eager always gets it materialised; sdpa gets None when nothing is padded, and then relies on the kwarg).
So `config.is_causal = False` is the switch. We also clear each attention layer's `is_causal`, for versions or
code paths that read the attribute instead of the kwarg. `check_bidirectional` probes padded and unpadded batches
at load, so a transformers version that honours neither fails loudly instead of training a causal model.
"""
from __future__ import annotations

import torch

ATTENTION_MODES = ("causal", "bidirectional")
# Families whose attention layers carry `is_causal` and whose forward builds its mask with create_causal_mask.
BIDIRECTIONAL_FAMILIES = ("llama", "mistral", "qwen2")


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_attention(model, mode: str) -> None:
    """Make `model` (an HF decoder, possibly peft-wrapped) attend causally or bidirectionally, in place."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"model.attention must be one of {ATTENTION_MODES}, got {mode!r}")
    base = _base(model)
    family = base.config.model_type
    if mode == "bidirectional" and family not in BIDIRECTIONAL_FAMILIES:
        raise ValueError(f"model.attention=bidirectional is supported for {BIDIRECTIONAL_FAMILIES}, not {family!r}")
    causal = mode == "causal"
    base.config.is_causal = causal
    layers = [m for m in base.modules() if hasattr(m, "is_causal") and m is not base]
    if not layers and not causal:
        raise ValueError(f"{type(base).__name__}: found no attention layer with an `is_causal` flag; this "
                         "transformers version builds attention differently, so bidirectional is not available")
    for m in layers:
        m.is_causal = causal


def attention_mode(model) -> str:
    return "causal" if getattr(_base(model).config, "is_causal", True) else "bidirectional"


@torch.no_grad()
def check_bidirectional(model, pad_id: int = 0) -> None:
    """Raise unless the first token's hidden state depends on a later token, unpadded and padded (right).

    Cheap (two 4-token sequences) and run once at load: it turns a transformers version that ignores the flags
    into a clear error instead of a silently causal model.
    """
    base = _base(model)
    device = next(base.parameters()).device
    vocab = base.config.vocab_size
    a = torch.tensor([[11 % vocab, 12 % vocab, 13 % vocab, 14 % vocab]], device=device)
    b = a.clone()
    b[0, -1] = 15 % vocab
    for padded in (False, True):
        ids = torch.cat([a, b])
        mask = torch.ones_like(ids)
        if padded:   # one extra padded position per row: the mask is now materialised
            ids = torch.cat([ids, torch.full((2, 1), pad_id, device=device)], dim=1)
            mask = torch.cat([mask, torch.zeros((2, 1), dtype=mask.dtype, device=device)], dim=1)
        was_training = base.training
        base.eval()
        try:
            hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            base.train(was_training)
        if torch.allclose(hidden[0, 0].float(), hidden[1, 0].float()):
            raise RuntimeError(
                f"model.attention=bidirectional had no effect on {type(base).__name__} with "
                f"attn_implementation={base.config._attn_implementation} ({'padded' if padded else 'unpadded'} "
                "batch): the first token did not see the last one. This transformers version does not honour "
                "config.is_causal / the layers' is_causal; use model.attention=causal")
