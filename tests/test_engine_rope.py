"""RoPE override (model surgery before the model is built): the rotary frequencies follow the new base / scaling."""
import torch

from embforge.engine.rope import rope_override


def test_rope_override_changes_rotary_frequencies():
    from transformers import LlamaConfig, LlamaModel

    def cfg():
        return LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           num_hidden_layers=1, vocab_size=64)

    head_dim = 8
    expected = 1.0 / (1e5 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    model = LlamaModel(rope_override(cfg(), rope_theta=1e5, max_position_embeddings=32768))
    assert torch.allclose(model.rotary_emb.inv_freq, expected)
    assert model.config.max_position_embeddings == 32768
    default = LlamaModel(cfg())
    assert not torch.allclose(default.rotary_emb.inv_freq, expected)
    scaled = rope_override(cfg(), rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert torch.allclose(LlamaModel(scaled).rotary_emb.inv_freq, default.rotary_emb.inv_freq / 4)
