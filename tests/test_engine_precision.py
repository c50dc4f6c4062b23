"""dtype: auto follows what the device multiplies natively; an emulated bf16 on CPU warns once."""
import warnings

import pytest
import torch

from embforge.engine import precision


@pytest.fixture
def cpu_bf16(monkeypatch):
    def set_native(value: bool):
        monkeypatch.setattr(precision, "cpu_native_bf16", lambda: value)
        monkeypatch.setattr(precision, "_warned", False)
    return set_native


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_native_bf16(cpu_bf16, native, expected):
    cpu_bf16(native)
    assert precision.resolve_dtype("auto", "cpu") == expected
    assert precision.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_explicit_bf16_without_native_support_warns_once(cpu_bf16):
    cpu_bf16(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
        assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "without native bf16" in msgs[0] and precision.cpu_capability() in msgs[0]


def test_explicit_bf16_with_native_support_is_silent(cpu_bf16):
    cpu_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
        assert precision.resolve_dtype("float32", "cpu") == torch.float32


def test_capability_names_aten_capability_and_bf16_units():
    cap = precision.cpu_capability()
    assert cap.split("+")[0] == torch.backends.cpu.get_cpu_capability()
    assert ("BF16" in cap or "AMX" in cap) == precision.cpu_native_bf16()


def test_embedder_auto_dtype_follows_cpu(cpu_bf16):
    from embforge.engine import Embedder, ModelConfig
    for native, expected in ((False, torch.float32), (True, torch.bfloat16)):
        cpu_bf16(native)
        e = Embedder.from_config(ModelConfig(path="tiny-llama", lora=None), device="cpu")
        assert next(e.model.parameters()).dtype == expected
