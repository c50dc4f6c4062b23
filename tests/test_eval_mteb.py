"""One small local task through mteb.evaluate, offline, with the embforge adapter."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from embforge.eval.beir import BeirDataset  # noqa: E402
from embforge.eval.encoders import HashingEncoder, load_encoder  # noqa: E402
from embforge.eval.retrieval import evaluate_retrieval  # noqa: E402

# mteb (and the adapter, which imports it) are imported inside the tests: locked, so a missing install fails these
# tests (never a skip), but it cannot stop the collection of every other test (`pytest -m gpu` on the device,
# which has no mteb).


def _subset():
    from embforge.eval.datasets import chatterbot_beir

    full = chatterbot_beir()
    qids = list(full.qrels)[100:140]
    keep = {d for q in qids for d in full.qrels[q]} | set(list(full.corpus)[:120])
    return BeirDataset(corpus={d: t for d, t in full.corpus.items() if d in keep},
                       queries={q: full.queries[q] for q in qids}, qrels={q: full.qrels[q] for q in qids},
                       name="chatterbot-subset")


def test_mteb_scores_equal_embforge_scores():
    from embforge.eval.mteb_adapter import beir_task, run_mteb
    ds = _subset()
    encoder = load_encoder("minilm")
    theirs = run_mteb(encoder, [beir_task(ds, name="ChatterbotSubset")])["ChatterbotSubset"]
    ours = evaluate_retrieval(encoder, ds, progress=False)
    for key in ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_100", "map_at_100"):
        assert ours[key] == pytest.approx(theirs[key], abs=2e-5), key  # mteb rounds some averages to 5 places
    assert theirs["ndcg_at_10"] > 0.3


def test_adapter_maps_prompt_types_to_instructions():
    import mteb

    from embforge.eval.mteb_adapter import MtebEncoder, beir_task, run_mteb
    enc = HashingEncoder()
    task = beir_task(_subset(), name="ChatterbotPromptCheck", instruction="Find the reply")
    run_mteb(MtebEncoder(enc), [task])
    assert {inst for _, inst in enc.calls} == {"Find the reply", None}  # queries instructed, documents not
    assert (40, "Find the reply") in enc.calls

    from mteb.types import PromptType

    meta = mteb.get_task("SciFact").metadata
    adapter = MtebEncoder(enc, instructions={"STS12": "custom"})
    assert adapter.instruction(meta, PromptType.query).startswith("Given a scientific claim")
    assert adapter.instruction(meta, PromptType.document) is None
    assert adapter.instruction(mteb.get_task("STS12").metadata, None) == "custom"  # symmetric: both sides
