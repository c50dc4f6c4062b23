"""The embedder: an HF decoder without LM head, optional nf4 base weights, LoRA, last-token (or mean) pooling.

Text handling follows E5-mistral: queries become `Instruct: {instruction}\\nQuery: {query}`, documents stay plain;
each sequence is truncated, then EOS is appended, and the embedding is the hidden state at that EOS. Mistral's pad
token is often EOS, so pooling finds the last real token from the attention mask, never by token id.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embforge.kernels import last_token_pool, mean_pool

DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {query}"
# Every attention AND MLP projection, per family (GritLM adapted Mixtral names and so never touched Mistral's MLP).
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] | str = "auto"   # "auto": every attention and MLP projection of the model's family


@dataclass
class ModelConfig:
    path: str = "smollm2"               # "smollm2" = the offline SmolLM2-135M asset; else a local dir or hub id
    dtype: str = "auto"                 # auto: bf16 on CUDA, fp32 on CPU
    quantization: str = "none"          # none | nf4 (bitsandbytes 4-bit, double quantization)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"   # auto: flash_attention_2 when flash-attn is importable, else sdpa
    pooling: str = "last"               # last | mean
    query_template: str = DEFAULT_QUERY_TEMPLATE
    query_max_length: int = 512
    doc_max_length: int = 512
    rope_theta: float | None = None     # long-context override (E5 passkey: 1e5 with a 32k window)
    padding_side: str = "right"

    def validate(self):
        if self.quantization not in ("none", "nf4"):
            raise ValueError(f"model.quantization must be 'none' or 'nf4', got {self.quantization!r}")
        if self.pooling not in ("last", "mean"):
            raise ValueError(f"model.pooling must be 'last' or 'mean', got {self.pooling!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be auto/float32/bfloat16/float16, got {self.dtype!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"model.padding_side must be left or right, got {self.padding_side!r}")
        if "{query}" not in self.query_template:
            raise ValueError("model.query_template must contain {query}")


def resolve_path(path: str) -> str:
    if path == "smollm2":
        from embforge.engine.assets import smollm2_dir
        return str(smollm2_dir())
    if path.startswith("tiny-"):  # tiny-llama / tiny-mistral / tiny-qwen2: random test decoders
        from embforge.engine.assets import tiny_decoder_dir
        return str(tiny_decoder_dir(path[len("tiny-"):]))
    return path


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _attn_impl(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def lora_targets(model_type: str, requested) -> list[str]:
    if requested != "auto":
        return list(requested)
    if model_type not in LORA_TARGETS:
        raise ValueError(f"no default LoRA targets for model family {model_type!r}; set model.lora.targets "
                         f"(known families: {sorted(LORA_TARGETS)})")
    return LORA_TARGETS[model_type]


class Embedder(torch.nn.Module):
    """Decoder backbone + pooling. `forward_tokens` gives raw pooled states (the loss normalizes);
    `encode` gives L2-normalized fp32 embeddings without grad."""

    def __init__(self, model, tokenizer, config: ModelConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; last-token pooling needs one")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # pooling is by mask, so pad == eos is harmless

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_config(cls, cfg: ModelConfig, device: str | torch.device | None = None) -> "Embedder":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = resolve_path(cfg.path)
        dtype = _torch_dtype(cfg.dtype, device)
        hf_cfg = AutoConfig.from_pretrained(path)
        if cfg.rope_theta is not None:
            from embforge.eval.passkey import rope_override
            rope_override(hf_cfg, rope_theta=cfg.rope_theta)
        kwargs = dict(config=hf_cfg, dtype=dtype, attn_implementation=_attn_impl(cfg.attn_implementation, device))
        if cfg.quantization == "nf4":
            from transformers import BitsAndBytesConfig
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
            kwargs["device_map"] = {"": device}
        model = AutoModel.from_pretrained(path, **kwargs)
        if cfg.quantization != "nf4":
            model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = cls._wrap(model, cfg)
        return cls(model, tokenizer, cfg)

    @staticmethod
    def _wrap(model, cfg: ModelConfig):
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            # Non-reentrant: reentrant checkpointing with LoRA has been reported at over 2x cost and needs inputs
            # that require grad.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            targets = lora_targets(model.config.model_type, cfg.lora.targets)
            names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
            missing = [t for t in targets if t not in names]
            if missing:
                raise ValueError(f"LoRA targets {missing} not found in {model.config.model_type} modules")
            model = get_peft_model(model, PeftLoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=targets, bias="none"))
        else:
            for p in model.parameters():
                p.requires_grad_(False)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None) -> "Embedder":
        """Load a folder written by `save_pretrained` (base model reference + LoRA adapter)."""
        from embforge.config import build_dataclass

        path = Path(path)
        meta_file = path / "embforge_config.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{path} is not an embforge model folder (no embforge_config.json)")
        meta = json.loads(meta_file.read_text())
        cfg = build_dataclass(ModelConfig, meta["model"])
        adapter = path / "adapter"
        if meta.get("merged"):
            cfg = dataclasses.replace(cfg, path=str(path / "merged"), lora=None, quantization="none")
            return cls.from_config(cfg, device)
        emb = cls.from_config(dataclasses.replace(cfg, lora=None), device)
        if adapter.exists():
            from peft import PeftModel
            emb.model = PeftModel.from_pretrained(emb.model, str(adapter))
            emb.config = cfg
        emb.eval()
        return emb

    def save_pretrained(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.save_adapter(out / "adapter")
        meta = {"model": dataclasses.asdict(self.config), "merged": False}
        meta["model"]["path"] = resolve_path(self.config.path)
        (out / "embforge_config.json").write_text(json.dumps(meta, indent=2))
        self.tokenizer.save_pretrained(out / "tokenizer")
        return out

    def save_adapter(self, out_dir: str | Path):
        if not hasattr(self.model, "peft_config"):
            raise ValueError("this embedder has no LoRA adapter to save")
        self.model.save_pretrained(str(out_dir), safe_serialization=True)

    # ---------------------------------------------------------------------------------------------- text
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def format_query(self, query: str, instruction: str | None) -> str:
        if not instruction:
            return query
        return self.config.query_template.format(instruction=instruction, query=query)

    def tokenize(self, texts: list[str], *, is_query: bool, instructions=None) -> list[list[int]]:
        """Token ids per text: template (queries with an instruction), truncation, then EOS appended."""
        if is_query:
            instructions = instructions if instructions is not None else [None] * len(texts)
            if len(instructions) != len(texts):
                raise ValueError(f"{len(texts)} queries but {len(instructions)} instructions")
            texts = [self.format_query(t, i) for t, i in zip(texts, instructions)]
        max_len = self.config.query_max_length if is_query else self.config.doc_max_length
        eos = self.tokenizer.eos_token_id
        out = []
        for ids in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            out.append(ids[: max_len - 1] + [eos])
        return out

    def collate(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to the longest sequence in this group only (per-chunk padding)."""
        T = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            if self.config.padding_side == "right":
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            else:
                ids[i, T - len(s):] = torch.tensor(s)
                mask[i, T - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ---------------------------------------------------------------------------------------------- compute
    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw pooled hidden states [b, H] in fp32 (not normalized: the loss normalizes, fused)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.config.pooling == "mean":
            return mean_pool(hidden, attention_mask, normalize=False, out_dtype=torch.float32)
        return last_token_pool(hidden, attention_mask, normalize=False, out_dtype=torch.float32)

    @torch.no_grad()
    def encode(self, texts: list[str], *, instruction: str | None = None, is_query: bool | None = None,
               batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """L2-normalized fp32 embeddings [n, H] on CPU. Queries (an instruction given) get the template."""
        if is_query is None:
            is_query = instruction is not None
        was_training = self.model.training
        self.model.eval()
        seqs = self.tokenize(list(texts), is_query=is_query,
                             instructions=[instruction] * len(texts) if is_query else None)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # length-sorted: little padding
        out = torch.empty(len(seqs), self.hidden_size, dtype=torch.float32)
        it = range(0, len(order), batch_size)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="encode", unit="batch")
        for start in it:
            idx = order[start: start + batch_size]
            ids, mask = self.collate([seqs[i] for i in idx])
            emb = self.forward_tokens(ids, mask)
            out[idx] = torch.nn.functional.normalize(emb, dim=-1).cpu()
        self.model.train(was_training)
        return out

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]
