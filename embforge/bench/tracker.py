"""Observe a training step from outside: what shapes the decoder really ran, when each pass ended, what autograd kept.

Hooks sit on the HF decoder's embedding lookup and final norm (the decoder is the module with `embed_tokens` and
`layers`, wherever peft or sentence-transformers wrapped it; both call the decoder's forward method directly, past
its own module hooks, but the lookup and the norm inside it go through theirs), so both systems are measured by
the same ruler:
- every decoder forward: (rows, padded length) and whether grad was on (pass 2) or off (pass 1); for a packed row
  (one row whose position ids restart, seen by a hook on the rotary embedding) also the sequence lengths in it,
  since its attention work is that of each sequence, not of one sequence as long as the row (reading the position
  ids costs one small device-to-host copy per packed forward, as the engine's own cu_seqlens check does);
- the pass boundaries: the end of the last no-grad forward (pass 1 done) and the start of the first forward with
  grad (loss done). On CUDA these are events recorded in the stream, so nothing waits for the GPU mid-step and the
  split is the GPU's own timeline (the engine's perf_counter timings are not synchronized);
- optionally the bytes autograd saves for backward per pass-2 chunk (deduplicated by storage, weights excluded):
  the activation memory of a chunk, exact and machine-independent, which the CPU regression check compares.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch


def find_decoder(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():
        if hasattr(m, "embed_tokens") and hasattr(m, "layers") and isinstance(m.layers, torch.nn.ModuleList):
            return m
    raise ValueError(f"no HF decoder (a module with embed_tokens and layers) inside {type(module).__name__}")


@dataclass
class Forward:
    rows: int
    length: int
    grad: bool
    segments: tuple[int, ...] | None = None   # packed row: the lengths of the sequences in it

    def shapes(self) -> list[tuple[int, int]]:
        """(rows, length) pairs with the attention work of this forward: a packed row is its sequences."""
        return [(1, n) for n in self.segments] if self.segments else [(self.rows, self.length)]


@dataclass
class StepTrace:
    forwards: list[Forward] = field(default_factory=list)
    chunk_saved_bytes: list[int] = field(default_factory=list)
    marks: dict = field(default_factory=dict)

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
    def __init__(self, model: torch.nn.Module, *, track_saved: bool = False):
        self.decoder = find_decoder(model)
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.track_saved = track_saved
        self.trace = StepTrace()
        self._storages: set = set()
        # weights saved for backward are not activations: leave them out of the per-chunk bytes
        self._weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]
                         if t.device.type != "meta"}
        self._handles = [self.decoder.embed_tokens.register_forward_pre_hook(self._on_embed),
                         self.decoder.norm.register_forward_hook(self._on_norm)]
        if hasattr(self.decoder, "rotary_emb"):
            self._handles.append(self.decoder.rotary_emb.register_forward_pre_hook(self._on_rotary, with_kwargs=True))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def mark(self, name: str):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.trace.marks[name] = ev
        else:
            self.trace.marks[name] = time.perf_counter()

    def split_ms(self) -> dict:
        """pass1 / loss / pass2 / optimizer in ms from the marks (call after the step, synchronized)."""
        m = self.trace.marks

        def ms(a, b):
            if a not in m or b not in m:
                return None
            return round(m[a].elapsed_time(m[b]) if self.cuda else (m[b] - m[a]) * 1e3, 3)
        if "pass2_start" not in m:  # one chunk held everything: a single forward+backward, no pass 2
            return {"pass1_ms": ms("start", "end"), "loss_ms": None, "pass2_ms": None,
                    "optimizer_ms": ms("end", "optimizer_end")}
        return {"pass1_ms": ms("start", "pass1_end"), "loss_ms": ms("pass1_end", "pass2_start"),
                "pass2_ms": ms("pass2_start", "end"), "optimizer_ms": ms("end", "optimizer_end")}

    def _on_embed(self, module, args):
        rows, length = args[0].shape
        grad = torch.is_grad_enabled()
        self.trace.forwards.append(Forward(rows, length, grad))
        if grad and "pass2_start" not in self.trace.marks:
            self.mark("pass2_start")
        if grad and self.track_saved:
            self.trace.chunk_saved_bytes.append(0)  # a new chunk's graph starts: the previous one is gone
            self._storages = set()

    def _on_rotary(self, module, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if pos is None or not self.trace.forwards or pos.dim() != 2 or pos.shape[0] != 1:
            return
        starts = torch.nonzero(pos[0] == 0).flatten().tolist()
        if len(starts) > 1 and starts[0] == 0:   # positions restart: a packed row
            self.trace.forwards[-1].segments = tuple(b - a for a, b in zip(starts, starts[1:] + [pos.shape[1]]))

    def _on_norm(self, module, args, output):
        if not torch.is_grad_enabled():
            self.mark("pass1_end")  # the last one standing is the end of pass 1

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
        """Wrap one training step (marks 'start'; the caller marks 'end' and 'optimizer_end')."""
        self.trace = StepTrace()
        self.mark("start")
        if not self.track_saved:
            yield self.trace
            return
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self.trace
