"""The checked launch (engine/launch.py): ranks launched with different configs, code or data are refused before any
model loads, with an error naming what differs; identical ranks pass."""
import json
import os
import socket
from pathlib import Path

import torch.multiprocessing as mp

from embforge.engine.distributed import Dist
from embforge.engine.launch import (LaunchMismatch, check_same_launch, fingerprint_differences, launch_fingerprint)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(path: Path, n: int = 12, tag: str = ""):
    path.write_text("".join(json.dumps({"query": f"question {i}{tag}", "positive": f"answer {i}",
                                        "negatives": [f"other {i}"]}) + "\n" for i in range(n)))


def _cfg(tmp_path, **over):
    from embforge.config import load_config
    from embforge.engine.train import TrainConfig
    items = {"data.train": f"[{tmp_path / 'train.jsonl'}]", "batch.queries": 4, "steps": 1, "device": "cpu",
             "model.path": "tiny-llama", "output_dir": str(tmp_path / "out"), **over}
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in items.items()])


def test_fingerprint_names_the_differing_config_key_and_file(tmp_path):
    write_data(tmp_path / "train.jsonl")
    write_data(tmp_path / "other.jsonl", tag="!")
    base = launch_fingerprint(_cfg(tmp_path), [tmp_path / "train.jsonl"])
    assert base["config.optim.lr"] == repr(1e-4) and base["embforge.commit"]
    assert fingerprint_differences([base, dict(base)]) == []
    lr = launch_fingerprint(_cfg(tmp_path, **{"optim.lr": 0.5}), [tmp_path / "train.jsonl"])
    (line,) = fingerprint_differences([base, base, lr])
    assert line.startswith("rank 2 differs from rank 0 in config.optim.lr: 0.5 (rank 0: 0.0001)")
    # the same path holding other bytes (what another node's stale copy looks like)
    changed = dict(base, **{f"data {tmp_path / 'train.jsonl'}":
                            launch_fingerprint(_cfg(tmp_path), [tmp_path / "other.jsonl"])
                            [f"data {tmp_path / 'other.jsonl'}"]})
    (line,) = fingerprint_differences([base, changed])
    assert f"data {tmp_path / 'train.jsonl'}:" in line and "blake2b" in line
    # one process: nothing is gathered, nothing compared
    check_same_launch(Dist(), base)


def _train_worker(rank, world_size, port, tmp, overrides, errors):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from embforge.cli.train import run_training
    try:
        run_training(_cfg(Path(tmp), **overrides[rank]), progress=False)
        errors[rank] = "trained"
    except LaunchMismatch as e:
        errors[rank] = str(e)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ranks_with_different_configs_are_refused_before_the_model_loads(tmp_path):
    write_data(tmp_path / "train.jsonl")
    # rank 1 was given another lr (a stale config copy on its node)
    overrides = [{}, {"optim.lr": 0.002}]
    with mp.Manager() as m:
        errors = m.dict()
        mp.spawn(_train_worker, args=(2, free_port(), str(tmp_path), overrides, errors), nprocs=2, join=True)
        errors = dict(errors)
    for rank in (0, 1):
        assert errors[rank].startswith("ranks were launched with different configs, code or data: rank 1 differs "
                                       "from rank 0 in config.optim.lr: 0.002 (rank 0: 0.0001)"), errors[rank]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
