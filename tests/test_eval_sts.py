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
    assert enc.calls == [(4, "Retrieve semantically similar text.")]   # both sides in one call


class _RandomEncoder:
    """A fixed random unit vector per text (no ties, unlike the lexical baseline), counting what it encodes."""

    def __init__(self):
        self.encoded = 0

    def encode(self, texts, *, instruction=None, batch_size=32):
        import zlib

        import torch
        self.encoded += len(texts)
        rows = [torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        out = torch.stack(rows)
        return out / out.norm(dim=1, keepdim=True)


def test_sts_encodes_each_distinct_text_once(tmp_path):
    """50 documents paired every way (1225 pairs) cost 50 encodings, and score as if every pair were encoded."""
    import itertools
    import json

    from embforge.eval.metrics import sts_metrics
    docs = [f"document {i} about topic {i % 7}" for i in range(50)]
    rows = [{"sentence1": a, "sentence2": b, "score": (i * 37) % 11} for i, (a, b) in
            enumerate(itertools.combinations(docs, 2))]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = _RandomEncoder()
    got = evaluate_sts(enc, f)
    assert enc.encoded == 50
    ref = _RandomEncoder()
    a = ref.encode([r["sentence1"] for r in rows])    # what encoding both sides of every pair gives
    b = ref.encode([r["sentence2"] for r in rows])
    assert ref.encoded == 2450
    want = sts_metrics((a * b).sum(dim=1).tolist(), [r["score"] for r in rows])
    assert got["num_pairs"] == 1225 and got["spearman"] == pytest.approx(want["spearman"], abs=1e-6)


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
