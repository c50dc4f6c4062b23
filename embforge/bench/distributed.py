"""`embforge bench --parts distributed`: a correctness row, not a speed claim. Two gloo ranks on this machine's CPU
run one GradCache step of the tiny offline Llama on a fixed global batch (hard negatives, same_tower, several
chunks per rank); the row reports the largest relative difference of the LoRA gradients and the loss from the
one-process step on the same batch. The part fails above 1e-5.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import torch

TOLERANCE = 1e-5
STEP = dict(chunk_tokens=48, same_tower=True)


def _batch():
    from embforge.data.records import ExampleFile, batch_at
    from embforge.data.sources import build
    from embforge.engine.batch import to_batch
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "demo.jsonl"
        build(path)
        examples, _ = batch_at(ExampleFile(path), 0, 6, seed=0)
    return to_batch(examples, 1)


def _embedder():
    from embforge.engine.model import Embedder, LoraConfig, ModelConfig
    torch.manual_seed(0)
    emb = Embedder.from_config(ModelConfig(path="tiny-llama", lora=LoraConfig(r=4, alpha=8, dropout=0.0)), "cpu")
    emb.model.train()
    return emb


def _grads(emb) -> dict:
    from embforge.engine.distributed import full_tensor
    return {n: full_tensor(p.grad).detach().clone() for n, p in emb.model.named_parameters() if p.requires_grad}


def _worker(rank, world_size, port, out, batch, strategy):
    from embforge.engine.batch import shard_batch
    from embforge.engine.distributed import DistributedConfig, init_distributed, wrap
    from embforge.engine.gradcache import contrastive_step
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist_, _ = init_distributed(DistributedConfig(timeout_s=120), "cpu")
    emb = _embedder()
    res = contrastive_step(wrap(emb, dist_, strategy), shard_batch(batch, dist_), dist=dist_, **STEP)
    grads = _grads(emb)
    dist_.on_main(torch.save, {"loss": res.loss, "grads": grads}, out)
    dist_.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(device: str, out_dir: Path, quick: bool = False, world_size: int = 2, strategy: str = "ddp") -> list[dict]:
    import torch.multiprocessing as mp

    from embforge.bench import common
    from embforge.engine.gradcache import contrastive_step
    if device != "cpu":
        raise ValueError("the distributed part is the CPU (gloo) correctness row; on GPUs run torchrun yourself")
    batch = _batch()
    emb = _embedder()
    want = contrastive_step(emb, batch, **STEP)
    want_grads = _grads(emb)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rank0.pt"
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(world_size, _free_port(), str(out), batch, strategy), nprocs=world_size, join=True)
        wall = time.perf_counter() - t0
        got = torch.load(out)
    err = max(float((got["grads"][n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in want_grads.items())
    loss_err = abs(got["loss"] - want.loss) / abs(want.loss)
    row = {"part": "distributed", "backend": "gloo", "strategy": strategy, "world_size": world_size,
           "queries": len(batch.queries), "documents": len(batch.documents), **STEP,
           "max_rel_grad_err": err, "rel_loss_err": loss_err, "tolerance": TOLERANCE,
           "status": "ok" if max(err, loss_err) <= TOLERANCE else "FAIL", "wall_s_incl_startup": round(wall, 1),
           **common.env_columns(device)}
    common.write_csv([row], Path(out_dir) / "distributed_cpu.csv")
    if row["status"] != "ok":
        raise RuntimeError(f"{world_size} gloo ranks differ from one process: gradient {err:.2e}, loss "
                           f"{loss_err:.2e} (tolerance {TOLERANCE})")
    return [row]
