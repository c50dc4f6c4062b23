"""Portable model folders: a saved model names its base as the user did (shorthand, hub id, a path relative to the
folder when the base lies beside it), so a copy encodes with the offline asset cache somewhere else."""
import json
import shutil

import numpy as np
import pytest

from embforge.cli import main
from embforge.engine.baseref import base_reference, locate_base


def test_base_reference_forms(tmp_path):
    model = tmp_path / "run" / "final"
    beside = tmp_path / "run" / "base"
    inside = model / "base"
    far = tmp_path / "elsewhere" / "base"
    for d in (model, beside, inside, far):
        d.mkdir(parents=True)
    assert base_reference("smollm2", model) == "smollm2"
    assert base_reference("tiny-qwen2", model) == "tiny-qwen2"
    assert base_reference("org/some-model", model) == "org/some-model"
    assert base_reference(str(beside), model) == "../base"
    assert base_reference(str(inside), model) == "./base"
    assert base_reference(str(far), model) == str(far.resolve())
    assert locate_base("../base", model) == str(beside.resolve())
    assert locate_base("./base", model) == str(inside.resolve())
    # what older versions stored: the resolved asset location of a shorthand, now gone -> the shorthand
    assert locate_base("/gone/cache/smollm2-135m-instruct", model) == "smollm2"
    assert locate_base("/gone/cache/tiny-mistral-h64-l2-s0", model) == "/gone/cache/tiny-mistral-h64-l2-s0"
    assert locate_base("org/some-model", model) == "org/some-model"


@pytest.mark.slow
def test_copied_model_folder_encodes_with_the_cache_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBFORGE_CACHE", str(tmp_path / "cache-a"))
    rows = [{"instruction": "Find it", "query": f"question {i}", "positive": f"answer {i} text"} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(
        "model: {path: tiny-llama, query_max_length: 16, doc_max_length: 16}\ndata: {train: [d.jsonl]}\n"
        "batch: {queries: 4, negatives: 0, chunk_tokens: 64}\noptim: {warmup_steps: 0, lr: 0.01}\n"
        "eval: {before_training: false}\nsteps: 1\ncheckpoint_every: 0\noutput_dir: run\ndevice: cpu\n")
    assert main(["train", "--config", "c.yaml"]) == 0
    meta = json.loads((tmp_path / "run" / "final" / "embforge_config.json").read_text())
    assert meta["model"]["path"] == "tiny-llama"           # not <cache-a>/tiny-llama-h64-l2-s0-t...
    texts = ["a first text", "and a second one"]
    assert main(["encode", "--model", "run/final", "--out", "here.npy", *texts]) == 0

    # Another machine: the folder copied, the cache elsewhere (and the old one gone).
    shutil.copytree(tmp_path / "run" / "final", tmp_path / "moved" / "model")
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(tmp_path / "cache-a")
    monkeypatch.setenv("EMBFORGE_CACHE", str(tmp_path / "cache-b"))
    assert main(["encode", "--model", "moved/model", "--out", "there.npy", *texts]) == 0
    assert (tmp_path / "cache-b").is_dir()                  # the shorthand rebuilt its asset there
    here, there = np.load(tmp_path / "here.npy"), np.load(tmp_path / "there.npy")
    assert here.shape == (2, 64)
    np.testing.assert_allclose(there, here, rtol=0, atol=1e-6)
    # .jsonl: one JSON list per line, the same vectors in input order; .pt: a tensor
    assert main(["encode", "--model", "moved/model", "--out", "e.jsonl", *texts]) == 0
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(np.array(rows), here, rtol=0, atol=1e-6)
    import torch
    assert main(["encode", "--model", "moved/model", "--out", "e.pt", *texts]) == 0
    np.testing.assert_allclose(torch.load(tmp_path / "e.pt").numpy(), here, rtol=0, atol=1e-6)
