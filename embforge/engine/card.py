"""Model cards: the README.md `embforge export` writes into the embforge and sentence-transformers folders.

Hugging Face model-card format (huggingface_hub's ModelCardData writes the YAML front matter: base_model,
library_name, pipeline_tag, tags, datasets, and model-index from the run's evaluations), then the recipe, the
evaluations recorded during training and usage. Everything comes from files the run left behind: the model's
embforge_config.json, the run's config (in its latest checkpoint), metrics.jsonl and eval.jsonl; a merged model
(`embforge merge`) describes its merge from merge.json. What is missing is left out, never invented.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# The offline shorthands' real names on the Hub (what base_model should say).
_HUB_NAMES = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# Counts an evaluation records next to its scores: sizes of the data, not results.
_SIZES = ("num_queries", "num_docs")


def _read_jsonl(path: Path) -> list[dict]:
    from embforge.common import read_jsonl
    return [rec for _, rec in read_jsonl(path)] if path.exists() else []


def run_record(model_dir: str | Path) -> dict:
    """What the run left behind for the model in `model_dir` (a run's final/ or an export of it): the training
    config, per-step metrics and evaluations. Empty parts when the model is not inside its run folder."""
    model_dir = Path(model_dir)
    run = model_dir.parent if (model_dir.parent / "metrics.jsonl").exists() else None
    record = {"run": run, "config": None, "metrics": [], "evals": [], "merge": None}
    if (model_dir / "merge.json").exists():
        record["merge"] = json.loads((model_dir / "merge.json").read_text())
    if run is None:
        return record
    record["metrics"] = _read_jsonl(run / "metrics.jsonl")
    record["evals"] = _read_jsonl(run / "eval.jsonl")
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    if checkpoints:
        state = torch.load(checkpoints[-1] / "trainer.pt", map_location="cpu", weights_only=False)
        record["config"] = state.get("config")
    return record


def base_model_name(path: str) -> str:
    if path in _HUB_NAMES:
        return _HUB_NAMES[path]
    p = Path(path)
    if p.exists() and (p / "config.json").exists():
        name = json.loads((p / "config.json").read_text()).get("_name_or_path") or ""
        return name if name and not Path(name).is_absolute() else p.name
    return path


def _dataset_name(entry) -> str:
    """A data.train entry (a path, or a dataset spec with path and optional name) or an eval data name."""
    if isinstance(entry, dict):
        return entry.get("name") or _dataset_name(entry["path"])
    return Path(entry).stem if ("/" in entry or entry.endswith(".jsonl")) else entry


def _count_lines(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return None


def final_evals(evals: list[dict]) -> list[dict]:
    """The last recorded value of each (data, metric): the trained model's scores."""
    last = {}
    for r in evals:
        last[(r["data"], r["metric"])] = r
    return list(last.values())


def card_data(model: dict, record: dict, *, library: str, name: str):
    from huggingface_hub import EvalResult, ModelCardData

    cfg = record["config"] or {}
    base = base_model_name((cfg.get("model") or {}).get("path") or model["path"])
    datasets = [_dataset_name(p) for p in (cfg.get("data") or {}).get("train", [])]
    results = [EvalResult(task_type="retrieval", task_name="Retrieval", dataset_type=_dataset_name(r["data"]),
                          dataset_name=_dataset_name(r["data"]), dataset_split="test", metric_type=r["metric"],
                          metric_value=r["value"], metric_name=r["metric"])
               for r in final_evals(record["evals"]) if r["metric"] not in _SIZES]
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "embforge", "text-embeddings",
            f"pooling-{model['pooling']}", f"attention-{model['attention']}"]
    if model.get("lora"):
        tags.append("lora")
    if record["merge"]:
        tags.append("merge")
    return ModelCardData(base_model=base, library_name=library, pipeline_tag="sentence-similarity", tags=tags,
                         datasets=datasets or None, model_name=name, eval_results=results or None)


def _recipe(model: dict, record: dict) -> list[str]:
    cfg = record["config"] or {}
    lora = model.get("lora")
    rows = [("base model", f"`{base_model_name((cfg.get('model') or {}).get('path') or model['path'])}`"),
            ("pooling", f"{model['pooling']} token" if model["pooling"] == "last" else "mean"),
            ("attention", model["attention"]),
            ("query template", f"`{model['query_template']!r}`"),
            ("max length", f"queries {model['query_max_length']}, documents {model['doc_max_length']} tokens"),
            ("LoRA", "none (full merged weights)" if not lora else
             f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, targets={lora['targets']}, "
             f"layers={lora['layers'] or 'all'}"),
            ("base weights", "nf4 (QLoRA)" if model.get("quantization") == "nf4" else "full precision")]
    if cfg:
        loss, batch, optim = cfg["loss"], cfg["batch"], cfg["optim"]
        temp = f"{loss['temperature']}" + (" (learnable)" if loss["learnable_temperature"] else "")
        learned = [m["temperature"] for m in record["metrics"] if "temperature" in m]
        if learned:
            temp += f", learned {learned[-1]:.4g}"
        extras = [x for x in ("same-tower negatives" if loss["same_tower"] else "",
                              f"Matryoshka dims {loss['matryoshka_dims']}" if loss["matryoshka_dims"] else "") if x]
        rows += [("loss", "InfoNCE (in-batch + hard negatives)" + (", " + ", ".join(extras) if extras else "")),
                 ("temperature", temp),
                 ("batch", f"{batch['queries']} queries per step, {batch['negatives']} hard negative(s) each "
                           f"(GradCache chunks of {batch['chunk_tokens']} tokens)"),
                 ("optimizer", f"{optim['optimizer']}, lr {optim['lr']}, {optim['decay']} decay after "
                               f"{optim['warmup_steps']} warmup steps, weight decay {optim['weight_decay']}"),
                 ("steps", f"{cfg['steps']} (seed {cfg['seed']}), {cfg['steps'] * batch['queries']} query examples "
                           "seen")]
        for entry in cfg["data"]["train"]:
            n = _count_lines(entry["path"] if isinstance(entry, dict) else entry)
            rows.append(("training data", f"`{_dataset_name(entry)}` ({n} examples)" if n is not None
                         else f"`{_dataset_name(entry)}`"))
    metrics = record["metrics"]
    if metrics:
        rows.append(("loss curve", f"{metrics[0]['loss']:.4f} at step {metrics[0]['step']} -> "
                                   f"{metrics[-1]['loss']:.4f} at step {metrics[-1]['step']}"))
    merge = record["merge"]
    if merge:
        how = f"{merge['method']} of {len(merge['sources'])} models, weights {[round(w, 4) for w in merge['weights']]}"
        how += f", rank-{merge['rank']} SVD adapter" if "rank" in merge else f", {merge['dtype']} weights"
        rows.append(("merge", how + " (`embforge merge`, merge.json)"))
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _evaluations(evals: list[dict]) -> list[str]:
    """One row per (data, step): the scores, and the data's size as the evaluation counted it."""
    if not evals:
        return ["No evaluation was recorded during training."]
    rows: dict[tuple, dict] = {}
    for r in evals:
        rows.setdefault((r["data"], r.get("step")), {})[r["metric"]] = r["value"]
    names = [m for m in dict.fromkeys(r["metric"] for r in evals) if m not in _SIZES]
    lines = ["Retrieval, recorded during training (`eval.jsonl`; step 0 is the untrained base):", "",
             "| data | step | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for (data, step), values in rows.items():
        size = ", ".join(f"{values[k]} {k.removeprefix('num_')}" for k in _SIZES if k in values)
        label = f"{_dataset_name(data)} ({size})" if size else _dataset_name(data)
        cells = [f"{values[m]:.4f}" if isinstance(values.get(m), float) else str(values.get(m, "")) for m in names]
        lines.append(f"| {label} | {step} | " + " | ".join(cells) + " |")
    return lines


def _usage(model: dict, instruction: str, st_path: str, ef_path: str) -> list[str]:
    prompt = None
    if model["query_template"].endswith("{query}"):
        prompt = model["query_template"][: -len("{query}")].format(instruction=instruction)
    lines = ["Queries carry a task instruction through the template "
             f"`{model['query_template']!r}`; documents are embedded as they are. "
             f"Instruction used here: \"{instruction}\".", ""]
    if prompt is not None:
        lines += ["### sentence-transformers", "", "```python", "from sentence_transformers import SentenceTransformer",
                  "", f"model = SentenceTransformer({st_path!r})",
                  f"queries = model.encode_query([\"how do I sort a list\"])   # prompt {prompt!r}",
                  "documents = model.encode_document([\"sorted() returns a new sorted list\"])",
                  "scores = model.similarity(queries, documents)", "```", "",
                  "For another task pass `prompt=` with the template filled with its instruction.", ""]
    lines += ["### embforge", "", "```bash",
              f"embforge encode --model {ef_path} --instruction \"{instruction}\" \"how do I sort a list\" --out q.pt",
              f"embforge encode --model {ef_path} --file documents.txt --out d.pt", "```"]
    return lines


def write_card(folder: str | Path, model: dict, record: dict, *, library: str, instruction: str,
               st_path: str, ef_path: str) -> Path:
    """README.md in `folder`: front matter + recipe + evaluations + usage."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    name = folder.name if folder.name != "sentence-transformers" else folder.parent.name
    data = card_data(model, record, library=library, name=name)
    body = [f"# {name}", "",
            f"A text embedding model fine-tuned from `{data.base_model}` with embforge (contrastive InfoNCE, LoRA, "
            "GradCache). It maps text to L2-normalized vectors for retrieval and similarity (cosine).", "",
            "## Usage", "", *_usage(model, instruction, st_path, ef_path), "",
            "## Training recipe", "", *_recipe(model, record), "",
            "## Evaluation", "", *_evaluations(record["evals"]), ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
    card.save(folder / "README.md")
    return folder / "README.md"
