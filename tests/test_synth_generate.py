"""`embforge synth generate` against a real loopback HTTP server that injects faults."""
from __future__ import annotations

from collections import Counter

import pytest

from embforge.cli import main as embforge_main
from embforge.synth.config import BatchConfig, SynthConfig
from embforge.synth.generate import run_generate
from embforge.synth.store import read_jsonl
from test_synth_fakeserver import FakeLLM

FAST = dict(backoff_base=0.02, backoff_max=0.1, request_timeout=1.0, progress=False, concurrency=4)


def cfg_for(fake, tmp_path, **kw) -> SynthConfig:
    base = dict(base_url=fake.base_url, model="gpt-4o-mini", out=str(tmp_path / "data.jsonl"), tasks_per_type=2,
                examples_per_task=2, **FAST)
    base.update(kw)
    return SynthConfig(**base)


def records(tmp_path, name="data.jsonl") -> list[dict]:
    return [r for _, r in read_jsonl(tmp_path / name)]


def ledger(tmp_path, name="data.raw.jsonl") -> list[dict]:
    return [e for _, e in read_jsonl(tmp_path / name) if e.get("type") == "result"]


def check_output(tmp_path) -> list[dict]:
    """The invariants every run must keep: trainer contract, no duplicate ids or texts, ledger == output."""
    recs = records(tmp_path)
    for r in recs:
        assert set(r) == {"instruction", "query", "positive", "negatives", "task_type", "language", "meta"}
        assert r["instruction"] and r["query"] and r["positive"] and isinstance(r["negatives"], list)
    ids = [r["meta"]["request_id"] for r in recs]
    assert len(ids) == len(set(ids)), "a request id was written twice"
    assert len({(r["query"], r["positive"]) for r in recs}) == len(recs)
    latest = {e["id"]: e for e in ledger(tmp_path)}
    assert set(ids) == {i for i, e in latest.items() if e["status"] == "accepted" and e["kind"] == "example"}
    return recs


def first_try_faults(plan: dict[int, str]):
    """Fault for the first attempt of the k-th distinct prompt; its retries are clean (so faults don't stack)."""
    seen: dict[str, int] = {}

    def faults(n, prompt):
        if prompt in seen:
            return None
        seen[prompt] = len(seen) + 1
        return plan.get(seen[prompt])
    return faults


def test_faults_are_survived_and_every_request_is_accounted_for(tmp_path):
    faults = first_try_faults({2: "429", 5: "500", 7: "stall", 9: "malformed", 11: "badjson", 13: "length",
                               15: "refusal", 17: "500", 18: "429"})
    # Many equally likely "languages" make every prompt text distinct, so a prompt identifies one request below.
    many_languages = {f"Language{i}": 1.0 for i in range(5000)}
    with FakeLLM(faults, stall=2.0, retry_after="0.3") as fake:
        report = run_generate(cfg_for(fake, tmp_path, languages=many_languages))
        log = fake.log
    recs = check_output(tmp_path)
    assert len(set(fake.prompts())) == 4 + 24
    assert report["stop_reason"] == "complete" and report["pending_requests"] == 0
    planned = sum(report["examples_planned"].values())
    assert planned == 6 * 2 * 2
    outcomes = report["example_outcomes"]
    assert sum(outcomes.values()) == planned
    assert outcomes == {"accepted:ok": planned - 1, "rejected:refusal": 1}
    assert len(recs) == planned - 1
    # Retry-After honoured: the request after the 429 came no sooner than the header said.
    i429 = next(i for i, e in enumerate(log) if e["fault"] == "429")
    retry = next(e for e in log[i429 + 1:] if e["prompt"] == log[i429]["prompt"])
    assert retry["t"] - log[i429]["t"] >= 0.29
    # truncated output was asked again with a doubled max_tokens
    i_len = next(i for i, e in enumerate(log) if e["fault"] == "length")
    again = next(e for e in log[i_len + 1:] if e["prompt"] == log[i_len]["prompt"])
    assert again["max_tokens"] == 2 * log[i_len]["max_tokens"]
    # the stalled and malformed requests were retried and then succeeded
    for fault in ("stall", "malformed", "badjson"):
        p = next(e["prompt"] for e in log if e["fault"] == fault)
        assert sum(e["prompt"] == p for e in log) >= 2, fault
    errs = Counter(err.split(":")[0] for e in ledger(tmp_path) for err in e["errors"])
    assert errs["timeout"] == 1 and errs["bad_response_body"] == 1 and errs["HTTP 429"] == 2
    assert report["cost"]["total_usd"] > 0


def test_exact_and_near_duplicates_are_removed(tmp_path):
    faults = first_try_faults({2: "duplicate", 3: "nearduplicate", 4: "duplicate"})
    with FakeLLM(faults) as fake:
        report = run_generate(cfg_for(fake, tmp_path, task_types=["sts"], tasks_per_type=1, examples_per_task=5,
                                      concurrency=1, languages={"English": 1.0}))
    # #4 repeats #3 (the fake's last example), and a rejected record is not remembered: so #4 is a near
    # duplicate of #1, not an exact one.
    assert report["example_outcomes"] == {"accepted:ok": 2, "rejected:duplicate_exact": 1,
                                          "rejected:duplicate_near": 2}
    assert len(check_output(tmp_path)) == 2


def test_json_schema_rejected_like_llama_cpp_falls_back_once(tmp_path):
    with FakeLLM(reject_json_schema=True) as fake:
        report = run_generate(cfg_for(fake, tmp_path, task_types=["sts", "short-long"], tasks_per_type=1,
                                      examples_per_task=1))
        formats = [e["response_format"] for e in fake.log]
    assert report["structured_output"] == "json_object_schema"
    assert report["stop_reason"] == "complete" and len(check_output(tmp_path)) == 2
    # Concurrent first requests may each see the rejection, but never more than the worker count.
    assert 1 <= formats.count("json_schema") <= 4 and formats[-1] == "json_object"


def test_plain_text_mode_extracts_json_from_prose(tmp_path):
    with FakeLLM(lambda n, p: "wrapped") as fake:
        report = run_generate(cfg_for(fake, tmp_path, structured_output="text", task_types=["sts"]))
        assert all(e["response_format"] is None for e in fake.log)
    assert report["example_outcomes"] == {"accepted:ok": 4} and len(check_output(tmp_path)) == 4


def test_resume_never_repeats_a_finished_request_and_completes(tmp_path):
    doomed = set()

    def faults(n, prompt):  # every 3rd distinct example prompt fails permanently during the first run
        if "exactly these string fields" in prompt and (prompt in doomed or len(doomed) < 5 and n % 3 == 0):
            doomed.add(prompt)
            return "500"
        return None

    with FakeLLM(faults) as fake:
        first = run_generate(cfg_for(fake, tmp_path, max_retries=1))
        asked_first = Counter(fake.prompts())
    # Two requests can carry the same prompt (doomed holds prompts), so pending >= len(doomed).
    pending = first["pending_requests"]
    assert first["stop_reason"] == "incomplete" and pending >= len(doomed) > 0
    n_first = len(check_output(tmp_path))

    def statuses():
        return Counter(e["status"] for e in {e["id"]: e for e in ledger(tmp_path)}.values())
    before = statuses()
    finished_first = before["accepted"] + before["rejected"]
    with FakeLLM() as fake:
        second = run_generate(cfg_for(fake, tmp_path))
        asked_second = fake.prompts()
    assert second["stop_reason"] == "complete"
    assert set(asked_second) == doomed, "the rerun asked for something that had already finished"
    # Every doomed request finished now; each became a record unless the deduper rejected it as a copy of one the
    # first run wrote (which prompts get doomed depends on thread timing, so that count is not fixed).
    after = statuses()
    assert after["failed"] == 0 and after["accepted"] + after["rejected"] == finished_first + pending
    new_records = after["accepted"] - before["accepted"]
    assert new_records >= 1 and len(check_output(tmp_path)) == n_first + new_records
    assert second["resumed_finished_requests"] == finished_first
    assert all(asked_first[p] >= 2 for p in doomed)  # max_retries=1: two tries, then "failed"
    with FakeLLM() as fake:
        third = run_generate(cfg_for(fake, tmp_path))
        assert fake.log == []
    assert third["stop_reason"] == "complete" and third["cost"] == second["cost"]


def test_budget_stops_cleanly_and_a_bigger_budget_resumes(tmp_path):
    prices = {"pricey": {"input": 1000.0, "output": 1000.0}}
    with FakeLLM() as fake:
        report = run_generate(cfg_for(fake, tmp_path, model="pricey", prices=prices, budget_usd=2.0, concurrency=2))
    assert report["stop_reason"] == "budget"
    assert 0 < report["cost"]["total_usd"] <= 2.0
    n = len(check_output(tmp_path))
    with FakeLLM() as fake:
        report = run_generate(cfg_for(fake, tmp_path, model="pricey", prices=prices, budget_usd=1e6))
    assert report["stop_reason"] == "complete" and len(check_output(tmp_path)) > n


def test_cli_keeps_the_api_key_out_of_every_output(tmp_path, monkeypatch, capsys):
    secret = "sk-embforge-test-SECRET-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    with FakeLLM({2: "500", 4: "429"}) as fake:
        rc = embforge_main(["synth", "generate", "--base-url", fake.base_url, "--model", "gpt-4o-mini",
                            "--out", str(tmp_path / "data.jsonl"), "--tasks-per-type", "1", "--examples-per-task",
                            "1", "--task-types", "sts,short-long", "--no-progress", "--set", "backoff_base=0.01"])
    assert rc == 0 and len(check_output(tmp_path)) == 2
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    for f in tmp_path.iterdir():
        assert secret not in f.read_text(errors="replace"), f.name


def test_cli_errors_name_the_bad_key_and_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nout: x.jsonl\ntask_types: [sts, poetry]\n")
    assert embforge_main(["synth", "generate", "--config", str(cfg)]) == 2
    assert "poetry" in capsys.readouterr().err
    cfg.write_text("model: m\nout: x.jsonl\nvalidation: {near_dup: 0.5}\n")
    assert embforge_main(["synth", "generate", "--config", str(cfg)]) == 2
    assert "validation.near_dup" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse's usage errors: the same code
        embforge_main(["synth", "generate", "--concurrency", "many"])
    assert e.value.code == 2


def test_batch_api_mode_submits_once_and_collects(tmp_path):
    # A "drop" leaves one request out of the batch output, like an expired line: it must go into the next batch.
    dropped = []

    def faults(n, prompt):
        if "exactly these string fields" in prompt and not dropped:
            dropped.append(prompt)
            return "drop"
        return "length" if n == 5 else None

    with FakeLLM(faults) as fake:
        cfg = cfg_for(fake, tmp_path, task_types=["sts", "short-long"], batch=BatchConfig(enabled=True,
                                                                                          poll_interval=0.01))
        first = run_generate(cfg)
        assert len(fake.batches) == 2 and all(e.get("batch") for e in fake.log)
        assert first["pending_requests"] == 1 and first["example_outcomes"]["rejected:truncated"] == 1
        second = run_generate(cfg)
        assert len(fake.batches) == 3 and fake.log[-1]["prompt"] == dropped[0]
    assert second["stop_reason"] == "complete"
    assert len(check_output(tmp_path)) == 4 + 2 * 2 - 1
    # the Batch API discount is applied to the cost
    u = second["cost"]["per_model"]["gpt-4o-mini"]
    assert u["usd"] == pytest.approx(0.5 * (u["prompt_tokens"] * 0.15 + u["completion_tokens"] * 0.6) / 1e6)


def test_batch_interrupted_while_polling_is_collected_not_resubmitted(tmp_path):
    with FakeLLM() as fake:
        cfg = cfg_for(fake, tmp_path, task_types=["sts"], batch=BatchConfig(enabled=True, poll_interval=0.01,
                                                                            max_wait=0.0))
        with pytest.raises(TimeoutError, match="rerun"):
            run_generate(cfg)
        assert len(fake.batches) == 1 and (tmp_path / "data.batch-examples.json").exists()
        cfg.batch.max_wait = 60.0
        report = run_generate(cfg)
        assert len(fake.batches) == 1, "the rerun paid for the same requests twice"
    assert report["stop_reason"] == "complete" and len(check_output(tmp_path)) == 4
    assert not (tmp_path / "data.batch-examples.json").exists()


def test_generated_file_feeds_the_trainer_reader_unchanged(tmp_path):
    # A real import: if the reader moves or is renamed, this test must fail, not skip.
    from embforge.data.records import read_examples

    with FakeLLM() as fake:
        run_generate(cfg_for(fake, tmp_path))
    recs = check_output(tmp_path)
    examples = list(read_examples(tmp_path / "data.jsonl"))
    assert len(examples) == len(recs)
    for ex, rec in zip(examples, recs):
        assert (ex.instruction, ex.query, ex.positive, list(ex.negatives)) == \
            (rec["instruction"], rec["query"], rec["positive"], rec["negatives"])
        assert ex.task_type == rec["task_type"] and ex.language == rec["language"]


def test_junk_fields_are_rejected_by_reason_in_report_bar_and_summary(tmp_path, capsys):
    """Well-formed JSON with junk in it: an ellipsis, the instruction repeated as the query, digits where a
    language was asked, a 3-word document for an "about N words" (N >= 50) spec. Each is rejected with its reason;
    the progress bar's ok / rejected counts equal the report's; the last line names the report's path."""
    import json
    import re
    tasks = [f"Find {w} facts about harbors" for w in ("alpha", "bravo", "cedar", "delta", "ember", "fjord")]
    junk = {
        tasks[0]: lambda p, pr: {**p, "user_query": "..."},
        tasks[1]: lambda p, pr: {**p, "user_query": tasks[1]},
        tasks[2]: lambda p, pr: {**p, "positive_document": "1.548879333365274"},
        tasks[3]: lambda p, pr: {**p, "positive_document": "a short answer"},
        tasks[4]: lambda p, pr: {**p, "hard_negative_document": "<document>"},
    }

    def faults(n, prompt):
        if "Think up" in prompt:
            return lambda p, pr: {"tasks": tasks[:len(p["tasks"])]}
        return next((f for t, f in junk.items() if t in prompt), None)

    out = tmp_path / "data.jsonl"
    with FakeLLM(faults) as fake:
        rc = embforge_main(["synth", "generate", "--base-url", fake.base_url, "--model", "gpt-4o-mini",
                            "--out", str(out), "--task-types", "short-long", "--tasks-per-type", "6",
                            "--examples-per-task", "1", "--concurrency", "1", "--set", "backoff_base=0.02",
                            "--set", "backoff_max=0.1", "--set", "languages={English: 1.0}"])
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "data.report.json").read_text())
    assert rc == 0, err
    assert report["example_outcomes"] == {"accepted:ok": 1, "rejected:placeholder:query": 1,
                                          "rejected:instruction_is_query": 1, "rejected:no_letters:positive": 1,
                                          "rejected:too_short_for_spec:positive": 1,
                                          "rejected:placeholder:negatives": 1}
    assert [r["instruction"] for r in records(tmp_path)] == [tasks[5]]
    bars = re.findall(r"ok=(\d+), rejected=(\d+)", err)
    assert bars and tuple(map(int, bars[-1])) == (1, 5)            # the example phase's final state
    assert "rejected by reason:" in err and "instruction_is_query 1" in err
    assert err.strip().splitlines()[-1] == f"[synth] report: {tmp_path / 'data.report.json'}"


def test_argument_errors_come_before_any_local_server(tmp_path, capsys, monkeypatch):
    import embforge.synth.local as local

    def no_server(*a, **k):
        raise AssertionError("the local server was started")
    monkeypatch.setattr(local, "LlamaServer", no_server)
    assert embforge_main(["synth", "generate", "--local", "--tasks-per-type", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["embforge synth: error: out: required (--out)"]
    assert embforge_main(["synth", "relabel", "--local", "--input", str(tmp_path / "none.jsonl"),
                          "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "none.jsonl not found" in capsys.readouterr().err
