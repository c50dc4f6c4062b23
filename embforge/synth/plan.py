"""Turning a config into concrete requests with deterministic ids.

A request id is a hash of everything that decides what is asked: the template (name, version, sha256 of
its text), the sampled parameters, the task text, the model and the seed. Rerunning the same command
therefore rebuilds the same ids, which is what lets a rerun skip finished work. Parameters are drawn from
an RNG seeded by (seed, task type, task text, example index), so they do not depend on how many other
requests exist, on their order, or on which of them already finished.
"""
from __future__ import annotations

import hashlib
import json
import math
import random

from .client import ChatRequest
from .config import SynthConfig
from .languages import e5_language_weights
from .tasks import BRAINSTORM_SCHEMA, TASK_TYPES, TaskType, output_schema, sample_params
from .templates import load_template
from .validate import normalize

MAX_TASK_CHARS = 600


def request_id(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def _rng(*parts) -> random.Random:
    return random.Random(int(request_id("rng", *parts), 16))


def _tmpl(cfg: SynthConfig, name: str):
    return load_template(name, cfg.template_version, cfg.template_dir)


def brainstorm_accept(value) -> bool:
    tasks = value.get("tasks") if isinstance(value, dict) else value
    return isinstance(tasks, list) and any(isinstance(t, str) and t.strip() for t in tasks)


def brainstorm_requests(cfg: SynthConfig) -> list[ChatRequest]:
    out = []
    for name in cfg.task_types:
        task = TASK_TYPES[name]
        if not task.two_step:
            continue
        tmpl = _tmpl(cfg, task.brainstorm_template)
        per_call = min(cfg.tasks_per_brainstorm, cfg.tasks_per_type)
        for call in range(math.ceil(cfg.tasks_per_type / per_call)):
            prompt = tmpl.render(n_tasks=per_call)
            rid = request_id("brainstorm", name, tmpl.name, tmpl.version, tmpl.digest, per_call, call,
                             cfg.model, cfg.seed)
            out.append(ChatRequest(
                id=rid, kind="brainstorm", messages=[{"role": "user", "content": prompt}],
                schema=BRAINSTORM_SCHEMA, accept=brainstorm_accept, max_tokens=cfg.brainstorm_max_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p,
                meta={"task_type": name, "call": call, "template": f"{tmpl.name}.{tmpl.version}"}))
    return out


def tasks_from_brainstorms(parsed_in_call_order: list, limit: int) -> list[str]:
    """Distinct, non-empty task definitions in the order the brainstorm calls produced them."""
    seen, tasks = set(), []
    for parsed in parsed_in_call_order:
        items = parsed.get("tasks") if isinstance(parsed, dict) else parsed
        for t in items or []:
            if not isinstance(t, str) or not t.strip() or len(t) > MAX_TASK_CHARS:
                continue
            key = normalize(t)
            if key not in seen:
                seen.add(key)
                tasks.append(t.strip())
    return tasks[:limit]


def _example_request(cfg: SynthConfig, task: TaskType, instruction: str, slot: tuple, languages) -> ChatRequest:
    tmpl = _tmpl(cfg, task.example_template)
    rng = _rng(cfg.seed, task.name, *slot)
    params = sample_params(task, rng, languages, cfg.placeholders.get(task.name),
                           cfg.validation.long_min_words)
    values = dict(params, task=instruction) if "task" in tmpl.fields else params
    prompt = tmpl.render(**values)
    rid = request_id("example", task.name, tmpl.name, tmpl.version, tmpl.digest, instruction, params, slot,
                     cfg.model, cfg.seed)
    return ChatRequest(
        id=rid, kind="example", messages=[{"role": "user", "content": prompt}], schema=output_schema(task),
        max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        meta={"task_type": task.name, "instruction": instruction, "params": params,
              "template": f"{tmpl.name}.{tmpl.version}", "template_sha": tmpl.digest})


def example_requests(cfg: SynthConfig, tasks_by_type: dict[str, list[str]]) -> list[ChatRequest]:
    languages = cfg.languages or e5_language_weights()
    out = []
    for name in cfg.task_types:
        task = TASK_TYPES[name]
        if task.two_step:
            for instruction in tasks_by_type.get(name, []):
                for k in range(cfg.examples_per_task):
                    out.append(_example_request(cfg, task, instruction, (instruction, k), languages))
        else:
            for k in range(cfg.tasks_per_type * cfg.examples_per_task):
                out.append(_example_request(cfg, task, task.fixed_instruction, ("", k), languages))
    return out


def build_record(req: ChatRequest, payload: dict, model: str, seed: int) -> dict:
    task = TASK_TYPES[req.meta["task_type"]]
    query, positive, negatives = task.to_record(payload, req.meta["instruction"])
    params = req.meta["params"]
    return {
        "instruction": req.meta["instruction"], "query": query.strip(), "positive": positive.strip(),
        "negatives": [n.strip() for n in negatives], "task_type": task.name,
        "language": params.get("language") or params.get("src_lang") or "English",
        "meta": {"request_id": req.id, "model": model, "seed": seed, "template": req.meta["template"],
                 "template_sha": req.meta["template_sha"], "params": params},
    }
