"""Unit tests of the synth building blocks: JSON extraction, templates, sampling, ids, validation, cost, store."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from embforge.synth.client import ChatRequest, ChatResult, interpret, parse_retry_after, redact_url
from embforge.synth.config import SynthConfig
from embforge.synth.cost import Budget, BudgetError, CostTracker, DEFAULT_PRICES, find_price
from embforge.synth.jsonx import JSONExtractError, extract_json
from embforge.synth.languages import e5_language_weights
from embforge.synth.plan import brainstorm_requests, example_requests, tasks_from_brainstorms
from embforge.synth.store import JsonlAppender, StoreError, read_jsonl
from embforge.synth.tasks import TASK_TYPES, sample_params
from embforge.synth.templates import TemplateError, load_template
from embforge.synth.validate import Deduper, ValidationConfig, check_example, count_words


# -- JSON extraction -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    '{"a": "x", "b": "y"}',
    'Sure! Here it is:\n```json\n{"a": "x", "b": "y"}\n```\nAnything else?',
    'The answer is {"a": "x", "b": "y"} as requested.',
    '{"a": "x", "b": "y",}',                                # trailing comma
    '\u201c{"a": "x", "b": "y"}',                            # junk before
])
def test_extract_json_finds_the_object(text):
    assert extract_json(text, lambda v: isinstance(v, dict) and "a" in v) == {"a": "x", "b": "y"}


def test_extract_json_skips_values_that_fail_the_check_and_never_evaluates_code():
    text = 'first {"other": 1} then {"a": "x"}'
    assert extract_json(text, lambda v: isinstance(v, dict) and "a" in v) == {"a": "x"}
    with pytest.raises(JSONExtractError):
        extract_json("{'a': __import__('os').getcwd()}", lambda v: isinstance(v, dict))
    with pytest.raises(JSONExtractError):
        extract_json("", None)


def test_interpret_handles_refusal_length_and_filter():
    req = ChatRequest(id="x", kind="example", messages=[], schema={"required": ["a"]})

    def raw(msg, finish="stop"):
        return {"choices": [{"message": msg, "finish_reason": finish}], "usage": {"prompt_tokens": 3,
                                                                                "completion_tokens": 4}}

    assert interpret(raw({"content": '{"a": "1"}'}), req, ChatResult("failed")).status == "ok"
    assert interpret(raw({"content": None, "refusal": "no"}), req, ChatResult("failed")).reason == "refusal"
    assert interpret(raw({"content": '{"a": "'}, "length"), req, ChatResult("failed")).reason == "truncated"
    assert interpret(raw({"content": ""}, "content_filter"), req, ChatResult("failed")).reason == "content_filter"
    r = interpret(raw({"content": '{"b": "1"}'}), req, ChatResult("failed"))
    assert (r.status, r.reason, r.usage["completion_tokens"]) == ("rejected", "invalid_json", 4)


def test_retry_after_parsing_and_url_redaction():
    assert parse_retry_after({"retry-after": "2.5"}) == 2.5
    assert parse_retry_after({"retry-after-ms": "300"}) == pytest.approx(0.3)
    assert 50 < parse_retry_after({"retry-after": "Wed, 21 Oct 2099 07:28:00 GMT"})
    assert parse_retry_after({}) is None
    assert redact_url("https://user:sk-secret@api.example.com/v1?api-key=sk-2") == "https://api.example.com/v1"


# -- templates and sampling ----------------------------------------------------------------------------------
def test_every_example_template_renders_with_sampled_values_and_no_placeholder_left():
    rng = random.Random(0)
    langs = e5_language_weights()
    for task in TASK_TYPES.values():
        tmpl = load_template(task.example_template)
        params = sample_params(task, rng, langs)
        values = dict(params, task="Retrieve recipes for a dish.") if "task" in tmpl.fields else params
        text = tmpl.render(**values)
        assert "$" not in text and text.strip()
        assert set(tmpl.fields) <= set(values), task.name
        for key in task.output_keys:
            assert f'"{key}"' in text, (task.name, key)


def test_template_refuses_missing_or_empty_placeholders():
    tmpl = load_template("example_sts")
    with pytest.raises(TemplateError, match="no value"):
        tmpl.render(unit="sentence")
    values = {f: "x" for f in tmpl.fields}
    values["language"] = "  "
    with pytest.raises(TemplateError, match="empty value"):
        tmpl.render(**values)


def test_language_distribution_follows_e5():
    w = e5_language_weights()
    assert sum(w.values()) == pytest.approx(1.0)
    rng = random.Random(1)
    task = TASK_TYPES["sts"]
    draws = Counter(sample_params(task, rng, w)["language"] for _ in range(20000))
    assert draws["English"] / 20000 == pytest.approx(0.431, abs=0.015)
    assert draws["Polish"] / 20000 == pytest.approx(0.0285, abs=0.006)
    assert len(draws) > 80  # the long tail is really drawn


def test_bitext_languages_differ_and_weight_overrides_apply():
    rng = random.Random(2)
    langs = {"English": 1.0, "German": 1.0, "French": 1.0}
    for _ in range(200):
        p = sample_params(TASK_TYPES["bitext"], rng, langs, {"unit": {"sentence": 1.0, "passage": 0.0}})
        assert p["src_lang"] != p["tgt_lang"] and p["unit"] == "sentence"
        assert p["low_score"] in {"1.5", "2", "2.5"}


def test_request_ids_are_deterministic_and_stable_when_the_run_grows():
    cfg = SynthConfig(model="m", out="x.jsonl", tasks_per_type=2, examples_per_task=2)
    tasks = {t: ["Task one.", "Task two."] for t in TASK_TYPES}
    ids = [r.id for r in brainstorm_requests(cfg) + example_requests(cfg, tasks)]
    assert ids == [r.id for r in brainstorm_requests(cfg) + example_requests(cfg, tasks)]
    assert len(set(ids)) == len(ids)
    bigger = SynthConfig(model="m", out="x.jsonl", tasks_per_type=2, examples_per_task=3)
    assert {r.id for r in example_requests(cfg, tasks)} < {r.id for r in example_requests(bigger, tasks)}
    for change in ({"model": "other"}, {"seed": 1}):
        other = SynthConfig(**{**cfg.__dict__, **change})
        assert not set(ids) & {r.id for r in brainstorm_requests(other) + example_requests(other, tasks)}


def test_tasks_from_brainstorms_dedupes_in_order():
    got = tasks_from_brainstorms([{"tasks": ["A task.", "a  TASK.", "", 3, "B task."]}, ["C task.", "B task."]], 10)
    assert got == ["A task.", "B task.", "C task."]


# -- validation and duplicates -------------------------------------------------------------------------------
def test_check_example_reasons():
    cfg = ValidationConfig(long_min_words=5)
    keys = ("input", "positive_document")
    ok = {"input": "one two three four five six", "positive_document": "seven eight nine ten eleven twelve"}
    assert check_example("long-long", ok, keys, keys, cfg) is None
    assert check_example("long-long", {**ok, "input": 3}, keys, keys, cfg) == "field_not_string:input"
    assert check_example("long-long", {**ok, "input": "too short"}, keys, keys, cfg) == "too_few_words:input"
    assert check_example("long-long", {**ok, "input": ok["positive_document"]}, keys, keys, cfg) == "fields_identical"
    assert check_example("long-long", {**ok, "input": "about $language " * 3}, keys, keys, cfg).startswith(
        "placeholder_left")


def test_count_words_handles_cjk():
    assert count_words("hello big world") == 3
    assert count_words("日本語の文章です") == 8


def test_deduper_exact_near_and_distinct():
    d = Deduper(threshold=0.8)
    base = {"query": "How do I repot a large fiddle leaf fig without hurting the roots?",
            "positive": "Water the plant a day before, loosen the root ball gently, and move it to a pot 5 cm wider."}
    assert d.check(base) is None
    assert d.check({**base, "query": "  how do I repot a LARGE fiddle leaf fig without hurting the roots? "}) == \
        "duplicate_exact"
    assert d.check({**base, "positive": base["positive"].replace("5 cm", "6 cm")}) == "duplicate_near"
    assert d.check({"query": "Best time to visit Kyoto for autumn leaves?",
                    "positive": "Late November, when the maples in Tofuku-ji and Eikan-do turn red."}) is None


# -- cost ----------------------------------------------------------------------------------------------------
def test_prices_by_prefix_and_budget_needs_a_price():
    assert find_price("gpt-4o-mini-2024-07-18", DEFAULT_PRICES) == DEFAULT_PRICES["gpt-4o-mini"]
    assert find_price("gpt-4o-2024-08-06", DEFAULT_PRICES) == DEFAULT_PRICES["gpt-4o"]
    t = CostTracker({"m": {"input": 1.0, "output": 2.0}})
    assert t.add("m", {"prompt_tokens": 1_000_000, "completion_tokens": 500_000}) == pytest.approx(2.0)
    assert t.total_usd == pytest.approx(2.0)
    with pytest.raises(BudgetError, match="no price"):
        Budget(CostTracker({}), "mystery-model", 5.0)
    b = Budget(t, "m", 2.5)
    assert b.try_reserve(0.4) and not b.try_reserve(0.2)
    b.release(0.4)
    assert b.try_reserve(0.2)


# -- durable JSONL -------------------------------------------------------------------------------------------
def test_torn_tail_is_moved_aside_and_mid_file_damage_names_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    with JsonlAppender(p) as a:
        a.append({"i": 1})
        a.append({"i": 2})
    with open(p, "ab") as f:
        f.write(b'{"i": 3, "half')  # what kill -9 in the middle of a write leaves
    with JsonlAppender(p) as a:
        assert a.torn_bytes == len(b'{"i": 3, "half')
        a.append({"i": 4})
    assert [o["i"] for _, o in read_jsonl(p)] == [1, 2, 4]
    assert (tmp_path / "x.jsonl.torn").read_bytes().startswith(b'{"i": 3')
    p.write_text('{"i": 1}\nnot json\n{"i": 2}\n')
    with pytest.raises(StoreError, match=r"x\.jsonl:2: invalid JSON"):
        list(read_jsonl(p))
