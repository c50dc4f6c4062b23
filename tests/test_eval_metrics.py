import math
import random

import pytest

from embforge.eval.metrics import retrieval_metrics, sts_metrics


def test_hand_computed_case():
    # q1: relevant d1 (rel 2) and d3 (rel 1); ranking d2, d1, d3.  q2: relevant d9 never retrieved.
    qrels = {"q1": {"d1": 2, "d3": 1}, "q2": {"d9": 1}}
    run = {"q1": {"d2": 0.9, "d1": 0.8, "d3": 0.7}, "q2": {"d1": 0.5, "d2": 0.4}}
    m = retrieval_metrics(qrels, run, k_values=[1, 10])
    # trec_eval nDCG gain is the raw grade: DCG = 2/log2(3) + 1/log2(4); ideal = 2/log2(2) + 1/log2(3)
    ndcg_q1 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 + 1 / math.log2(3))
    assert m["ndcg_at_10"] == pytest.approx(ndcg_q1 / 2)
    assert m["ndcg_at_1"] == 0.0
    assert m["mrr_at_10"] == pytest.approx((1 / 2) / 2)
    assert m["mrr_at_1"] == 0.0
    assert m["recall_at_10"] == pytest.approx(1.0 / 2)
    assert m["recall_at_1"] == 0.0
    assert m["map_at_10"] == pytest.approx(((1 / 2 + 2 / 3) / 2) / 2)
    assert m["num_queries"] == 2


def test_ties_are_broken_by_doc_id_descending():
    # Equal scores: trec_eval ranks "dB" before "dA", so the relevant "dA" sits at rank 2.
    m = retrieval_metrics({"q": {"dA": 1}}, {"q": {"dA": 0.5, "dB": 0.5}}, k_values=[1, 10])
    assert m["mrr_at_10"] == pytest.approx(0.5) and m["recall_at_1"] == 0.0
    assert m["ndcg_at_10"] == pytest.approx(1 / math.log2(3))
    m = retrieval_metrics({"q": {"dB": 1}}, {"q": {"dA": 0.5, "dB": 0.5}}, k_values=[1])
    assert m["mrr_at_1"] == 1.0 and m["recall_at_1"] == 1.0


def _random_case(seed, n_q=40, n_d=300):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_d)]
    qrels = {f"q{i}": {d: rng.choice([0, 1, 1, 2]) for d in rng.sample(docs, rng.randint(1, 6))} for i in range(n_q)}
    # Rounded scores create ties, which is where tie-breaking conventions would show up.
    run = {q: {d: round(rng.random(), 2) for d in rng.sample(docs, 150)} for q in qrels}
    return qrels, run


def _trec_order(docs):
    """trec_eval's ranking: score descending, ties broken by document id descending."""
    return [d for d, _ in sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def _by_hand(qrels, run, k, map_k):
    """nDCG@k, Recall@k, MRR@k, MAP@map_k per query, written from the trec_eval definitions (graded gain = the
    judgement, relevant = judgement >= 1), averaged over the queries that have judgements and a ranking."""
    out = {"ndcg": [], "recall": [], "mrr": [], "map": []}
    for q in sorted(set(qrels) & set(run)):
        rels = qrels[q]
        ranked = _trec_order(run[q])
        relevant = {d for d, r in rels.items() if r >= 1}
        gains = [rels.get(d, 0) for d in ranked]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]) if g > 0)
        ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        out["ndcg"].append(dcg / idcg if idcg else 0.0)
        out["recall"].append(len(relevant & set(ranked[:k])) / len(relevant) if relevant else 0.0)
        first = next((i for i, d in enumerate(ranked[:k]) if d in relevant), None)
        out["mrr"].append(0.0 if first is None else 1.0 / (first + 1))
        hits, precisions = 0, []
        for i, d in enumerate(ranked[:map_k]):
            if d in relevant:
                hits += 1
                precisions.append(hits / (i + 1))
        out["map"].append(sum(precisions) / len(relevant) if relevant else 0.0)
    return {key: sum(v) / len(v) for key, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_hand_written_definitions_and_mteb(seed):
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    qrels, run = _random_case(seed)
    ours = retrieval_metrics(qrels, run, k_values=[10, 100])
    for k in (10, 100):
        hand = _by_hand(qrels, run, k, 100)
        assert ours[f"ndcg_at_{k}"] == pytest.approx(hand["ndcg"], rel=1e-9)
        assert ours[f"recall_at_{k}"] == pytest.approx(hand["recall"], rel=1e-9)
        assert ours[f"mrr_at_{k}"] == pytest.approx(hand["mrr"], rel=1e-9)
    assert ours["map_at_100"] == pytest.approx(_by_hand(qrels, run, 100, 100)["map"], rel=1e-9)

    mteb_res = calculate_retrieval_scores(run, qrels, [10, 100])
    # mteb rounds its averages to 5 decimals
    assert ours["ndcg_at_10"] == pytest.approx(mteb_res.ndcg["NDCG@10"], abs=1e-5)
    assert ours["recall_at_10"] == pytest.approx(mteb_res.recall["Recall@10"], abs=1e-5)
    assert ours["recall_at_100"] == pytest.approx(mteb_res.recall["Recall@100"], abs=1e-5)
    assert ours["map_at_100"] == pytest.approx(mteb_res.map["MAP@100"], abs=1e-5)
    assert ours["mrr_at_10"] == pytest.approx(mteb_res.mrr["MRR@10"], abs=1e-9)


def test_sts_metrics_against_numpy_and_ranks():
    import numpy as np

    gold = [0.0, 1.0, 2.5, 3.0, 5.0]
    pred = [0.1, 0.3, 0.2, 0.8, 0.9]
    m = sts_metrics(pred, gold)
    assert m["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1])
    # ranks of pred: 1,3,2,4,5 vs 1..5: d^2 sum = 2 -> 1 - 6*2/(5*24)
    assert m["spearman"] == pytest.approx(1 - 6 * 2 / (5 * 24))
    with pytest.raises(ValueError, match="predictions"):
        sts_metrics([0.1], gold)
