"""The six E5 task types: their placeholders, prompts, expected JSON fields and mapping to training records.

Placeholder values and default weights follow the recipe (../shared/docs/recipe.md); every one of them is
sampled per request, and weights can be overridden from the config.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

CLARITY = ["clear", "understandable with some effort", "ambiguous"]
DIFFICULTY = ["high school", "college", "PhD"]
UNIT = ["sentence", "phrase", "passage"]

STS_INSTRUCTION = "Retrieve semantically similar text."
BITEXT_INSTRUCTION = "Retrieve parallel sentences."


def uniform(values) -> dict[str, float]:
    return {str(v): 1.0 for v in values}


@dataclass(frozen=True)
class TaskType:
    name: str
    example_template: str
    output_keys: tuple[str, ...]
    placeholders: dict[str, dict[str, float]]
    to_record: Callable[[dict, str], tuple[str, str, list[str]]]  # (payload, task) -> query, positive, negatives
    brainstorm_template: str | None = None  # None: symmetric task, fixed instruction, no step 1
    fixed_instruction: str | None = None
    uses_language: bool = True
    long_fields: tuple[str, ...] = ()  # fields that must reach validation.long_min_words
    extra: dict = field(default_factory=dict)

    @property
    def two_step(self) -> bool:
        return self.brainstorm_template is not None


TASK_TYPES: dict[str, TaskType] = {t.name: t for t in [
    TaskType(
        "short-long", "example_short_long", ("user_query", "positive_document", "hard_negative_document"),
        {"query_type": uniform(["extremely long-tail", "long-tail", "common"]),
         "query_length": uniform(["less than 5 words", "5 to 15 words", "at least 10 words"]),
         "clarity": uniform(CLARITY), "num_words": uniform([50, 100, 200, 300, 400, 500]),
         "difficulty": uniform(DIFFICULTY)},
        lambda p, t: (p["user_query"], p["positive_document"], [p["hard_negative_document"]]),
        brainstorm_template="brainstorm_short_long"),
    TaskType(
        "long-short", "example_long_short", ("input_text", "label", "misleading_label"),
        {"num_words": uniform(["less than 10", "at least 10", "at least 50", "at least 100", "at least 200"]),
         "clarity": uniform(CLARITY), "difficulty": uniform(DIFFICULTY)},
        lambda p, t: (p["input_text"], p["label"], [p["misleading_label"]]),
        brainstorm_template="brainstorm_long_short"),
    TaskType(
        "short-short", "example_short_short", ("input", "positive_document"), {},
        lambda p, t: (p["input"], p["positive_document"], []),
        brainstorm_template="brainstorm_short_short"),
    TaskType(
        "long-long", "example_long_long", ("input", "positive_document"), {},
        lambda p, t: (p["input"], p["positive_document"], []),
        brainstorm_template="brainstorm_long_long", long_fields=("input", "positive_document")),
    TaskType(
        "sts", "example_sts", ("S1", "S2", "S3"),
        {"unit": uniform(UNIT), "high_score": uniform(["4", "4.5", "5"]), "low_score": uniform(["2.5", "3", "3.5"]),
         "difficulty": uniform(DIFFICULTY)},
        lambda p, t: (p["S1"], p["S2"], [p["S3"]]),
        fixed_instruction=STS_INSTRUCTION),
    TaskType(
        "bitext", "example_bitext", ("S1", "S2", "S3"),
        {"unit": uniform(UNIT), "high_score": uniform(["4", "4.5", "5"]), "low_score": uniform(["1.5", "2", "2.5"]),
         "difficulty": uniform(DIFFICULTY)},
        lambda p, t: (p["S1"], p["S2"], [p["S3"]]),
        fixed_instruction=BITEXT_INSTRUCTION, uses_language=False),
]}


def weighted_choice(rng: random.Random, weights: dict[str, float], what: str) -> str:
    items = [(k, float(w)) for k, w in weights.items() if float(w) > 0]
    if not items:
        raise ValueError(f"{what}: no value with a positive weight")
    total = sum(w for _, w in items)
    x = rng.random() * total
    for k, w in items:
        x -= w
        if x < 0:
            return k
    return items[-1][0]


def sample_params(task: TaskType, rng: random.Random, languages: dict[str, float],
                  overrides: dict[str, dict[str, float]] | None = None, long_min_words: int = 300) -> dict[str, str]:
    """Draw every placeholder of `task` (sorted order, so the same rng state gives the same draw)."""
    spaces = dict(task.placeholders)
    spaces.update(overrides or {})
    params = {name: weighted_choice(rng, spaces[name], f"{task.name}.{name}") for name in sorted(spaces)}
    if task.name == "bitext":
        # Both sides come from the language distribution; the target must differ from the source.
        params["src_lang"] = weighted_choice(rng, languages, "languages")
        others = {k: v for k, v in languages.items() if k != params["src_lang"]}
        params["tgt_lang"] = weighted_choice(rng, others or {"English": 1.0}, "languages")
    elif task.uses_language:
        params["language"] = weighted_choice(rng, languages, "languages")
    if task.long_fields:
        params["min_words"] = str(long_min_words)
    return params


def output_schema(task: TaskType) -> dict:
    return {"type": "object", "properties": {k: {"type": "string"} for k in task.output_keys},
            "required": list(task.output_keys), "additionalProperties": False}


# minItems makes grammar-constrained servers (llama.cpp) produce at least one task: small models otherwise
# happily emit {"tasks": []}. OpenAI's structured outputs accept minItems too.
BRAINSTORM_SCHEMA = {"type": "object",
                     "properties": {"tasks": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
                     "required": ["tasks"], "additionalProperties": False}
