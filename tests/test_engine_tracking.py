"""Run tracking: a tiny training run with log.tensorboard leaves event files whose scalars, read back with
tensorboard's own EventAccumulator, equal metrics.jsonl and eval.jsonl step for step, also after a stop, a lost
checkpoint and a resume (no duplicate steps); asking for W&B without the package is a clear error."""
import importlib.util
import json
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from embforge.cli import main
from embforge.config import load_config
from embforge.data.sources import build
from embforge.cli.train import run_training as train
from embforge.engine.train import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("track")
    build(root / "train.jsonl", sources=("stdlib",))   # one source: enough for a tiny run, cheap to build
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()[:12]]
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": r["positive"]}) + "\n"
                                               for i, r in enumerate(rows)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n"
                                                for i, r in enumerate(rows[:5])))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\td{i}\t1\n" for i in range(5)))
    return root


def _cfg(data, out, *extra):
    return load_config(TrainConfig, None, [
        "model.path=tiny-llama", "model.lora.dropout=0.1", "model.query_max_length=32", "model.doc_max_length=24",
        f"data.train=[{data / 'train.jsonl'}]", "batch.queries=4", "batch.chunk_tokens=64", "optim.warmup_steps=1",
        "optim.lr=1e-2", "steps=5", "loss.learnable_temperature=true", f"eval.data={data / 'beir'}",
        "eval.every_steps=2", f"output_dir={out}", "device=cpu", "log.tensorboard=true", *extra])


def _scalars(out):
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_against_files(out):
    tb = _scalars(out)
    metrics = _jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5]
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                     ("tokens_per_s", "train/tokens_per_s"), ("temperature", "train/temperature"),
                     ("peak_gb", "train/peak_memory_gb")):
        assert [s for s, _ in tb[tag]] == [r["step"] for r in metrics], tag      # each step once
        assert [v for _, v in tb[tag]] == pytest.approx([r[key] for r in metrics], rel=1e-6), tag   # float32
    evals = [r for r in _jsonl(out / "eval.jsonl") if r["metric"] == "ndcg_at_10"]
    assert [s for s, _ in tb["eval/beir/ndcg_at_10"]] == [r["step"] for r in evals] == [0, 2, 4, 5]
    assert [v for _, v in tb["eval/beir/ndcg_at_10"]] == pytest.approx([r["value"] for r in evals], rel=1e-6)
    return tb


@pytest.mark.slow
def test_event_files_equal_metrics_also_after_resume(data, tmp_path):
    full = tmp_path / "full"
    train(_cfg(data, full), progress=False)
    tb_full = _check_against_files(full)
    assert len({v for _, v in tb_full["train/loss"]}) > 1

    # stopped after step 3 with checkpoints at 2 and 3; the step-3 checkpoint is then lost, so the resumed run
    # recomputes step 3, which the first process had already logged: it must appear once, with the new value
    part = tmp_path / "part"
    train(_cfg(data, part, "checkpoint_every=2"), progress=False, stop_after=3)
    assert [s for s, _ in _scalars(part)["train/loss"]] == [1, 2, 3]
    shutil.rmtree(part / "checkpoints" / "step-000003")
    train(_cfg(data, part, "checkpoint_every=2"), resume=True, progress=False)
    tb_part = _check_against_files(part)
    # resume reproduces the uninterrupted run, so the curves are the same
    assert tb_part["train/loss"] == tb_full["train/loss"]
    assert len(list((part / "tensorboard").glob("events.out.tfevents.*"))) == 2    # one file per process


def test_no_tracking_unless_asked(data, tmp_path):
    out = tmp_path / "plain"
    train(_cfg(data, out, "log.tensorboard=false", "steps=1", "eval.data=null"), progress=False)
    assert (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_clear_error(data, tmp_path, capsys):
    with pytest.raises(ValueError, match="log.wandb: true needs the wandb package"):
        _cfg(data, tmp_path / "w", "log.wandb=true")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: tiny-llama}}\ndata: {{train: [{data / 'train.jsonl'}]}}\n"
                   f"output_dir: {tmp_path / 'w'}\nlog: {{wandb: true}}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs the wandb package" in err and not (tmp_path / "w").exists()


def test_per_dataset_loss_curves(data, tmp_path):
    """Two named datasets, homogeneous batches: each step's loss goes to its dataset's curve, and the curves
    partition the steps."""
    lines = (data / "train.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:200]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[200:400]) + "\n")
    out = tmp_path / "run"
    specs = f"[{{path: {tmp_path / 'a.jsonl'}, name: alpha}}, {{path: {tmp_path / 'b.jsonl'}, name: beta}}]"
    cfg = _cfg(data, out, "steps=6", "eval.data=null", "loss.learnable_temperature=false", f"data.train={specs}")
    train(cfg, progress=False)
    tb = _scalars(out)
    metrics = _jsonl(out / "metrics.jsonl")
    by_name = {name: [(r["step"], r["loss"]) for r in metrics if r.get("dataset") == name]
               for name in ("alpha", "beta")}
    assert by_name["alpha"] and by_name["beta"]                              # both datasets were drawn
    for name, want in by_name.items():
        got = tb[f"train/loss/{name}"]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert sorted(s for name in by_name for s, _ in tb[f"train/loss/{name}"]) == list(range(1, 7))
