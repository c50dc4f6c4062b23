"""Corpus encoding and the embedding cache: `embforge encode --out-dir` killed with SIGKILL midway and rerun encodes
only the unfinished shards and ends with exactly `Embedder.encode`'s vectors; token-budget batches; the cache
serves every text seen before with the same model (across processes) and nothing across models."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from embforge.cli import main
from embforge.engine import Embedder, ModelConfig
from embforge.engine.cache import CachedEncoder, EmbeddingCache, cached, model_fingerprint
from embforge.engine.corpus import CorpusError, encode_corpus, load_corpus, token_batches
from embforge.engine.model import LoraConfig


def _model(folder, seed):
    cfg = ModelConfig(path="tiny-llama", query_max_length=32, doc_max_length=48,
                      lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(seed)
    emb = Embedder.from_config(cfg, "cpu")
    with torch.no_grad():
        for n, p in emb.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    emb.save_pretrained(folder)
    return Embedder.from_pretrained(folder, device="cpu")


def _corpus(n):
    return [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(i % 41)) for i in range(n)]


def test_token_batches_respect_the_budget():
    lengths = [5, 40, 3, 17, 17, 90, 1, 33]
    for packed in (False, True):
        batches = token_batches(lengths, 64, packed)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        flat = [lengths[i] for b in batches for i in b]
        assert flat == sorted(lengths, reverse=True)                      # longest first
        for b in batches:
            cost = sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b)
            assert cost <= 64 or len(b) == 1                               # 90 > 64 goes alone
    assert len(token_batches(lengths, 64, True)) < len(token_batches(lengths, 64, False))


@pytest.mark.slow
def test_killed_encode_resumes_without_reencoding_finished_shards(tmp_path):
    emb = _model(tmp_path / "m", seed=1)
    texts = _corpus(1500)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"_id": f"doc{i}", "text": t}) + "\n"
                                              for i, t in enumerate(texts)))
    out = tmp_path / "enc"
    cmd = [sys.executable, "-m", "embforge", "encode", "--model", str(tmp_path / "m"), "--file",
           str(tmp_path / "c.jsonl"), "--out-dir", str(out), "--shard-size", "50", "--token-budget", "96"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    done = {}
    while time.time() < deadline and proc.poll() is None:
        if (out / "manifest.json").exists():
            done = json.loads((out / "manifest.json").read_text())["shards"]
            if len(done) >= 2:
                break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads((out / "manifest.json").read_text())["shards"]
    assert 2 <= len(done) < 30, "the encode finished before it could be killed"
    with pytest.raises(CorpusError, match="not encoded yet"):
        load_corpus(out)

    seen = []
    inner = emb.embed_chunk
    emb.embed_chunk = lambda seqs: (seen.extend(seqs), inner(seqs))[1]
    # a larger budget for the rest (fewer, bigger batches): the vectors do not depend on how texts are batched
    res = encode_corpus(emb, texts, out, ids=[f"doc{i}" for i in range(1500)], shard_size=50, token_budget=2048,
                        progress=False)
    assert res["encoded_now"] == len(seen) == 1500 - 50 * len(done)     # finished shards were not re-encoded
    ids, vecs = load_corpus(out)
    assert ids[:2] == ["doc0", "doc1"] and len(ids) == 1500
    torch.testing.assert_close(vecs, emb.encode(texts, batch_size=64), atol=1e-5, rtol=1e-4)
    assert not list(out.glob("*.tmp"))
    # a finished encoding reruns for free; another shard size or corpus is refused, not mixed in
    assert encode_corpus(emb, texts, out, shard_size=50, progress=False)["encoded_now"] == 0
    with pytest.raises(CorpusError, match="another shard_size"):
        encode_corpus(emb, texts, out, shard_size=100, progress=False)
    with pytest.raises(CorpusError, match="another corpus"):
        encode_corpus(emb, texts[:-1] + ["changed"], out, shard_size=50, progress=False)


def test_cache_encodes_each_text_once_per_model(tmp_path):
    a = _model(tmp_path / "a", seed=1)
    texts = ["alpha text", "beta text", "alpha text", "gamma"]
    enc = cached(a, tmp_path / "cache")
    first = enc.encode(texts)
    assert enc.encoded == 3 and enc.reused == 1
    torch.testing.assert_close(first, a.encode(texts), atol=1e-6, rtol=1e-5)
    again = enc.encode(["gamma", "alpha text"])
    assert enc.encoded == 3 and torch.equal(again, first[[3, 0]])
    q = enc.encode(["alpha text"], instruction="Find it")              # queries are other keys
    assert enc.encoded == 4
    torch.testing.assert_close(q, a.encode(["alpha text"], instruction="Find it"), atol=1e-6, rtol=1e-5)

    # another process' view: the parts on disk; a different model gets its own fingerprint and encodes
    counting = CachedEncoder(a, EmbeddingCache(tmp_path / "cache", model_fingerprint(a)))
    torch.testing.assert_close(counting.encode(texts), first)
    assert counting.encoded == 0 and len(counting.cache) == 4
    b = _model(tmp_path / "b", seed=2)
    assert model_fingerprint(b) != model_fingerprint(a)
    enc_b = cached(b, tmp_path / "cache")
    out_b = enc_b.encode(texts)
    assert enc_b.encoded == 3 and (out_b - first).abs().max() > 1e-3


def test_encode_cli_errors(tmp_path, capsys):
    _model(tmp_path / "m", seed=1)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    assert main(["encode", "--model", str(tmp_path / "m"), "--file", str(tmp_path / "bad.jsonl"),
                 "--out-dir", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: missing field 'text'" in capsys.readouterr().err


def test_mine_and_eval_reuse_the_cache(tmp_path, capsys):
    """Re-scoring and re-mining the same corpus with the same model encodes nothing: every text comes back from the
    cache, and the results are the same."""
    _model(tmp_path / "m", seed=1)
    rows = [{"instruction": "Find the matching document", "query": f"question {i} about w{i % 13}",
             "positive": t} for i, t in enumerate(_corpus(40))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": r["positive"]}) + "\n"
                                               for i, r in enumerate(rows)))
    (beir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n"
                                                for i, r in enumerate(rows[:10])))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                             "".join(f"q{i}\td{i}\t1\n" for i in range(10)))
    cache = ["--cache-dir", str(tmp_path / "cache")]
    results = []
    for n in range(2):
        out = tmp_path / f"eval{n}.json"
        assert main(["eval", "retrieval", "--model", str(tmp_path / "m"), "--data", str(beir), "--out", str(out),
                     *cache]) == 0
        err = capsys.readouterr().err
        assert ("0 texts reused, 50 encoded" if n == 0 else "50 texts reused, 0 encoded") in err, err
        results.append({r["metric"]: r["value"] for r in json.loads(out.read_text())})
    assert results[0] == results[1] and "ndcg_at_10" in results[0]
    mined = []
    for n in range(2):
        out = tmp_path / f"mined{n}.jsonl"
        assert main(["mine", "--data", str(tmp_path / "train.jsonl"), "--out", str(out), "--model",
                     str(tmp_path / "m"), "--ranks", "2-6", "--negatives", "2", *cache]) == 0
        err = capsys.readouterr().err
        # the documents were cached by the evaluation already; the mining queries carry another instruction
        assert (" 40 encoded" if n == 0 else "0 encoded") in err, err
        mined.append(out.read_text())
    assert mined[0] == mined[1] and "negatives" in mined[0]
    capsys.readouterr()
    assert main(["eval", "retrieval", "--model", str(tmp_path / "m"), "--data", str(beir), "--no-cache",
                 *cache]) == 0
    assert "embedding cache" not in capsys.readouterr().err
