"""The training-record reader's teacher scores: `"scores": [positive, negative 1, ...]` (issue 22)."""
import json

import pytest

from embforge.data.records import DataError, ExampleFile, parse_record, read_records

REC = {"instruction": "Find it.", "query": "q", "positive": "p", "negatives": ["n1", "n2"]}


def test_scores_parse_in_record_order():
    ex = parse_record({**REC, "scores": [3, 1.5, 0]}, "x:1")
    assert ex.scores == [3.0, 1.5, 0.0] and all(isinstance(s, float) for s in ex.scores)
    assert parse_record(REC, "x:1").scores is None and parse_record({**REC, "scores": None}, "x:1").scores is None
    # a single negative given as a string still counts as one negative
    assert parse_record({**REC, "negatives": "n1", "scores": [1, 0]}, "x:1").scores == [1.0, 0.0]


@pytest.mark.parametrize("scores,msg", [([1, 0], "has 2 values but the record has 1 positive and 2 negatives"),
                                        ([1, 0, 0, 0], "has 4 values"),
                                        ([1, "high", 0], "list of numbers"), ([1, True, 0], "list of numbers"),
                                        ("1,0,0", "list of numbers"), ([1, float("nan"), 0], "finite"),
                                        ([1, float("inf"), 0], "finite")])
def test_bad_scores_name_file_and_line(tmp_path, scores, msg):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(REC) + "\n\n" + json.dumps({**REC, "scores": scores}) + "\n")  # NaN/Infinity: JSON5-ish
    with pytest.raises(DataError, match=f"{path}:3: field 'scores' {msg}" if "has" in msg else f"{path}:3: .*{msg}"):
        ExampleFile(path)
    with pytest.raises(DataError, match=f"{path}:3"):
        read_records(path)
    data = ExampleFile(path, skip_bad_lines=True)        # the bad line is skipped and reported, the good one kept
    assert len(data) == 1 and data.skipped[0].startswith(f"{path}:3") and data.scored == 0


def test_example_file_counts_scored_records(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [REC, {**REC, "scores": [2, 1, 0]}, REC]))
    data = ExampleFile(path)
    assert data.scored == 1 and data[1].scores == [2.0, 1.0, 0.0] and data[0].scores is None
