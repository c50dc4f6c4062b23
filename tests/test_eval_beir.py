import json

import pytest

from embforge.eval.beir import BeirDataset, BeirFormatError, load_beir, write_beir


def _write(tmp_path, corpus, queries, qrels_lines, split="test"):
    (tmp_path / "qrels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus.jsonl").write_text("".join(l + "\n" for l in corpus))
    (tmp_path / "queries.jsonl").write_text("".join(l + "\n" for l in queries))
    (tmp_path / "qrels" / f"{split}.tsv").write_text("".join(l + "\n" for l in qrels_lines))
    return tmp_path


GOOD_CORPUS = ['{"_id": "d1", "title": "Cats", "text": "Cats purr."}', '', '{"_id": "d2", "text": "Dogs bark."}']
GOOD_QUERIES = ['{"_id": "q1", "text": "what purrs"}', '{"_id": "q2", "text": "who barks", "instruction": "Find it"}']
GOOD_QRELS = ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2\t2"]


def test_load_joins_title_and_reads_instructions(tmp_path):
    ds = load_beir(_write(tmp_path, GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS))
    assert ds.corpus == {"d1": "Cats Cats purr.", "d2": "Dogs bark."}
    assert ds.queries == {"q1": "what purrs", "q2": "who barks"}
    assert ds.instructions == {"q2": "Find it"}
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2}}


def test_write_then_load_round_trips(tmp_path):
    ds = BeirDataset(corpus={"a": "x\ty", "b": "z"}, queries={"q": "?"}, qrels={"q": {"b": 1, "a": 0}},
                     instructions={"q": "Do it"}, split="dev")
    back = load_beir(write_beir(ds, tmp_path / "out"), "dev")
    assert (back.corpus, back.queries, back.qrels, back.instructions) == (ds.corpus, ds.queries, ds.qrels,
                                                                           ds.instructions)


@pytest.mark.parametrize("corpus,queries,qrels,message", [
    (['{"_id": "d1", "text": "a"}', '{"_id": "d2"}'], GOOD_QUERIES, GOOD_QRELS, "corpus.jsonl:2: missing field 'text'"),
    (['{"_id": "d1", "text": "a"', ], GOOD_QUERIES, GOOD_QRELS, "corpus.jsonl:1: invalid JSON"),
    (['{"_id": "d1", "text": "a"}', '{"_id": "d1", "text": "b"}'], GOOD_QUERIES, GOOD_QRELS,
     "corpus.jsonl:2: duplicate '_id'"),
    (GOOD_CORPUS, ['{"_id": "q1", "text": ["x"]}'], GOOD_QRELS, "queries.jsonl:1: field 'text' must be a string"),
    (GOOD_CORPUS, GOOD_QUERIES, ["query-id\tcorpus-id\tscore", "q1\td1\tyes"], "test.tsv:2: field 'score'"),
    (GOOD_CORPUS, GOOD_QUERIES, ["q1\td1"], "test.tsv:1: expected 3 tab-separated columns"),
    (GOOD_CORPUS, GOOD_QUERIES, ["q1\td9\t1"], "1 corpus id(s) not in corpus.jsonl"),
    (GOOD_CORPUS, GOOD_QUERIES, ["q7\td1\t1"], "1 query id(s) not in queries.jsonl"),
])
def test_errors_name_file_line_and_field(tmp_path, corpus, queries, qrels, message):
    with pytest.raises(BeirFormatError) as e:
        load_beir(_write(tmp_path, corpus, queries, qrels))
    assert message in str(e.value)


def test_missing_split_lists_available_ones(tmp_path):
    _write(tmp_path, GOOD_CORPUS, GOOD_QUERIES, GOOD_QRELS, split="dev")
    with pytest.raises(FileNotFoundError, match=r"available splits: \['dev'\]"):
        load_beir(tmp_path, "test")
    assert json.loads((tmp_path / "corpus.jsonl").read_text().splitlines()[0])["_id"] == "d1"  # input untouched
