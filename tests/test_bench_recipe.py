"""bench/bench_recipe.py's table: means, spreads and wins over the strongest base, read from a run folder's files;
runs scored on other set sizes are refused rather than tabulated side by side."""
import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("bench_recipe", Path(__file__).parents[1] / "bench" / "bench_recipe.py")
bench_recipe = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_recipe)


def _eval(chat, gcide, fort, sts, n=300):
    r = lambda v, q, d: {"ndcg_at_10": v, "num_queries": q, "num_docs": d}   # noqa: E731
    return {"chatterbot": r(chat, n, 870), "gcide": r(gcide, 200, 600), "fortunes": r(fort, 100, 360),
            "gcide_sts": {"spearman": sts, "num_pairs": 200}}


def _run(tmp_path, variant, seed, ev, losses=(5.0, 4.0, 3.0, 2.0)):
    d = tmp_path / "recipe" / variant / f"seed{seed}"
    (d / "train").mkdir(parents=True)
    (d / "eval_trained.json").write_text(json.dumps(ev))
    (d / "train" / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": x, "seconds": 10.0 + i})
                                                      + "\n" for i, x in enumerate(losses)))
    (d / "command.sh").write_text(f"embforge train --set 'data.train=[{{path: {tmp_path}/mined/a.jsonl, name: a}}]' "
                                  f"--set seed={seed} --set loss.false_negative_margin=0.1\n")


def test_table_means_spreads_and_wins(tmp_path):
    (tmp_path / "eval_base.json").write_text(json.dumps(_eval(0.03, 0.01, 0.20, 0.10)))
    (tmp_path / "eval_base_causal.json").write_text(json.dumps(_eval(0.01, 0.02, 0.10, 0.30)))
    (tmp_path / "eval_minilm.json").write_text(json.dumps(_eval(0.5, 0.5, 0.5, 0.7)))
    _run(tmp_path, "margin", 0, _eval(0.10, 0.20, 0.30, 0.40))
    _run(tmp_path, "margin", 1, _eval(0.20, 0.30, 0.10, 0.20))
    args = type("A", (), {"run": str(tmp_path), "out": str(tmp_path / "t.md"), "order": [], "note": "threads 1"})
    text = bench_recipe.table(args)
    assert (tmp_path / "t.md").read_text() == text and "threads 1" in text
    rows = [line for line in text.splitlines() if line.startswith("| margin | 0,1 |")]
    # chatterbot: mean 0.15, both beat 0.03; gcide: base best is causal's 0.02; sense pairs: base best 0.30
    # (causal), one of two beats it; fortunes: one of two beats 0.20
    assert rows == ["| margin | 0,1 | 0.1500 | 0.1000 - 0.2000 | 2/2 |", "| margin | 0,1 | 0.2500 | 0.2000 - 0.3000 | 2/2 |",
                    "| margin | 0,1 | 0.3000 | 0.2000 - 0.4000 | 1/2 |", "| margin | 0,1 | 0.2000 | 0.1000 - 0.3000 | 1/2 |"]
    assert "(base_causal): 0.3000" in text and "all-MiniLM-L6-v2: 0.7000" in text
    assert "| margin | 11.5 | 4.000 -> 3.000 | loss.false_negative_margin=0.1 |" in text


def test_table_refuses_other_set_sizes(tmp_path):
    (tmp_path / "eval_base.json").write_text(json.dumps(_eval(0.03, 0.01, 0.20, 0.10)))
    _run(tmp_path, "full", 0, _eval(0.1, 0.2, 0.3, 0.4, n=748))
    args = type("A", (), {"run": str(tmp_path), "out": None, "order": [], "note": ""})
    with pytest.raises(SystemExit, match="full seed 0: chatterbot sizes"):
        bench_recipe.table(args)
