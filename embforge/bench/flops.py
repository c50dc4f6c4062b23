"""FLOP model of one GradCache step of a LoRA decoder embedder (docs/bench.md states the formulas).

Only matmul FLOPs are counted (norms, RoPE, activations and softmax exponentials are ignored, as is usual for MFU),
a multiply-add is 2 FLOPs, and causal attention counts its lower triangle only: QK^T and PV together cost
4 * heads * head_dim * n(n+1)/2 per layer for a sequence of n tokens.

Model FLOPs (the MFU numerator) are what plain full-batch training of this model on these tokens needs, nothing
else: one forward, the backward through the frozen base for the activation gradients only (a frozen weight gets no
weight-gradient GEMM, and the first layer's q/k/v need no input gradient: the embedding is frozen), the LoRA
backward (activation and weight gradients), and the loss. tests/test_bench_flops.py checks every term against
torch's FLOP counter on a real peft model. The `6 * params * tokens`
rule is wrong here: it charges a weight-gradient GEMM for 7B frozen weights.
Hardware FLOPs (the HFU numerator) are what the step actually executes: pass 1 (a forward that plain training would
not run: GradCache recomputation), pass 2's forward, the gradient-checkpointing recomputation of pass 2's forward
when it is on, and the backward, each on the padded chunk shapes the model really saw.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    lora_r: int = 0  # 0: no LoRA (full fine-tuning is not what we bench)

    @classmethod
    def from_hf_config(cls, cfg, lora_r: int) -> "DecoderShape":
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                   getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim,
                   cfg.intermediate_size, lora_r)

    def _projections(self) -> list[tuple[int, int]]:
        """(in, out) of the seven projections of one layer: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def base_linear_params(self) -> int:
        """Weights every token multiplies by (the embedding table is a lookup: no FLOPs; no LM head)."""
        return self.layers * sum(a * b for a, b in self._projections())

    @property
    def lora_params(self) -> int:
        """LoRA A (r x in) and B (out x r) on all seven projections of every layer."""
        return self.layers * self.lora_r * sum(a + b for a, b in self._projections())

    def attention_fwd(self, n: int, causal: bool = True) -> int:
        """QK^T + PV of one sequence of n tokens, all layers: the causal triangle, or the full square that an
        eager or masked kernel computes."""
        pairs = n * (n + 1) // 2 if causal else n * n
        return self.layers * 4 * self.heads * self.head_dim * pairs

    @property
    def _first_layer_skipped(self) -> int:
        """Per-token weights of the first layer's q, k, v (base and LoRA A) whose input gradient is never computed:
        their input comes from the frozen embedding, which needs no gradient."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * (q + 2 * kv) + self.lora_r * 3 * h

    def forward(self, n: int, causal: bool = True) -> int:
        return 2 * (self.base_linear_params + self.lora_params) * n + self.attention_fwd(n, causal)

    def backward(self, n: int, causal: bool = True) -> int:
        """Activation gradients through the frozen base (2PT), LoRA activation + weight gradients (4 P_lora T),
        attention backward (dQ, dK, dV, dP: twice its forward), less the first layer's q/k/v input gradients."""
        return (2 * self.base_linear_params * n + 4 * self.lora_params * n + 2 * self.attention_fwd(n, causal)
                - 2 * self._first_layer_skipped * n)


def loss_flops(n_queries: int, n_docs: int, dim: int) -> int:
    """InfoNCE forward (2BND) + backward (4BND), as the kernel benchmark counts it."""
    return 6 * n_queries * n_docs * dim


def model_flops(shape: DecoderShape, lengths: list[int], n_queries: int, n_docs: int) -> int:
    """MFU numerator: forward + backward of every sequence at its real length, plus the loss."""
    return sum(shape.forward(n) + shape.backward(n) for n in lengths) + loss_flops(n_queries, n_docs, shape.hidden)


def hardware_flops(shape: DecoderShape, pass1_shapes: list[tuple[int, int]], pass2_shapes: list[tuple[int, int]],
                   gradient_checkpointing: bool, n_queries: int, n_docs: int) -> dict:
    """HFU numerator from the (rows, padded length) of every forward the model ran, split by pass.
    Padded positions count: the GEMMs multiply them. Attention counts the causal triangle of the padded length
    (a masked kernel may compute the full square: then HFU is understated, never inflated)."""
    def fwd(shapes):
        return sum(b * shape.forward(t) for b, t in shapes)
    p1, p2f = fwd(pass1_shapes), fwd(pass2_shapes)
    recompute = p2f if gradient_checkpointing else 0
    bwd = sum(b * shape.backward(t) for b, t in pass2_shapes)
    loss = loss_flops(n_queries, n_docs, shape.hidden)
    return {"pass1": p1, "pass2_fwd": p2f, "recompute": recompute, "backward": bwd, "loss": loss,
            "total": p1 + p2f + recompute + bwd + loss}


# Dense bf16 peak (no sparsity) from the vendors' data sheets, by device-name substring. Anything else (CPU
# included) is judged against the same-run measured matmul rate only.
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5,
               "H200": 989.4, "A100": 312.0}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None
