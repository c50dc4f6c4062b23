import pytest

from embforge.eval.beir import BeirDataset
from embforge.eval.encoders import HashingEncoder
from embforge.eval.retrieval import evaluate_retrieval


def _toy():
    corpus = {f"d{i}": f"document about topic{i} and filler words" for i in range(30)}
    queries = {f"q{i}": f"tell me about topic{i}" for i in range(10)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(10)}
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels, name="toy")


def test_lexical_toy_is_perfect_and_chunking_does_not_change_it():
    ds = _toy()
    full = evaluate_retrieval(HashingEncoder(), ds, corpus_chunk=100, progress=False)
    chunked = evaluate_retrieval(HashingEncoder(), ds, corpus_chunk=4, progress=False, return_run=True)
    assert full["ndcg_at_10"] == pytest.approx(1.0) and full["mrr_at_10"] == pytest.approx(1.0)
    assert chunked["ndcg_at_10"] == full["ndcg_at_10"]
    assert chunked["num_queries"] == 10 and chunked["num_docs"] == 30
    assert all(max(docs, key=docs.get) == f"d{q[1:]}" for q, docs in chunked["run"].items())


def test_wrong_qrels_score_zero():
    ds = _toy()
    ds.qrels = {f"q{i}": {f"d{(i + 1) % 30}": 1} for i in range(10)}  # relevance points at the wrong doc
    m = evaluate_retrieval(HashingEncoder(), ds, progress=False)
    assert m["mrr_at_10"] < 0.5


def test_instruction_goes_to_queries_only_and_per_query_wins():
    ds = _toy()
    ds.instructions = {"q0": "special"}
    enc = HashingEncoder()
    evaluate_retrieval(enc, ds, instruction="default", corpus_chunk=12, progress=False)
    calls = enc.calls
    assert sorted(c for c in calls if c[1] is not None) == [(1, "special"), (9, "default")]
    assert [c for c in calls if c[1] is None] == [(12, None), (12, None), (6, None)]  # corpus, chunked


def test_minilm_on_chatterbot_subset():
    """A real encoder on real data: all-MiniLM-L6-v2 must retrieve chatterbot answers far above chance."""
    from embforge.eval.datasets import chatterbot_beir
    from embforge.eval.encoders import load_encoder

    full = chatterbot_beir()
    qids = list(full.qrels)[:80]
    # the relevant answers plus 250 distractors keep CPU time low while chance stays near zero
    keep = {d for q in qids for d in full.qrels[q]} | set(list(full.corpus)[-250:])
    ds = BeirDataset(corpus={d: t for d, t in full.corpus.items() if d in keep},
                     queries={q: full.queries[q] for q in qids}, qrels={q: full.qrels[q] for q in qids})
    m = evaluate_retrieval(load_encoder("minilm"), ds, batch_size=64, progress=False)
    assert m["num_docs"] > 300
    assert m["ndcg_at_10"] > 0.3  # chance level is about 0.03 with 300+ candidates
    assert m["recall_at_100"] >= m["recall_at_10"]
