"""The levers of the end-to-end benchmark: each changes one thing about the headline step, in place where it can.

A lever is applied to an already loaded model and undone after its row (a 7B reload costs tens of seconds of the
GPU budget); Liger and torch.compile change a model for good, so e2e.py drops that model after them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from embforge.bench.setup import Setup
from embforge.bench.tracker import find_decoder


@dataclass(frozen=True)
class Lever:
    name: str                      # "baseline" or what changed, e.g. "grad_ckpt=off"
    system: str = "embforge"       # or "sentence-transformers"
    quantization: str | None = None
    gradient_checkpointing: bool | None = None
    chunk_tokens: int | None = None
    pad_global: bool = False
    packing: bool | None = None    # None: the engine's default (packed wherever exact); False: padded chunks
    compile_layers: bool = False
    liger: bool = False
    peer_token_budget: bool = True  # the peer's strongest mode: token-budget mini-batches (padding-free when its
                                    # flash-attention prerequisites are installed); False: fixed mini_batch_size
    cuda_only: bool = False
    cost: float = 1.0              # expected wall time relative to the headline's, for the budget
    max_steps: int | None = None   # fewer measured steps where one suffices (uniform shapes: no cold first step)


def levers_for(setup: Setup, device: str, quick: bool) -> list[Lever]:
    """Priority order (the GPU budget cuts the tail): the headline, the peer, the levers that may pay, then the
    ones that measure what we avoid. Liger and torch.compile change a model for good (it is dropped after them);
    Liger restores transformers' module globals, so later levers are unaffected."""
    other_base = "none" if setup.quantization == "nf4" else "nf4"
    out = [Lever("baseline"),
           Lever("peer", system="sentence-transformers", cost=1.7),
           # per-chunk padding instead of packed rows, at the same token budget (then counted with padding)
           Lever("chunks=padded", packing=False, cost=1.3),
           Lever("liger=rmsnorm+rope+swiglu", liger=True, cuda_only=True),
           Lever("grad_ckpt=off", gradient_checkpointing=False, chunk_tokens=setup.chunk_tokens_no_ckpt),
           Lever(f"base={'bf16' if other_base == 'none' else 'nf4'}", quantization=other_base),
           Lever("liger+chunks=padded", liger=True, packing=False, cuda_only=True, cost=1.3),
           # every row padded to the step's longest: ~3x the work, so one step (its chunks all have one shape)
           Lever("chunks=padded_global", pad_global=True, packing=False, cost=1.7, max_steps=1),
           Lever("peer=mini_batch_size", system="sentence-transformers", peer_token_budget=False, cost=1.7),
           Lever("compile=decoder_layers", compile_layers=True, cuda_only=True, cost=2.0)]
    if device != "cuda":
        out = [lv for lv in out if not lv.cuda_only]
        if quick:  # the CI check: the headline, the peer and the levers that need no reload of a 4-bit model
            out = [lv for lv in out if lv.name in ("baseline", "chunks=padded", "chunks=padded_global", "peer",
                                                   "peer=mini_batch_size", "grad_ckpt=off")]
    return out


def pad_globally(embedder, length: int):
    """The padded-globally lever: every chunk padded to the step's longest sequence (what slicing one globally
    padded batch gives), on top of the engine's own per-chunk collation. Right-padded columns carry mask 0, so
    pooling still reads each row's last real token. Returns an undo function."""
    orig = embedder.collate

    def collate(seqs):
        ids, mask = orig(seqs)
        extra = length - ids.shape[1]
        if extra <= 0:
            return ids, mask
        ids = torch.cat([ids, ids.new_full((ids.shape[0], extra), embedder.tokenizer.pad_token_id)], 1)
        return ids, torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)
    embedder.collate = collate
    return lambda: delattr(embedder, "collate")


def apply_lever(obj, lever: Lever, setup: Setup, global_len: int, plant: dict, undo: list):
    """Switch a loaded model to the lever's setting in place, appending to `undo` as it goes (so a half-applied
    lever is still undone). Toggling in place instead of reloading saves a 7B load per lever (tens of seconds)."""
    decoder = find_decoder(obj)
    padded = lever.packing is False or lever.pad_global or plant.get("pad_global")
    if lever.system == "embforge" and padded and obj.packing:
        obj.set_packing(False)
        undo.append(lambda: obj.set_packing("auto"))
    if lever.system == "embforge" and (lever.pad_global or plant.get("pad_global")):
        undo.append(pad_globally(obj, global_len))
    if lever.gradient_checkpointing is not None and lever.gradient_checkpointing != setup.gradient_checkpointing:
        on = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        if hasattr(obj, "set_gradient_checkpointing"):  # an Embedder: also drops transformers' input-grad hook
            obj.set_gradient_checkpointing(lever.gradient_checkpointing)
            undo.append(lambda: obj.set_gradient_checkpointing(setup.gradient_checkpointing))
        elif lever.gradient_checkpointing:
            decoder.gradient_checkpointing_enable(**on)
            undo.append(decoder.gradient_checkpointing_disable)
        else:
            decoder.gradient_checkpointing_disable()
            undo.append(lambda: decoder.gradient_checkpointing_enable(**on))
    if lever.compile_layers:
        for layer in decoder.layers:
            layer.compile(dynamic=True)

        def uncompile():
            for layer in decoder.layers:
                layer._compiled_call_impl = None  # what nn.Module.compile set: without it calls stay compiled
            torch._dynamo.reset()
        undo.append(uncompile)
    if lever.liger:
        # Liger patches this model's modules and transformers' Mistral module globals (RoPE, and the norm/MLP
        # classes later models would be built from): the globals are restored after the lever, the model dropped.
        # The engine's own path (model.liger): the same patch a user gets.
        from transformers.models.mistral import modeling_mistral

        from embforge.engine.liger import apply_liger
        saved = {k: getattr(modeling_mistral, k) for k in ("apply_rotary_pos_emb", "MistralRMSNorm", "MistralMLP")}
        undo.append(lambda: [setattr(modeling_mistral, k, v) for k, v in saved.items()])
        apply_liger(decoder, next(decoder.parameters()).device)


def plant_slow_layers(obj, factor: int):
    """Test hook: make every decoder layer run `factor` times (outputs of the extra runs discarded, no grad) --
    a known, sizeable slowdown that the check must catch."""
    for layer in find_decoder(obj).layers:
        orig = layer.forward

        def slow(*a, _orig=orig, **k):
            with torch.no_grad():
                for _ in range(factor - 1):
                    _orig(*a, **k)
            return _orig(*a, **k)
        layer.forward = slow
