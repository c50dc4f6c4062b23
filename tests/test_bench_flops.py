"""The benchmark's FLOP model against torch's own FLOP counter on a real peft LoRA decoder, and its parameter counts
against a Mistral-7B built on the meta device (no memory, no weights)."""
import peft
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from embforge.bench import flops, models
from embforge.bench.peer import lora_config


def _lora_model(shape: str, r: int, attn: str):
    from transformers import MistralModel
    cfg = models.mistral_config(shape)
    cfg._attn_implementation = attn
    model = MistralModel(cfg)
    return cfg, peft.get_peft_model(model, lora_config(r, 2 * r, 0.0))


@pytest.mark.parametrize("n", [7, 33])
def test_forward_and_backward_flops_match_torch_counter(n):
    # eager attention: torch counts its matmuls (the full n x n square, which causal=False models)
    cfg, model = _lora_model("tiny", 4, "eager")
    shape = flops.DecoderShape.from_hf_config(cfg, 4)
    ids = torch.randint(5, cfg.vocab_size, (1, n))
    with FlopCounterMode(display=False) as fwd:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    with FlopCounterMode(display=False) as bwd:
        out.float().sum().backward()
    assert fwd.get_total_flops() == shape.forward(n, causal=False)
    assert bwd.get_total_flops() == shape.backward(n, causal=False)


def test_causal_attention_is_the_triangle():
    shape = flops.DecoderShape.from_hf_config(models.mistral_config("tiny"), 4)
    n = 10
    assert shape.attention_fwd(n) * 2 * n == shape.attention_fwd(n, causal=False) * (n + 1)


def test_mistral_7b_parameter_counts():
    from transformers import MistralModel
    cfg = models.mistral_config("7b")
    with torch.device("meta"):
        model = peft.get_peft_model(MistralModel(cfg), lora_config(16, 32, 0.05))
    shape = flops.DecoderShape.from_hf_config(cfg, 16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    linear = sum(m.base_layer.weight.numel() for m in model.modules() if isinstance(m, peft.tuners.lora.Linear))
    assert trainable == shape.lora_params
    assert linear == shape.base_linear_params
    # and the whole model is Mistral-7B: 7.24B with the LM head this embedder drops (32000 x 4096)
    total = sum(p.numel() for p in model.parameters()) - trainable + cfg.vocab_size * cfg.hidden_size
    assert total == 7_241_732_096


def test_hardware_flops_split_and_checkpointing():
    shape = flops.DecoderShape.from_hf_config(models.mistral_config("tiny"), 4)
    p1, p2 = [(3, 10), (2, 20)], [(3, 10), (2, 20)]
    off = flops.hardware_flops(shape, p1, p2, False, 2, 4)
    on = flops.hardware_flops(shape, p1, p2, True, 2, 4)
    assert on["total"] - off["total"] == off["pass2_fwd"] == off["pass1"] > 0
    assert off["total"] == off["pass1"] + off["pass2_fwd"] + off["backward"] + off["loss"]
    # padding costs: the same 5 sequences padded to 20 tokens execute more than at their own lengths
    padded = flops.hardware_flops(shape, [(5, 20)], [(5, 20)], False, 2, 4)
    assert padded["total"] > off["total"]


def test_peak_lookup():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert flops.peak_tflops("cpu:x86_64x2") is None
