"""model.liger: the CPU error, what gets patched (against a stand-in liger module that patches the way liger-kernel
0.8.5 does: forwards rebound on the instance, RoPE swapped in the modeling module), and, on a GPU with liger-kernel
installed, equality with the unpatched model at bf16 tolerance."""
import importlib
import sys
import types

import pytest
import torch

from embforge.engine import Embedder, LoraConfig, ModelConfig
from embforge.engine.liger import LIGER_FAMILIES, apply_liger

CUDA = torch.device("cuda")


def hf_model(family):
    from transformers import AutoModel
    from embforge.engine.model import resolve_path
    return AutoModel.from_pretrained(resolve_path(f"tiny-{family}"))


def fake_liger(monkeypatch, *, patch=True):
    """A liger_kernel.transformers stand-in recording its calls; with patch=True it patches like liger does."""
    calls = []

    def liger_norm_forward(self, x):
        return x

    def liger_mlp_forward(self, x):
        return x

    def liger_rope(q, k, cos, sin, *a, **kw):
        return q, k

    def make(family):
        def apply(**kwargs):
            calls.append((family, kwargs))
            if not patch:
                return
            model = kwargs["model"]
            for m in model.modules():
                if type(m).__name__.endswith("RMSNorm"):
                    m.forward = types.MethodType(liger_norm_forward, m)
                if type(m).__name__.endswith("MLP"):
                    m.forward = types.MethodType(liger_mlp_forward, m)
            mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
            monkeypatch.setattr(mod, "apply_rotary_pos_emb", liger_rope)
        return apply
    pkg = types.ModuleType("liger_kernel")
    sub = types.ModuleType("liger_kernel.transformers")
    for family, fn in LIGER_FAMILIES.items():
        setattr(sub, fn, make(family))
    pkg.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    return calls


@pytest.mark.parametrize("family", sorted(LIGER_FAMILIES))
def test_patches_rmsnorm_rope_swiglu_of_each_family(monkeypatch, family):
    calls = fake_liger(monkeypatch)
    model = hf_model(family)
    layers = model.config.num_hidden_layers
    patched = apply_liger(model, CUDA)   # the device is only checked, nothing runs
    assert patched == {"rms_norm": 2 * layers + 1, "swiglu": layers, "rope": True}
    [(called_family, kwargs)] = calls
    assert called_family == family and kwargs["model"] is model
    # RMSNorm, RoPE and SwiGLU on; never the LM-head losses (an embedder has no LM head: the fused linear
    # cross-entropy patch would replace the model's forward)
    assert {k: v for k, v in kwargs.items() if k != "model"} == {
        "rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}


def test_a_patch_that_changes_nothing_is_an_error(monkeypatch):
    fake_liger(monkeypatch, patch=False)
    with pytest.raises(RuntimeError, match="unpatched"):
        apply_liger(hf_model("llama"), CUDA)


def test_cpu_unsupported_family_and_missing_package_errors(monkeypatch):
    model = hf_model("llama")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        apply_liger(model, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):   # the engine path: a clear error at load
        Embedder.from_config(ModelConfig(path="tiny-llama", liger=True), "cpu")
    monkeypatch.setitem(sys.modules, "liger_kernel", None)      # not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(ImportError, match="pip install liger-kernel=="):
        apply_liger(model, CUDA)
    monkeypatch.setattr(model.config, "model_type", "gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        apply_liger(model, CUDA)


def probe_loss(emb: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the embeddings. Not |emb|^2: the final RMSNorm makes the raw embedding's norm
    nearly constant, so that loss's gradients are rounding noise and any two paths 'differ' by percents."""
    w = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    return (emb.float() * w.to(emb.device)).sum()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs CUDA and liger-kernel")
@pytest.mark.parametrize("family", sorted(LIGER_FAMILIES))
def test_liger_matches_unpatched_on_gpu(family):
    """Embeddings and LoRA gradients with Liger vs without, bf16, packed chunks (the training path)."""
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    saved = dict(vars(mod))
    texts = ["a", "what is the boiling point of water?", "Paris is the capital of France. " * 5]
    out = {}
    try:
        for liger in (False, True):
            torch.manual_seed(0)
            e = Embedder.from_config(ModelConfig(path=f"tiny-{family}", dtype="bfloat16", liger=liger,
                                                 lora=LoraConfig(dropout=0.0)), "cuda")
            g = torch.Generator().manual_seed(0)   # nonzero lora_B (peft starts it at 0): lora_A's gradient counts
            with torch.no_grad():
                for n, p in e.model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)
            seqs = e.tokenize(texts, is_query=False)
            emb = e.embed_chunk(seqs)
            probe_loss(emb).backward()
            assert any(p.grad.norm() > 0 for n, p in e.model.named_parameters() if "lora_A" in n)
            out[liger] = (emb.detach().float(), torch.cat([p.grad.flatten().float()
                                                           for p in e.trainable_parameters()]))
    finally:
        for k, v in saved.items():
            setattr(mod, k, v)
    (e0, g0), (e1, g1) = out[False], out[True]
    assert (e1 - e0).abs().max() <= 2e-2 * e0.abs().max()
    assert (g1 - g0).norm() <= 5e-2 * g0.norm()
