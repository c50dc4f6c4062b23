"""Training loop: resume reproduces the uninterrupted loss curve exactly; data errors name file:line."""
import json

import pytest

from embforge.config import ConfigError, load_config
from embforge.engine.data import DataError, ExampleFile, read_examples
from embforge.engine.demo_data import build
from embforge.engine.train import TrainConfig, train


def cfg_for(tmp_path, out, steps=4):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        build(data)
    return load_config(TrainConfig, None, [
        "model.path=tiny-llama", "model.lora.dropout=0.1", f"data.train=[{data}]", "batch.queries=6",
        "batch.chunk_tokens=64", "optim.warmup_steps=1", f"steps={steps}", f"output_dir={out}",
        "checkpoint_every=0", "device=cpu"])


def test_resume_reproduces_uninterrupted_loss_curve(tmp_path):
    full = train(cfg_for(tmp_path, tmp_path / "a"), progress=False)["losses"]
    part = train(cfg_for(tmp_path, tmp_path / "b"), progress=False, stop_after=2)
    assert part["stopped_at"] == 2 and len(part["losses"]) == 2
    resumed = train(cfg_for(tmp_path, tmp_path / "b"), resume=True, progress=False)["losses"]
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
    result = train(cfg, progress=False)
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
