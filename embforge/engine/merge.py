"""`embforge merge`: weight-space merging of LoRA models trained from one base (model soups, LM-Cocktail,
Qwen3-Embedding's checkpoint merging).

A LoRA model is the base plus, per adapted matrix, a delta  D = scale * B @ A  (peft's own `get_delta_weight`).
Models are merged on those deltas, matrix by matrix; A and B are never averaged separately: mean(B) @ mean(A) is
not mean(B @ A), so that would be a different model (the cross terms B_i @ A_j of unrelated adapters).

  linear  D = sum_i w_i D_i, weights normalized to sum to 1 (uniform when not given): an average of the models.
  slerp   two models, t = w_2 / (w_1 + w_2) (0.5 when not given). Per matrix, on the flattened deltas:
              omega = arccos(<D_1, D_2> / (|D_1| |D_2|))
              D     = sin((1 - t) omega) / sin(omega) * D_1  +  sin(t omega) / sin(omega) * D_2
          so t = 0 gives D_1 and t = 1 gives D_2 exactly; along the way the delta follows the arc between the two
          directions instead of the chord (whose midpoint is shorter than both). Where sin(omega) vanishes (one
          delta zero, or the two (anti)parallel within 1e-6 rad) the arc is undefined and the chord is used:
          D = (1 - t) D_1 + t D_2, the limit of the formula as omega -> 0.

Deltas are computed and combined in float64. The output is either
  - a full model (the default): W = W_base + D in float64, rounded once to --dtype (float32 or bfloat16); the
    rounding error relative to the float64 weights is reported; or
  - with `rank=r`, a LoRA adapter of rank r: each D refactored by truncated SVD, D ~= (U_r S_r^1/2)(S_r^1/2 V_r^T)
    with scale 1 (alpha = r), the retained energy sum(s_1..r^2) / sum(s^2) reported per matrix. An average of N
    rank-r deltas has rank <= N r, so rank >= N r loses nothing.
Either loads with `Embedder.from_pretrained` and exports with `embforge export` like any embforge model.

Sources: embforge model folders (a run's `final/`, an `embforge export`), a run folder (its `final/`), or a
run's checkpoint folders (`checkpoints/step-N`; `last_checkpoints(run, k)` lists a run's last k).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

# Settings that decide how text becomes an embedding: merged models must agree on all of them.
_SAME = ("pooling", "attention", "query_template", "query_max_length", "doc_max_length", "rope_theta",
         "padding_side")
_PARALLEL_EPS = 1e-6


class MergeError(ValueError):
    """Bad merge input; the message is one line naming the source or option."""


@dataclass
class Source:
    label: str                  # the path as given
    model: dict                 # ModelConfig fields of the trained model
    adapter_dir: Path | None    # a peft adapter folder, or
    tensors: Path | None        # a checkpoint's adapter.safetensors (parameter names of the training PeftModel)

    @property
    def base(self) -> str:
        from embforge.engine.model import resolve_path
        path = resolve_path(self.model["path"])
        return str(Path(path).resolve()) if Path(path).exists() else path


def read_source(path: str | Path) -> Source:
    """What a merge input is: a model folder, a run folder (its final/) or a checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise MergeError(f"{p}: no such model folder")
    if not (p / "embforge_config.json").exists() and (p / "final" / "embforge_config.json").exists():
        p = p / "final"
    meta_file = p / "embforge_config.json"
    if meta_file.exists():
        from embforge.engine.model import read_model_meta
        meta = read_model_meta(meta_file, MergeError)
        if not (p / "adapter" / "adapter_config.json").exists():
            raise MergeError(f"{p}: a full model without a LoRA adapter; merge takes LoRA models (a run's final/, "
                             "an export, a checkpoint, or a merge written with --rank)")
        return Source(str(path), meta["model"], p / "adapter", None)
    if (p / "adapter.safetensors").exists() and (p / "trainer.pt").exists():
        state = torch.load(p / "trainer.pt", map_location="cpu", weights_only=False)
        model = (state.get("config") or {}).get("model")
        if model is None:
            raise MergeError(f"{p / 'trainer.pt'}: checkpoint without the run's config (key 'config.model')")
        if model.get("lora") is None:
            raise MergeError(f"{p}: checkpoint of a run without LoRA")
        return Source(str(path), model, None, p / "adapter.safetensors")
    raise MergeError(f"{p}: not an embforge model folder (no embforge_config.json), run folder (no final/) or "
                     "checkpoint (no adapter.safetensors + trainer.pt)")


def last_checkpoints(run_dir: str | Path, k: int) -> list[Path]:
    """A run's last k checkpoint folders, oldest first."""
    if k < 1:
        raise MergeError(f"--last must be >= 1, got {k}")
    root = Path(run_dir) / "checkpoints"
    steps = sorted(root.glob("step-*")) if root.is_dir() else []
    if len(steps) < k:
        raise MergeError(f"{run_dir}: asked for the last {k} checkpoints, found {len(steps)} in {root} "
                         "(training keeps the last two)")
    return steps[-k:]


def check_compatible(sources: list[Source]):
    first = sources[0]
    for s in sources[1:]:
        if s.base != first.base:
            raise MergeError(f"different bases: {first.label} is trained from {first.base}, {s.label} from {s.base}")
        for key in _SAME:
            if s.model.get(key) != first.model.get(key):
                raise MergeError(f"model.{key} differs: {first.model.get(key)!r} in {first.label}, "
                                 f"{s.model.get(key)!r} in {s.label}")


def resolve_weights(n: int, weights: list[float] | None, method: str) -> list[float]:
    if method not in ("linear", "slerp"):
        raise MergeError(f"--method must be linear or slerp, got {method!r}")
    if n < 2:
        raise MergeError(f"merge needs at least two models, got {n}")
    if method == "slerp" and n != 2:
        raise MergeError(f"--method slerp interpolates exactly two models, got {n}")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise MergeError(f"--weights: {len(weights)} weights for {n} models")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"--weights must be >= 0 with a positive sum, got {weights}")
    return [w / sum(weights) for w in weights]


def slerp(d1: torch.Tensor, d2: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two deltas (any shape, treated as flat vectors); see the module docstring."""
    n1, n2 = d1.norm(), d2.norm()
    if n1 == 0 or n2 == 0:
        return (1 - t) * d1 + t * d2
    cos = (d1.flatten() @ d2.flatten() / (n1 * n2)).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    if omega < _PARALLEL_EPS or math.pi - omega < _PARALLEL_EPS:
        return (1 - t) * d1 + t * d2
    s = torch.sin(omega)
    return torch.sin((1 - t) * omega) / s * d1 + torch.sin(t * omega) / s * d2


def _attach(sources: list[Source], base_model):
    """One PeftModel over the base holding every source as its own adapter (m0, m1, ...): the base loads once."""
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file

    from embforge.config import build_dataclass
    from embforge.engine.model import LoraConfig, peft_lora_config

    # peft configs of checkpoint sources are built on the plain base, before any adapter wraps its linear layers
    configs = {i: peft_lora_config(base_model, build_dataclass(LoraConfig, s.model["lora"], prefix="model.lora."))
               for i, s in enumerate(sources) if s.adapter_dir is None}
    model = base_model
    for i, s in enumerate(sources):
        name = f"m{i}"
        if s.adapter_dir is not None:
            if i == 0:
                model = PeftModel.from_pretrained(model, str(s.adapter_dir), adapter_name=name)
            else:
                model.load_adapter(str(s.adapter_dir), adapter_name=name)
            if getattr(model.peft_config[name], "use_dora", False):
                # DoRA rescales each column by a learned magnitude: its model is not base + scale * B @ A
                raise MergeError(f"{s.adapter_dir}: a DoRA adapter; merge handles plain LoRA only")
            continue
        if i == 0:
            model = get_peft_model(model, configs[i], adapter_name=name)
        else:
            model.add_adapter(name, configs[i])
        params = dict(model.named_parameters())
        for key, value in load_file(s.tensors).items():
            target = key.replace(".default.", f".{name}.")
            if target not in params:
                raise MergeError(f"{s.tensors}: parameter {key} does not fit the run's LoRA config")
            with torch.no_grad():
                params[target].copy_(value)
    return model


def _deltas(model, n: int):
    """(module name in the base model, its base weight, [float64 delta per source, or None where not adapted])."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        out = []
        for i in range(n):
            a = f"m{i}"
            if a not in module.lora_A:
                out.append(None)
                continue
            module.lora_A[a].double()    # peft computes the delta in the adapter's dtype: make that float64
            module.lora_B[a].double()
            out.append(module.get_delta_weight(a))
        yield name.removeprefix("base_model.model."), module.get_base_layer().weight, out


def combine(deltas: list[torch.Tensor | None], weights: list[float], method: str, shape) -> torch.Tensor:
    zero = torch.zeros(shape, dtype=torch.float64)
    ds = [zero if d is None else d for d in deltas]
    if method == "slerp":
        return slerp(ds[0], ds[1], weights[1])
    return sum(w * d for w, d in zip(weights, ds))


def truncated_factors(delta: torch.Tensor, rank: int):
    """B [out, r], A [r, in] with B @ A the best rank-r approximation of delta; and the energy it keeps."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    total = float((s ** 2).sum())
    energy = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vh[:r]
    return b, a, energy


def merge_models(paths: list[str | Path], out_dir: str | Path, *, weights: list[float] | None = None,
                 method: str = "linear", rank: int | None = None, dtype: str = "float32") -> dict:
    """Merge LoRA models (see the module docstring) into `out_dir`; returns the report also written to
    out_dir/merge.json."""
    from embforge.config import build_dataclass
    from embforge.engine.model import Embedder, ModelConfig

    if dtype not in ("float32", "bfloat16"):
        raise MergeError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if rank is not None and rank < 1:
        raise MergeError(f"--rank must be >= 1, got {rank}")
    weights = resolve_weights(len(paths), weights, method)
    sources = [read_source(p) for p in paths]
    check_compatible(sources)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MergeError(f"{out}: exists and is not empty; choose a new --out")

    first = sources[0]
    cfg = build_dataclass(ModelConfig, {**first.model, "path": first.base}, prefix="model.")
    base_cfg = dataclasses.replace(cfg, lora=None, quantization="none", dtype="float32", liger=False)
    emb = Embedder.from_config(base_cfg, "cpu")   # full precision: never merge into 4-bit weights
    peft_model = _attach(sources, emb.model)
    merged: dict[str, torch.Tensor] = {}
    for name, _, deltas in _deltas(peft_model, len(sources)):
        shape = next(d.shape for d in deltas if d is not None)
        merged[name] = combine(deltas, weights, method, shape)
    base = peft_model.unload()                   # the plain base model, LoRA layers removed
    report = {"method": method, "sources": [s.label for s in sources], "weights": weights, "base": first.base,
              "matrices": len(merged)}
    if method == "slerp":
        report["t"] = weights[1]
    out.mkdir(parents=True, exist_ok=True)
    if rank is None:
        report.update(dtype=dtype, rounding=_write_full(base, merged, emb, cfg, out, getattr(torch, dtype)))
    else:
        report.update(rank=rank, energy=_write_adapter(base, merged, emb, cfg, out, rank))
    (out / "merge.json").write_text(json.dumps(report, indent=2))
    return report


def _write_full(base, merged, emb, cfg, out: Path, dtype: torch.dtype) -> dict:
    """W_base + D, rounded once to dtype; the error of that rounding over all weights, relative to float64."""
    err2 = ref2 = worst = 0.0
    worst_name = None
    with torch.no_grad():
        deltas = {f"{name}.weight": d for name, d in merged.items()}
        for pname, p in base.named_parameters():
            exact = p.detach().double()
            if pname in deltas:
                exact = exact + deltas[pname]
            rounded = exact.to(dtype)
            e2 = float(((rounded.double() - exact) ** 2).sum())
            r2 = float((exact ** 2).sum())
            err2, ref2 = err2 + e2, ref2 + r2
            if r2 > 0 and math.sqrt(e2 / r2) > worst:
                worst, worst_name = math.sqrt(e2 / r2), pname
            p.data = rounded
    base.save_pretrained(out / "merged", safe_serialization=True)
    emb.tokenizer.save_pretrained(out / "merged")
    emb.tokenizer.save_pretrained(out / "tokenizer")
    model = dataclasses.asdict(dataclasses.replace(cfg, lora=None))
    (out / "embforge_config.json").write_text(json.dumps({"model": model, "merged": True}, indent=2))
    return {"relative_frobenius": math.sqrt(err2 / ref2) if ref2 else 0.0, "worst_matrix": worst_name,
            "worst_matrix_relative": worst}


def _write_adapter(base, merged, emb, cfg, out: Path, rank: int) -> dict:
    """Each merged delta as a rank-r LoRA pair (scale 1); the adapter is saved like a trained one."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from embforge.engine.model import LoraConfig

    names = sorted(merged)
    peft_model = get_peft_model(base, PeftLoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                     target_modules=names, bias="none"))
    energy = {}
    with torch.no_grad():
        for name in names:
            layer = peft_model.base_model.model.get_submodule(name)
            b, a, energy[name] = truncated_factors(merged[name], rank)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("layers.")})
    depth = base.config.num_hidden_layers
    lora = LoraConfig(r=rank, alpha=rank, dropout=0.0, targets=sorted({n.rsplit(".", 1)[-1] for n in names}),
                      layers=None if layers == list(range(depth)) else layers)
    emb.model = peft_model
    emb.config = dataclasses.replace(cfg, lora=lora)
    emb.save_pretrained(out)
    values = list(energy.values())
    return {"min": min(values), "mean": sum(values) / len(values),
            "worst_matrix": min(energy, key=energy.get), "per_matrix": energy}


def summary(report: dict) -> str:
    """One line for the terminal."""
    head = f"merged {len(report['sources'])} models ({report['method']}, weights " \
           f"{[round(w, 4) for w in report['weights']]}) over {report['matrices']} matrices"
    if "rank" in report:
        e = report["energy"]
        return f"{head}: rank-{report['rank']} adapter, energy kept min {e['min']:.6f} mean {e['mean']:.6f}"
    r = report["rounding"]
    return (f"{head}: full {report['dtype']} model, rounding error {r['relative_frobenius']:.2e} relative "
            f"(worst matrix {r['worst_matrix']}: {r['worst_matrix_relative']:.2e})")
