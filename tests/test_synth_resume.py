"""Resume states built on purpose, not by the luck of a kill: a record in the ledger but not in the output,
and the deduper re-seeded from what the output already holds."""
from __future__ import annotations

import asyncio
import json

from embforge.synth.generate import Generator
from test_synth_fakeserver import FakeLLM
from test_synth_generate import cfg_for, check_output, ledger, records

STS = ("S1", "S2", "S3")  # the fake keys its "duplicate" memory by the answer's field names


def sts_cfg(fake, tmp_path, examples: int, **kw):
    # STS needs no brainstorm: every request is an example, so request k of a run is example k (concurrency 1).
    return cfg_for(fake, tmp_path, task_types=["sts"], tasks_per_type=1, examples_per_task=examples, concurrency=1,
                   languages={"English": 1.0}, **kw)


class SimulatedCrash(RuntimeError):
    pass


def run_crashing_on_output_write(cfg, crash_at: int) -> None:
    """Run until the `crash_at`-th output write, which dies after writing half its line: the ledger already
    holds that record (it is written first), the output holds a torn fragment of it."""
    gen = Generator(cfg)
    open_files = gen._open

    def open_and_arm():
        open_files()
        appender, writes = gen.records, []
        real_append = appender.append

        def append(rec):
            writes.append(rec)
            if len(writes) == crash_at:
                line = json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode()
                appender._f.write(line[: len(line) // 2])
                appender._f.flush()
                raise SimulatedCrash("killed between the ledger line and the output line")
            real_append(rec)
        appender.append = append

    gen._open = open_and_arm
    try:
        asyncio.run(gen.run())
    except SimulatedCrash:
        return
    raise AssertionError("the crash point was never reached")


def test_record_in_the_ledger_but_not_the_output_is_restored_once_and_blocks_its_duplicates(tmp_path, capsys):
    with FakeLLM() as fake:
        run_crashing_on_output_write(sts_cfg(fake, tmp_path, 4), crash_at=2)
        asked_first = len(fake.log)
    accepted = [e for e in ledger(tmp_path) if e["status"] == "accepted"]
    assert asked_first == 2 and len(accepted) == 2
    lost = accepted[1]
    raw_out = (tmp_path / "data.jsonl").read_bytes()
    assert not raw_out.endswith(b"\n"), "the simulated crash should leave a torn last line"
    assert [r["meta"]["request_id"] for r in records_whole_lines(raw_out)] == [accepted[0]["id"]]

    def faults(n, prompt):
        if n == 1:  # the next example repeats the lost record word for word
            fake2.last_example[STS] = lost["content"]
            return "duplicate"
        return None

    with FakeLLM(faults, seed=1) as fake2:  # another seed: its fresh answers differ from the first run's
        report = asyncio.run(Generator(sts_cfg(fake2, tmp_path, 4)).run())
        asked_second = fake2.prompts()
    assert "restored 1 accepted record" in capsys.readouterr().err
    # The lost record is back, exactly as the ledger holds it, and its request was not paid for again.
    recs = check_output(tmp_path)
    assert recs[1] == lost["record"]
    assert len(asked_second) == 2  # the two examples never answered; the lost one was not asked again
    assert report["stop_reason"] == "complete"
    # The duplicate of the restored record was caught: the deduper knows restored records too.
    latest = {e["id"]: e for e in ledger(tmp_path)}
    assert sorted(e["reason"] or "ok" for e in latest.values()) == ["duplicate_exact", "ok", "ok", "ok"]
    assert len(recs) == 3
    # The torn fragment was moved aside, not silently dropped.
    line = json.dumps(lost["record"], ensure_ascii=False, separators=(",", ":")).encode()
    assert (tmp_path / "data.jsonl.torn").read_bytes() == line[: len(line) // 2] + b"\n"


def records_whole_lines(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.split(b"\n")[:-1]]


def test_resume_seeds_the_deduper_with_everything_already_in_the_output(tmp_path):
    with FakeLLM() as fake:
        first = asyncio.run(Generator(sts_cfg(fake, tmp_path, 2)).run())
    assert first["stop_reason"] == "complete"
    earlier = [e for e in ledger(tmp_path) if e["status"] == "accepted"]
    assert len(earlier) == 2
    # A record that reached the output some other way (merged by hand, another seed): the ledger knows nothing
    # of it, so only reading the output can teach the deduper about it.
    foreign = {"S1": "foreign query about basalt columns and glaciers near the fjord",
               "S2": "foreign passage on basalt columns formed by cooling lava beside a glacier fjord",
               "S3": "an unrelated sentence about violins"}
    with open(tmp_path / "data.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "Retrieve semantically similar text.", "query": foreign["S1"],
                            "positive": foreign["S2"], "negatives": [foreign["S3"]], "task_type": "sts",
                            "language": "English", "meta": {"source": "merged by hand"}}) + "\n")

    plan = {1: (earlier[0]["content"], "duplicate"), 2: (earlier[1]["content"], "nearduplicate"),
            3: (json.dumps(foreign), "duplicate"), 4: (None, None)}

    def faults(n, prompt):
        content, fault = plan[n]
        if content:
            fake2.last_example[STS] = content
        return fault

    with FakeLLM(faults, seed=1) as fake2:  # another seed: its fresh answers differ from the first run's
        second = asyncio.run(Generator(sts_cfg(fake2, tmp_path, 6)).run())
        assert len(fake2.log) == 4, "the rerun asked again for a request that had finished"
    assert second["stop_reason"] == "complete"
    new = [e for e in ledger(tmp_path) if e["id"] not in {x["id"] for x in earlier}]
    assert [e["reason"] or "ok" for e in new] == ["duplicate_exact", "duplicate_near", "duplicate_exact", "ok"]
    recs = records(tmp_path)
    assert len(recs) == 4 and len({(r["query"], r["positive"]) for r in recs}) == 4
