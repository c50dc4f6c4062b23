"""Embedder: templates, EOS after truncation, pooling by mask (pad == eos, left/right), LoRA targets per family,
non-reentrant checkpointing, and the nf4 path checked against a dequantized fp32 twin."""
import dataclasses

import pytest
import torch

from embforge.engine import ContrastiveBatch, Embedder, LoraConfig, ModelConfig, contrastive_step
from embforge.engine.model import LORA_TARGETS
from embforge.engine.text import pad_batch

ALL_PROJ = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def emb():
    return Embedder.from_config(ModelConfig(path="tiny-llama", query_max_length=12, doc_max_length=20), "cpu")


def randomize_lora(e, seed=0):
    """peft starts lora_B at zero (LoRA is a no-op, lora_A gets no gradient): make the adapter matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in e.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_query_template_and_eos_after_truncation(emb):
    tok = emb.tokenizer
    ids = emb.tokenize(["a very long query " * 20], is_query=True, instructions=["Find it"])[0]
    assert len(ids) == 12 and ids[-1] == tok.eos_token_id
    full = tok("Instruct: Find it\nQuery: " + "a very long query " * 20, add_special_tokens=False)["input_ids"]
    assert ids[:-1] == full[:11]                      # the templated text, truncated, then EOS
    assert tok.decode(ids[:-1]).startswith("Instruct: Find it")
    long_doc = emb.tokenize(["word " * 100], is_query=False)[0]
    assert len(long_doc) == 20 and long_doc[-1] == tok.eos_token_id   # document limit, not the query one
    doc = emb.tokenize(["short doc"], is_query=False)[0]
    assert doc[-1] == tok.eos_token_id and doc.count(tok.eos_token_id) == 1 and "Instruct" not in tok.decode(doc)
    assert emb.tokenize(["q"], is_query=True, instructions=[None])[0] == emb.tokenize(["q"], is_query=False)[0]


def test_custom_query_template():
    e = Embedder.from_config(ModelConfig(path="tiny-llama", lora=None, query_template="<{instruction}> {query}"),
                             "cpu")
    assert e.tokenizer.decode(e.tokenize(["hi"], is_query=True, instructions=["Find"])[0][:-1]) == "<Find> hi"
    with pytest.raises(ValueError, match="query_template"):
        ModelConfig(query_template="{instruction} {text}").validate()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_does_not_change_embeddings(emb, side):
    texts = ["one", "a somewhat longer document text", "mid length text"]
    e = Embedder(emb.model, emb.tokenizer, dataclasses.replace(emb.config, padding_side=side))
    ids, mask = e.collate(e.tokenize(texts, is_query=False))
    pad_col = 0 if side == "left" else -1
    assert (mask[:, pad_col] == 0).any()          # really padded on that side
    batched = e.encode(texts)
    single = torch.cat([e.encode([t]) for t in texts])   # no padding at all
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_equals_eos_pools_by_mask(emb, side):
    eos = emb.tokenizer.eos_token_id
    assert emb.tokenizer.pad_token_id == eos          # SmolLM2's tokenizer: pad is EOS
    ids, mask = pad_batch([[5, 6, 9, eos], [7, eos]], eos, side)
    row = ids[1].tolist()
    assert row.count(eos) == 3 and mask[1].sum() == 2  # two pads that look exactly like the real EOS
    pooled = emb.forward_tokens(ids, mask)
    alone = emb.forward_tokens(torch.tensor([[7, eos]]), torch.ones(1, 2, dtype=torch.long))
    assert torch.allclose(pooled[1], alone[0], atol=1e-5)


def test_mean_pooling_averages_real_tokens_only(emb):
    e = Embedder(emb.model, emb.tokenizer, dataclasses.replace(emb.config, pooling="mean"))
    ids, mask = e.collate([[5, 6, 7, 0], [8, 0]])
    pooled = e.forward_tokens(ids, mask)
    hidden = emb.model(input_ids=ids[1:, :2], attention_mask=mask[1:, :2]).last_hidden_state
    assert torch.allclose(pooled[1], hidden[0].mean(0), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_lora_targets_every_attention_and_mlp_projection(family):
    e = Embedder.from_config(ModelConfig(path=f"tiny-{family}"), "cpu")
    adapted = {}
    for n, _ in e.model.named_parameters():
        if "lora_A" in n:
            layer, proj = n.split(".lora_A")[0].split(".")[-3], n.split(".lora_A")[0].rsplit(".", 1)[-1]
            adapted.setdefault(layer, set()).add(proj)
    assert set(LORA_TARGETS[family]) == ALL_PROJ
    assert adapted == {"0": ALL_PROJ, "1": ALL_PROJ}   # every projection in every layer
    assert all("lora" in n for n, p in e.model.named_parameters() if p.requires_grad)
    assert e.model.peft_config["default"].r == 16 and e.model.peft_config["default"].lora_alpha == 32
    assert e.model.base_model.model.config._attn_implementation == "sdpa"   # no flash-attn on CPU


def test_lora_targets_are_checked_against_the_model():
    with pytest.raises(ValueError, match=r"\['w1'\] name no linear layer"):
        Embedder.from_config(ModelConfig(path="tiny-mistral", lora=LoraConfig(targets=["q_proj", "w1"])), "cpu")


def _adapted_layers(e):
    return {n.split(".lora_A")[0].split(".")[-3] for n, _ in e.model.named_parameters() if "lora_A" in n}


@pytest.mark.parametrize("layers,expected", [("top:1", {"1"}), ([0], {"0"}), ([1, 0, 1], {"0", "1"}), (None, {"0", "1"})])
def test_lora_layers_choose_which_decoder_layers_get_adapters(tmp_path, layers, expected):
    e = Embedder.from_config(ModelConfig(path="tiny-llama", lora=LoraConfig(layers=layers, dropout=0.0)), "cpu")
    assert _adapted_layers(e) == expected
    randomize_lora(e, seed=1)
    e.save_pretrained(tmp_path / "m")                       # peft records the layers: the reload adapts the same
    loaded = Embedder.from_pretrained(tmp_path / "m", device="cpu")
    assert _adapted_layers(loaded) == expected
    texts = ["a tiny test", "of which layers adapt"]
    assert torch.allclose(loaded.encode(texts), e.encode(texts), atol=1e-5)


def test_lora_on_top_layers_trains_only_those_layers():
    """The point of top:N: no adapter below, so the frozen lower layers get no gradient work at all."""
    e = Embedder.from_config(ModelConfig(path="tiny-llama", lora=LoraConfig(layers="top:1", dropout=0.0)), "cpu")
    randomize_lora(e, seed=2)
    batch = ContrastiveBatch(["q one", "q two"], [None, None], ["doc one", "doc two"])
    contrastive_step(e, batch, chunk_tokens=64)
    grads = {n: p.grad for n, p in e.model.named_parameters() if p.requires_grad}
    assert grads and all(".layers.1." in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("layers,match", [("top:3", "more layers than this model has"),
                                          ([2], r"\[2\] out of range"), ("bottom:1", "'top:N'"),
                                          ("top:0", "'top:N'"), ([], "layer indices"), ([-1], "layer indices")])
def test_bad_lora_layers_name_the_field(layers, match):
    with pytest.raises(ValueError, match=f"model.lora.layers(.|\n)*{match}"):
        Embedder.from_config(ModelConfig(path="tiny-llama", lora=LoraConfig(layers=layers)), "cpu")


def test_gradient_checkpointing_is_non_reentrant_without_input_grads():
    e = Embedder.from_config(ModelConfig(path="tiny-llama", gradient_checkpointing=True), "cpu")
    base = e.model.base_model.model
    assert base.is_activation_checkpointing
    assert not getattr(base, "_require_grads_hooks", None)   # peft's reentrant-era input hook removed
    e.train()
    seen = []
    base.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    e.forward_tokens(*e.collate([[5, 6, e.tokenizer.eos_token_id]])).sum().backward()
    assert seen == [False]
    assert all(p.grad is not None for p in e.trainable_parameters())
    e.set_gradient_checkpointing(False)
    assert not base.is_activation_checkpointing and not e.config.gradient_checkpointing
    e.set_gradient_checkpointing(True)
    assert base.is_activation_checkpointing and not getattr(base, "_require_grads_hooks", None)


def _dequantized_twin(q_emb):
    """An fp32 embedder whose linear weights are exactly the nf4 weights, dequantized, with the same adapter."""
    import bitsandbytes.functional as F
    from bitsandbytes.nn import Linear4bit

    twin = Embedder.from_config(dataclasses.replace(q_emb.config, quantization="none"), "cpu")
    q_mods = dict(q_emb.model.named_modules())
    n_linear = 0
    with torch.no_grad():
        for name, m in twin.model.named_modules():
            qm = q_mods[name]
            if isinstance(qm, Linear4bit):
                m.weight.copy_(F.dequantize_4bit(qm.weight.data, qm.weight.quant_state).reshape(m.weight.shape))
                n_linear += 1
        q_params = dict(q_emb.model.named_parameters())
        for name, p in twin.model.named_parameters():
            if "lora_" in name:
                p.copy_(q_params[name])
    assert n_linear == 2 * 7
    return twin


def test_nf4_qlora_gradients_match_dequantized_fp32_twin():
    """The 4-bit path: Linear4bit layers with double quantization, LoRA on all of them, and gradients equal to an
    fp32 model holding the dequantized weights, also after an `encode` (bitsandbytes' CPU repacking in eval mode
    once made them silently wrong)."""
    from bitsandbytes.nn import Linear4bit
    e = Embedder.from_config(ModelConfig(path="tiny-mistral", quantization="nf4", lora=LoraConfig(dropout=0.0)),
                             "cpu")
    four_bit = [m for m in e.model.modules() if isinstance(m, Linear4bit)]
    assert len(four_bit) == 14 and all(m.weight.quant_state.nested for m in four_bit)   # double quantization
    assert four_bit[0].weight.quant_state.quant_type == "nf4"
    randomize_lora(e)
    twin = _dequantized_twin(e)
    texts = ["a query about cats", "a document", "another, longer document about dogs and cats"]
    assert torch.allclose(e.encode(texts), twin.encode(texts), atol=1e-5)
    batch = ContrastiveBatch(["q one", "q two"], ["Find", "Find"], ["d1", "n1", "a longer d2", "n2"])
    e.train(), twin.train()
    res = contrastive_step(e, batch, chunk_tokens=8)
    ref = contrastive_step(twin, batch, chunk_tokens=8)
    assert res.n_chunks > 1 and abs(res.loss - ref.loss) < 1e-5 * abs(ref.loss)
    g = torch.cat([p.grad.flatten() for p in e.trainable_parameters()])
    g_ref = torch.cat([p.grad.flatten() for p in twin.trainable_parameters()])
    assert torch.isfinite(g).all() and g_ref.norm() > 0
    assert (g - g_ref).norm() / g_ref.norm() < 1e-4


def test_save_and_load_roundtrip(tmp_path, emb):
    texts = ["hello world", "another"]
    randomize_lora(emb, seed=3)
    before = emb.encode(texts, instruction="Find")
    assert not torch.allclose(before, emb.encode(texts))          # the instruction template is applied
    emb.save_pretrained(tmp_path / "m")
    loaded = Embedder.from_pretrained(tmp_path / "m", device="cpu")
    assert torch.allclose(loaded.encode(texts, instruction="Find"), before, atol=1e-5)
    assert loaded.config.query_max_length == 12 and not loaded.model.training


@pytest.mark.parametrize("field,value", [("quantization", "int3"), ("pooling", "cls"), ("padding_side", "top"),
                                         ("attn_implementation", "flash"), ("doc_max_length", 1),
                                         ("dtype", "int8")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        dataclasses.replace(ModelConfig(), **{field: value}).validate()
    with pytest.raises(ValueError, match="model.lora.dropout"):
        ModelConfig(lora=LoraConfig(dropout=1.5)).validate()
