"""One run per output_dir: a rerun is refused and leaves the first run byte for byte; --overwrite starts over
(the old files gone, metrics.jsonl holding one run); --resume after a crash keeps one line per step."""
import json
from pathlib import Path

import pytest

from embforge.cli import main

DATA = [{"instruction": "Find the answer", "query": f"question {i} about cats", "positive": f"answer {i} about cats",
         "negatives": [f"unrelated text {i}"]} for i in range(8)]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DATA))
    (tmp_path / "c.yaml").write_text(
        "model: {path: tiny-llama, query_max_length: 16, doc_max_length: 16}\ndata: {train: [d.jsonl]}\n"
        "batch: {queries: 4, chunk_tokens: 64}\noptim: {warmup_steps: 1}\neval: {before_training: false}\n"
        "steps: 2\ncheckpoint_every: 1\noutput_dir: out\ndevice: cpu\n")
    return tmp_path


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rerun_refused_then_overwrite_starts_over(run_dir, capsys):
    out = run_dir / "out"
    assert main(["train", "--config", "c.yaml"]) == 0
    first = snapshot(out)
    assert steps(out) == [1, 2] and "final/embforge_config.json" in first

    # The dry-run's plan against what the run measured: tokens and chunks of the same two batches.
    from embforge.cli.train import check_inputs
    from embforge.config import load_config
    from embforge.data.plan import training_plan
    from embforge.engine.modelfiles import load_model_files
    from embforge.engine.train import TrainConfig
    cfg = load_config(TrainConfig, "c.yaml")
    plan = training_plan(cfg, check_inputs(cfg), load_model_files("tiny-llama")[1])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert plan["tokens_per_step"] == round(sum(r["real_tokens"] for r in recs) / 2)
    key = "packed_chunks_per_step" if recs[0]["packed"] else "chunks_per_step"
    assert plan[key] == sum(r["chunks"] for r in recs) / 2

    # A second run (other settings even) is refused before anything is written: the first run byte for byte.
    capsys.readouterr()
    assert main(["train", "--config", "c.yaml", "--set", "optim.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert snapshot(out) == first

    # --overwrite: the old run's files are removed first (a file only the old run had is gone), one run remains.
    (out / "final" / "only-in-the-old-run.txt").write_text("x")
    (out / "notes.txt").write_text("not a run file: kept")
    assert main(["train", "--config", "c.yaml", "--set", "optim.lr=0.01", "--overwrite"]) == 0
    assert steps(out) == [1, 2]
    assert not (out / "final" / "only-in-the-old-run.txt").exists()
    assert (out / "notes.txt").read_text() == "not a run file: kept"
    assert snapshot(out)["final/adapter/adapter_model.safetensors"] != first["final/adapter/adapter_model.safetensors"]


def test_resume_after_a_crash_keeps_one_line_per_step(run_dir):
    from embforge.cli.train import run_training
    from embforge.config import load_config
    from embforge.engine.train import TrainConfig

    out = run_dir / "out"
    cfg = load_config(TrainConfig, "c.yaml", ["checkpoint_every=0"])
    assert run_training(cfg, progress=False, stop_after=1)["stopped_at"] == 1    # checkpoint at step 1
    with open(out / "metrics.jsonl", "a") as f:       # a crash during step 2, after its metrics line was written
        f.write(json.dumps({"step": 2, "loss": 99.0}) + "\n")
    assert steps(out) == [1, 2]
    run_training(cfg, resume=True, progress=False)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines[1]["loss"] != 99.0
