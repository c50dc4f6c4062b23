"""Tests run on CPU: Triton kernels go through the interpreter (must be set before triton is imported)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """A test skipped without CUDA must carry the gpu marker, or `pytest -m gpu` (bench/gpu_suite.sh smoke) never
    selects it and a GPU machine never runs it: such a test is a collection error, not a silent gap."""
    unmarked = []
    for item in items:
        needs_cuda = any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif"))
        if needs_cuda and item.get_closest_marker("gpu") is None:
            unmarked.append(item.nodeid)
    if unmarked:
        raise pytest.UsageError("tests skipped without CUDA but not marked @pytest.mark.gpu: " + ", ".join(unmarked))
