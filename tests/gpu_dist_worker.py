"""One rank of a torchrun-launched GradCache step, for tests/test_gpu_paths.py (not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node 1 tests/gpu_dist_worker.py OUT STRATEGY DEVICE

Joins the process group the way `embforge train` does (init_distributed: NCCL on CUDA, gloo on CPU), wraps the
tiny Llama embedder in DDP or FSDP2, runs one multi-chunk GradCache step on the shared global batch and saves the
loss, the backend and the LoRA gradients (gathered from FSDP2's shards) to OUT.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_engine_distributed import CHUNK, global_batch  # noqa: E402

from embforge.engine.batch import shard_batch  # noqa: E402
from embforge.engine.distributed import DistributedConfig, full_tensor, init_distributed, wrap  # noqa: E402
from embforge.engine.gradcache import contrastive_step  # noqa: E402


def lora_embedder(device):
    """fp32 tiny Llama with seeded, nonzero lora_B (so lora_A's gradient is not zero) and no dropout."""
    from embforge.engine.model import Embedder, LoraConfig, ModelConfig
    torch.manual_seed(0)
    emb = Embedder.from_config(ModelConfig(path="tiny-llama", dtype="float32", attn_implementation="sdpa",
                                           lora=LoraConfig(r=4, alpha=8, dropout=0.0)), device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in emb.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.2)
    emb.model.train()
    return emb


def main(out: str, strategy: str, device: str):
    import torch.distributed as dist
    dist_, dev = init_distributed(DistributedConfig(timeout_s=120), device)
    assert dist_.active and dist_.world_size == 1
    emb = lora_embedder(dev)
    wrapped = wrap(emb, dist_, strategy)
    res = contrastive_step(wrapped, shard_batch(global_batch(), dist_), dist=dist_, chunk_tokens=CHUNK)
    grads = {n: full_tensor(p.grad).detach().float().cpu() for n, p in emb.model.named_parameters()
             if p.requires_grad}
    torch.save({"loss": res.loss, "n_chunks": res.n_chunks, "backend": dist.get_backend(),
                "strategy": getattr(wrapped, "strategy", None), "device": str(dev), "grads": grads}, out)
    dist_.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
