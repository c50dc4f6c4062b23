"""Retrieval and STS metrics. Retrieval numbers come from pytrec_eval (the trec_eval port BEIR and mteb use).

Conventions follow mteb so numbers are comparable with published MTEB/BEIR results:
- a query is averaged only if it has judgements and a ranking (pytrec_eval's behaviour);
- rankings are ordered by score, ties broken by doc id descending (trec_eval's order);
- MRR@k is trec_eval's `recip_rank` on the ranking cut to its first k documents;
- MAP is `map_cut` at the search depth (MAP@100 by default).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

DEFAULT_K = (10, 100)


def _cut(run: Run, k: int) -> dict[str, dict[str, float]]:
    """Keep each query's first k documents in trec_eval order (score desc, then doc id desc)."""
    out = {}
    for qid, docs in run.items():
        ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k]
        out[qid] = {d: float(s) for d, s in ranked}
    return out


def retrieval_metrics(qrels: Qrels, run: Run, k_values: Sequence[int] = DEFAULT_K, *,
                      map_k: int | None = None) -> dict[str, float]:
    """nDCG@k, Recall@k, MRR@k for each k, and MAP@map_k (default max(k_values)), averaged over queries.

    Keys are mteb's names (`ndcg_at_10`, `mrr_at_10`, `recall_at_100`, `map_at_100`) plus `num_queries`.
    """
    import pytrec_eval

    k_values = sorted(set(int(k) for k in k_values))
    if not k_values or k_values[0] < 1:
        raise ValueError(f"k_values must be positive integers, got {k_values}")
    map_k = map_k or k_values[-1]
    qrels = {q: {d: int(r) for d, r in rels.items()} for q, rels in qrels.items()}
    run = {q: {d: float(s) for d, s in docs.items()} for q, docs in run.items()}
    ks = ",".join(map(str, k_values))
    measures = {f"ndcg_cut.{ks}", f"recall.{ks}", f"map_cut.{map_k}"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    if not per_query:
        raise ValueError("no query has both relevance judgements and a ranking: check that query ids match")
    n = len(per_query)
    out: dict[str, float] = {}
    for k in k_values:
        out[f"ndcg_at_{k}"] = sum(s[f"ndcg_cut_{k}"] for s in per_query.values()) / n
        out[f"recall_at_{k}"] = sum(s[f"recall_{k}"] for s in per_query.values()) / n
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(_cut(run, k))
        # A query whose cut ranking is empty still counts (reciprocal rank 0), as in mteb.
        out[f"mrr_at_{k}"] = sum(rr[q]["recip_rank"] if q in rr else 0.0 for q in per_query) / n
    out[f"map_at_{map_k}"] = sum(s[f"map_cut_{map_k}"] for s in per_query.values()) / n
    out["num_queries"] = n
    return out


def sts_metrics(predicted: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """Spearman and Pearson correlation between predicted similarities and gold scores."""
    from scipy.stats import pearsonr, spearmanr

    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold scores")
    if len(gold) < 2:
        raise ValueError("need at least 2 pairs to compute a correlation")
    return {"spearman": float(spearmanr(predicted, gold).statistic),
            "pearson": float(pearsonr(predicted, gold).statistic),
            "num_pairs": len(gold)}
