"""Distributed training on CPU (gloo): N ranks give the exact global-batch gradient of one process.

Workers are spawned processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT on
127.0.0.1 with a free port), so they go through the same init_distributed as `torchrun -m embforge train`.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from embforge.engine.batch import ContrastiveBatch, shard_batch, text_ids
from embforge.engine.distributed import Dist, DistributedConfig, check_launch, rank_seed
from embforge.engine.packing import make_packed_chunks
from embforge.engine.gradcache import contrastive_step, make_chunks

REPO = Path(__file__).resolve().parents[1]
CHUNK = 48          # small: several GradCache chunks per rank (pass 2 replays pass 1)
MIXED_CHUNK = 260   # between the ranks' token counts at world size 2 (235 and 295 with the tiny tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch() -> ContrastiveBatch:
    """6 queries x (positive + 2 hard negatives), with duplicates that land on different ranks: query 3 repeats
    query 0, and query 4's positive is query 1's hard negative (both must be masked, not used as negatives).
    One long document makes the last rank's chunk count differ (FSDP2 then pads the others with empty chunks)."""
    qs = ["how do tides work", "best way to brew coffee", "what is a prime number", "how do tides work",
          "why is the sky blue", "how to tie a bowline knot"]
    docs = []
    for i, q in enumerate(qs):
        docs += [f"answer about {q} number {i}", f"unrelated text {i} about trains", f"another distractor {i}"]
    docs[4] = docs[12]       # query 1's first hard negative == query 4's positive
    docs[-1] += " with a long tail of many more words" * 5   # the last rank runs more chunks than the others
    return ContrastiveBatch(qs, ["Retrieve the answer."] * len(qs), docs)


CASES = {  # name: (step kwargs, dropout p)
    "negatives_chunked": (dict(chunk_tokens=CHUNK), 0.0),
    # rank 0's slice fits one chunk, the last rank's needs two: ranks take different paths through the step (the
    # second step of a DDP run, when it rebuilds its buckets, once deadlocked on exactly this)
    "mixed_one_and_two_chunks": (dict(chunk_tokens=MIXED_CHUNK), 0.0),
    "same_tower_matryoshka_one_chunk": (dict(chunk_tokens=1 << 14, same_tower=True, matryoshka_dims=[16, 64],
                                             matryoshka_weights=[0.5, 1.0]), 0.0),
    "dropout_same_tower_chunked": (dict(chunk_tokens=CHUNK, same_tower=True, matryoshka_dims=[32, 64]), 0.1),
}


def _embedder(path="tiny-llama", quantization="none"):
    from embforge.engine.model import Embedder, ModelConfig
    torch.manual_seed(0)
    emb = Embedder.from_config(ModelConfig(path=path, quantization=quantization, lora=_lora()), "cpu")
    emb.model.train()
    return emb


def _lora():
    from embforge.engine.model import LoraConfig
    return LoraConfig(r=4, alpha=8, dropout=0.1)


def _set_dropout(emb, p):
    for m in emb.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def _grads(emb) -> dict:
    from embforge.engine.distributed import full_tensor
    return {n: full_tensor(p.grad).detach().clone() for n, p in emb.model.named_parameters() if p.requires_grad}


def _step_worker(rank, world_size, port, out_dir, strategy, cases, model_kw):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from embforge.engine.distributed import init_distributed, wrap
    dist_, _ = init_distributed(DistributedConfig(timeout_s=120), "cpu")
    emb = _embedder(**model_kw)
    wrapped = wrap(emb, dist_, strategy)
    results = {}
    for name in cases:
        kw, p = CASES[name]
        _set_dropout(emb, p)
        torch.manual_seed(rank_seed(0, rank))
        res = contrastive_step(wrapped, shard_batch(global_batch(), dist_), dist=dist_, **kw)
        results[name] = {"loss": res.loss, "grads": _grads(emb), "chunks": dist_.gather_objects(res.n_chunks)}
        for q in emb.trainable_parameters():
            q.grad = None
    if rank == 0:
        torch.save(results, Path(out_dir) / f"{strategy}-{world_size}.pt")
    dist_.shutdown()


def run_ranks(world_size, tmp_path, strategy, cases, **model_kw) -> dict:
    mp.spawn(_step_worker, args=(world_size, free_port(), str(tmp_path), strategy, cases, model_kw),
             nprocs=world_size, join=True)
    return torch.load(tmp_path / f"{strategy}-{world_size}.pt")


def reference(name, world_size) -> tuple[float, dict]:
    """One process, plain autograd, no GradCache: every rank's embeddings computed under that rank's generator in
    that rank's chunk order (so dropout masks are the ones the ranks drew), then the global InfoNCE."""
    from embforge.kernels import infonce_loss
    kw, p = CASES[name]
    emb = _embedder()
    _set_dropout(emb, p)
    batch = global_batch()
    qs, ds = [], []
    for r in range(world_size):
        local = shard_batch(batch, Dist(rank=r, world_size=world_size, active=True))
        seqs = emb.tokenize(local.queries, is_query=True, instructions=local.instructions) + \
            emb.tokenize(local.documents, is_query=False)
        torch.manual_seed(rank_seed(0, r))
        out = [None] * len(seqs)
        # The same chunks, in the same order and through the same (packed or padded) path as contrastive_step.
        chunker = make_packed_chunks if emb.packing else make_chunks
        for c in chunker([len(s) for s in seqs], kw["chunk_tokens"]):
            e = emb.embed_chunk([seqs[i] for i in c])
            for j, i in enumerate(c):
                out[i] = e[j]
        b = len(local.queries)
        qs += out[:b]
        ds += out[b:]
    qid, did = text_ids(batch.queries, batch.documents)
    loss = infonce_loss(torch.stack(qs), torch.stack(ds), 0.02, query_ids=qid, doc_ids=did,
                        same_tower=kw.get("same_tower", False), matryoshka_dims=kw.get("matryoshka_dims"),
                        matryoshka_weights=kw.get("matryoshka_weights"))
    loss.backward()
    return float(loss), _grads(emb)


def assert_close(got: dict, want: dict, rtol=1e-5):
    assert got.keys() == want.keys() and len(got) > 0
    for n in want:
        err = (got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-12)
        assert err < rtol, f"{n}: relative error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_step_equals_one_process(tmp_path, world_size):
    cases = list(CASES) if world_size == 2 else ["negatives_chunked", "dropout_same_tower_chunked"]
    got = run_ranks(world_size, tmp_path, "ddp", cases)
    for name in cases:
        kw, p = CASES[name]
        if p == 0.0:   # literally the single-process GradCache step on the same global batch
            emb = _embedder()
            _set_dropout(emb, 0.0)
            res = contrastive_step(emb, global_batch(), **kw)
            want_loss, want = res.loss, _grads(emb)
        else:          # dropout: ranks draw their own masks; pass 2 must replay them exactly
            want_loss, want = reference(name, world_size)
        assert abs(got[name]["loss"] - want_loss) < 1e-5 * abs(want_loss), name
        assert_close(got[name]["grads"], want)
    if "mixed_one_and_two_chunks" in cases:
        assert got["mixed_one_and_two_chunks"]["chunks"] == [1, 2]   # the ranks really took different paths


@pytest.mark.slow
def test_qlora_ddp_step_equals_one_process(tmp_path):
    """DDP's default use: a 4-bit (bitsandbytes nf4) base replicated per rank, LoRA trained."""
    pytest.importorskip("bitsandbytes")
    model = dict(path="tiny-mistral", quantization="nf4")
    got = run_ranks(2, tmp_path, "ddp", ["negatives_chunked"], **model)["negatives_chunked"]
    emb = _embedder(**model)
    _set_dropout(emb, 0.0)
    res = contrastive_step(emb, global_batch(), **CASES["negatives_chunked"][0])
    assert got["loss"] == pytest.approx(res.loss, rel=1e-5)
    assert_close(got["grads"], _grads(emb))


def test_refusals_before_any_model_loads(tmp_path):
    from embforge.config import load_config
    from embforge.engine.train import TrainConfig
    cfg = load_config(TrainConfig, None, ["data.train=[x]", "batch.queries=6"])
    with pytest.raises(ValueError, match="batch.queries=6.*not divisible by the world size 4"):
        check_launch(cfg, 4)
    check_launch(cfg, 3)
    cfg = load_config(TrainConfig, None, ["data.train=[x]", "batch.queries=8", "distributed.strategy=fsdp",
                                          "model.quantization=nf4"])
    with pytest.raises(ValueError, match="fsdp does not support: model.quantization=nf4"):
        check_launch(cfg, 2)
    with pytest.raises(Exception, match="distributed.strategy"):
        load_config(TrainConfig, None, ["data.train=[x]", "distributed.strategy=zero3"])
    # the CLI shortcut refuses before it starts any process
    r = subprocess.run([sys.executable, "-m", "embforge", "train", "--nproc", "4", "--config",
                        str(write_config(tmp_path, tmp_path / "x", steps=1, dropout=0.0))], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not divisible by the world size 4" in r.stderr
    assert "torch.distributed.run" not in r.stderr


def test_one_process_has_no_distributed_path():
    from embforge.engine.distributed import init_distributed, wrap
    assert "RANK" not in os.environ
    d, dev = init_distributed(DistributedConfig(), "cpu")
    assert not d.active and d.is_main and d.world_size == 1
    sentinel = object()
    assert wrap(sentinel, d, "ddp") is sentinel                # no wrapper
    batch = global_batch()
    assert shard_batch(batch, d) is batch                      # no slicing, ids computed as before
    x = torch.randn(3, 2)
    assert d.gather_rows(x) is x and d.sum(2.5) == 2.5         # no collectives
    import torch.distributed as tdist
    assert not tdist.is_initialized()


def test_shard_batch_slices_with_global_ids():
    batch = global_batch()
    parts = [shard_batch(batch, Dist(rank=r, world_size=3, active=True)) for r in range(3)]
    assert sum((p.queries for p in parts), []) == batch.queries
    assert sum((p.documents for p in parts), []) == batch.documents
    qid, did = text_ids(batch.queries, batch.documents)
    assert sum((p.query_ids for p in parts), []) == qid.tolist()
    assert sum((p.doc_ids for p in parts), []) == did.tolist()
    assert parts[0].query_ids[0] == parts[1].query_ids[1]     # "how do tides work" on ranks 0 and 1: one id


# ------------------------------------------------------------------------------------ torchrun end to end
def write_config(tmp_path, out, *, steps, dropout, checkpoint_every=0, loss=None) -> Path:
    from embforge.data.sources import build
    data = tmp_path / "train.jsonl"
    if not data.exists():
        build(data)
    cfg = tmp_path / f"{Path(out).name}.yaml"
    cfg.write_text(json.dumps({   # JSON is YAML
        "model": {"path": "tiny-llama", "lora": {"r": 4, "alpha": 8, "dropout": dropout}},
        "data": {"train": [str(data)]}, "batch": {"queries": 6, "negatives": 1, "chunk_tokens": 64},
        "optim": {"warmup_steps": 1, "lr": 1e-3}, "steps": steps, "output_dir": str(out), "loss": loss or {},
        "checkpoint_every": checkpoint_every, "device": "cpu", "distributed": {"timeout_s": 60}}))
    return cfg


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}


def torchrun(n, cfg, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "embforge", "train", "--config", str(cfg), *extra]
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metrics(out) -> list[dict]:
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def adapter(out) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "final" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_torchrun_train_matches_one_process(tmp_path, capsys):
    from embforge.cli.train import run_training
    from embforge.config import load_config
    from embforge.engine.train import TrainConfig
    one = tmp_path / "one"
    loss = {"learnable_temperature": True, "same_tower": True}    # tau's gradient is summed outside DDP
    run_training(load_config(TrainConfig, write_config(tmp_path, one, steps=3, dropout=0.0, loss=loss)),
                 progress=False)
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "embforge", "train", "--nproc", "2", "--config",
                        str(write_config(tmp_path, two, steps=3, dropout=0.0, loss=loss))], env=env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"final_loss"') == 1                      # one voice
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3] and all(m["world_size"] == 2 for m in m2)
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["temperature"] == pytest.approx(a["temperature"], rel=1e-6)
    assert m1[0]["loss"] != m1[2]["loss"] and m1[2]["temperature"] != 0.02   # it trained
    w1, w2 = adapter(one), adapter(two)
    assert_close(w2, w1, rtol=1e-4)
    # Resume the 2-rank run on ONE process (another world size) and the one-process run alike, to step 5: the data
    # order does not depend on the world size, so both continue the same way.
    for out in (one, two):
        run_training(load_config(TrainConfig, write_config(tmp_path, out, steps=5, dropout=0.0, loss=loss)),
                     resume=True, progress=False)
    assert "written by 2 rank(s), resuming on 1" in capsys.readouterr().err
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2, 3, 4, 5]
    for a, b in zip(m1[3:], m2[3:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert_close(adapter(two), adapter(one), rtol=1e-4)


def _rank_pid(parent: int, rank: int) -> int | None:
    for line in subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True,
                               text=True).stdout.split():
        try:
            environ = Path(f"/proc/{line}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(line)
    return None


@pytest.mark.slow
def test_killed_rank_stops_the_run_and_resume_reproduces_it(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = torchrun(2, write_config(tmp_path, full, steps=6, dropout=0.1, checkpoint_every=2))
    assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
    proc = torchrun(2, write_config(tmp_path, cut, steps=6, dropout=0.1, checkpoint_every=2))
    deadline = time.time() + 300
    while time.time() < deadline and not (cut / "metrics.jsonl").exists() or len(metrics(cut)) < 3:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    rc = proc.wait(timeout=120)
    assert rc != 0 and time.time() - t0 < 120                         # the survivors did not hang
    steps_done = len(metrics(cut))
    assert steps_done < 6
    published = sorted((cut / "checkpoints").glob("step-*"))
    assert published and all((c / "trainer.pt").exists() and (c / "adapter.safetensors").exists() for c in published)
    resumed = torchrun(2, write_config(tmp_path, cut, steps=6, dropout=0.1, checkpoint_every=2), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()[-3000:]
    assert_close(adapter(cut), adapter(full), rtol=1e-6)
    lf = {m["step"]: m["loss"] for m in metrics(full)}
    lc = {m["step"]: m["loss"] for m in metrics(cut)}                 # the resumed steps overwrite nothing
    assert all(lc[s] == pytest.approx(lf[s], rel=1e-6) for s in lf)


@pytest.mark.slow
def test_fsdp2_gradients_equal_one_process_and_ddp(tmp_path):
    """FSDP2 (fully_shard per decoder layer + root, gloo on CPU) on the unquantized tiny model: the same gradients
    as the one-process step, which test_ddp_step_equals_one_process holds DDP to, hence the same as DDP."""
    cases = ["negatives_chunked", "same_tower_matryoshka_one_chunk"]
    got = run_ranks(2, tmp_path, "fsdp", cases)
    for name in cases:
        kw, _ = CASES[name]
        emb = _embedder()
        _set_dropout(emb, 0.0)
        res = contrastive_step(emb, global_batch(), **kw)
        assert got[name]["loss"] == pytest.approx(res.loss, rel=1e-5)
        assert_close(got[name]["grads"], _grads(emb))
