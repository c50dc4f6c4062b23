"""`embforge export`: the embforge folder, the merged model and the sentence-transformers folder all embed like the
trained embedder (queries with the instruction, documents plain, long texts truncated with EOS kept last)."""
import json
import shutil

import pytest
import torch

from embforge.cli import main
from embforge.engine import Embedder, ModelConfig
from embforge.engine.export import ExportError, eos_appending_tokenizer, export, query_prompt
from embforge.engine.model import resolve_path

import sentence_transformers as st  # noqa: E402  (locked: a missing install must fail, not skip)

INSTR = "Given a question, retrieve the passage that answers it"
QUERIES = ["how do I sort a list", "what is a context manager?",
           "a long query " + "that keeps going " * 20]                        # longer than query_max_length
DOCS = ["sorted() returns a new sorted list", "The with statement runs __enter__ and __exit__.",
        "a very long document " + "with many repeated words " * 40]           # longer than doc_max_length


def _trained(tmp_path, seed=0, **model_kw):
    """A tiny-llama embedder with a non-trivial LoRA adapter, saved as a run's final folder."""
    cfg = ModelConfig(path=model_kw.pop("path", "tiny-llama"), query_max_length=64, doc_max_length=24, **model_kw)
    emb = Embedder.from_config(cfg, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in emb.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    emb.eval()
    emb.save_pretrained(tmp_path / "final")
    return emb


def _assert_st_matches(emb, st_dir):
    model = st.SentenceTransformer(str(st_dir), device="cpu")
    want_q, want_d = emb.encode(QUERIES, instruction=INSTR), emb.encode(DOCS)
    got_q = torch.as_tensor(model.encode_query(QUERIES))
    got_d = torch.as_tensor(model.encode_document(DOCS))
    assert got_q.shape == want_q.shape and got_d.shape == want_d.shape
    torch.testing.assert_close(got_q, want_q, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_d, want_d, atol=2e-5, rtol=1e-4)
    # sanity: the check would fail if the instruction were lost or truncation swallowed the queries
    assert torch.cdist(got_q, got_q).triu(1)[torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)].min() > 1e-3
    assert (got_q - emb.encode(QUERIES)).abs().max() > 1e-3
    return model


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_sentence_transformers_folder_reproduces_embforge_encode(tmp_path, pooling):
    emb = _trained(tmp_path, pooling=pooling)
    written = export(tmp_path / "final", tmp_path / "out", merge=True, sentence_transformers=True,
                     instruction=INSTR)
    model = _assert_st_matches(emb, written["sentence_transformers"])
    assert model.similarity_fn_name == "cosine"
    meta = json.loads((tmp_path / "out" / "sentence-transformers" / "embforge_export.json").read_text())
    assert meta["query_instruction"] == INSTR and meta["pooling"] == pooling
    # with --merge the export loads back into embforge from merged/ and embeds the same
    assert (tmp_path / "out" / "merged" / "config.json").exists()
    again = Embedder.from_pretrained(tmp_path / "out", device="cpu")
    assert not hasattr(again.model, "peft_config")
    torch.testing.assert_close(again.encode(DOCS), emb.encode(DOCS), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(again.encode(QUERIES, instruction=INSTR), emb.encode(QUERIES, instruction=INSTR),
                               atol=2e-5, rtol=1e-4)


def test_bos_adding_tokenizer_keeps_bos_and_gains_eos(tmp_path):
    """Llama/Mistral tokenizers put BOS in front: the export must keep it once and add EOS at the end."""
    from transformers import AutoTokenizer

    base = tmp_path / "bos-model"
    shutil.copytree(resolve_path("tiny-llama"), base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_bos_token = True  # transformers 5 persists BOS/EOS as these flags and rebuilds the post-processor
    tok.save_pretrained(base)
    assert AutoTokenizer.from_pretrained(base)("hi")["input_ids"][0] == tok.bos_token_id

    emb = _trained(tmp_path, path=str(base))
    fixed = eos_appending_tokenizer(emb.tokenizer)
    ids = fixed("hi there")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.bos_token_id) == 1
    written = export(tmp_path / "final", tmp_path / "out", sentence_transformers=True, instruction=INSTR)
    _assert_st_matches(emb, written["sentence_transformers"])


def test_cli_export_and_encode(tmp_path):
    emb = _trained(tmp_path)
    rc = main(["export", "--model", str(tmp_path / "final"), "--out", str(tmp_path / "exp"),
               "--sentence-transformers", "--instruction", INSTR])
    assert rc == 0
    (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n")
    assert main(["encode", "--model", str(tmp_path / "exp"), "--file", str(tmp_path / "docs.txt"),
                 "--out", str(tmp_path / "d.pt")]) == 0
    torch.testing.assert_close(torch.load(tmp_path / "d.pt"), emb.encode(DOCS), atol=2e-5, rtol=1e-4)
    model = st.SentenceTransformer(str(tmp_path / "exp" / "sentence-transformers"), device="cpu")
    torch.testing.assert_close(torch.as_tensor(model.encode_document(DOCS)), emb.encode(DOCS), atol=2e-5, rtol=1e-4)


def test_export_errors_are_clear(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "not an embforge model folder" in capsys.readouterr().err
    with pytest.raises(ExportError, match="text after"):
        query_prompt("Instruct: {instruction}\nQuery: {query}\nAnswer:", INSTR)
    assert query_prompt("Instruct: {instruction}\nQuery: {query}", "Find") == "Instruct: Find\nQuery: "
    _trained(tmp_path, query_template="{query} || {instruction}")
    with pytest.raises(ExportError, match="prefixes"):
        export(tmp_path / "final", tmp_path / "out", sentence_transformers=True, instruction=INSTR)
