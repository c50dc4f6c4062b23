"""The demo summary reads its numbers from the run's files; `embforge eval report` / `heldout` are its commands."""
import dataclasses
import json
from pathlib import Path

import pytest

from embforge.eval.report import report


def _evals(tmp_path, **ndcg):
    for label, (chat, gc, sts) in ndcg.items():
        (tmp_path / f"eval_{label}.json").write_text(json.dumps(
            {"chatterbot": {"ndcg_at_10": chat}, "gcide": {"ndcg_at_10": gc}, "gcide_sts": {"spearman": sts}}))


def _one_step_run(run, stages):
    """A run folder with its stage times and a one-step metrics file (what `report` needs beside the evals)."""
    (run / "train").mkdir()
    (run / "stages.tsv").write_text(stages)
    (run / "train" / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "loss": 1.0, "seconds": 1.0, "tokens_per_s": 1.0, "chunks": 1}) + "\n")


def test_report_reads_the_run(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "stages.tsv").write_text("synth\t40\ntrain\t450\n")
    steps = [{"step": i + 1, "loss": 5.0 - i, "seconds": 10.0 + i, "tokens_per_s": 100.0 + i, "chunks": 16}
             for i in range(4)]
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    _evals(tmp_path, base=(0.0146, 0.02, 0.1), trained=(0.25, 0.22, 0.3), minilm=(0.5, 0.42, 0.6))
    text = report(tmp_path)
    assert "| **total** | **490** |" in text
    assert "| untrained base (strongest) | trained | all-MiniLM-L6-v2 |" in text
    assert "| chatterbot Q/A retrieval (ndcg@10) | 0.0146 | 0.2500 | 0.5000 |" in text
    assert "| GCIDE sense-pair similarity (spearman) | 0.1000 | 0.3000 | 0.6000 |" in text
    assert "gap closed on GCIDE retrieval: 50%" in text        # (0.22 - 0.02) / (0.42 - 0.02)
    assert "4.000 -> 3.000" in text                # mean of first 3 (5,4,3) and last 3 (4,3,2) losses
    assert "median step 12.0 s" in text and "16 GradCache chunks" in text
    assert "Per dataset" not in text                # metrics without dataset names: no such line
    for i, s in enumerate(steps):                   # a mixture run names each step's dataset
        s["dataset"] = "b" if i == 1 else "a"
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    assert "Per dataset (steps, mean loss): a 3 (3.333), b 1 (4.000)." in report(tmp_path)   # a: (5+3+2)/3


def test_report_without_evals_says_so(tmp_path):
    _one_step_run(tmp_path, "train\t5\n")
    assert "side-by-side evaluation did not run" in report(tmp_path)
    _evals(tmp_path, trained=(0.2, 0.1, 0.3))
    text = report(tmp_path)
    assert "| trained |" in text and "untrained base" not in text and "gap closed" not in text


def test_report_shows_the_base_at_its_strongest_per_set(tmp_path):
    """Two untrained configurations: each set takes the better one, and the summary names which."""
    _one_step_run(tmp_path, "train\t5\n")
    _evals(tmp_path, base=(0.01, 0.30, 0.10), base_causal=(0.05, 0.02, 0.40), trained=(0.2, 0.25, 0.3))
    text = report(tmp_path)
    assert "| chatterbot Q/A retrieval (ndcg@10) | 0.0500 | 0.2000 |" in text
    assert "| GCIDE word -> definition retrieval (ndcg@10) | 0.3000 | 0.2500 |" in text
    assert "| GCIDE sense-pair similarity (spearman) | 0.4000 | 0.3000 |" in text
    assert "chatterbot: base_causal, gcide: base, gcide_sts: base_causal" in text


def test_report_shows_the_synthetic_stage(tmp_path):
    _one_step_run(tmp_path, "synth\t60\n")
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "synth.report.json").write_text(json.dumps({"model": "smollm2-135m-instruct", "example_outcomes": {
        "accepted:ok": 3, "rejected:field_too_short:positive": 2, "rejected:placeholder:query": 1}}))
    (tmp_path / "synth" / "synth.jsonl").write_text(json.dumps(
        {"instruction": "Find the recipe", "query": "bread", "positive": "Mix flour and water.",
         "negatives": ["Paint the fence."]}) + "\n")
    text = report(tmp_path)
    assert "3 of 6 generated examples kept (50%)" in text
    assert "field_too_short:positive 2, placeholder:query 1" in text
    assert '"query": "bread"' in text


def test_report_subcommand_prints_the_summary_and_refuses_a_missing_run(tmp_path, capsys):
    from embforge.cli import main

    _one_step_run(tmp_path, "train\t5\n")
    assert main(["eval", "report", str(tmp_path)]) == 0
    assert capsys.readouterr().out == report(tmp_path)
    assert main(["eval", "report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embforge eval: error:") and "stages.tsv" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/usr/share/dictd/gcide.index").exists(), reason="dict-gcide not installed")
def test_heldout_subcommand_writes_what_evaluate_model_gives(tmp_path):
    from embforge.cli import main
    from embforge.eval.encoders import HashingEncoder
    from embforge.eval.report import evaluate_model

    out = tmp_path / "eval_hashing.json"
    assert main(["eval", "heldout", "--model", "hashing", "--out", str(out), "--small", "--max-queries", "20"]) == 0
    got = json.loads(out.read_text())
    want = evaluate_model(HashingEncoder(), plain=False, max_queries=20, gcide_queries=100, gcide_docs=300,
                          sts_pairs=100)
    assert got["model"] == "hashing"
    for key in ("chatterbot", "gcide", "gcide_sts"):
        assert {k: v for k, v in got[key].items() if k != "seconds"} == \
            pytest.approx({k: v for k, v in want[key].items() if k != "seconds"})
    assert got["chatterbot"]["num_queries"] == 20


@pytest.mark.skipif(not Path("/usr/share/dictd/gcide.index").exists(), reason="dict-gcide not installed")
def test_heldout_sizes_and_query_sample(tmp_path, capsys):
    """--gcide-queries/--gcide-docs/--sts-pairs size the sets; --max-queries is a spread sample, not the first ids
    (chatterbot's first ids in order are its first topics only)."""
    from embforge.cli import main

    out = tmp_path / "e.json"
    assert main(["eval", "heldout", "--model", "hashing", "--out", str(out), "--max-queries", "40",
                 "--gcide-queries", "30", "--gcide-docs", "90", "--sts-pairs", "25"]) == 0
    got = json.loads(out.read_text())
    assert (got["gcide"]["num_queries"], got["gcide"]["num_docs"], got["gcide_sts"]["num_pairs"]) == (30, 90, 25)
    assert got["chatterbot"]["num_queries"] == 40
    from embforge.eval.datasets import chatterbot_beir
    from embforge.eval.report import sample_queries
    qrels = chatterbot_beir().qrels
    sample = sample_queries(qrels, 40)
    assert sample == sample_queries(qrels, 40) and len(set(sample)) == 40 and set(sample) <= set(qrels)
    numbers = sorted(int(i[1:]) for i in sample)      # ids q0..qN in file order: the sample spans the files
    assert numbers[0] < len(qrels) // 4 and numbers[-1] > 3 * len(qrels) // 4
    assert main(["eval", "heldout", "--model", "hashing", "--out", str(out), "--gcide-queries", "50",
                 "--gcide-docs", "20"]) == 2
    assert "--gcide-docs" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/usr/share/dictd/gcide.index").exists(), reason="dict-gcide not installed")
def test_heldout_scores_only_the_named_sets(tmp_path, capsys):
    """--sets: the demo scores each untrained base configuration only where it measured strongest; the report
    takes each set's best over the files that have it."""
    from embforge.cli import main
    from embforge.eval.report import strongest_base

    out = tmp_path / "eval_base_causal.json"
    assert main(["eval", "heldout", "--model", "hashing", "--out", str(out), "--sets", "gcide_sts,gcide",
                 "--gcide-queries", "20", "--gcide-docs", "60", "--sts-pairs", "20"]) == 0
    got = json.loads(out.read_text())
    assert sorted(k for k, v in got.items() if isinstance(v, dict)) == ["gcide", "gcide_sts"]
    (tmp_path / "eval_base.json").write_text(json.dumps({"chatterbot": {"ndcg_at_10": 0.1},
                                                         "gcide": {"ndcg_at_10": 2.0}}))
    best, which = strongest_base(tmp_path)
    assert which == {"chatterbot": "base", "gcide": "base", "gcide_sts": "base_causal"}
    assert best["gcide_sts"]["spearman"] == got["gcide_sts"]["spearman"]
    assert main(["eval", "heldout", "--model", "hashing", "--out", str(out), "--sets", "gcide,stsb"]) == 2
    assert "unknown held-out set(s) stsb" in capsys.readouterr().err


def test_chatterbot_docs_keeps_every_judged_answer_and_samples_the_rest():
    from embforge.eval.datasets import chatterbot_beir
    from embforge.eval.report import sample_corpus, sample_queries

    ds = chatterbot_beir()
    keep = sample_queries(ds.qrels, 40)
    ds = dataclasses.replace(ds, qrels={q: ds.qrels[q] for q in keep})
    small = sample_corpus(ds, 100)
    relevant = {d for rel in ds.qrels.values() for d in rel}
    assert len(small.corpus) == 100 and relevant <= set(small.corpus) and len(relevant) < 100
    assert small.corpus == sample_corpus(ds, 100).corpus           # the same sample every run
    assert set(sample_corpus(ds, 10).corpus) == relevant             # never drops a judged answer
