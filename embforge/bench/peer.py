"""The peer: sentence-transformers' CachedMultipleNegativesRankingLoss on the same backbone, LoRA, quantization,
data and effective batch, called directly (loss(features, labels).backward(), then the optimizer), no Trainer.

The model is built the way an ST user builds a decoder embedder: a Transformer module loading the same HF folder
(with the same BitsAndBytesConfig), last-token Pooling, Normalize, and the same peft LoRA added with add_adapter.
Texts are the ones our step sees: queries already in the instruction template, EOS appended, because ST's
tokenizer call adds no EOS for this tokenizer.
"""
from __future__ import annotations

import importlib.util
import inspect

import torch


def _st_modules():
    try:  # sentence-transformers >= 6 layout
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # older layout
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


def lora_config(r: int, alpha: int, dropout: float):
    from peft import LoraConfig
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def flash_available(device: str) -> bool:
    """ST's padding-free mode (inputs flattened by DataCollatorWithFlattening, varlen flash attention) needs
    flash attention from flash-attn or the `kernels` package, on CUDA, in half precision."""
    return torch.device(device).type == "cuda" and any(
        importlib.util.find_spec(m) is not None for m in ("flash_attn", "kernels"))


def peer_mode(st, token_budget: bool) -> str:
    """Which of ST's configurations ran, for the row: flattened (padding-free) or padded inputs; token-budget
    or fixed-size mini-batches."""
    flat = bool(getattr(st[0], "can_flatten_inputs", False))
    return f"{'flattened' if flat else 'padded'}+{'mini_batch_num_tokens' if token_budget else 'mini_batch_size'}"


def build_st_model(model_dir, *, device: str, dtype: torch.dtype, quantization: str, gradient_checkpointing: bool,
                   max_length: int, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05):
    from sentence_transformers import SentenceTransformer
    Transformer, Pooling, Normalize = _st_modules()
    # Its strongest configuration: flash attention (then ST packs its inputs padding-free) where installed.
    attn = "flash_attention_2" if flash_available(device) and dtype != torch.float32 else "sdpa"
    model_kwargs = {"dtype": dtype, "attn_implementation": attn}
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model_kwargs["device_map"] = {"": device}
    transformer = Transformer(str(model_dir), model_kwargs=model_kwargs, max_seq_length=max_length)
    dim = transformer.auto_model.config.hidden_size
    st = SentenceTransformer(modules=[transformer, Pooling(dim, pooling_mode="lasttoken"), Normalize()],
                             device=device)
    st.add_adapter(lora_config(lora_r, lora_alpha, lora_dropout))
    if gradient_checkpointing:
        st[0].auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    st.train()
    return st


def trainable_parameters(st) -> list[torch.nn.Parameter]:
    return [p for p in st.parameters() if p.requires_grad]


def make_loss(st, *, temperature: float, mini_batch_size: int, mini_batch_num_tokens: int | None = None):
    try:
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss
    kwargs = {"scale": 1.0 / temperature, "mini_batch_size": mini_batch_size}
    if mini_batch_num_tokens is not None:
        if "mini_batch_num_tokens" not in inspect.signature(CachedMultipleNegativesRankingLoss).parameters:
            raise RuntimeError("this sentence-transformers has no mini_batch_num_tokens")
        kwargs["mini_batch_num_tokens"] = mini_batch_num_tokens
    return CachedMultipleNegativesRankingLoss(st, **kwargs)


def features(st, queries: list[str], instructions: list[str], documents: list[str], docs_per_query: int,
             query_template: str, device) -> list[dict]:
    """ST's (anchor, positive, negative_1..) columns, each tokenized and padded as its collator would."""
    eos = st.tokenizer.eos_token
    anchors = [query_template.format(instruction=i, query=q) + " " + eos for q, i in zip(queries, instructions)]
    columns = [anchors] + [[d + " " + eos for d in documents[g::docs_per_query]] for g in range(docs_per_query)]
    out = []
    for texts in columns:
        f = st.tokenize(texts)
        out.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()})
    return out
