"""`model.attention`: an early token sees later tokens only when bidirectional, for sdpa and eager, padded and
unpadded; the setting survives save / load / merged export; the sentence-transformers export refuses it."""
import json

import pytest
import torch

from embforge.engine import Embedder, ModelConfig
from embforge.engine.attention import attention_mode, check_bidirectional, set_attention
from embforge.engine import ContrastiveBatch, contrastive_step


def _first_token_states(emb, ids_a, ids_b, pad_to=None):
    """Hidden state of token 0 for two sequences (optionally right-padded to `pad_to`), in one batch."""
    seqs = [ids_a, ids_b]
    width = pad_to or max(map(len, seqs))
    ids = torch.tensor([s + [emb.tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        base = emb.model.get_base_model() if hasattr(emb.model, "get_base_model") else emb.model
        return base(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_first_token_depends_on_later_tokens_only_when_bidirectional(family, impl):
    a, b = [21, 22, 23, 24], [21, 22, 23, 99]            # differ only in the last token
    for mode in ("causal", "bidirectional"):
        emb = Embedder.from_config(ModelConfig(path=f"tiny-{family}", attention=mode, attn_implementation=impl,
                                               lora=None), "cpu")
        emb.eval()
        assert attention_mode(emb.model) == mode
        for pad_to in (None, 6):                          # unpadded (sdpa gets no mask) and padded
            h = _first_token_states(emb, a, b, pad_to)
            differs = not torch.allclose(h[0], h[1], atol=1e-6)
            assert differs == (mode == "bidirectional"), (family, impl, mode, pad_to)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bidirectional_embedding_does_not_depend_on_padding(impl):
    cfg = ModelConfig(path="tiny-llama", attention="bidirectional", attn_implementation=impl, pooling="mean",
                      lora=None)
    emb = Embedder.from_config(cfg, "cpu")
    texts = ["short text", "a much longer text that forces padding on the short one"]
    together = emb.encode(texts)
    alone = torch.cat([emb.encode([t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    # and the padding really is masked: pad tokens do not leak into the short text's states
    assert not torch.allclose(together[0], together[1])


def test_training_step_save_load_and_merged_export_keep_bidirectional(tmp_path):
    from embforge.engine.export import export

    cfg = ModelConfig(path="tiny-llama", attention="bidirectional", pooling="mean", query_max_length=16,
                      doc_max_length=16)
    emb = Embedder.from_config(cfg, "cpu")
    emb.model.train()
    batch = ContrastiveBatch(["q one", "q two"], [None, None], ["doc one", "doc two"])
    res = contrastive_step(emb, batch, temperature=0.05)
    assert res.loss > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.trainable_parameters())
    with torch.no_grad():
        for n, p in emb.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    emb.eval()
    want = emb.encode(["check this text", "and another one"])
    emb.save_pretrained(tmp_path / "final")
    assert json.loads((tmp_path / "final" / "embforge_config.json").read_text())["model"]["attention"] == \
        "bidirectional"
    loaded = Embedder.from_pretrained(tmp_path / "final", "cpu")
    assert attention_mode(loaded.model) == "bidirectional"
    torch.testing.assert_close(loaded.encode(["check this text", "and another one"]), want, atol=1e-5, rtol=1e-4)
    from embforge.cli.eval import load_heldout_model    # evaluation folds the adapter in: same embeddings
    for_eval = load_heldout_model(str(tmp_path / "final"))
    fp32 = all(p.dtype == torch.float32 for p in loaded.model.parameters())    # dtype auto: bf16 stays unmerged
    assert hasattr(for_eval.model, "peft_config") != fp32 and attention_mode(for_eval.model) == "bidirectional"
    torch.testing.assert_close(for_eval.encode(["check this text", "and another one"]), want, atol=1e-5, rtol=1e-4)

    written = export(tmp_path / "final", tmp_path / "out", merge=True, sentence_transformers=True,
                     instruction="find it")
    merged = Embedder.from_pretrained(tmp_path / "out", "cpu")
    assert attention_mode(merged.model) == "bidirectional"
    torch.testing.assert_close(merged.encode(["check this text", "and another one"]), want, atol=1e-4, rtol=1e-3)
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(written["sentence_transformers"], device="cpu")
    for texts in (["check this text", "and another one"], ["check this text"]):   # padded and unpadded batches
        got = torch.as_tensor(model.encode_document(texts))
        torch.testing.assert_close(got, want[: len(texts)], atol=1e-4, rtol=1e-3)


def test_sentence_transformers_export_refuses_a_folder_that_would_load_causal(tmp_path, monkeypatch):
    from embforge.engine import attention, export as export_mod

    emb = Embedder.from_config(ModelConfig(path="tiny-llama", attention="bidirectional"), "cpu")
    emb.save_pretrained(tmp_path / "final")

    real, calls = attention.check_bidirectional, []

    def stays_causal_after_reload(model, pad_id=0):
        """The export's own load passes; the sentence-transformers reload (2nd probe) acts as an older
        transformers that ignores is_causal would."""
        calls.append(type(model).__name__)
        if len(calls) > 1:
            raise RuntimeError("no effect")
        real(model, pad_id)
    monkeypatch.setattr(attention, "check_bidirectional", stays_causal_after_reload)
    with pytest.raises(export_mod.ExportError, match="would load with causal attention"):
        export_mod.export(tmp_path / "final", tmp_path / "out", sentence_transformers=True)
    assert len(calls) == 2


def test_the_load_check_catches_a_model_that_stayed_causal():
    emb = Embedder.from_config(ModelConfig(path="tiny-llama", lora=None), "cpu")
    with pytest.raises(RuntimeError, match="no effect"):
        check_bidirectional(emb.model)                    # a causal model fails the probe
    set_attention(emb.model, "bidirectional")
    check_bidirectional(emb.model)
    assert not any(getattr(m, "is_causal", False) for m in emb.model.modules())
    set_attention(emb.model, "causal")
    with pytest.raises(RuntimeError, match="no effect"):
        check_bidirectional(emb.model)
    with pytest.raises(ValueError, match="attention must be one of"):
        set_attention(emb.model, "sideways")
    with pytest.raises(ValueError, match="model.attention"):
        ModelConfig(attention="sideways").validate()
