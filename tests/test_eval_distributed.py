"""Evaluation on every rank (engine/rank_encoder.py): under DDP and FSDP2 each rank encodes its share of the
queries and corpus, and the gathered embeddings and retrieval metrics equal one process's (gloo, CPU)."""
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from embforge.engine.distributed import DistributedConfig
from embforge.eval.beir import BeirDataset
from test_engine_distributed import _embedder, free_port

INSTRUCTION = "Find the matching answer."


def dataset() -> BeirDataset:
    """21 documents, 7 judged queries: with corpus_chunk 10 the last corpus chunk holds one text, so rank 1's share
    of it is empty; query 5 duplicates query 0's text (encoded once)."""
    topics = ["tides", "coffee", "prime numbers", "the sky", "knots", "volcanoes", "bread", "orbits", "rust",
              "chess", "tea", "rivers", "glass", "bees", "clocks", "maps", "salt", "ice", "paper", "wind", "sand"]
    corpus = {f"d{i}": f"A short text about {t}, number {i}, with {'many ' * (i % 5)}words." for i, t in
              enumerate(topics)}
    queries = {f"q{i}": f"what do you know about {topics[i]}" for i in range(7)}
    queries["q5"] = queries["q0"]
    return BeirDataset(corpus=corpus, queries=queries, qrels={q: {f"d{q[1:]}": 1} for q in queries},
                       name="tiny", split="test")


def evaluate(encoder) -> dict:
    from embforge.eval.retrieval import evaluate_retrieval
    return evaluate_retrieval(encoder, dataset(), instruction=INSTRUCTION, batch_size=3, corpus_chunk=10,
                              progress=False, return_run=True)


def _worker(rank, world_size, port, out_dir, strategy):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from embforge.engine.distributed import init_distributed, wrap
    from embforge.engine.rank_encoder import RankShardedEncoder
    dist_, _ = init_distributed(DistributedConfig(timeout_s=120), "cpu")
    emb = _embedder()
    encoder = RankShardedEncoder(emb, wrap(emb, dist_, strategy), dist_)
    seen = []
    real_encode = emb.encode
    emb.encode = lambda texts, **kw: (seen.append(len(texts)), real_encode(texts, **kw))[1]   # DDP's own share
    texts = list(dataset().corpus.values())
    result = {"metrics": evaluate(encoder), "corpus": encoder.encode(texts), "training": emb.model.training,
              "own_texts": sum(seen)}
    torch.save(result, Path(out_dir) / f"{strategy}-rank{rank}.pt")
    dist_.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_evaluates_its_share_and_gets_one_process_metrics(tmp_path, strategy):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), strategy), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{strategy}-rank{r}.pt") for r in (0, 1)]
    emb = _embedder()
    want = evaluate(emb)
    want_corpus = emb.encode(list(dataset().corpus.values()))
    assert 0.0 < want["ndcg_at_10"] < 1.0          # a ranking with something to get wrong
    for g in got:
        torch.testing.assert_close(g["corpus"], want_corpus, rtol=1e-5, atol=1e-6)   # every row, in order
        for k, v in want.items():
            if isinstance(v, float):
                assert g["metrics"][k] == pytest.approx(v, abs=1e-6), k
        assert g["metrics"]["run"].keys() == want["run"].keys()
        assert g["training"]                       # train mode is back (LoRA dropout)
    if strategy == "ddp":   # the work was split: 6 unique queries + 21 documents + 21 documents, ~half each
        assert sorted(g["own_texts"] for g in got) == [23, 25]


@pytest.mark.slow
def test_fsdp_training_evaluates_on_every_rank_and_records_once(tmp_path):
    """`eval.data` under FSDP2 (refused before: rank 0 alone did not hold the sharded model): the evaluation before
    training equals one process's evaluation of the same (untrained) model, and rank 0 alone writes eval.jsonl."""
    import json

    from embforge.eval.beir import write_beir
    from embforge.eval.retrieval import evaluate_retrieval
    from test_engine_distributed import torchrun, write_config
    beir = write_beir(dataset(), tmp_path / "beir")
    out = tmp_path / "run"
    cfg = write_config(tmp_path, out, steps=2, dropout=0.0)
    d = json.loads(cfg.read_text())
    d["distributed"]["strategy"] = "fsdp"
    d["eval"] = {"data": str(beir)}
    cfg.write_text(json.dumps(d))
    proc = torchrun(2, cfg)
    log = proc.stdout.read()
    assert proc.wait(timeout=600) == 0, log[-3000:]
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    ndcg = [(r["step"], r["value"]) for r in records if r["metric"] == "ndcg_at_10"]
    assert [s for s, _ in ndcg] == [0, 2] and log.count("[train] eval at step") == 2     # one voice
    want = evaluate_retrieval(_embedder(), dataset(), progress=False)
    assert ndcg[0][1] == pytest.approx(want["ndcg_at_10"], abs=1e-6)


def _slow_worker(rank, world_size, port, out_dir):
    """Encoding sleeps 0.6 s a text, so one evaluation lasts several times the collective timeout on each rank
    (the shares differ by fewer texts than there are ranks, so no collective waits long)."""
    import time
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from embforge.engine.distributed import init_distributed, wrap
    from embforge.engine.rank_encoder import RankShardedEncoder
    dist_, _ = init_distributed(DistributedConfig(timeout_s=3), "cpu")
    emb = _embedder()
    real_encode = emb.encode
    emb.encode = lambda texts, **kw: (time.sleep(0.6 * len(texts)), real_encode(texts, **kw))[1]
    encoder = RankShardedEncoder(emb, wrap(emb, dist_, "ddp"), dist_)
    t0 = time.perf_counter()
    metrics = evaluate(encoder)
    seconds = time.perf_counter() - t0
    dist_.barrier()                     # the next collective after the evaluation
    torch.save({"metrics": metrics, "seconds": seconds}, Path(out_dir) / f"slow-rank{rank}.pt")
    dist_.shutdown()


@pytest.mark.slow
def test_an_evaluation_longer_than_the_collective_timeout_does_not_trip_it(tmp_path):
    """distributed.timeout_s=3 and an evaluation that takes several times that on every rank: it completes, because
    no rank waits in a collective while another encodes alone (with rank 0 evaluating alone, rank 1 would sit in
    the next collective for the whole evaluation and time out)."""
    mp.spawn(_slow_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"slow-rank{r}.pt") for r in (0, 1)]
    want = evaluate(_embedder())
    for g in got:
        assert g["seconds"] > 2 * 3                      # the evaluation outlasted the timeout twice over
        assert g["metrics"]["ndcg_at_10"] == pytest.approx(want["ndcg_at_10"], abs=1e-6)
