"""The embedder: an HF decoder without LM head, optional nf4 base weights, LoRA, last-token (or mean) pooling.

Text handling (embforge/engine/text.py) follows E5-mistral: instruction template on queries, truncation then EOS,
and the embedding is the hidden state at that EOS, found from the attention mask (pad is often EOS itself).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embforge.engine.checks import check_model_path
from embforge.engine.precision import resolve_dtype
from embforge.engine.text import DEFAULT_QUERY_TEMPLATE, check_template, format_query, pad_batch, tokenize_texts
from embforge.kernels import last_token_pool, mean_pool

# peft asks every model whether it checkpoints through transformers' deprecated alias, and transformers warns on each
# call: nothing the user did or can change. Only that message, category and module are silenced.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")

# Every attention AND MLP projection, per family. Named per family on purpose: GritLM reused Mixtral's expert names
# (w1/w2/w3) for Mistral and so never adapted Mistral's MLP. from_config checks each name exists in the model.
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = {family: list(_LLAMA_LIKE) for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")}


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: list[str] | str = "auto"   # "auto": every attention and MLP projection of the model's family
    # Which decoder layers get adapters: null = all, a list of indices, or "top:N" (the last N). Adapting only the
    # top layers stops the backward pass there (SmolLM2's top 15 of 30: a CPU demo step ~1.5x faster), but with
    # bidirectional attention the unadapted lower layers cannot adjust to it: the demo then barely learned
    # (bench/results/demo_cpu.md). A lever for causal models and for speed studies, not the default.
    layers: list[int] | str | None = None

    def validate(self):
        if self.r < 1:
            raise ValueError(f"model.lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must lie in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) and self.targets != "auto":
            raise ValueError(f"model.lora.targets must be 'auto' or a list of module names, got {self.targets!r}")
        if isinstance(self.layers, str):
            n = self.layers[len("top:"):] if self.layers.startswith("top:") else ""
            if not (n.isdigit() and int(n) >= 1):
                raise ValueError(f"model.lora.layers must be null, a list of layer indices or 'top:N' (N >= 1), "
                                 f"got {self.layers!r}")
        elif isinstance(self.layers, list) and (not self.layers or any(i < 0 for i in self.layers)):
            raise ValueError(f"model.lora.layers: a list must hold layer indices >= 0, got {self.layers!r}")


def lora_layers(model, requested) -> list[int] | None:
    """The decoder layer indices that get adapters (None: all), checked against the model's depth."""
    if requested is None:
        return None
    depth = model.config.num_hidden_layers
    if isinstance(requested, str):   # "top:N", validated
        n = int(requested[len("top:"):])
        if n > depth:
            raise ValueError(f"model.lora.layers: {requested!r} asks for more layers than this model has ({depth})")
        return list(range(depth - n, depth))
    bad = [i for i in requested if i >= depth]
    if bad:
        raise ValueError(f"model.lora.layers: {bad} out of range: this model has layers 0..{depth - 1}")
    return sorted(set(requested))


def peft_lora_config(model, lora: LoraConfig):
    """peft's LoraConfig for `lora` on this model (targets and layers checked against it): training and
    `embforge merge` (which re-creates a checkpoint's adapter) build adapters the same way."""
    from peft import LoraConfig as PeftLoraConfig

    targets = lora_targets(model, lora.targets)
    layers = lora_layers(model, lora.layers)
    # layers_pattern "layers": the decoder stack of every family we support is <model>.layers.
    where = {} if layers is None else {"layers_to_transform": layers, "layers_pattern": "layers"}
    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          bias="none", **where)



def read_model_meta(meta_file: Path, error=ValueError) -> dict:
    """A saved model's embforge_config.json; a malformed one raises `error` naming file:line or the missing key."""
    try:
        meta = json.loads(Path(meta_file).read_text())
    except json.JSONDecodeError as e:
        raise error(f"{meta_file}:{e.lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(meta, dict) or "model" not in meta:
        raise error(f"{meta_file}: missing key 'model'")
    return meta

@dataclass
class ModelConfig:
    path: str = "smollm2"               # "smollm2" = the offline SmolLM2-135M asset, "tiny-<family>" = random test
                                        # decoder; else a local dir or hub id
    dtype: str = "auto"                 # auto: bf16 on CUDA and on CPUs with native bf16, else fp32 (precision.py)
    quantization: str = "none"          # none | nf4 (bitsandbytes 4-bit, double quantization)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False  # always non-reentrant
    attn_implementation: str = "auto"   # auto: flash_attention_2 when flash-attn is importable (CUDA), else sdpa
    pooling: str = "last"               # last | mean
    attention: str = "causal"           # causal | bidirectional (llama/mistral/qwen2; embforge/engine/attention.py)
    query_template: str = DEFAULT_QUERY_TEMPLATE
    query_max_length: int = 512         # tokens including the appended EOS
    doc_max_length: int = 512
    rope_theta: float | None = None     # long-context override (E5 passkey: 1e5 with a 32k window)
    padding_side: str = "right"         # left and right give the same embeddings (pooling is by mask)
    liger: bool = False                 # Liger-Kernel RMSNorm/RoPE/SwiGLU (llama, mistral, qwen2; CUDA only)

    def validate(self):
        choices = {"quantization": ("none", "nf4"), "pooling": ("last", "mean"),
                   "attention": ("causal", "bidirectional"),
                   "dtype": ("auto", "float32", "bfloat16", "float16"), "padding_side": ("left", "right"),
                   "attn_implementation": ("auto", "sdpa", "flash_attention_2", "eager")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("query_max_length", "doc_max_length"):
            if getattr(self, name) < 2:
                raise ValueError(f"model.{name} must be >= 2 (one token plus EOS), got {getattr(self, name)}")
        if self.rope_theta is not None and not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        check_template(self.query_template)
        check_model_path(self.path)
        if self.lora is not None:
            self.lora.validate()


def resolve_path(path: str) -> str:
    """The offline shorthands: "smollm2" and "tiny-llama" / "tiny-mistral" / "tiny-qwen2"."""
    if path == "smollm2":
        from embforge.engine.assets import smollm2_dir
        return str(smollm2_dir())
    if path.startswith("tiny-"):
        from embforge.engine.assets import tiny_decoder_dir
        return str(tiny_decoder_dir(path[len("tiny-"):]))
    return path


def _attn_impl(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """auto: flash-attn when importable on CUDA, else torch's own varlen flash kernel (SDPA for padded chunks,
    varlen for packed ones: embforge/engine/packing.py), else SDPA."""
    if name != "auto":
        return name
    if device.type == "cuda" and dtype != torch.float32:
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        from embforge.engine import packing
        if packing.torch_varlen_available():
            packing.register_varlen_attention()
            return packing.VARLEN_ATTENTION
    return "sdpa"


def lora_targets(model, requested) -> list[str]:
    """Target module names, checked against the model: each must name at least one linear layer."""
    model_type = model.config.model_type
    if requested == "auto":
        if model_type not in LORA_TARGETS:
            raise ValueError(f"model.lora.targets: no default LoRA targets for model family {model_type!r} "
                             f"(known: {sorted(LORA_TARGETS)}); list its attention and MLP projections explicitly")
        requested = LORA_TARGETS[model_type]
    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    missing = [t for t in requested if t not in linear]
    if missing:
        raise ValueError(f"model.lora.targets: {missing} name no linear layer of this {model_type} model "
                         f"(its linear layers: {sorted(linear)})")
    return list(requested)


def _keep_bnb_cpu_weights_trainable(model):
    """bitsandbytes (0.50) repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel the first time the layer
    runs in eval mode without grad (e.g. `encode`), and from then on always calls that kernel, which has no
    autograd: gradients through the frozen base weights are silently dropped and LoRA gradients come out wrong
    (measured: 25% relative error on a tiny Mistral). Training needs the differentiable path, so turn it off."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def _checkpointing(model, enabled: bool):
    """Non-reentrant activation checkpointing: reentrant checkpointing with LoRA has been reported at over 2x cost,
    and only the reentrant variant needs inputs that require grad. transformers (and peft) still hook the embedding
    output to require grad, a reentrant-era workaround that only adds a backward through layer 0 to the input:
    removed after each of them, since each call forgets the hooks of the one before."""
    new_api = hasattr(model, "activation_checkpointing_enable")   # transformers >= 5.2x; older: gradient_...
    kwargs = {"use_reentrant": False}
    if not enabled:
        (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
    elif new_api:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if enabled:
        model.disable_input_require_grads()


class Embedder(torch.nn.Module):
    """Decoder backbone + pooling. `forward_tokens` gives raw pooled states (the loss normalizes, fused);
    `encode` gives L2-normalized fp32 embeddings without grad. Train/eval mode is the caller's: LoRA dropout is
    active only after `.train()` (HF loads models in eval mode)."""

    def __init__(self, model, tokenizer, config: ModelConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; last-token pooling needs one")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # pooling is by mask, so pad == eos is harmless
        self.set_packing("auto")

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_config(cls, cfg: ModelConfig, device: str | torch.device | None = None) -> "Embedder":
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        from embforge.engine.modelfiles import check_model_files

        cfg.validate()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        path = check_model_files(cfg.path)     # one line naming model.path when it cannot load
        dtype = resolve_dtype(cfg.dtype, device)
        hf_cfg = AutoConfig.from_pretrained(path)
        if cfg.rope_theta is not None:
            from embforge.engine.rope import rope_override
            rope_override(hf_cfg, rope_theta=cfg.rope_theta)
        kwargs = dict(config=hf_cfg, dtype=dtype, attn_implementation=_attn_impl(cfg.attn_implementation, device,
                                                                                   dtype))
        if cfg.quantization == "nf4":
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ImportError("model.quantization=nf4 needs bitsandbytes: "
                                  "pip install -c constraints.txt bitsandbytes")
            from transformers import BitsAndBytesConfig
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
            kwargs["device_map"] = {"": str(device)}  # quantize straight onto the device, never a full-size copy
        model = AutoModel.from_pretrained(path, **kwargs)
        if cfg.quantization != "nf4":
            model.to(device)
        else:
            _keep_bnb_cpu_weights_trainable(model)
        if cfg.attention != "causal":
            from embforge.engine.attention import check_bidirectional, set_attention
            set_attention(model, cfg.attention)
            check_bidirectional(model)
        if cfg.liger:
            from embforge.engine.liger import apply_liger
            apply_liger(model, device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(cls._wrap(model, cfg), tokenizer, cfg)

    @staticmethod
    def _wrap(model, cfg: ModelConfig):
        """Freeze the base, optional non-reentrant checkpointing, LoRA on every projection.

        Deliberately not peft's prepare_model_for_kbit_training: it casts every bf16 parameter (embeddings, norms)
        to fp32, which makes the norms emit fp32, so q/k/v and attention run in fp32 (no flash attention, twice the
        activation memory). bf16 residuals are what the model was trained with; RMSNorm already reduces in fp32.
        """
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            _checkpointing(model, True)
        if cfg.lora is None:
            return model
        from peft import get_peft_model

        peft_model = get_peft_model(model, peft_lora_config(model, cfg.lora))
        if cfg.gradient_checkpointing:
            model.disable_input_require_grads()   # peft hooks the input again (see _checkpointing)
        return peft_model

    def set_gradient_checkpointing(self, enabled: bool):
        """Switch non-reentrant checkpointing on or off in place (e.g. a benchmark lever), without a reload."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        _checkpointing(base, enabled)
        self.config = dataclasses.replace(self.config, gradient_checkpointing=enabled)

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, *, quantization: str | None = None,
                        dtype: str | None = None) -> "Embedder":
        """Load a folder written by `save_pretrained` (base model reference + LoRA adapter), in eval mode.
        `quantization` / `dtype` override what the run trained with (export loads the base unquantized)."""
        from embforge.config import build_dataclass

        path = Path(path)
        meta_file = path / "embforge_config.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"{path} is not an embforge model folder (no embforge_config.json)")
        meta = read_model_meta(meta_file)
        if meta.get("merged") and isinstance(meta["model"], dict):
            meta["model"]["path"] = str(path / "merged")   # self-contained: the base it names is not needed
        elif isinstance(meta["model"].get("path"), str):
            from embforge.engine.baseref import locate_base
            meta["model"]["path"] = locate_base(meta["model"]["path"], path)
        cfg = build_dataclass(ModelConfig, meta["model"], prefix="model.")
        from embforge.engine.modelfiles import check_model_files
        check_model_files(cfg.path)      # a base that cannot load is one line, before anything loads
        overrides = {k: v for k, v in (("quantization", quantization), ("dtype", dtype)) if v is not None}
        cfg = dataclasses.replace(cfg, **overrides)
        if cfg.liger and torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type != "cuda":
            cfg = dataclasses.replace(cfg, liger=False)  # same math, kernels only: load a GPU-trained model anywhere
        if meta.get("merged"):
            cfg = dataclasses.replace(cfg, path=str(path / "merged"), lora=None, quantization="none")
            emb = cls.from_config(cfg, device)
        else:
            emb = cls.from_config(dataclasses.replace(cfg, lora=None), device)
            if (path / "adapter").exists():
                from peft import PeftModel
                emb.model = PeftModel.from_pretrained(emb.model, str(path / "adapter"))
                emb.config = cfg
        emb.eval()
        return emb

    def save_pretrained(self, out_dir: str | Path, *, adapter_state_dict: dict | None = None) -> Path:
        """Adapter + tokenizer + the model config (the base named as the user named it: engine/baseref.py).
        adapter_state_dict: full LoRA tensors by parameter name, when the parameters themselves are sharded (FSDP2)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.save_adapter(out / "adapter", state_dict=adapter_state_dict)
        meta = {"model": dataclasses.asdict(self.config), "merged": False}
        from embforge.engine.baseref import base_reference
        meta["model"]["path"] = base_reference(self.config.path, out)
        (out / "embforge_config.json").write_text(json.dumps(meta, indent=2))
        self.tokenizer.save_pretrained(out / "tokenizer")
        return out

    def save_adapter(self, out_dir: str | Path, state_dict: dict | None = None):
        if not hasattr(self.model, "peft_config"):
            raise ValueError("this embedder has no LoRA adapter to save")
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        self.model.save_pretrained(str(out_dir), safe_serialization=True, **kwargs)

    # ---------------------------------------------------------------------------------------------- text
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def format_query(self, query: str, instruction: str | None) -> str:
        return format_query(self.config.query_template, query, instruction)

    def tokenize(self, texts: list[str], *, is_query: bool, instructions=None) -> list[list[int]]:
        """Token ids per text: template (queries with an instruction), truncation, then EOS appended."""
        texts = list(texts)
        if is_query:
            instructions = list(instructions) if instructions is not None else [None] * len(texts)
            if len(instructions) != len(texts):
                raise ValueError(f"{len(texts)} queries but {len(instructions)} instructions")
            texts = [self.format_query(t, i) for t, i in zip(texts, instructions)]
        max_len = self.config.query_max_length if is_query else self.config.doc_max_length
        return tokenize_texts(self.tokenizer, texts, max_len)

    def set_packing(self, mode: bool | str = "auto"):
        """Padding-free packed chunks (true), padded chunks (false), or "auto": packed wherever it is exact and
        a varlen kernel skips the cross-sequence blocks (embforge/engine/packing.py). Used by embed_chunk, so by
        training, encode and eval alike."""
        from embforge.engine import packing
        self.packing = packing.resolve_packing(mode, self)
        self.packed_kernel = packing.packed_kernel(self.model.config._attn_implementation, self.device)

    def collate(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad to the longest sequence in this group only (per-chunk padding), on the model's device."""
        return pad_batch(seqs, self.tokenizer.pad_token_id, self.config.padding_side, self.device)

    # ---------------------------------------------------------------------------------------------- compute
    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw pooled hidden states [b, H] in fp32 (not normalized: the loss normalizes, fused)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pool = mean_pool if self.config.pooling == "mean" else last_token_pool
        return pool(hidden, attention_mask, normalize=False, out_dtype=torch.float32)

    def embed_chunk(self, seqs: list[list[int]]) -> torch.Tensor:
        """Raw pooled fp32 embeddings [b, H] of token sequences run through the decoder at once: one packed row
        when `self.packing`, else padded to the longest of them."""
        if self.packing:
            from embforge.engine.packing import embed_packed
            return embed_packed(self, seqs)
        return self.forward_tokens(*self.collate(seqs))

    @torch.no_grad()
    def encode(self, texts: list[str], *, instruction: str | None = None, is_query: bool | None = None,
               batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """L2-normalized fp32 embeddings [n, H] on CPU, in eval mode (restored after). Queries (`is_query`,
        default: an instruction is given) get the template."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if is_query is None:
            is_query = instruction is not None
        seqs = self.tokenize(list(texts), is_query=is_query,
                             instructions=[instruction] * len(texts) if is_query else None)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # length-sorted: little padding
        out = torch.empty(len(seqs), self.hidden_size, dtype=torch.float32)
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="encode", unit="batch")
        was_training = self.model.training
        self.model.eval()
        try:
            for start in starts:
                idx = order[start: start + batch_size]
                emb = self.embed_chunk([seqs[i] for i in idx])
                out[idx] = torch.nn.functional.normalize(emb, dim=-1).cpu()
        finally:
            self.model.train(was_training)
        return out

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
