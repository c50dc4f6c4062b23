"""CUDA paths no other test reaches, each with a CPU twin where one is cheap (the twin runs the same logic here):

- DDP and FSDP2 over NCCL: a 1-rank torchrun (tests/gpu_dist_worker.py) wraps the embedder, runs a multi-chunk
  GradCache step and must give the one-process loss and LoRA gradients (twin: gloo on CPU);
- nf4 QLoRA: LoRA gradients through bitsandbytes' 4-bit base layers equal those of a plain model holding the
  dequantized weights (twin: bitsandbytes' CPU path);
- bidirectional attention on CUDA (bf16, the auto attention implementation): an early token sees later ones, and
  padding changes nothing (CPU: tests/test_engine_attention.py).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ON_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, CUDA])]


def nonzero_lora_b(emb, seed=0):
    """peft starts lora_B at zero, where lora_A gets no gradient: seeded values make both count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in emb.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)


def probe_loss(emb: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the embeddings. Not |emb|^2: the final RMSNorm makes the raw embedding's norm
    nearly constant, so that loss's gradients are rounding noise and any two paths 'differ' by percents."""
    w = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    return (emb.float() * w.to(emb.device)).sum()


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


# ------------------------------------------------------------------------------------------------ distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("device", ON_DEVICES)
def test_one_rank_torchrun_step_equals_one_process(tmp_path, device, strategy):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_dist_worker import CHUNK, global_batch, lora_embedder

    from embforge.engine.gradcache import contrastive_step
    out = tmp_path / "rank0.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        str(REPO / "tests" / "gpu_dist_worker.py"), str(out), strategy, device],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    got = torch.load(out)
    assert got["backend"] == ("nccl" if device == "cuda" else "gloo") and got["strategy"] == strategy
    assert got["n_chunks"] > 1                      # pass 2 replays pass 1 through the wrapped engine

    emb = lora_embedder(device)
    res = contrastive_step(emb, global_batch(), chunk_tokens=CHUNK)
    want = {n: p.grad.float().cpu() for n, p in emb.model.named_parameters() if p.requires_grad}
    assert got["loss"] == pytest.approx(res.loss, rel=1e-5)
    assert got["grads"].keys() == want.keys() and any("lora_A" in n for n in want)
    tol = 1e-4 if device == "cuda" else 1e-5        # CUDA reductions may run in another order
    for n in want:
        assert want[n].norm() > 0, n
        assert rel(got["grads"][n], want[n]) < tol, n


# ------------------------------------------------------------------------------------------------ nf4 QLoRA
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("device", ON_DEVICES)
def test_nf4_lora_gradients_equal_a_model_with_the_dequantized_weights(device):
    """QLoRA's gradients flow through the frozen 4-bit base layers into LoRA: they must equal the gradients of a
    plain model whose base weights are the dequantized nf4 weights (bf16 on CUDA, fp32 on CPU)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from embforge.engine import Embedder, LoraConfig, ModelConfig
    cfg = dict(path="tiny-mistral", lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    q = Embedder.from_config(ModelConfig(quantization="nf4", **cfg), device)
    ref = Embedder.from_config(ModelConfig(**cfg), device)
    nonzero_lora_b(q)
    ref_mods = dict(ref.model.named_modules())
    quantized = 0
    with torch.no_grad():
        for name, m in q.model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = F.dequantize_4bit(m.weight.data, m.weight.quant_state).to(ref_mods[name].weight.dtype)
                assert rel(w, ref_mods[name].weight) > 1e-3, name   # really quantized: 4 bits changed it
                ref_mods[name].weight.copy_(w)
                quantized += 1
        assert quantized >= 7 * q.model.config.num_hidden_layers   # every projection of every layer
        ref_params = dict(ref.model.named_parameters())
        for n, p in q.model.named_parameters():
            if p.requires_grad:
                ref_params[n].copy_(p)
    seqs = q.tokenize(["a", "what is the boiling point of water?", "Paris is the capital of France. " * 4],
                      is_query=False)
    out = {}
    for name, e in (("nf4", q), ("ref", ref)):
        e.train()
        emb = e.embed_chunk(seqs)
        probe_loss(emb).backward()
        out[name] = (emb.detach().float(), {n: p.grad.float() for n, p in e.model.named_parameters()
                                            if p.requires_grad})
    (a, ga), (b, gb) = out["nf4"], out["ref"]
    tol_e, tol_g = (2e-2, 5e-2) if device == "cuda" else (1e-4, 1e-3)
    assert (a - b).abs().max() <= tol_e * b.abs().max()
    assert ga.keys() == gb.keys() and any("lora_A" in n for n in ga)
    flat_a, flat_b = torch.cat([ga[n].flatten() for n in ga]), torch.cat([gb[n].flatten() for n in ga])
    assert flat_b.norm() > 0 and rel(flat_a, flat_b) < tol_g


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_bidirectional_attention_on_gpu(family):
    """bf16 on CUDA with the attention implementation `auto` picks there (flash-attn or torch's varlen behind SDPA
    for padded chunks): the first token's state depends on the last token only when bidirectional, packing is off
    (it would be causal), and padding does not change a bidirectional embedding."""
    from embforge.engine import Embedder, ModelConfig
    from embforge.engine.attention import attention_mode
    a, b = [21, 22, 23, 24], [21, 22, 23, 99]
    for mode in ("causal", "bidirectional"):
        e = Embedder.from_config(ModelConfig(path=f"tiny-{family}", attention=mode, lora=None), "cuda")
        e.eval()
        assert attention_mode(e.model) == mode and e.model.dtype == torch.bfloat16
        assert e.packing == (mode == "causal")
        base = e.model.get_base_model() if hasattr(e.model, "get_base_model") else e.model
        with torch.no_grad():
            h = base(input_ids=torch.tensor([a, b], device="cuda")).last_hidden_state[:, 0].float()
        assert (not torch.allclose(h[0], h[1], atol=1e-3)) == (mode == "bidirectional"), mode
    texts = ["one", "a somewhat longer document text with more words", "mid length text"]
    batched = e.encode(texts)
    single = torch.cat([e.encode([t]) for t in texts])
    assert (batched - single).abs().max() <= 2e-2
