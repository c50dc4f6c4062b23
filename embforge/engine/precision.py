"""Which floating-point precision the base weights run in, decided by what the device does natively.

`dtype: auto` means bf16 where the hardware multiplies bf16 natively and fp32 elsewhere:
- CUDA: bf16.
- CPU with AVX512-BF16 or AMX: bf16 (a bf16 matmul is faster than fp32 there).
- any other CPU (AVX2, AVX512 without BF16, ARM without the extension): fp32. Without native bf16, oneDNN emulates
  it by converting every tile, and a bf16 matmul runs tens of times slower than fp32 (bench/results/precision_cpu.md
  holds the measurement on an AVX2 machine).

An explicit `bfloat16` on such a CPU still runs (a user may want the arithmetic of a bf16 machine) but warns once.
Every CPU time we record names `cpu_capability()` beside it, since the same code runs at very different speeds.
"""
from __future__ import annotations

import functools
import warnings

import torch


@functools.lru_cache(maxsize=None)
def cpu_native_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.lru_cache(maxsize=None)
def cpu_capability() -> str:
    """ATen's CPU capability (`torch.backends.cpu.get_cpu_capability()`: AVX2, AVX512, ...), plus the bf16 units it
    does not name: e.g. "AVX512+BF16", "AVX512+AMX", "AVX2"."""
    cap = torch.backends.cpu.get_cpu_capability()
    extras = [name for name, has in (("BF16", torch.cpu._is_avx512_bf16_supported()),
                                      ("AMX", torch.cpu._is_amx_tile_supported())) if has]
    return "+".join([cap, *extras])


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """The precision `dtype: auto` picks on this device."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


_warned = False


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto` | `float32` | `bfloat16` | `float16` -> a torch dtype, warning once when bf16 is asked for on a CPU that
    would emulate it."""
    global _warned
    if name == "auto":
        return auto_dtype(device)
    dtype = getattr(torch, name)
    if (dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_native_bf16() and not _warned):
        _warned = True
        warnings.warn(f"dtype bfloat16 on a CPU without native bf16 ({cpu_capability()}): every bf16 matmul is "
                      "emulated and runs far slower than fp32 (bench/results/precision_cpu.md); "
                      "use dtype: auto (fp32 here) unless you need bf16 arithmetic", stacklevel=2)
    return dtype
