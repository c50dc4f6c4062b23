"""model.liger: Liger-Kernel's fused RMSNorm, RoPE and SwiGLU in the decoder, for training and encoding.

Liger patches an already loaded model in place (each RMSNorm's and each MLP's forward) and swaps the family's
`apply_rotary_pos_emb` in transformers' modeling module, which the attention layers look up at call time: that
module global is process-wide, so every model of that family built in this process afterwards uses Liger's RoPE
too. Its cross-entropy patches are never applied (an embedder has no LM head). Liger's kernels are Triton
kernels that need a CUDA GPU (they do not run under TRITON_INTERPRET either), hence the error on CPU.

Targeted and checked against liger-kernel 0.8.5 (apply_liger_kernel_to_<family>(rope, cross_entropy,
fused_linear_cross_entropy, rms_norm, swiglu, model)).
"""
from __future__ import annotations

import importlib

import torch

LIGER_VERSION = "0.8.5"
LIGER_FAMILIES = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
                  "qwen2": "apply_liger_kernel_to_qwen2"}


def _modeling_module(family: str):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


def apply_liger(model, device: torch.device) -> dict:
    """Patch `model` (the HF decoder, before LoRA) with Liger's RMSNorm, RoPE and SwiGLU; return what was
    patched ({"rms_norm": n modules, "swiglu": n modules, "rope": True}). Raises a clear error on a non-CUDA
    device, an unsupported family, a missing liger-kernel, or a patch that changed nothing."""
    family = model.config.model_type
    if torch.device(device).type != "cuda":
        raise RuntimeError(f"model.liger=true needs a CUDA GPU: Liger-Kernel's Triton kernels do not run on "
                           f"{torch.device(device).type}; set model.liger=false")
    if family not in LIGER_FAMILIES:
        raise ValueError(f"model.liger=true: no Liger patch for model family {family!r} "
                         f"(supported: {sorted(LIGER_FAMILIES)})")
    try:
        liger = importlib.import_module("liger_kernel.transformers")
    except ImportError as e:
        raise ImportError(f"model.liger=true needs liger-kernel: pip install liger-kernel=={LIGER_VERSION}") from e
    norms_before = _forwards(model, "RMSNorm")
    mlps_before = _forwards(model, "MLP")
    rope_before = _modeling_module(family).apply_rotary_pos_emb
    getattr(liger, LIGER_FAMILIES[family])(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                           fused_linear_cross_entropy=False, model=model)
    patched = {"rms_norm": sum(_forwards(model, "RMSNorm")[k] is not f for k, f in norms_before.items()),
               "swiglu": sum(_forwards(model, "MLP")[k] is not f for k, f in mlps_before.items()),
               "rope": _modeling_module(family).apply_rotary_pos_emb is not rope_before}
    missing = [name for name, n in (("rms_norm", len(norms_before)), ("swiglu", len(mlps_before)))
               if patched[name] != n] + ([] if patched["rope"] else ["rope"])
    if missing:
        raise RuntimeError(f"model.liger=true: liger-kernel left {missing} of this {family} model unpatched "
                           f"(patched: {patched}); this embforge was checked against liger-kernel {LIGER_VERSION}")
    return patched


def _forwards(model, class_suffix: str) -> dict:
    """The bound forward of every module whose original class name ends in `class_suffix` (Liger rebinds
    `forward` on the instance, so a changed function object means a patched module)."""
    out = {}
    for name, m in model.named_modules():
        if type(m).__name__.endswith(class_suffix):
            fn = m.__dict__.get("forward", type(m).forward)
            out[name] = getattr(fn, "__func__", fn)
    return out
