"""`embforge merge`: merged weights equal a float64 computation from the adapter files; two trained LoRA models
merged embed like the base plus the averaged deltas (and not like either input, nor like A and B averaged
separately); a merged model exports to sentence-transformers and reproduces `embforge encode`; slerp endpoints are
the inputs; --rank refactors by SVD with the energy reported; bad inputs are one-line errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embforge.cli import main
from embforge.config import load_config
from embforge.engine import Embedder, ModelConfig
from embforge.engine.merge import MergeError, merge_models, slerp
from embforge.engine.model import LoraConfig, resolve_path

TEXTS = ["how do I sort a list", "The with statement runs __enter__ and __exit__.", "a third, different text"]
INSTR = "Given a question, retrieve the passage that answers it"


def _random_adapter(folder, seed, r=4, alpha=8, targets="auto", layers=None, path="tiny-llama"):
    """A tiny-llama embedder with random nonzero lora_B, saved like a run's final folder."""
    cfg = ModelConfig(path=path, query_max_length=32, doc_max_length=24,
                      lora=LoraConfig(r=r, alpha=alpha, dropout=0.0, targets=targets, layers=layers))
    torch.manual_seed(seed)
    emb = Embedder.from_config(cfg, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in emb.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    emb.eval()
    emb.save_pretrained(folder)
    return emb


def _deltas64(adapter_dir):
    """{base weight name: float64 alpha/r * B @ A}, read straight from peft's files (no peft code)."""
    conf = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = conf["lora_alpha"] / conf["r"]
    tensors = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
        out[name] = scale * b.double() @ a.double()
    return out


def _base64():
    return {k: v.double() for k, v in load_file(Path(resolve_path("tiny-llama")) / "model.safetensors").items()}


def _reference_embedder(weights64, pooling="last"):
    """The base model with the given float64 weights (rounded to float32), wrapped as a plain embedder."""
    emb = Embedder.from_config(ModelConfig(path="tiny-llama", lora=None, query_max_length=32, doc_max_length=24,
                                           pooling=pooling), "cpu")
    emb.model.load_state_dict({k: v.float() for k, v in weights64.items()})
    return emb.eval()


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    _random_adapter(root / "a", seed=1, r=4, alpha=8)
    # a different rank, scale and set of adapted matrices: deltas are merged per matrix, zero where absent
    _random_adapter(root / "b", seed=2, r=2, alpha=6, targets=["q_proj", "v_proj", "down_proj"], layers=[1])
    return root / "a", root / "b"


def test_linear_merge_equals_float64_reference(two_adapters, tmp_path):
    a, b = two_adapters
    report = merge_models([a, b], tmp_path / "m", weights=[1, 3])
    assert report["weights"] == [0.25, 0.75] and report["matrices"] == 14
    got = load_file(tmp_path / "m" / "merged" / "model.safetensors")
    base, da, db = _base64(), _deltas64(a / "adapter"), _deltas64(b / "adapter")
    assert set(db) < set(da) and len(da) == 14 and len(db) == 3
    want = {k: v + 0.25 * da.get(k, 0) + 0.75 * db.get(k, 0) for k, v in base.items()}
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-6, atol=1e-9)   # one float32 rounding
    # the merge changed the weights, and not the way averaging A and B separately would
    k = "layers.1.self_attn.q_proj.weight"
    assert (got[k].double() - base[k]).abs().max() > 1e-2
    ta, tb = (load_file(m / "adapter" / "adapter_model.safetensors") for m in (a, b))
    key = "base_model.model.layers.1.self_attn.q_proj.lora_{}.weight"
    naive = 0.5 * (ta[key.format("B")][:, :2].double() + tb[key.format("B")].double()) @ \
        (0.5 * (ta[key.format("A")][:2].double() + tb[key.format("A")].double()))
    assert (want[k] - base[k] - naive).abs().max() > 1e-2
    assert report["rounding"]["relative_frobenius"] < 1e-7


def test_bfloat16_output_reports_its_rounding(two_adapters, tmp_path):
    a, b = two_adapters
    report = merge_models([a, b], tmp_path / "m", dtype="bfloat16")
    got = load_file(tmp_path / "m" / "merged" / "model.safetensors")
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    base, da, db = _base64(), _deltas64(a / "adapter"), _deltas64(b / "adapter")
    want = {k: v + 0.5 * da.get(k, 0) + 0.5 * db.get(k, 0) for k, v in base.items()}
    err = sum(float(((got[k].double() - want[k]) ** 2).sum()) for k in want)
    ref = sum(float((want[k] ** 2).sum()) for k in want)
    assert report["rounding"]["relative_frobenius"] == pytest.approx((err / ref) ** 0.5, rel=1e-6)
    assert 1e-4 < report["rounding"]["relative_frobenius"] < 1e-2        # bf16 keeps 8 bits of mantissa
    emb = Embedder.from_pretrained(tmp_path / "m", device="cpu")
    assert emb.encode(TEXTS).shape == (3, 64)


def test_slerp_endpoints_and_midpoint(two_adapters, tmp_path):
    a, b = two_adapters
    base, da, db = _base64(), _deltas64(a / "adapter"), _deltas64(b / "adapter")
    for w, want_d in (([1, 0], da), ([0, 1], db)):
        merge_models([a, b], tmp_path / f"s{w[1]}", method="slerp", weights=w)
        got = load_file(tmp_path / f"s{w[1]}" / "merged" / "model.safetensors")
        for k in base:
            torch.testing.assert_close(got[k].double(), base[k] + want_d.get(k, 0), rtol=1e-6, atol=1e-9)
    merge_models([a, b], tmp_path / "mid", method="slerp")
    got = load_file(tmp_path / "mid" / "merged" / "model.safetensors")
    k = "layers.1.mlp.down_proj.weight"      # adapted in both: a real arc
    x, y = da[k].numpy().ravel(), db[k].numpy().ravel()
    omega = np.arccos(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    ref = (np.sin(omega / 2) * (x + y) / np.sin(omega)).reshape(da[k].shape)
    np.testing.assert_allclose(got[k].double().numpy() - base[k].numpy(), ref, rtol=1e-5, atol=1e-7)
    assert np.abs(ref - 0.5 * (x + y).reshape(ref.shape)).max() > 1e-3     # not the linear midpoint
    k = "layers.0.mlp.up_proj.weight"        # adapted in a only: the chord, (1 - t) * D_a
    torch.testing.assert_close(got[k].double() - base[k], 0.5 * da[k], rtol=1e-5, atol=1e-7)
    # the formula itself: parallel vectors fall back to the chord, endpoints are exact
    v = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(slerp(v, 2 * v, 0.5), 1.5 * v)
    w = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(slerp(v, w, 0.0), v)
    torch.testing.assert_close(slerp(v, w, 1.0), w)


def test_rank_refactoring_keeps_energy(two_adapters, tmp_path):
    a, b = two_adapters
    full = merge_models([a, b], tmp_path / "full")
    exact = merge_models([a, b], tmp_path / "r6", rank=6)        # 4 + 2: the sum's rank fits
    assert exact["energy"]["min"] == pytest.approx(1.0, abs=1e-9)
    texts_emb = Embedder.from_pretrained(tmp_path / "full", device="cpu").encode(TEXTS)
    r6 = Embedder.from_pretrained(tmp_path / "r6", device="cpu")
    assert hasattr(r6.model, "peft_config")
    torch.testing.assert_close(r6.encode(TEXTS), texts_emb, atol=1e-5, rtol=1e-4)
    low = merge_models([a, b], tmp_path / "r1", rank=1)
    k = "layers.1.mlp.down_proj"
    d = 0.5 * _deltas64(a / "adapter")[k + ".weight"] + 0.5 * _deltas64(b / "adapter")[k + ".weight"]
    s = np.linalg.svd(d.numpy(), compute_uv=False)
    assert low["energy"]["per_matrix"][k] == pytest.approx(s[0] ** 2 / (s ** 2).sum(), rel=1e-9)
    assert low["energy"]["min"] < 0.99
    assert full["matrices"] == low["matrices"] == 14


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two quick LoRA trainings from tiny-llama (different seeds and data order), checkpoints every step."""
    from embforge.data.sources import build
    from embforge.cli.train import run_training as train
    from embforge.engine.train import TrainConfig

    root = tmp_path_factory.mktemp("runs")
    build(root / "train.jsonl", sources=("stdlib",))   # one source: enough for a tiny run, cheap to build
    for seed in (1, 2):
        cfg = load_config(TrainConfig, None, [
            "model.path=tiny-llama", "model.lora.dropout=0.0", "model.lora.r=4", "model.pooling=mean",
            "model.query_max_length=32", "model.doc_max_length=24", f"data.train=[{root / 'train.jsonl'}]",
            "batch.queries=4", "batch.chunk_tokens=64", "optim.lr=5e-3", "optim.warmup_steps=1", "steps=3",
            f"seed={seed}", f"output_dir={root / f'run{seed}'}", "checkpoint_every=1", "device=cpu"])
        train(cfg, progress=False)
    return root / "run1", root / "run2"


def test_two_trained_models_merge_to_the_averaged_deltas(two_runs, tmp_path, capsys):
    r1, r2 = two_runs
    out = tmp_path / "merged"
    assert main(["merge", "--models", str(r1 / "final"), str(r2 / "final"), "--out", str(out)]) == 0
    assert "full float32 model" in capsys.readouterr().err
    base, d1, d2 = _base64(), _deltas64(r1 / "final" / "adapter"), _deltas64(r2 / "final" / "adapter")
    ref = _reference_embedder({k: v + 0.5 * d1.get(k, 0) + 0.5 * d2.get(k, 0) for k, v in base.items()}, "mean")
    merged = Embedder.from_pretrained(out, device="cpu")
    assert merged.config.pooling == "mean"
    for kw in ({}, {"instruction": INSTR}):
        want = ref.encode(TEXTS, **kw)
        torch.testing.assert_close(merged.encode(TEXTS, **kw), want, atol=1e-5, rtol=1e-4)
        for run in (r1, r2):   # and it is neither input
            assert (Embedder.from_pretrained(run / "final", device="cpu").encode(TEXTS, **kw) - want).abs().max() > 1e-4

    # merged, then exported: sentence-transformers and embforge encode of the export reproduce embforge encode
    import sentence_transformers as st
    exp = tmp_path / "exp"
    assert main(["export", "--model", str(out), "--out", str(exp), "--sentence-transformers",
                 "--instruction", INSTR]) == 0
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    assert main(["encode", "--model", str(exp), "--file", str(tmp_path / "t.txt"),
                 "--out", str(tmp_path / "e.pt")]) == 0
    torch.testing.assert_close(torch.load(tmp_path / "e.pt"), merged.encode(TEXTS), atol=1e-5, rtol=1e-4)
    model = st.SentenceTransformer(str(exp / "sentence-transformers"), device="cpu")
    torch.testing.assert_close(torch.as_tensor(model.encode_document(TEXTS)), merged.encode(TEXTS),
                               atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(model.encode_query(TEXTS)), merged.encode(TEXTS, instruction=INSTR),
                               atol=2e-5, rtol=1e-4)


def test_last_k_checkpoints_of_a_run(two_runs, tmp_path):
    r1, _ = two_runs
    out = tmp_path / "soup"
    assert main(["merge", "--last", "2", "--run", str(r1), "--out", str(out), "--weights", "1", "1"]) == 0
    report = json.loads((out / "merge.json").read_text())
    assert [Path(s).name for s in report["sources"]] == ["step-000002", "step-000003"]
    conf = json.loads((r1 / "final" / "adapter" / "adapter_config.json").read_text())
    scale = conf["lora_alpha"] / conf["r"]
    base = _base64()
    want = dict(base)
    for step in ("step-000002", "step-000003"):
        t = load_file(r1 / "checkpoints" / step / "adapter.safetensors")
        for key, a in t.items():
            if ".lora_A." in key:
                name = key.split(".lora_A.")[0].removeprefix("base_model.model.") + ".weight"
                b = t[key.replace(".lora_A.", ".lora_B.")]
                want[name] = want[name] + 0.5 * scale * b.double() @ a.double()
    got = load_file(out / "merged" / "model.safetensors")
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-6, atol=1e-9)
    # step 3 is the final model: the soup of steps 2 and 3 differs from it
    assert any((got[k].double() - (base[k] + _deltas64(r1 / "final" / "adapter").get(k, 0))).abs().max() > 1e-6
               for k in base)


def test_bad_inputs_are_one_line_errors(two_adapters, tmp_path, capsys):
    a, b = two_adapters
    _random_adapter(tmp_path / "mistral", seed=3, path="tiny-mistral")
    capsys.readouterr()
    cases = [
        (["--models", str(a), str(tmp_path / "mistral")], "different bases"),
        (["--models", str(a), str(tmp_path / "nowhere")], "no such model folder"),
        (["--models", str(a), str(b), "--weights", "1", "2", "3"], "3 weights for 2 models"),
        (["--models", str(a), str(b), str(a), "--method", "slerp"], "exactly two models, got 3"),
        (["--models", str(a)], "at least two models"),
        (["--models", str(a), str(b), "--weights", "1", "-1"], "weights must be >= 0"),
        (["--models", str(a), "--last", "2"], "--run and --last go together"),
        (["--last", "5", "--run", str(a)], "found 0"),
        (["--models", str(a), str(tmp_path)], "not an embforge model folder"),
    ]
    for i, (args, msg) in enumerate(cases):
        assert main(["merge", *args, "--out", str(tmp_path / f"o{i}")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1 and err.startswith("embforge merge: error:"), err
    merge_models([a, b], tmp_path / "full")
    with pytest.raises(MergeError, match="full model without a LoRA adapter"):
        merge_models([a, tmp_path / "full"], tmp_path / "again")
    with pytest.raises(MergeError, match="not empty"):
        merge_models([a, b], tmp_path / "full")
    _random_adapter(tmp_path / "meanpool", seed=4)
    meta = json.loads((tmp_path / "meanpool" / "embforge_config.json").read_text())
    meta["model"]["pooling"] = "mean"
    (tmp_path / "meanpool" / "embforge_config.json").write_text(json.dumps(meta))
    with pytest.raises(MergeError, match="model.pooling differs"):
        merge_models([a, tmp_path / "meanpool"], tmp_path / "p")
