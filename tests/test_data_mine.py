"""`embforge mine`: a hand-checkable case (fake encoder with hand-set vectors), resume, modes, errors, CLI."""
import json
import math

import pytest
import torch

from embforge.data.mine import MineConfig, is_near_duplicate, mine

POS = "the cat sat on the mat"
# text -> cosine with the query (vectors [s, sqrt(1 - s^2)], query [1, 0]); the positive scores 0.8.
CORPUS = {
    "The cat sat on the MAT.": 0.85,        # rank 1: duplicate of the positive (same words)
    POS: 0.80,                              # rank 2: the positive itself
    "a feline resting on a rug": 0.78,      # rank 3: >= 0.95 * 0.8 = 0.76 -> likely false negative
    "dogs bark at night": 0.70,             # rank 4: above the window (starts at rank 5)
    "stock prices fell today": 0.60,        # rank 5: kept
    "rain is expected tomorrow": 0.50,      # rank 6: kept
    "the recipe needs two eggs": 0.40,      # rank 7: surplus (2 negatives asked)
    "trains leave every hour": 0.30,        # rank 8: surplus
}


class FakeEncoder:
    def __init__(self, table):
        self.table = table
        self.calls = []

    def encode(self, texts, *, instruction=None, batch_size=32):
        self.calls.append((list(texts), instruction))
        rows = []
        for t in texts:
            s = self.table[t]
            rows.append([s, math.sqrt(1 - s * s)])
        return torch.tensor(rows)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _corpus_file(path, texts):
    path.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))


def test_hand_checked_negatives_and_filter_counts(tmp_path):
    data, corpus, out = tmp_path / "d.jsonl", tmp_path / "c.jsonl", tmp_path / "o.jsonl"
    _write(data, [{"instruction": "find it", "query": "Q", "positive": POS, "negatives": ["old"], "x": 1}])
    _corpus_file(corpus, list(CORPUS))
    enc = FakeEncoder({**CORPUS, "Q": 1.0})
    cfg = MineConfig(rank_start=5, rank_end=100, negatives=2, margin=0.95, near_dup=0.9)
    report = mine(data, out, enc, corpus=corpus, cfg=cfg, progress=False)
    rec = json.loads(out.read_text())
    assert rec["negatives"] == ["stock prices fell today", "rain is expected tomorrow"]
    assert rec["x"] == 1 and rec["query"] == "Q"                      # other fields copied unchanged
    assert report["removed"] == {"positive": 1, "duplicate": 1, "margin": 1, "above_window": 1}
    assert report["surplus"] == 2 and report["retrieved"] == 8 and report["written"] == 2
    assert ("Q",) == tuple(next(t for t, inst in enc.calls if inst == "find it"))  # query got its instruction
    assert json.loads((tmp_path / "o.jsonl.report.json").read_text())["removed"]["margin"] == 1
    assert not (tmp_path / "o.jsonl.parts").exists()


def test_margin_and_window_change_the_answer(tmp_path):
    data, corpus, out = tmp_path / "d.jsonl", tmp_path / "c.jsonl", tmp_path / "o.jsonl"
    _write(data, [{"query": "Q", "positive": POS}])
    _corpus_file(corpus, list(CORPUS))
    enc = FakeEncoder({**CORPUS, "Q": 1.0})
    mine(data, out, enc, corpus=corpus, progress=False,
         cfg=MineConfig(rank_start=1, rank_end=4, negatives=5, margin=1.5))   # margin never fires; depth 4
    assert json.loads(out.read_text())["negatives"] == ["a feline resting on a rug", "dogs bark at night"]


def test_default_corpus_is_the_datas_own_texts_and_append_mode(tmp_path):
    recs = [{"query": f"q{i}", "positive": t, "negatives": ["own neg"]} for i, t in
            enumerate(["alpha beta", "gamma delta", "epsilon zeta"])]
    data, out = tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    _write(data, recs)
    table = {"alpha beta": 0.9, "gamma delta": 0.5, "epsilon zeta": 0.1, "own neg": 0.3,
             "q0": 1.0, "q1": 1.0, "q2": 1.0}
    mine(data, out, FakeEncoder(table), progress=False,
         cfg=MineConfig(rank_start=1, rank_end=10, negatives=1, margin=100.0, mode="append"))
    got = [json.loads(line)["negatives"] for line in out.read_text().splitlines()]
    # all queries point the same way: each record's best non-positive candidate is "alpha beta" or "gamma delta"
    assert got == [["own neg", "gamma delta"], ["own neg", "alpha beta"], ["own neg", "alpha beta"]]


def test_resume_skips_finished_shards_and_matches_a_full_run(tmp_path):
    recs = [{"query": f"q{i}", "positive": POS} for i in range(3)]
    data, corpus = tmp_path / "d.jsonl", tmp_path / "c.jsonl"
    _write(data, recs)
    _corpus_file(corpus, list(CORPUS))
    table = {**CORPUS, "q0": 1.0, "q1": 0.9, "q2": 0.5}
    cfg = MineConfig(rank_start=2, rank_end=8, negatives=3, shard_size=1)
    mine(data, tmp_path / "full.jsonl", FakeEncoder(table), corpus=corpus, cfg=cfg, progress=False)

    enc = FakeEncoder(table)
    part = mine(data, tmp_path / "o.jsonl", enc, corpus=corpus, cfg=cfg, progress=False, stop_after_shards=2)
    assert part == {"stopped_after_shards": 2} and not (tmp_path / "o.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "o.jsonl.parts").glob("shard-*")) == ["shard-00000.json",
                                                                                   "shard-00001.json"]
    enc2 = FakeEncoder(table)
    mine(data, tmp_path / "o.jsonl", enc2, corpus=corpus, cfg=cfg, progress=False)
    encoded = [t for texts, _ in enc2.calls for t in texts]
    assert "q0" not in encoded and "q2" in encoded          # finished shards are not redone
    assert not any(t in encoded for t in CORPUS if t != POS)  # cached corpus embeddings reused
    assert (tmp_path / "o.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()


def test_settings_change_restarts_instead_of_mixing(tmp_path):
    data, corpus = tmp_path / "d.jsonl", tmp_path / "c.jsonl"
    _write(data, [{"query": f"q{i}", "positive": POS} for i in range(2)])
    _corpus_file(corpus, list(CORPUS))
    table = {**CORPUS, "q0": 1.0, "q1": 1.0}
    mine(data, tmp_path / "o.jsonl", FakeEncoder(table), corpus=corpus, progress=False, stop_after_shards=1,
         cfg=MineConfig(rank_start=5, rank_end=8, negatives=1, shard_size=1))
    mine(data, tmp_path / "o.jsonl", FakeEncoder(table), corpus=corpus, progress=False,
         cfg=MineConfig(rank_start=1, rank_end=8, negatives=1, shard_size=1, margin=2.0))
    got = [json.loads(line)["negatives"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert got == [["a feline resting on a rug"]] * 2


def test_in_place_and_bad_input(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"query": "q0", "positive": "alpha beta"}) + "\n" + '{"query": "q1"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: field 'positive'"):
        mine(data, data, FakeEncoder({}), progress=False)
    assert data.read_text().count("\n") == 2                 # nothing lost
    with pytest.raises(ValueError, match="rank window"):
        MineConfig(rank_start=10, rank_end=5).validate()


def test_near_duplicate_rule():
    assert is_near_duplicate("The cat, sat.", "the cat sat", 0.9)
    assert not is_near_duplicate("the cat sat", "the dog sat", 0.9)
    assert is_near_duplicate("the cat sat", "the dog sat", 0.5)


def test_cli_with_the_hashing_encoder(tmp_path):
    from embforge.cli import main
    data = tmp_path / "d.jsonl"
    _write(data, [{"query": "python list sort", "positive": "sort a python list in place"},
                  {"query": "bake bread", "positive": "how to bake bread at home"},
                  {"query": "train times", "positive": "the train leaves at noon"}])
    assert main(["mine", "--data", str(data), "--out", str(data), "--model", "hashing", "--ranks", "1-3",
                 "--negatives", "1", "--margin", "0.99"]) == 0
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    assert all(len(r["negatives"]) == 1 and r["negatives"][0] != r["positive"] for r in recs)
    assert main(["mine", "--data", str(data), "--out", str(data), "--model", "hashing", "--ranks", "9-3"]) == 2


def test_positive_outside_the_corpus_is_encoded_for_the_margin(tmp_path):
    data, corpus, out = tmp_path / "d.jsonl", tmp_path / "c.jsonl", tmp_path / "o.jsonl"
    _write(data, [{"query": "Q", "positive": POS}])
    _corpus_file(corpus, [t for t in CORPUS if t != POS])
    enc = FakeEncoder({**CORPUS, "Q": 1.0})
    report = mine(data, out, enc, corpus=corpus, progress=False,
                  cfg=MineConfig(rank_start=5, rank_end=100, negatives=2, margin=0.95))
    assert json.loads(out.read_text())["negatives"] == ["rain is expected tomorrow", "the recipe needs two eggs"]
    assert report["removed"] == {"positive": 0, "duplicate": 1, "margin": 1, "above_window": 2}
    assert [POS] in [texts for texts, _ in enc.calls]           # encoded as a document for its score


def test_cli_with_minilm_truncated(tmp_path):
    from embforge.cli import main
    data, out = tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    _write(data, [{"query": "how to sort a list", "positive": "sorted() returns a new sorted list"},
                  {"query": "bake bread", "positive": "knead the dough and bake it for forty minutes"},
                  {"query": "train timetable", "positive": "the train leaves the station at noon"}])
    assert main(["mine", "--data", str(data), "--out", str(out), "--model", "minilm", "--ranks", "1-3",
                 "--negatives", "2", "--margin", "0.99", "--max-seq-length", "16"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["positive"] not in r["negatives"] for r in recs) and sum(map(len, (r["negatives"] for r in recs)))
    assert main(["mine", "--data", str(data), "--out", str(out), "--model", "hashing", "--max-seq-length", "8"]) == 2


def test_scores_are_the_encoders_cosines_in_written_order(tmp_path):
    """--scores: [positive, *negatives written], each the cosine of the query with that text (hand-set vectors:
    the table's values); append mode scores the record's own negatives too (encoded: they are not in the corpus).
    Without --scores, old scores whose negatives changed are dropped (they would no longer line up)."""
    data, corpus, out = tmp_path / "d.jsonl", tmp_path / "c.jsonl", tmp_path / "o.jsonl"
    _write(data, [{"instruction": "find it", "query": "Q", "positive": POS, "negatives": ["old"],
                   "scores": [1.0, 0.0]}])
    _corpus_file(corpus, list(CORPUS))
    enc = FakeEncoder({**CORPUS, "Q": 1.0, "old": 0.33})
    kw = dict(rank_start=5, rank_end=100, negatives=2, margin=0.95, near_dup=0.9)
    report = mine(data, out, enc, corpus=corpus, cfg=MineConfig(**kw, scores=True), progress=False)
    rec = json.loads(out.read_text())
    assert rec["negatives"] == ["stock prices fell today", "rain is expected tomorrow"]
    assert rec["scores"] == pytest.approx([0.80, 0.60, 0.50], abs=1e-6) and report["scored"] == 1
    mine(data, out, enc, corpus=corpus, cfg=MineConfig(**kw, mode="append", scores=True), progress=False)
    rec = json.loads(out.read_text())
    assert rec["negatives"] == ["old", "stock prices fell today", "rain is expected tomorrow"]
    assert rec["scores"] == pytest.approx([0.80, 0.33, 0.60, 0.50], abs=1e-6)
    report = mine(data, out, enc, corpus=corpus, cfg=MineConfig(**kw), progress=False)
    rec = json.loads(out.read_text())
    assert "scores" not in rec and report["scores_dropped"] == 1 and report["scored"] == 0


def test_cli_scores_with_the_hashing_encoder(tmp_path):
    from embforge.cli import main
    from embforge.data.records import read_records
    from embforge.eval.encoders import HashingEncoder
    data, out = tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    _write(data, [{"query": "python list sort", "positive": "sort a python list in place"},
                  {"query": "bake bread", "positive": "how to bake bread at home"},
                  {"query": "train times", "positive": "the train leaves at noon"},
                  {"query": "sort numbers", "positive": "sorting numbers in a list"}])
    assert main(["mine", "--data", str(data), "--out", str(out), "--model", "hashing", "--ranks", "1-3",
                 "--negatives", "2", "--margin", "0.99", "--scores"]) == 0
    enc = HashingEncoder()
    recs = read_records(out)                       # valid training records: the reader checks the lengths
    assert all(len(r["negatives"]) == 2 for _, r in recs)
    for _, r in recs:
        q = enc.encode([r["query"]], instruction=None)[0].float()
        d = enc.encode([r["positive"], *r["negatives"]], instruction=None).float()
        assert r["scores"] == pytest.approx((d @ q).tolist(), abs=1e-5)
        assert r["scores"][0] != r["scores"][1]


def test_cli_mines_each_dataset_against_its_own_texts(tmp_path):
    """Several datasets (a directory, or several files): one output each, its negatives from its own texts."""
    from embforge.cli import main
    src = tmp_path / "sources"
    src.mkdir()
    # the cooking queries' words match the railway texts best: only a per-dataset corpus keeps them out
    dishes = ["whisk eggs into flour", "knead the dough slowly", "simmer the soup gently", "roast vegetables well"]
    cooking = [{"query": f"{d} aboard trains platforms", "positive": f"cooking: {d}"} for d in dishes]
    trains = [{"query": f"railway question {i}", "positive": f"railway {i}: trains platforms timetable"}
              for i in range(4)]
    _write(src / "cooking.jsonl", cooking)
    _write(src / "trains.jsonl", trains)
    out = tmp_path / "mined"
    args = ["--model", "hashing", "--ranks", "1-4", "--negatives", "1", "--margin", "0.999"]
    assert main(["mine", "--data", str(src), "--out", str(out), *args]) == 0
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["cooking.jsonl", "trains.jsonl"]
    for name, own in [("cooking", cooking), ("trains", trains)]:
        recs = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert [r["query"] for r in recs] == [r["query"] for r in own]
        assert all(r["negatives"] and r["negatives"][0] in {o["positive"] for o in own} - {r["positive"]}
                   for r in recs)
    # one combined file mines against both texts: then cooking records get railway negatives
    both = tmp_path / "both.jsonl"
    _write(both, cooking + trains)
    assert main(["mine", "--data", str(both), "--out", str(tmp_path / "both.mined.jsonl"), *args]) == 0
    mixed = [json.loads(line) for line in (tmp_path / "both.mined.jsonl").read_text().splitlines()][:4]
    assert any(r["negatives"][0].startswith("railway") for r in mixed)
    # errors: two inputs with one name; --out an existing file
    (tmp_path / "other").mkdir()
    _write(tmp_path / "other" / "cooking.jsonl", cooking)
    assert main(["mine", "--data", str(src / "cooking.jsonl"), str(tmp_path / "other" / "cooking.jsonl"),
                 "--out", str(out), *args]) == 2
    assert main(["mine", "--data", str(src), "--out", str(both), *args]) == 2


def test_short_records_keep_their_own_negatives_or_fail(tmp_path, capsys):
    """A 3-text corpus cannot fill ranks 10-100: replace mode used to write 0 negatives and exit 0, deleting the
    records' own. Default now keeps them (after any mined ones); --on-short fail exits 1 and writes nothing."""
    from embforge.cli import main
    recs = [{"query": f"q{i}", "positive": t, "negatives": [f"own negative {i}", "shared own negative"]}
            for i, t in enumerate(["alpha beta", "gamma delta", "epsilon zeta"])]
    data, out = tmp_path / "d.jsonl", tmp_path / "o.jsonl"
    _write(data, recs)
    before = data.read_bytes()
    assert main(["mine", "--data", str(data), "--out", str(out), "--model", "hashing", "--on-short", "fail"]) == 1
    err = capsys.readouterr().err
    assert f"{data}:1: 0 negative(s) mined, 7 asked (3 of 3 records short" in err and "Traceback" not in err
    assert not out.exists() and data.read_bytes() == before
    assert main(["mine", "--data", str(data), "--out", str(data), "--model", "hashing"]) == 0   # default: keep
    got = [json.loads(line)["negatives"] for line in data.read_text().splitlines()]
    assert got == [r["negatives"] for r in recs]
    assert "kept their own negatives (too few mined): 3" in capsys.readouterr().err
    # enough candidates: replace mode still replaces (the record's own negatives are not what was asked)
    table = {"alpha beta": 0.9, "gamma delta": 0.5, "epsilon zeta": 0.1, "own negative 0": 0.2, "own negative 1": 0.2,
             "own negative 2": 0.2, "shared own negative": 0.2, "q0": 1.0, "q1": 1.0, "q2": 1.0}
    mine(data, out, FakeEncoder(table), progress=False, cfg=MineConfig(rank_start=1, rank_end=10, negatives=1,
                                                                      margin=100.0))
    assert [len(json.loads(line)["negatives"]) for line in out.read_text().splitlines()] == [1, 1, 1]
