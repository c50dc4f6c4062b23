"""FSDP2 checkpoints (torch.distributed.checkpoint) on CPU / gloo: kill -9 + --resume continues exactly, and a
2-rank checkpoint resumes on one process and on 3 ranks (resharded on load) with the same data order.

The end-to-end helpers (config, torchrun launch, metrics / adapter readers) are test_engine_distributed's."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_engine_distributed import _rank_pid, adapter, assert_close, env, metrics, torchrun, write_config


def fsdp_config(tmp_path, out, **kw) -> Path:
    cfg = write_config(tmp_path, out, **kw)
    d = json.loads(cfg.read_text())
    d["distributed"]["strategy"] = "fsdp"
    cfg.write_text(json.dumps(d))
    return cfg


def published(out) -> list[Path]:
    return sorted((Path(out) / "checkpoints").glob("step-*"))


def wait_for_steps(proc, out, n, timeout=600):
    deadline = time.time() + timeout
    while not (Path(out) / "metrics.jsonl").exists() or len(metrics(out)) < n:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.05)


@pytest.mark.slow
def test_fsdp2_kill9_and_resume_equals_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = torchrun(2, fsdp_config(tmp_path, full, steps=6, dropout=0.1, checkpoint_every=2))
    assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
    # sharded: every rank's shards + DCP metadata + trainer.pt, no gathered adapter
    ckpt = published(full)[-1]
    assert sorted(f.name for f in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "trainer.pt").exists() and not (ckpt / "adapter.safetensors").exists()

    proc = torchrun(2, fsdp_config(tmp_path, cut, steps=6, dropout=0.1, checkpoint_every=2))
    wait_for_steps(proc, cut, 3)
    victim = _rank_pid(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert len(metrics(cut)) < 6 and not (cut / "final").exists()
    done = published(cut)
    assert done and all((c / "trainer.pt").exists() and (c / "sharded" / ".metadata").exists() for c in done)
    # what a kill -9 inside a later write leaves: a temp folder with torn shards and no trainer.pt; never chosen
    torn = cut / "checkpoints" / ".tmp-torn"
    shutil.copytree(done[-1] / "sharded", torn / "sharded")
    (torn / "sharded" / "__1_0.distcp").write_bytes(b"\0" * 7)
    resumed = torchrun(2, fsdp_config(tmp_path, cut, steps=6, dropout=0.1, checkpoint_every=2), "--resume")
    out = resumed.stdout.read()
    assert resumed.wait(timeout=600) == 0, out[-3000:]
    assert f"resumed from {done[-1]}" in out and not torn.exists()
    # dropout on: bit-identical only if every rank's generators, the optimizer and the schedule came back
    assert_close(adapter(cut), adapter(full), rtol=1e-6)
    lf = {m["step"]: m["loss"] for m in metrics(full)}
    lc = {m["step"]: m["loss"] for m in metrics(cut)}
    assert sorted(lc) == sorted(lf) == list(range(1, 7))
    assert all(lc[s] == pytest.approx(lf[s], rel=1e-6) for s in lf)


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_on_one_process_three_ranks_and_ddp(tmp_path):
    """Dropout 0, so N ranks follow the one-process run (the exact global-batch gradient) and any world size or
    strategy can be compared with the uninterrupted 2-rank run: within 1e-4 relative (float reassociation)."""
    full = tmp_path / "full"
    p = torchrun(2, fsdp_config(tmp_path, full, steps=4, dropout=0.0, checkpoint_every=2))
    assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
    lf = [m["loss"] for m in metrics(full)]
    assert lf[2] != pytest.approx(lf[0], rel=1e-3)            # it trains: a fresh start would not give step 3's loss
    for n, strategy in ((1, "fsdp"), (3, "fsdp"), (2, "ddp")):
        out = tmp_path / f"on{n}{strategy}"
        shutil.copytree(full, out)     # the 2-rank run as if stopped after step 2
        shutil.rmtree(out / "final")
        shutil.rmtree(published(out)[-1])
        cfg = fsdp_config(tmp_path, out, steps=4, dropout=0.0, checkpoint_every=2)
        if strategy == "ddp":    # the sharded files read whole by every DDP rank
            cfg = write_config(tmp_path, out, steps=4, dropout=0.0, checkpoint_every=2)
        if n == 1:     # plain `embforge train --resume`: no torchrun, no process group, no FSDP
            r = subprocess.run([sys.executable, "-m", "embforge", "train", "--config", str(cfg), "--resume"],
                               env=env(), capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            log = r.stderr
        else:
            proc = torchrun(n, cfg, "--resume")
            log = proc.stdout.read()
            assert proc.wait(timeout=600) == 0, log[-3000:]
        assert f"resumed from {published(out)[0]} at step 2" in log
        assert (f"written by 2 rank(s), resuming on {n}" in log) == (n != 2)
        m = metrics(out)
        assert [x["step"] for x in m] == [1, 2, 3, 4]
        assert [x["loss"] for x in m[2:]] == pytest.approx(lf[2:], rel=1e-4)
        assert_close(adapter(out), adapter(full), rtol=1e-4)


def descendant_with_rank(root: int, rank: int) -> int | None:
    """The pid of the worker of rank `rank` anywhere below `root` (embforge -> torchrun -> workers)."""
    todo = [root]
    while todo:
        pid = todo.pop()
        pid_rank = _rank_pid(pid, rank)
        if pid_rank is not None:
            return pid_rank
        todo += [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                                                text=True).stdout.split()]
    return None


def embforge_train(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embforge", "train", *map(str, args)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_rank_under_max_restarts_resumes_by_itself(tmp_path):
    """`embforge train --nproc 2 --max-restarts 1`: rank 1 is killed with -9 after step 3; torchrun restarts both
    workers, they resume from the latest checkpoint (no --resume given, the used output_dir not refused) and the run
    ends with the adapter and losses of an uninterrupted one (dropout on: every rank's RNG came back)."""
    full, elastic = tmp_path / "full", tmp_path / "elastic"
    p = embforge_train("--nproc", 2, "--config", write_config(tmp_path, full, steps=6, dropout=0.1,
                                                             checkpoint_every=2))
    assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
    proc = embforge_train("--nproc", 2, "--max-restarts", 1, "--overwrite", "--config",
                          write_config(tmp_path, elastic, steps=6, dropout=0.1, checkpoint_every=2))
    wait_for_steps(proc, elastic, 3)
    victim = descendant_with_rank(proc.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    log = proc.stdout.read()
    assert proc.wait(timeout=600) == 0, log[-3000:]
    assert "--max-restarts=1" in log and "torchrun restart 1: resuming from the latest checkpoint" in log
    assert "resumed from" in log and log.count('"final_loss"') == 1
    assert "shared rendezvous store" not in log     # the restart got a store of its own (pytorch/pytorch#135712)
    assert_close(adapter(elastic), adapter(full), rtol=1e-6)
    lf = {m["step"]: m["loss"] for m in metrics(full)}
    le = {m["step"]: m["loss"] for m in metrics(elastic)}
    assert sorted(le) == list(range(1, 7)) and all(le[s] == pytest.approx(lf[s], rel=1e-6) for s in lf)


def test_max_restarts_needs_nproc(tmp_path):
    r = subprocess.run([sys.executable, "-m", "embforge", "train", "--max-restarts", "1", "--config",
                        str(write_config(tmp_path, tmp_path / "x", steps=1, dropout=0.0))], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--max-restarts needs --nproc" in r.stderr


def test_restarts_with_torchruns_shared_store_are_detected(monkeypatch):
    """Under plain torchrun --max-restarts the workers share the agent's store, whose keys outlive a restart: the
    case init_distributed warns about and `embforge train --nproc --max-restarts` avoids."""
    from embforge.engine.distributed import restarts_share_a_store

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    assert restarts_share_a_store()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert not restarts_share_a_store()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")     # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert not restarts_share_a_store()
