"""Bad input, as a new user would give it: every case exits 2 with ONE line on stderr naming the config key or
file:line, no traceback, and (data, model path, output_dir errors) before any model loads.

Run in-process through the CLI's main(); the model loader is replaced by a spy that fails the test if called."""
import json

import pytest

from embforge.cli import main

GOOD = [{"instruction": "Find the answer", "query": f"question {i} about cats", "positive": f"answer {i} about cats",
         "negatives": [f"unrelated text {i}"]} for i in range(6)]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    bad = [json.dumps(GOOD[0]), json.dumps(GOOD[1]), '{"query": "q", "positive": ', json.dumps(GOOD[2])]
    (tmp_path / "bad_json.jsonl").write_text("\n".join(bad) + "\n")
    (tmp_path / "no_positive.jsonl").write_text(json.dumps(GOOD[0]) + "\n" + json.dumps({"query": "q"}) + "\n")
    (tmp_path / "c.yaml").write_text("model: {path: tiny-llama}\ndata: {train: [d.jsonl]}\n"
                                     "batch: {queries: 4, chunk_tokens: 64}\nsteps: 1\noutput_dir: out\n")
    (tmp_path / "hubbase").mkdir()     # a model folder whose base is a hub id this machine has never downloaded
    (tmp_path / "hubbase" / "embforge_config.json").write_text(json.dumps(
        {"model": {"path": "nosuch-org/nosuch-model"}, "merged": False}))
    (tmp_path / "used" / "checkpoints").mkdir(parents=True)
    (tmp_path / "used" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    from embforge.eval.datasets import is_heldout
    kept = [r for r in GOOD if not is_heldout(r["query"], 0.1, 0)]
    (tmp_path / "one.jsonl").write_text(json.dumps(kept[0]) + "\n")   # no record falls in the 10% held-out slice
    return tmp_path


@pytest.fixture
def no_model_load(monkeypatch):
    from embforge.engine.model import Embedder

    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(Embedder, "from_config", classmethod(spy))
    return calls


TRAIN = ["train", "--config", "c.yaml"]
CASES = [
    # (argv, what the one line must contain)
    (TRAIN + ["--set", "batch.negatives=-1"], "batch.negatives"),
    (TRAIN + ["--set", "optim.warmup_steps=-5"], "optim.warmup_steps"),
    (TRAIN + ["--set", "checkpoint_every=-1"], "checkpoint_every"),
    (TRAIN + ["--set", "optim.lr=-1e-3"], "optim.lr"),
    (TRAIN + ["--set", "optim.lr=0"], "optim.lr"),
    (TRAIN + ["--set", "optim.weight_decay=-0.1"], "optim.weight_decay"),
    (TRAIN + ["--set", "optim.betas=[0.9, 1.5]"], "optim.betas[1]"),
    (TRAIN + ["--set", "optim.betas=[0.9]"], "optim.betas"),
    (TRAIN + ["--set", "optim.grad_clip=0"], "optim.grad_clip"),
    (TRAIN + ["--set", "optim.optimizer=sgd"], "optim.optimizer"),
    (TRAIN + ["--set", "batch.queries=0"], "batch.queries"),
    (TRAIN + ["--set", "batch.chunk_tokens=0"], "batch.chunk_tokens"),
    (TRAIN + ["--set", "batch.chunk_tokens=lots"], "batch.chunk_tokens"),
    (TRAIN + ["--set", "batch.max_chunk_seqs=0"], "batch.max_chunk_seqs"),
    (TRAIN + ["--set", "steps=0"], "steps"),
    (TRAIN + ["--set", "log_every=0"], "log_every"),
    (TRAIN + ["--set", "seed=-3"], "seed"),
    (TRAIN + ["--set", "device=gpu0"], "device"),
    (TRAIN + ["--set", "loss.temperature=-1"], "loss.temperature"),
    (TRAIN + ["--set", "loss.temperature=.nan"], "loss.temperature"),
    (TRAIN + ["--set", "loss.matryoshka_dims=[32, 0]"], "loss.matryoshka_dims[1]"),
    (TRAIN + ["--set", "loss.matryoshka_weights=[1.0]"], "loss.matryoshka_weights"),
    (TRAIN + ["--set", "loss.matryoshka_dims=[32, 16]", "--set", "loss.matryoshka_weights=[1.0]"],
     "loss.matryoshka_weights"),
    (TRAIN + ["--set", "model.lora.r=0"], "model.lora.r"),
    (TRAIN + ["--set", "model.lora.alpha=-1"], "model.lora.alpha"),
    (TRAIN + ["--set", "model.lora.dropout=1.5"], "model.lora.dropout"),
    (TRAIN + ["--set", "model.path=/nonexistent/model"], "model.path"),
    (TRAIN + ["--set", "model.path=tiny-foo"], "model.path"),
    (TRAIN + ["--set", "model.path=nosuch-org/nosuch-model"], "not in the offline cache"),
    (TRAIN + ["--set", "eval.every_steps=-1"], "eval.every_steps"),
    (TRAIN + ["--set", "eval.max_queries=0"], "eval.max_queries"),
    (TRAIN + ["--set", "eval.data=/nonexistent/beir"], "eval.data"),
    (TRAIN + ["--set", "distributed.timeout_s=0"], "distributed.timeout_s"),
    (TRAIN + ["--set", "distributed.strategy=zero3"], "distributed.strategy"),
    (TRAIN + ["--set", "optim.lrr=1"], "optim.lrr"),
    (TRAIN + ["--set", "data.train=[missing.jsonl]"], "missing.jsonl"),
    (TRAIN + ["--set", "data.train=[bad_json.jsonl]"], "bad_json.jsonl:3"),
    (TRAIN + ["--set", "data.train=[no_positive.jsonl]"], "no_positive.jsonl:2"),
    (TRAIN + ["--set", "data.train=[bad_json.jsonl]", "--dry-run"], "bad_json.jsonl:3"),
    (TRAIN + ["--set", "output_dir=used"], "output_dir used already holds a run"),
    (TRAIN + ["--set", "output_dir=used", "--dry-run"], "output_dir used already holds a run"),
    (TRAIN + ["--resume", "--overwrite"], "--resume"),
    (["encode", "--model", "nowhere", "--out", "x.npy", "hi"], "nowhere"),
    (["encode", "--model", "nowhere", "--out", "x.txt", "hi"], "--out x.txt"),
    (["encode", "--model", "hubbase", "--out", "x.npy", "hi"], "not in the offline cache"),
    (["export", "--model", "hubbase", "--out", "exp"], "not in the offline cache"),
    (["export", "--model", "nowhere", "--out", "exp"], "nowhere"),
    (["eval", "retrieval", "--model", "hashing", "--synthetic", "one.jsonl"], "held-out"),
    (["eval", "sts", "--model", "hashing", "--data", "missing.tsv"], "missing.tsv"),
    (["mine", "--data", "d.jsonl", "--out", "m.jsonl", "--model", "hashing", "--negatives", "0"], "negatives"),
    (["mine", "--data", "no_positive.jsonl", "--out", "m.jsonl", "--model", "hashing"], "no_positive.jsonl:2"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a[3:] or a[:2]) for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(workdir, no_model_load, capsys, argv, needle):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err
    assert lines[0].startswith(f"embforge {argv[0]}: error: ")
    assert no_model_load == []            # refused before any model loaded


def test_data_error_in_a_normal_run_comes_before_the_model(workdir, no_model_load, capsys):
    """The same bad line, with a config that is otherwise fine: without the spy this run would load tiny-llama."""
    assert main(TRAIN + ["--set", "data.train=[d.jsonl, bad_json.jsonl]"]) == 2
    assert "bad_json.jsonl:3: invalid JSON" in capsys.readouterr().err
    assert no_model_load == [] and not (workdir / "out").exists()


def test_dry_run_prints_the_plan_without_loading_weights(workdir, no_model_load, capsys):
    assert main(TRAIN + ["--dry-run", "--set", "batch.queries=8"]) == 0
    out, err = capsys.readouterr()
    assert "dataset d: d.jsonl: 6 examples" in out and "1 per epoch" in out and "tokens per step: ~" in out
    assert "8 queries, 16 documents" in out
    assert "repeats examples" in out          # 8 queries from 6 examples
    assert no_model_load == [] and not (workdir / "out").exists()


def test_version(capsys):
    from embforge import __version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"embforge {__version__}"


def test_small_data_says_once_that_batches_repeat_examples(workdir):
    """Six examples, 48 queries a step: each batch holds every example 8 times; the run's log says so once (the
    notes the trainer prints), and says nothing when the data covers a batch."""
    from embforge.data.batches import ExampleBatches

    notes = ExampleBatches(["d.jsonl"], queries=48, negatives=1, seed=0).notes
    assert len(notes) == 1 and "6 training examples but batch.queries is 48" in notes[0]
    batch, _ = ExampleBatches(["d.jsonl"], queries=48, negatives=1, seed=0)(0)
    assert len(batch.queries) == 48 and len(set(batch.queries)) == 6          # what the warning describes
    assert ExampleBatches(["d.jsonl"], queries=6, negatives=1, seed=0).notes == []


def test_eval_sts_instruction_help_says_both_sentences(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "sts", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--instruction INSTRUCTION instruction applied to BOTH sentences of every pair" in help_text
