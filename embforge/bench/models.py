"""Mistral-shaped models with random weights, built from code (nothing to download on the benchmark machine).

A model is written once as a HF folder (config, safetensors, the synthetic tokenizer) so that the trainer and the
sentence-transformers peer load it through their ordinary paths (`Embedder.from_config`, ST's Transformer module),
with their own quantization and LoRA: the benchmark measures what users run, not a hand-assembled twin.
On CUDA the weights are initialized in bf16 directly on the GPU (a 7B model never exists as 28 GB of fp32 anywhere,
and the GPU draws 7B random numbers in seconds); on CPU in fp32.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from embforge.bench import synthetic
from embforge.engine.precision import auto_dtype

# name -> MistralConfig fields. "7b": Mistral-7B (v0.2/v0.3 layout: no sliding window). The small ones keep its
# proportions (GQA 4:1, intermediate 3.5x hidden) at CI size.
SHAPES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=32000),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                  intermediate_size=448, vocab_size=2048),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                 intermediate_size=224, vocab_size=512),
}


def mistral_config(shape: str):
    from transformers import MistralConfig
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {sorted(SHAPES)}")
    return MistralConfig(**SHAPES[shape], max_position_embeddings=32768, rope_theta=1e6, sliding_window=None,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)


def _stamp(shape: str, dtype: torch.dtype, seed: int) -> dict:
    return {"shape": shape, "fields": SHAPES[shape], "dtype": str(dtype), "seed": seed}


def random_model_dir(shape: str, directory: str | Path, device: str = "cpu", seed: int = 0) -> Path:
    """Write (or reuse) a HF folder with a random-weight Mistral of `shape` and the synthetic tokenizer.
    The folder is reused only when its stamp (shape, dtype, seed) matches, so a stale model is never measured."""
    from transformers import MistralModel
    directory = Path(directory)
    dtype = auto_dtype(device)
    stamp = _stamp(shape, dtype, seed)
    stamp_file = directory / "embforge_bench_stamp.json"
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    stamp_file.unlink(missing_ok=True)
    cfg = mistral_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = MistralModel._from_config(cfg, dtype=dtype)  # random init runs where the weights live
    model.to("cpu").save_pretrained(directory)  # bf16 on the host: 14.5 GB for 7B, saved by the tested CPU path
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    synthetic.save_tokenizer(cfg.vocab_size, directory)
    stamp_file.write_text(json.dumps(stamp))  # last: a half-written folder has no stamp
    return directory
