"""The multi-dataset sampler (embforge/data/mixture.py): spec errors name data.train[i].key; weights give the
empirical shares; homogeneous batches; no duplicate texts in a batch (deferred, not dropped); per-dataset
instruction / negatives / in_batch_negatives; exact resume from a saved position; the same global batches on 1, 2
and 3 gloo ranks."""
import json
import os
import pickle
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from embforge.config import ConfigError, load_config
from embforge.data.mixture import open_mixture, resolve
from embforge.data.records import ExampleFile, batch_at
from embforge.engine.train import DatasetSpec, TrainConfig


def write(path: Path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def records(prefix: str, n: int, **extra):
    return [{"query": f"{prefix} query {i}", "positive": f"{prefix} passage {i}", **extra} for i in range(n)]


@pytest.fixture
def two(tmp_path):
    """Dataset a: 40 examples; dataset b: 20."""
    return write(tmp_path / "a.jsonl", records("a", 40)), write(tmp_path / "b.jsonl", records("b", 20))


def run(sampler, steps, position=None):
    position = sampler.initial_position() if position is None else position
    out = []
    for _ in range(steps):
        batch, position = sampler(position)
        out.append(batch)
    return out, position


def source(ex) -> str:
    return ex.query.split()[0]


# ------------------------------------------------------------------------------------------------ specs
def test_yaml_maps_paths_and_mappings_onto_specs(tmp_path, two):
    a, b = two
    y = tmp_path / "c.yaml"
    y.write_text(f"data:\n  train:\n    - {a}\n    - {{path: {b}, name: bee, weight: 3, instruction: Find it., "
                 "negatives: 0, in_batch_negatives: false}\n")
    cfg = load_config(TrainConfig, y)
    assert cfg.data.train[0] == a
    assert cfg.data.train[1] == DatasetSpec(b, "bee", 3.0, "Find it.", 0, False)
    ds = resolve(cfg.data.train)
    assert [(d.name, d.weight, len(d.data)) for d in ds] == [("a", 40.0, 40), ("bee", 3.0, 20)]   # size by default


@pytest.mark.parametrize("entry,message", [
    ("{path: P, wieght: 2}", r"unknown key data.train\[1\].wieght"),
    ("{path: P, weight: 0}", r"data.train\[1\].weight: must be a number > 0, got 0"),
    ("{path: P, weight: -1.5}", r"data.train\[1\].weight: must be a number > 0"),
    ("{path: P, negatives: -1}", r"data.train\[1\].negatives: must be >= 0"),
    ("{name: x}", r"missing required key data.train\[1\].path"),
    ("{path: P, in_batch_negatives: maybe}", r"data.train\[1\].in_batch_negatives: expected true/false"),
])
def test_bad_specs_name_the_key(tmp_path, two, entry, message):
    y = tmp_path / "c.yaml"
    y.write_text(f"data:\n  train:\n    - {two[0]}\n    - {entry.replace('P', two[1])}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, y)


def test_missing_files_empty_globs_and_clashing_names_name_the_key(tmp_path, two):
    a, b = two
    with pytest.raises(ConfigError, match=r"^data.train\[1\]: training data not found: .*nope.jsonl"):
        resolve([a, str(tmp_path / "nope.jsonl")])
    with pytest.raises(ConfigError, match=r"^data.train\[1\].path: no files match"):
        resolve([a, DatasetSpec(str(tmp_path / "shards" / "*.jsonl"))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^data.train\[0\].path: directory .* holds no \*.jsonl"):
        resolve([DatasetSpec(str(tmp_path / "empty"))])
    with pytest.raises(ConfigError, match=r"^data.train\[1\].name: 'a' is already data.train\[0\]'s name"):
        resolve([a, DatasetSpec(b, name="a")])
    with pytest.raises(ConfigError, match=r"^data.train\[1\].negatives: .*needs batch.sampling: homogeneous"):
        open_mixture([a, DatasetSpec(b, negatives=3)], queries=4, negatives=1, sampling="mixed")
    with pytest.raises(ConfigError, match=r"^data.train\[0\].in_batch_negatives: false needs"):
        open_mixture([DatasetSpec(a, in_batch_negatives=False), b], queries=4, negatives=1, sampling="mixed")
    with pytest.raises(ConfigError, match=r"batch.sampling: 'uniform' is not one of"):
        open_mixture([a], queries=4, negatives=1, sampling="uniform")


def test_directories_and_globs_of_shards_are_one_dataset(tmp_path):
    for k in range(3):
        write(tmp_path / "msmarco" / f"part-{k}.jsonl", records(f"m{k}", 5))
        write(tmp_path / "flat" / f"nli-{k}.jsonl", records(f"n{k}", 4))
    ds = resolve([str(tmp_path / "msmarco"), str(tmp_path / "flat" / "nli-*.jsonl")])
    assert [(d.name, len(d.data), d.weight) for d in ds] == [("msmarco", 15, 15.0), ("nli", 12, 12.0)]


# ------------------------------------------------------------------------------------------------ sampling
def test_weights_give_the_empirical_shares(two):
    a, b = two
    steps = 600
    shares = {}
    for wa, wb in [(3, 1), (1, 3), (None, None)]:
        s = open_mixture([DatasetSpec(a, weight=wa), DatasetSpec(b, weight=wb)], queries=4, negatives=1, seed=5)
        counts = Counter(batch.dataset for batch in run(s, steps)[0])
        shares[(wa, wb)] = counts["a"] / steps
    # the reference: weight / total weight (default weights: sizes 40 and 20); 600 draws: std <= 0.02
    assert shares[(3, 1)] == pytest.approx(0.75, abs=0.06)
    assert shares[(1, 3)] == pytest.approx(0.25, abs=0.06)
    assert shares[(None, None)] == pytest.approx(2 / 3, abs=0.06)


def test_homogeneous_batches_come_from_one_dataset_mixed_ones_do_not(two):
    homog, _ = run(open_mixture(list(two), queries=8, negatives=1, seed=1), 40)
    assert all({source(ex) for ex in b.examples} == {b.dataset} for b in homog)
    assert {b.dataset for b in homog} == {"a", "b"}
    mixed, _ = run(open_mixture(list(two), queries=8, negatives=1, seed=1, sampling="mixed"), 40)
    assert any(len({source(ex) for ex in b.examples}) == 2 for b in mixed)
    assert {b.dataset for b in mixed} == {"mixed"}


def test_mixed_sampling_is_the_single_stream_order_of_before(two):
    """Checkpoints written before mixtures hold one int position: mixed sampling must continue that exact order."""
    s = open_mixture(list(two), queries=7, negatives=1, seed=3, sampling="mixed")
    data = ExampleFile(list(two))
    position = 0
    for batch in run(s, 12)[0]:
        want, position = batch_at(data, position, 7, 3)
        assert batch.examples == want


def test_no_duplicate_texts_in_a_batch_and_skipped_examples_come_later(tmp_path):
    # 30 examples, only 10 distinct queries (3 positives each): batches of 8 can always be made distinct
    recs = [{"query": f"q{i % 10}", "positive": f"p{i}"} for i in range(30)]
    path = write(tmp_path / "dups.jsonl", recs)
    other = write(tmp_path / "other.jsonl", records("o", 5))
    s = open_mixture([DatasetSpec(path, weight=1e9), other], queries=8, negatives=1, seed=2)
    batches, position = run(s, 12)
    mine = [b for b in batches if b.dataset == "dups"]
    assert len(mine) == 12
    for b in mine:
        texts = [ex.query for ex in b.examples] + [ex.positive for ex in b.examples]
        assert len(set(texts)) == len(texts)
    taken = [p for b in mine for p in b.positions]
    state = position["streams"]["dups"]
    assert len(taken) == len(set(taken)) == 96
    # skipped, never dropped: what was taken plus what is deferred is exactly the stream read so far
    assert sorted(taken + state["deferred"]) == list(range(state["position"]))
    assert set(range(30)) <= set(taken)                 # every example of epoch 0 came
    # the feature changes the outcome: the plain stream puts repeated queries into a batch
    plain, _ = run(open_mixture([path], queries=8, negatives=1, seed=2), 12)
    assert any(len({ex.query for ex in b.examples}) < 8 for b in plain)


def test_a_dataset_smaller_than_the_batch_says_so_once(tmp_path, two):
    tiny = write(tmp_path / "tiny.jsonl", records("t", 3))
    s = open_mixture([DatasetSpec(tiny, weight=1e9), two[0]], queries=8, negatives=1)
    assert any("tiny: 3 examples but batch.queries is 8" in n for n in s.notes)
    batches, _ = run(s, 5)
    assert all(len(b.examples) == 8 for b in batches)
    repeat_notes = [n for n in s.notes if "distinct query/positive texts" in n]
    assert len(repeat_notes) == 1 and "only 3 distinct" in repeat_notes[0]
    assert Counter(ex.query for ex in batches[0].examples).most_common(1)[0][1] > 1


def test_per_dataset_instruction_negatives_and_in_batch_flag(tmp_path):
    own = [{"query": f"a own query {i}", "positive": f"a own passage {i}", "instruction": "Own."} for i in range(5)]
    sts = [{"S1": f"a sts left {i}", "S2": f"a sts right {i}"} for i in range(2)]   # the reader's STS default loses
    a = write(tmp_path / "a.jsonl", own + records("a", 5, negatives=["x", "y"]) + sts)
    b = write(tmp_path / "b.jsonl", records("b", 10))
    s = open_mixture([DatasetSpec(a, instruction="Inst A."), DatasetSpec(b, negatives=0, in_batch_negatives=False)],
                     queries=4, negatives=2, seed=0)
    batches, _ = run(s, 30)
    got_a = [ex for bt in batches if bt.dataset == "a" for ex in bt.examples]
    assert {ex.instruction for ex in got_a} == {"Own.", "Inst A."}   # records that carry one keep it
    assert all(ex.instruction == "Own." for ex in got_a if ex.query in {r["query"] for r in own})
    assert {ex.instruction for ex in got_a if " sts " in ex.query} == {"Inst A."}
    assert resolve([b])[0].data[0].instruction is None                # no dataset instruction: none given
    assert all((bt.negatives, bt.in_batch_negatives) == ((2, True) if bt.dataset == "a" else (0, False))
               for bt in batches)
    assert all(ex.instruction is None for bt in batches if bt.dataset == "b" for ex in bt.examples)


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("sampling", ["homogeneous", "mixed"])
def test_resume_from_a_saved_position_continues_exactly(tmp_path, sampling):
    recs = [{"query": f"q{i % 7}", "positive": f"p{i}"} for i in range(23)]      # duplicates: deferrals in play
    paths = [write(tmp_path / "d.jsonl", recs), write(tmp_path / "e.jsonl", records("e", 11))]

    def fresh():
        return open_mixture(paths, queries=5, negatives=1, seed=9, sampling=sampling)

    def key(b):
        return b.dataset, b.positions, [(ex.query, ex.positive) for ex in b.examples]

    full, _ = run(fresh(), 40)
    head, position = run(fresh(), 17)
    position = pickle.loads(pickle.dumps(position))        # what a checkpoint round trip does
    tail, _ = run(fresh(), 23, position)
    assert [key(b) for b in head + tail] == [key(b) for b in full]
    if sampling == "homogeneous":      # the cut falls where deferred examples must be carried over
        assert position["streams"]["d"]["deferred"] and len({b.dataset for b in full}) == 2


def test_positions_of_the_other_mode_are_refused(two):
    homog = open_mixture(list(two), queries=4, negatives=1)
    mixed = open_mixture(list(two), queries=4, negatives=1, sampling="mixed")
    with pytest.raises(ValueError, match="cannot resume a checkpoint written with one mixed stream"):
        homog(12)
    with pytest.raises(ValueError, match="cannot resume a checkpoint written with batch.sampling=homogeneous"):
        mixed(homog.initial_position())


# ------------------------------------------------------------------------------------------------ ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fingerprints(batches):
    return [(b.dataset, b.positions, [ex.query for ex in b.examples]) for b in batches]


def _rank_worker(rank, world_size, port, paths, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from embforge.engine.batch import shard_batch, to_batch
    from embforge.engine.distributed import DistributedConfig, init_distributed
    dist_, _ = init_distributed(DistributedConfig(timeout_s=60), "cpu")
    batches, _ = run(open_mixture(paths, queries=6, negatives=1, seed=4), 25)
    local = [shard_batch(to_batch(b.examples, b.negatives), dist_).queries for b in batches]
    every = dist_.gather_objects({"batches": _fingerprints(batches), "local": local})
    if rank == 0:
        Path(out).write_bytes(pickle.dumps(every))
    dist_.shutdown()


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_takes_the_same_global_batch_and_its_slice(tmp_path, world_size):
    recs = [{"query": f"q{i % 9}", "positive": f"p{i}"} for i in range(40)]
    paths = [write(tmp_path / "d.jsonl", recs), write(tmp_path / "e.jsonl", records("e", 15))]
    out = tmp_path / "ranks.pkl"
    mp.spawn(_rank_worker, args=(world_size, _free_port(), paths, str(out)), nprocs=world_size, join=True)
    every = pickle.loads(out.read_bytes())
    want, _ = run(open_mixture(paths, queries=6, negatives=1, seed=4), 25)       # one process
    assert len(every) == world_size
    for r in every:
        assert r["batches"] == _fingerprints(want)
    for step, b in enumerate(want):     # the ranks' slices, in rank order, are the global batch
        assert sum((r["local"][step] for r in every), []) == [ex.query for ex in b.examples]


# ------------------------------------------------------------------------------------------------ a training run
def _train_cfg(tmp_path, out, steps, dropout=0.1, seed=1):
    import yaml
    alpha = write(tmp_path / "alpha.jsonl", records("alpha", 24))
    beta = write(tmp_path / "beta.jsonl", records("beta", 24))
    y = tmp_path / "mix.yaml"
    y.write_text(yaml.safe_dump({
        "model": {"path": "tiny-llama", "lora": {"dropout": dropout}},
        "data": {"train": [{"path": alpha, "weight": 3, "instruction": "Inst alpha."},
                           {"path": beta, "weight": 1, "instruction": "Inst beta.", "negatives": 2}]},
        "batch": {"queries": 6, "negatives": 1, "chunk_tokens": 64},
        "optim": {"warmup_steps": 1}, "steps": steps, "output_dir": str(out), "checkpoint_every": 0,
        "device": "cpu", "seed": seed, "distributed": {"timeout_s": 60}}))
    return load_config(TrainConfig, y)


@pytest.mark.slow
def test_two_dataset_training_run_is_homogeneous_applies_settings_and_resumes_exactly(tmp_path, monkeypatch):
    import embforge.engine.train as engine_train
    from embforge.cli.train import run_training
    seen = []
    real_step = engine_train.contrastive_step

    def spy(embedder, batch, **kw):
        seen.append((batch.dataset, {q.split()[0] for q in batch.queries}, set(batch.instructions),
                     len(batch.documents) // len(batch.queries)))
        return real_step(embedder, batch, **kw)
    monkeypatch.setattr(engine_train, "contrastive_step", spy)

    steps = 8
    full = run_training(_train_cfg(tmp_path, tmp_path / "full", steps), progress=False)
    assert len(seen) == steps
    for dataset, sources, instructions, group in seen:           # homogeneous, settings of its own dataset
        assert sources == {dataset} and instructions == {f"Inst {dataset}."}
        assert group == (3 if dataset == "beta" else 2)             # beta: negatives 2; alpha: batch.negatives 1
    chosen = [d for d, *_ in seen]
    assert set(chosen) == {"alpha", "beta"}
    # the run's datasets are the sampler's draws (whose 3:1 shares test_weights_give_the_empirical_shares checks)
    sampler = open_mixture(_train_cfg(tmp_path, tmp_path / "x", steps).data.train, queries=6, negatives=1, seed=1)
    assert chosen == [sampler.choose(s).name for s in range(steps)]
    lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dataset"] for r in lines] == chosen
    counts = Counter(chosen)
    assert {k: v["steps"] for k, v in full["datasets"].items()} == counts
    for name in counts:
        mean = sum(l for l, d in zip(full["losses"], chosen) if d == name) / counts[name]
        assert full["datasets"][name]["mean_loss"] == pytest.approx(mean, rel=1e-9)

    # killed after 3 steps (the checkpoint a signal writes), resumed: the same datasets and losses, step for step
    part = run_training(_train_cfg(tmp_path, tmp_path / "part", steps), progress=False, stop_after=3)
    assert part["stopped_at"] == 3
    resumed = run_training(_train_cfg(tmp_path, tmp_path / "part", steps), resume=True, progress=False)
    assert resumed["losses"] == full["losses"] and len(set(full["losses"])) > 1
    assert resumed["datasets"] == full["datasets"]
    lines = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dataset"] for r in lines] == chosen


def test_in_batch_negatives_off_reaches_the_step_for_its_dataset_only(tmp_path, monkeypatch):
    """A dataset with in_batch_negatives: false trains with each query limited to its own group; the other dataset's
    batches keep in-batch negatives."""
    import embforge.engine.train as engine_train
    from embforge.cli.train import run_training
    seen = []
    real_step = engine_train.contrastive_step

    def spy(embedder, batch, **kw):
        seen.append((batch.dataset, batch.in_batch_negatives))
        return real_step(embedder, batch, **kw)
    monkeypatch.setattr(engine_train, "contrastive_step", spy)
    cfg = _train_cfg(tmp_path, tmp_path / "r", 4, dropout=0.0, seed=5)     # seed 5 draws alpha, beta, beta, alpha
    cfg.data.train[1].in_batch_negatives = False
    run_training(cfg, progress=False)
    assert seen == [("alpha", True), ("beta", False), ("beta", False), ("alpha", True)]


@pytest.mark.slow
def test_torchrun_two_ranks_train_the_same_datasets_and_losses_as_one_process(tmp_path):
    import subprocess
    import sys

    from embforge.cli.train import run_training
    # seed 5 draws alpha, beta, beta, alpha (4 steps)
    one = run_training(_train_cfg(tmp_path, tmp_path / "one", 4, dropout=0.0, seed=5), progress=False)
    _train_cfg(tmp_path, tmp_path / "two", 4, dropout=0.0, seed=5)    # rewrites mix.yaml for the 2-rank run
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "embforge", "train", "--nproc", "2", "--config",
                        str(tmp_path / "mix.yaml")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads(r.stdout[r.stdout.index("{"):])
    m1, m2 = ([json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two"))
    assert [m["dataset"] for m in m2] == [m["dataset"] for m in m1] and all(m["world_size"] == 2 for m in m2)
    assert len({m["dataset"] for m in m1}) == 2
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert {k: v["steps"] for k, v in two["datasets"].items()} == {k: v["steps"] for k, v in one["datasets"].items()}
