"""bench/gpu_suite.sh on CPU: the smoke part fails loudly on a failing test, on zero GPU tests run where CUDA is
present, on a part that errors and on a machine without CUDA; it passes when the tests pass, and keeps its logs.

The planted tests live in a temporary file handed to the suite through GPU_SUITE_TESTS; GPU_SUITE_DRY_RUN=1 lets
smoke run without CUDA. One case fakes CUDA (a sitecustomize that makes torch report a device) to reach the
"no GPU test ran" check."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "gpu_suite.sh"

PLANTED = '''
import pytest

@pytest.mark.gpu
def test_planted_pass():
    assert 1 + 1 == 2

@pytest.mark.gpu
def test_planted_failure():
    assert False, "PLANTED-FAILURE"
'''
PASSING = '''
import pytest

@pytest.mark.gpu
def test_planted_pass():
    assert 1 + 1 == 2

def test_not_gpu_never_runs():
    assert False, "a test without the gpu marker was selected"
'''
ALL_SKIPPED = '''
import pytest

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs something this machine lacks")
def test_skipped():
    pass
'''
FAKE_CUDA = '''
import types
import torch
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_properties = lambda i: types.SimpleNamespace(name="FakeGPU", total_memory=2**30, major=9,
                                                                     minor=0)
'''


def run_suite(tmp_path: Path, tests: str | None, *parts, fake_cuda=False, **env_extra):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_SUITE_DRY_RUN="1")
    env.update(env_extra)
    if tests is not None:
        f = tmp_path / "planted" / "test_planted.py"
        f.parent.mkdir(exist_ok=True)
        f.write_text(tests)
        env["GPU_SUITE_TESTS"] = str(f)
    if fake_cuda:
        site = tmp_path / "fakecuda"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(FAKE_CUDA)
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    r = subprocess.run(["bash", str(SUITE), *parts], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    return r, out


@pytest.mark.slow
def test_smoke_fails_on_a_planted_failure_and_keeps_the_log(tmp_path):
    r, out = run_suite(tmp_path, PLANTED, "smoke")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "GPU-SUITE FAILED: smoke" in r.stderr
    log = (out / "smoke_pytest.log").read_text()
    assert "PLANTED-FAILURE" in log and "1 failed, 1 passed" in log
    assert "smoke" in (out / "summary.txt").read_text() and (out / "smoke_junit.xml").is_file()
    env = (out / "env.txt").read_text()   # the environment report ran first
    for key in ("torch ", "triton ", "transformers ", "varlen_attn", "cuda False"):
        assert key in env, key


def test_smoke_passes_when_the_gpu_tests_pass(tmp_path):
    r, out = run_suite(tmp_path, PASSING, "smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "GPU-SUITE OK: smoke" in r.stdout and "1 passed, 1 deselected" in (out / "smoke_pytest.log").read_text()


def test_no_cuda_without_dry_run_fails(tmp_path):
    r, out = run_suite(tmp_path, PASSING, "smoke", GPU_SUITE_DRY_RUN="0")
    assert r.returncode == 1 and "no CUDA device" in (out / "env.txt").read_text()
    assert not (out / "smoke_pytest.log").exists()          # the tests never started


@pytest.mark.slow
def test_zero_gpu_tests_on_a_cuda_machine_fails(tmp_path):
    r, out = run_suite(tmp_path, ALL_SKIPPED, "smoke", fake_cuda=True, GPU_SUITE_DRY_RUN="0",
                       GPU_SUITE_ALLOW_MISSING="1")
    assert "gpu FakeGPU" in (out / "env.txt").read_text()
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 gpu tests ran" in r.stdout and "no GPU test ran" in r.stderr


def test_missing_carried_wheels_fail_on_cuda(tmp_path):
    r, out = run_suite(tmp_path, PASSING, "smoke", fake_cuda=True, GPU_SUITE_DRY_RUN="0")
    assert r.returncode == 1 and "carry .whl/" in (out / "env.txt").read_text()   # liger-kernel is not here


def test_a_failing_part_fails_the_suite_after_the_others_ran(tmp_path):
    r, out = run_suite(tmp_path, None, "nonsense", "pooling")
    assert r.returncode == 1 and "unknown part" in r.stderr
    assert (out / "pooling.log").is_file()                  # the next part still ran


@pytest.mark.parametrize("part", ["infonce", "pooling", "e2e"])
def test_part_commands_exit_status_is_kept(tmp_path, part):
    """A part whose command fails (here: --device cuda on a CPU machine) fails the suite, through tee."""
    r, out = run_suite(tmp_path, None, part, PART_TIMEOUT_S="120")
    assert r.returncode == 1, r.stdout[-2000:]
    assert f"GPU-SUITE FAIL: {part}" in r.stderr and (out / f"{part}.log").is_file()
