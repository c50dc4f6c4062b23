import json

import pytest

from embforge.eval.encoders import HashingEncoder
from embforge.eval.sts import StsFormatError, evaluate_sts, load_sts


def test_sts_tsv_and_jsonl_agree(tmp_path):
    rows = [("red apple pie", "red apple pie", 5.0),  # hashed-word cosines: 1, 2/3, 1/3, 0
            ("red apple pie", "red apple tart", 3.5),
            ("red apple pie", "green apple cake", 1.0),
            ("red apple pie", "blue ocean waves", 0.0)]
    tsv = tmp_path / "s.tsv"
    tsv.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    jl = tmp_path / "s.jsonl"
    jl.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in rows))
    m1, m2 = evaluate_sts(HashingEncoder(), tsv), evaluate_sts(HashingEncoder(), jl)
    assert m1 == m2
    assert m1["spearman"] == pytest.approx(1.0)  # lexical overlap orders these pairs exactly
    assert m1["num_pairs"] == 4


def test_sts_instruction_applies_to_both_sides(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "c", "sentence2": "d", "score": 2}\n')
    enc = HashingEncoder()
    evaluate_sts(enc, f, instruction="Retrieve semantically similar text.")
    assert enc.calls == [(2, "Retrieve semantically similar text.")] * 2


@pytest.mark.parametrize("name,text,message", [
    ("a.tsv", "sentence1\tsentence2\nx\ty\n", "a.tsv:1: header lacks column(s) ['score']"),
    ("b.tsv", "sentence1\tsentence2\tscore\nx\ty\t1\nx\ty\thigh\n", "b.tsv:3: field 'score'"),
    ("c.jsonl", '{"sentence1": "x", "sentence2": "y", "score": 1}\n{"sentence1": "x", "score": 2}\n',
     "c.jsonl:2: missing field 'sentence2'"),
])
def test_sts_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(StsFormatError) as e:
        load_sts(tmp_path / name)
    assert message in str(e.value)
