"""Observe a training step from outside: what shapes the decoder really ran, and what autograd kept.

Hooks sit on the HF decoder (the module with `embed_tokens` and `layers`), wherever the trainer or the peer wrapped
it (peft, sentence-transformers), so both systems are measured by the same ruler:
- every decoder forward, seen at its embedding lookup (sentence-transformers calls the decoder's forward method
  directly, past module hooks; the lookup inside it goes through them): (rows, padded length) and whether grad was
  on (pass 2) or off (pass 1);
- optionally the bytes autograd saves for backward per pass-2 chunk (deduplicated by storage): the activation memory
  of a chunk, exact and machine-independent, which is what the CPU regression check compares;
- optionally a "pad every chunk to the step's longest sequence" lever, the padding that length-sorted chunks avoid.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


def find_decoder(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():
        if hasattr(m, "embed_tokens") and hasattr(m, "layers") and isinstance(m.layers, torch.nn.ModuleList):
            return m
    raise ValueError(f"no HF decoder (a module with embed_tokens and layers) inside {type(module).__name__}")


def _ids_and_mask(args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return ids, mask


@dataclass
class Forward:
    rows: int
    length: int
    grad: bool


@dataclass
class StepTrace:
    forwards: list[Forward] = field(default_factory=list)
    chunk_saved_bytes: list[int] = field(default_factory=list)

    def passes(self, grad: bool) -> list[Forward]:
        return [f for f in self.forwards if f.grad == grad]

    def summary(self) -> dict:
        p1, p2 = self.passes(False), self.passes(True)
        return {"chunks_pass1": len(p1), "chunks_pass2": len(p2), "seqs_pass2": sum(f.rows for f in p2),
                "padded_tokens_pass1": sum(f.rows * f.length for f in p1),
                "padded_tokens_pass2": sum(f.rows * f.length for f in p2),
                "max_chunk_padded_tokens": max((f.rows * f.length for f in p2), default=0),
                "saved_act_peak_mb": round(max(self.chunk_saved_bytes, default=0) / 2**20, 3)}


class Tracker:
    def __init__(self, model: torch.nn.Module, *, track_saved: bool = False, pad_global_to: int | None = None):
        self.decoder = find_decoder(model)
        self.track_saved = track_saved
        self.pad_global_to = pad_global_to
        self.trace = StepTrace()
        self._storages: set = set()
        # weights saved for backward are not activations: leave them out of the per-chunk bytes
        self._weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]
                         if t.device.type != "meta"}
        self._handles = []
        self.pads_applied = 0
        if pad_global_to:
            self._handles.append(self.decoder.register_forward_pre_hook(self._pad, with_kwargs=True))
            self._handles.append(self.decoder.register_forward_hook(self._unpad, with_kwargs=True))
        self._handles.append(self.decoder.embed_tokens.register_forward_pre_hook(self._record))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self):
        self.trace = StepTrace()

    def _record(self, module, args):
        rows, length = args[0].shape
        grad = torch.is_grad_enabled()
        self.trace.forwards.append(Forward(rows, length, grad))
        if grad and self.track_saved:
            self.trace.chunk_saved_bytes.append(0)  # a new chunk's graph starts: the previous one is gone
            self._storages = set()

    # -- left-pad every chunk to the step's longest length, and cut the output back (the padded-globally lever) --
    def _pad(self, module, args, kwargs):
        ids, mask = _ids_and_mask(args, kwargs)
        extra = self.pad_global_to - ids.shape[1]
        if extra <= 0 or mask is None:
            return None
        pad_id = ids.new_full((ids.shape[0], extra), int(ids[0, 0]))
        kwargs = dict(kwargs)
        kwargs["input_ids"] = torch.cat([pad_id, ids], 1)
        kwargs["attention_mask"] = torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1)
        for key in ("position_ids", "cache_position"):
            kwargs.pop(key, None)  # derived from the new length by the model
        module._embforge_cut = extra
        self.pads_applied += 1
        return (), kwargs

    def _unpad(self, module, args, kwargs, output):
        extra = getattr(module, "_embforge_cut", 0)
        if extra:
            module._embforge_cut = 0
            output.last_hidden_state = output.last_hidden_state[:, extra:]
        return output

    # -- saved-tensor accounting --
    def _pack(self, t: torch.Tensor):
        if self.trace.chunk_saved_bytes:
            try:
                st = t.untyped_storage()
                key = (st.data_ptr(), st.device)
                if key not in self._storages and st.data_ptr() not in self._weights:
                    self._storages.add(key)
                    self.trace.chunk_saved_bytes[-1] += st.nbytes()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage
                self.trace.chunk_saved_bytes[-1] += t.numel() * t.element_size()
        return t

    @contextlib.contextmanager
    def step(self):
        """Wrap one training step: resets the trace and, if asked, counts saved tensors."""
        self.reset()
        if not self.track_saved:
            yield self.trace
            return
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self.trace
