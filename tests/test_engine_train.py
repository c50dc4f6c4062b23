"""Training loop: resume reproduces the uninterrupted loss curve exactly (after stop_after, SIGINT or SIGTERM, with
a learnable temperature too); checkpoints are pruned to the last two; data errors name file:line."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from embforge.config import ConfigError, load_config
from embforge.data.records import DataError, ExampleFile, read_examples
from embforge.data.sources import build
from embforge.cli.train import run_training
from embforge.engine.train import TrainConfig


def cfg_for(tmp_path, out, steps=4, extra=()):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        build(data)
    return load_config(TrainConfig, None, [
        "model.path=tiny-llama", "model.lora.dropout=0.1", f"data.train=[{data}]", "batch.queries=6",
        "batch.chunk_tokens=64", "optim.warmup_steps=1", f"steps={steps}", f"output_dir={out}",
        "checkpoint_every=0", "device=cpu", *extra])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_resume_reproduces_uninterrupted_loss_curve(tmp_path):
    full = run_training(cfg_for(tmp_path, tmp_path / "a"), progress=False)["losses"]
    part = run_training(cfg_for(tmp_path, tmp_path / "b"), progress=False, stop_after=2)
    assert part["stopped_at"] == 2 and len(part["losses"]) == 2
    resumed = run_training(cfg_for(tmp_path, tmp_path / "b"), resume=True, progress=False)["losses"]
    assert len(full) == 4 and resumed == full          # bit-identical, dropout included
    assert len({round(x, 6) for x in full}) > 1
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]


def test_raw_e5_formats_and_bad_lines(tmp_path):
    p = tmp_path / "mix.jsonl"
    p.write_text("\n".join([
        json.dumps({"user_query": "q", "positive_document": "p", "hard_negative_document": "n", "task": "T"}),
        json.dumps({"input_text": "long text", "label": "pos", "misleading_label": "neg"}),
        json.dumps({"input": "a", "positive_document": "b"}),
        json.dumps({"S1": "x", "S2": "y", "S3": "z"}),
        "{not json",
        json.dumps({"query": "q", "positive": ""}),
    ]) + "\n")
    with pytest.raises(DataError, match=r"mix.jsonl:5: invalid JSON"):
        ExampleFile(p)
    data = ExampleFile(p, skip_bad_lines=True)
    assert len(data) == 4 and len(data.skipped) == 2 and "mix.jsonl:6" in data.skipped[1]
    ex = list(read_examples(p, skip_bad_lines=True))
    assert (ex[0].instruction, ex[0].query, ex[0].negatives) == ("T", "q", ["n"])
    assert ex[3].instruction == "Retrieve semantically similar text." and ex[3].negatives == ["z"]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="batch.querys"):
        load_config(TrainConfig, None, ["batch.querys=3", "data.train=[x]"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(TrainConfig, None, ["optim.lr=fast", "data.train=[x]"])
    # YAML 1.1 reads 1e-3 (no dot) as a string: still a number to us
    assert load_config(TrainConfig, None, ["optim.lr=1e-3", "data.train=[x]"]).optim.lr == 1e-3


def _tiny_beir(folder, n_docs=24, n_queries=8):
    """A small BEIR folder from the demo data: query i's answer is document i."""
    rows = [json.loads(l) for l in (folder.parent / "train.jsonl").read_text().splitlines()[:n_docs]]
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": r["positive"]}) + "\n"
                                                 for i, r in enumerate(rows)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n"
                                                  for i, r in enumerate(rows[:n_queries])))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                               "".join(f"q{i}\td{i}\t1\n" for i in range(n_queries)))
    return folder


def test_evaluation_before_every_n_steps_and_after(tmp_path):
    from embforge.eval.retrieval import evaluate_retrieval

    cfg = cfg_for(tmp_path, tmp_path / "run", steps=5)
    beir = _tiny_beir(tmp_path / "beir")
    cfg.eval.data, cfg.eval.every_steps, cfg.eval.max_queries = str(beir), 2, 6
    cfg.optim.lr = 1e-2  # big steps: 5 steps of a tiny model must visibly move the ranking
    result = run_training(cfg, progress=False)
    assert list(result["eval"]) == ["before", "step2", "step4", "after"]
    records = [json.loads(l) for l in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    ndcg = {r["step"]: r["value"] for r in records if r["metric"] == "ndcg_at_10"}
    assert sorted(ndcg) == [0, 2, 4, 5]
    assert all(r["data"] == str(beir) and "commit" in r and r["model"] for r in records)
    assert {r["value"] for r in records if r["metric"] == "num_queries"} == {6}   # max_queries applied
    for key, step in (("before", 0), ("step2", 2), ("after", 5)):
        assert result["eval"][key]["ndcg_at_10"] == ndcg[step]
    assert len(set(ndcg.values())) > 1                                   # training changed the embedder
    # the "after" record is what an independent evaluation of the final model gives
    from embforge.eval.beir import load_beir
    ds = load_beir(beir)
    ds.qrels = {q: ds.qrels[q] for q in sorted(ds.qrels)[:6]}
    again = evaluate_retrieval(result["embedder"], ds, progress=False)
    assert again["ndcg_at_10"] == pytest.approx(ndcg[5], abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Learnable temperature, checkpoint pruning, SIGINT / SIGTERM
# ----------------------------------------------------------------------------------------------------------
LEARN_TAU = ["loss.learnable_temperature=true", "loss.temperature=0.1", "optim.lr=1e-2"]


@pytest.mark.slow
def test_learnable_temperature_trains_and_is_restored_on_resume(tmp_path):
    from embforge.data.records import ExampleFile, batch_at
    from embforge.engine.gradcache import contrastive_step
    from embforge.engine.model import Embedder
    from embforge.engine.batch import to_batch

    a, b = tmp_path / "a", tmp_path / "b"
    cfg = cfg_for(tmp_path, a, extra=[*LEARN_TAU, "checkpoint_every=1"])
    full = run_training(cfg, progress=False)["losses"]
    temps = [r["temperature"] for r in metrics(a)]
    # dL/dtau of the first step, computed directly on the same model, batch and dropout draws.
    torch.manual_seed(cfg.seed)
    e = Embedder.from_config(cfg.model, torch.device("cpu"))
    e.model.train()
    batch = to_batch(batch_at(ExampleFile(cfg.data.train), 0, 6, cfg.seed)[0], cfg.batch.negatives)
    tau = torch.tensor(0.1, requires_grad=True)
    first = contrastive_step(e, batch, temperature=tau, chunk_tokens=64)
    assert first.loss == pytest.approx(full[0], rel=1e-6)
    assert abs(float(tau.grad)) > 1e-3
    # Adam's first step moves log(tau) by exactly lr against the gradient's sign (no weight decay on the
    # temperature: the config's optim.weight_decay=0.1 would add lr * 0.1 * log(0.1) = -2.3e-3).
    step1 = math.log(temps[0]) - math.log(0.1)
    assert step1 == pytest.approx(-1e-2 * math.copysign(1, float(tau.grad)), abs=2e-5)
    assert len({round(t, 7) for t in temps}) == len(temps) == 4          # it keeps moving
    # keep=2: only the last two checkpoints survive, no temp folder is left behind.
    assert checkpoints(a) == ["step-000003", "step-000004"]
    saved = torch.load(a / "checkpoints" / "step-000004" / "trainer.pt", weights_only=False)
    assert math.exp(float(saved["log_tau"])) == pytest.approx(temps[-1], rel=1e-6)

    # Interrupted after 2 steps and resumed: same temperatures, same losses (log_tau and its Adam state restored).
    part = run_training(cfg_for(tmp_path, b, extra=LEARN_TAU), progress=False, stop_after=2)
    assert part["stopped_at"] == 2
    resumed = run_training(cfg_for(tmp_path, b, extra=LEARN_TAU), resume=True, progress=False)["losses"]
    assert resumed == full
    assert [r["temperature"] for r in metrics(b)] == temps


def assert_no_embforge_class_pickled(path):
    """A checkpoint holds plain data only: an embforge class pickled by its module path would stop loading as soon
    as the code moves (checkpoints written before a restructure must still resume)."""
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            assert not module.startswith("embforge"), f"{path} pickles {module}.{name}"
            return super().find_class(module, name)

    torch.load(path, weights_only=False, pickle_module=SimpleNamespace(Unpickler=Unpickler, load=pickle.load,
                                                                       __name__="pickle"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    return run_training(cfg_for(root, root / "run"), progress=False)["losses"]


def test_sigint_checkpoints_after_the_current_step_and_resume_continues(tmp_path, monkeypatch, uninterrupted):
    """The handler path, deterministically: a real SIGINT to this process during step 2."""
    import embforge.engine.train as T

    real, calls = T.contrastive_step, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(T, "contrastive_step", interrupted)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    part = run_training(cfg_for(tmp_path, out), progress=False)          # checkpoint_every=0: only the signal saves
    assert part["stopped_at"] == 2 and len(calls) == 2           # the step in flight finished, no third began
    assert signal.getsignal(signal.SIGINT) is before             # handlers restored
    assert checkpoints(out) == ["step-000002"] and [r["step"] for r in metrics(out)] == [1, 2]
    assert_no_embforge_class_pickled(out / "checkpoints" / "step-000002" / "trainer.pt")
    monkeypatch.setattr(T, "contrastive_step", real)
    assert run_training(cfg_for(tmp_path, out), resume=True, progress=False)["losses"] == uninterrupted


@pytest.mark.slow
def test_sigterm_to_embforge_train_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    """A real `embforge train` process, a real SIGTERM while it trains. (Constant learning rate: the run is cut
    at an unknown step, and a decaying schedule depends on the total number of steps.)"""
    data = tmp_path / "train.jsonl"
    build(data)
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""model: {{path: tiny-llama, lora: {{dropout: 0.1}}}}
data: {{train: ["{data}"]}}
batch: {{queries: 6, chunk_tokens: 64}}
optim: {{warmup_steps: 1, decay: constant}}
steps: 4000
output_dir: "{out}"
checkpoint_every: 0
device: cpu
""")
    import embforge
    root = str(Path(embforge.__file__).resolve().parents[1])      # the package under test, not an installed one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "embforge", "train", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 1):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "training never logged a step"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "signal 15: checkpointing after this step" in stderr
    n = len(metrics(out))
    assert 1 <= n < 4000 and json.loads(stdout)["steps"] == n
    assert checkpoints(out) == [f"step-{n:06d}"]
    state = torch.load(out / "checkpoints" / f"step-{n:06d}" / "trainer.pt", weights_only=False)
    assert state["step"] == n and state["losses"] == [r["loss"] for r in metrics(out)]
    # The checkpoint resumes into the curve of an uninterrupted run one step longer.
    const = ["optim.decay=constant"]
    resumed = run_training(cfg_for(tmp_path, out, steps=n + 1, extra=const), resume=True, progress=False)["losses"]
    full = run_training(cfg_for(tmp_path, tmp_path / "full", steps=n + 1, extra=const), progress=False)["losses"]
    assert resumed == full


def test_save_checkpoint_keeps_the_last_two_in_step_order(tmp_path):
    from embforge.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    emb = SimpleNamespace(model=model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    log_tau = torch.nn.Parameter(torch.tensor(-2.0))
    for step in (9, 10, 99, 100, 1000):          # crosses digit boundaries: order must be numeric
        with torch.no_grad():
            model.weight.fill_(step)
            log_tau.fill_(-step / 1000)
        save_checkpoint(tmp_path, step, emb, opt, sched, log_tau, {"step": step})
    assert checkpoints(tmp_path) == ["step-000100", "step-001000"]
    assert latest_checkpoint(tmp_path).name == "step-001000"
    save_checkpoint(tmp_path, 1001, emb, opt, sched, None, {"step": 1001}, keep=3)
    assert checkpoints(tmp_path) == ["step-000100", "step-001000", "step-001001"]
    with torch.no_grad():
        model.weight.zero_()
        log_tau.zero_()
    state = load_checkpoint(tmp_path / "checkpoints" / "step-001000", emb, opt, sched, log_tau)
    assert state["step"] == 1000 and float(model.weight[0, 0]) == 1000 and float(log_tau) == -1.0


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    """A typo in a shipped recipe (an unknown key, a bad value) fails here, not minutes into someone's run."""
    cfg = load_config(TrainConfig, path)
    cfg.validate()
    cfg.model.validate()
