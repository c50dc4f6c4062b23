"""The demo summary reads its numbers from the run's files."""
import json

from embforge.engine.demo_report import report


def test_report_reads_the_run(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "stages.tsv").write_text("synth\t40\ntrain_and_eval\t450\n")
    steps = [{"step": i + 1, "loss": 5.0 - i, "seconds": 10.0 + i, "tokens_per_s": 100.0 + i, "chunks": 16}
             for i in range(4)]
    (tmp_path / "train" / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    (tmp_path / "train_result.json").write_text(json.dumps(
        {"eval": {"before": {"ndcg_at_10": 0.0146, "mrr_at_10": 0.01},
                  "after": {"ndcg_at_10": 0.2503, "mrr_at_10": 0.2}}}))
    text = report(tmp_path)
    assert "| **total** | **490** |" in text
    assert "| ndcg_at_10 | 0.0146 | 0.2503 |" in text and "| mrr_at_10 | 0.0100 | 0.2000 |" in text
    assert "4.000 -> 3.000" in text                # mean of first 3 (5,4,3) and last 3 (4,3,2) losses
    assert "median step 12.0 s" in text and "16 GradCache chunks" in text
