"""Embedder: templates, EOS after truncation, pooling by mask (pad == eos), LoRA targets, 4-bit path."""
import dataclasses

import pytest
import torch

from embforge.engine import Embedder, LoraConfig, ModelConfig
from embforge.engine.model import LORA_TARGETS


@pytest.fixture(scope="module")
def emb():
    return Embedder.from_config(ModelConfig(path="tiny-llama", query_max_length=12, doc_max_length=20), "cpu")


def test_query_template_and_eos_after_truncation(emb):
    tok = emb.tokenizer
    ids = emb.tokenize(["a very long query " * 20], is_query=True, instructions=["Find it"])[0]
    assert len(ids) == 12 and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]).startswith("Instruct: Find it\nQuery:")
    doc = emb.tokenize(["short doc"], is_query=False)[0]
    assert doc[-1] == tok.eos_token_id and "Instruct" not in tok.decode(doc)
    assert emb.tokenize(["q"], is_query=True, instructions=[None])[0] == emb.tokenize(["q"], is_query=False)[0]


def test_left_and_right_padding_give_same_embeddings(emb):
    texts = ["one", "a somewhat longer document text", "mid length text"]
    right = emb.encode(texts)
    left_emb = Embedder(emb.model, emb.tokenizer, dataclasses.replace(emb.config, padding_side="left"))
    left = left_emb.encode(texts)
    single = torch.cat([emb.encode([t]) for t in texts])
    assert torch.allclose(right, single, atol=1e-5)
    assert torch.allclose(left, single, atol=1e-4)
    assert torch.allclose(right.norm(dim=1), torch.ones(3), atol=1e-5)


def test_pad_equals_eos_pools_by_mask(emb):
    emb.tokenizer.pad_token = emb.tokenizer.eos_token
    ids, mask = emb.collate([[5, 6, emb.tokenizer.eos_token_id], [7, emb.tokenizer.eos_token_id]])
    assert ids[1, -1] == emb.tokenizer.eos_token_id and mask[1, -1] == 0
    pooled = emb.forward_tokens(ids, mask)
    alone = emb.forward_tokens(*emb.collate([[7, emb.tokenizer.eos_token_id]]))
    assert torch.allclose(pooled[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_lora_targets_every_attention_and_mlp_projection(family):
    e = Embedder.from_config(ModelConfig(path=f"tiny-{family}"), "cpu")
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in e.model.named_parameters() if "lora_A" in n}
    assert adapted == set(LORA_TARGETS[family]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"}
    assert all("lora" in n for n, p in e.model.named_parameters() if p.requires_grad)


def test_nf4_qlora_runs_on_cpu_with_finite_grads():
    pytest.importorskip("bitsandbytes")
    from embforge.engine import ContrastiveBatch, contrastive_step
    e = Embedder.from_config(ModelConfig(path="tiny-mistral", quantization="nf4"), "cpu")
    assert any("4bit" in type(m).__name__ for m in e.model.modules())
    batch = ContrastiveBatch(["q one", "q two"], ["Find", "Find"], ["d1", "n1", "d2", "n2"])
    res = contrastive_step(e, batch, chunk_tokens=8)
    grads = [p.grad for p in e.trainable_parameters() if p.grad is not None]
    assert res.n_chunks > 1 and grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_save_and_load_roundtrip(tmp_path, emb):
    texts = ["hello world", "another"]
    before = emb.encode(texts, instruction="Find")
    emb.save_pretrained(tmp_path / "m")
    loaded = Embedder.from_pretrained(tmp_path / "m", device="cpu")
    assert torch.allclose(loaded.encode(texts, instruction="Find"), before, atol=1e-5)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="quantization"):
        ModelConfig(quantization="int3").validate()
