"""Model cards: `embforge export` writes README.md (Hugging Face format) into the embforge and sentence-transformers
folders with the run's recipe and evaluation numbers; huggingface_hub parses it and sentence-transformers loads
the folder with it."""
import json

import pytest
import sentence_transformers as st
import torch
from huggingface_hub import ModelCard

from embforge.cli import main
from embforge.config import load_config
from embforge.data.sources import build
from embforge.cli.train import run_training as train
from embforge.engine.train import TrainConfig

INSTR = "Given a question, retrieve the passage that answers it"


def _tiny_beir(folder, rows, n_queries=6):
    folder.mkdir()
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": r["positive"]}) + "\n"
                                                 for i, r in enumerate(rows)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n"
                                                  for i, r in enumerate(rows[:n_queries])))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                               "".join(f"q{i}\td{i}\t1\n" for i in range(n_queries)))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    data = root / "pairs.jsonl"
    build(data, sources=("stdlib",))   # one source: enough for a tiny run, cheap to build
    rows = [json.loads(line) for line in data.read_text().splitlines()[:16]]
    beir = _tiny_beir(root / "tinybeir", rows)
    cfg = load_config(TrainConfig, None, [
        "model.path=tiny-llama", "model.lora.dropout=0.0", "model.lora.r=4", "model.lora.alpha=16",
        "model.pooling=mean", "model.query_max_length=32", "model.doc_max_length=24", f"data.train=[{data}]",
        "batch.queries=4", "batch.chunk_tokens=64", "optim.lr=1e-2", "optim.warmup_steps=1", "steps=3",
        "loss.learnable_temperature=true", "loss.temperature=0.05", f"eval.data={beir}", "eval.every_steps=2",
        f"output_dir={root / 'run'}", "checkpoint_every=0", "device=cpu"])
    train(cfg, progress=False)
    assert main(["export", "--model", str(root / "run" / "final"), "--out", str(root / "exp"),
                 "--sentence-transformers", "--instruction", INSTR]) == 0
    return root


def test_card_front_matter_carries_the_runs_numbers(exported):
    run = exported / "run"
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = {r["metric"]: r["value"] for r in evals if r["step"] == 3}
    assert sorted({r["step"] for r in evals}) == [0, 2, 3]
    n_examples = sum(1 for line in (exported / "pairs.jsonl").read_text().splitlines() if line.strip())
    for folder, library in ((exported / "exp", "embforge"), (exported / "exp" / "sentence-transformers",
                                                             "sentence-transformers")):
        card = ModelCard.load(folder / "README.md")
        data = card.data
        assert data.pipeline_tag == "sentence-similarity" and data.library_name == library
        assert data.base_model == "tiny-llama" and data.datasets == ["pairs"]
        assert "embforge" in data.tags and "lora" in data.tags and "pooling-mean" in data.tags
        got = {r.metric_type: r.metric_value for r in data.eval_results}
        assert got["ndcg_at_10"] == final["ndcg_at_10"] and got["recall_at_10"] == final["recall_at_10"]
        assert {r.dataset_name for r in data.eval_results} == {"tinybeir"}
        text = card.text
        assert "r=4, alpha=16" in text and "learned" in text and f"{metrics[-1]['temperature']:.4g}" in text
        assert f"`pairs` ({n_examples} examples)" in text and "4 queries per step" in text
        assert f"{metrics[-1]['loss']:.4f} at step 3" in text
        assert "num_queries" not in got                                       # sizes are not scores
        before = {r["metric"]: r["value"] for r in evals if r["step"] == 0}
        assert f"| tinybeir (6 queries, 16 docs) | 0 | {before['ndcg_at_10']:.4f} | {before['recall_at_10']:.4f} |" \
            in text                                                           # the history, not only the end
        assert INSTR in text and "encode_query" in text and "embforge encode --model" in text


def test_sentence_transformers_loads_the_folder_with_its_card(exported):
    folder = exported / "exp" / "sentence-transformers"
    model = st.SentenceTransformer(str(folder), device="cpu")
    assert model._model_card_text == (folder / "README.md").read_text()
    assert "## Training recipe" in model._model_card_text
    from embforge.engine import Embedder
    emb = Embedder.from_pretrained(exported / "exp", device="cpu")
    texts = ["how do I sort a list", "a second text"]
    torch.testing.assert_close(torch.as_tensor(model.encode_document(texts)), emb.encode(texts), atol=2e-5, rtol=1e-4)
