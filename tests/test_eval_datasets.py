import json
import warnings

import pytest

from embforge.data.records import DataError
from embforge.eval.beir import load_beir
from embforge.eval.datasets import chatterbot_beir, chatterbot_pairs, is_heldout, synthetic_beir


def test_chatterbot_beir_from_installed_yaml(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = chatterbot_beir(tmp_path / "cb")
    pairs = chatterbot_pairs()
    assert len(pairs) > 800  # ~900 unique English pairs in chatterbot-corpus 1.3
    assert sum(len(r) for r in ds.qrels.values()) == len(pairs)  # every pair is one judgement, none lost
    q = next(qid for qid, text in ds.queries.items() if text == "What is AI?")
    answers = {ds.corpus[d] for d in ds.qrels[q]}
    assert any(a.startswith("Artificial Intelligence is the branch of engineering") for a in answers)
    assert len(answers) >= 2  # a question asked twice keeps both answers relevant
    # the malformed trivia entry shipped upstream is reported, not silently dropped
    assert any("trivia.yml" in str(w.message) for w in caught)
    back = load_beir(tmp_path / "cb")  # written files pass the strict loader
    assert back.qrels == ds.qrels and back.corpus == ds.corpus


def test_chatterbot_instruction_travels_with_files(tmp_path):
    chatterbot_beir(tmp_path, instruction="Find the reply")
    first = json.loads((tmp_path / "queries.jsonl").read_text().splitlines()[0])
    assert first["instruction"] == "Find the reply"


def _synthetic(tmp_path, n=400):
    path = tmp_path / "synth.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"task {i % 3}", "query": f"query number {i}",
                                "positive": f"positive {i}", "negatives": [f"negative {i}", "shared negative"],
                                "task_type": "short-long"}) + "\n")
    return path


def test_synthetic_heldout_split(tmp_path):
    path = _synthetic(tmp_path)
    ds = synthetic_beir(path, tmp_path / "beir", fraction=0.25, seed=3)
    assert 60 <= len(ds.queries) <= 140  # ~100 of 400
    assert ds == synthetic_beir(path, fraction=0.25, seed=3) or ds.queries == synthetic_beir(
        path, fraction=0.25, seed=3).queries  # deterministic
    for qid, text in ds.queries.items():
        i = int(text.split()[-1])
        assert qid == f"q{i + 1}"  # query id = line number of its record
        assert is_heldout(text, 0.25, 3)
        assert ds.instructions[qid] == f"task {i % 3}"
        assert [ds.corpus[d] for d in ds.qrels[qid]] == [f"positive {i}"]
    assert sum(t == "shared negative" for t in ds.corpus.values()) == 1
    assert load_beir(tmp_path / "beir").instructions == ds.instructions


def test_synthetic_errors_name_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "q", "positive": "p"}\n\n{"query": "q2", "positive": ""}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: field 'positive'"):
        synthetic_beir(path)
    path.write_text('{"query": "q", "positive": "p", "negatives": [1]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'negatives'"):
        synthetic_beir(path)


def test_is_heldout_fraction_bounds():
    assert not is_heldout("x", 0.0) and is_heldout("x", 1.0)
    with pytest.raises(ValueError):
        is_heldout("x", 1.5)


def test_fortunes_topics_parse_and_split(tmp_path):
    """Entries split on % lines, attributions dropped, short entries and repeats skipped; queries and corpus are
    disjoint and every query's relevant documents are exactly its topic's corpus entries."""
    from embforge.eval.datasets import fortunes_beir, fortunes_by_topic
    topics = ("food", "love")
    for t in topics:
        entries = [f"A {t} saying number {i} that is long enough to be kept by the filter.\n\t\t-- Someone Famous"
                   for i in range(6)] + ["short", f"A {t} saying number 0 that is long enough to be kept by the filter."]
        (tmp_path / t).write_text("\n%\n".join(entries) + "\n")
    by_topic = fortunes_by_topic(tmp_path, topics)
    assert [len(v) for v in by_topic.values()] == [6, 6]
    assert all("Someone" not in t and "--" not in t for v in by_topic.values() for t in v)
    ds = fortunes_beir(queries_per_topic=2, docs_per_topic=4, data_dir=tmp_path, topics=topics)
    assert len(ds.queries) == 4 and len(ds.corpus) == 8
    assert not set(ds.queries.values()) & set(ds.corpus.values())
    for qid, rel in ds.qrels.items():
        topic = qid.split("-")[0]
        assert set(rel) == {d for d in ds.corpus if d.startswith(topic + "-")}
        assert all(topic in ds.corpus[d] for d in rel)
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        fortunes_by_topic(tmp_path / "none", topics)
