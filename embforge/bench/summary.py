"""Turn each part's rows into named, typed metrics (see check.py for the kinds) for the summary and the check."""
from __future__ import annotations

from embforge.bench.check import metric

# counts that follow from the data, the chunking and the model: identical on any machine
_E2E_EXACT = {"real_tokens": "equal", "model_flops": "equal", "chunks_pass1": "lower", "chunks_pass2": "lower",
              "padded_tokens_pass1": "lower", "padded_tokens_pass2": "lower", "hw_flops": "lower"}


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _num(v):
    return float(v) if v not in (None, "") else None


def e2e_metrics(part: str, rows: list[dict], device: str = "cuda") -> dict:
    """Work counters (exact), saved-activation bytes, time over the same-run matmul; peak memory only on CUDA. On CPU
    the step's peak is the process's RSS high-water mark, which counts whatever the process loaded before (a pytest
    process: 990 MB; a fresh `embforge bench`: 740 MB, same code): saved_act_peak_mb is the CPU memory check."""
    out = {}
    for r in _ok(rows):
        key = f"{part}/{r['lever']}"
        for col, better in _E2E_EXACT.items():
            out[f"{key}/{col}"] = metric(int(r[col]), "exact", better)
        if _num(r.get("saved_act_peak_mb")):
            out[f"{key}/saved_act_peak_mb"] = metric(_num(r["saved_act_peak_mb"]), "bytes", "lower")
        if device == "cuda":
            out[f"{key}/peak_mem_mb"] = metric(_num(r["peak_mem_mb"]), "memory", "lower")
        out[f"{key}/step_over_matmul"] = metric(_num(r["step_over_matmul"]), "time", "lower")
        if _num(r.get("speedup_vs_peer")):  # filed under the peer: it exists only when the peer ran
            out[f"{part}/peer/baseline_speedup"] = metric(_num(r["speedup_vs_peer"]), "time", "higher")
    return out


def kernel_metrics(part: str, rows: list[dict], matmul_ms: float, device: str) -> dict:
    """InfoNCE / pooling rows: peak memory where measured, and on CUDA the time over the same-run matmul. Not on CPU:
    these ops take 0.01-10 ms there and two checks of the same code differed up to 200x on 2 shared cores."""
    out = {}
    for r in _ok(rows) if part == "kernels" else [r for r in rows if _num(r.get("median_ms"))]:
        shape = "x".join(str(r[k]) for k in ("B", "N", "T", "H") if k in r)
        key = f"{part}/{r['kernel']}/{r['provider']}/{r['mode']}/{shape}/{r.get('dtype', '')}"
        if device == "cuda":
            out[f"{key}/time_over_matmul"] = metric(round(_num(r["median_ms"]) / matmul_ms, 4), "time", "lower")
        # CPU pooling memory is the in-process RSS high-water mark (mostly 0, else allocator noise); InfoNCE's is
        # measured in a fresh process per configuration and held within a few % over repeated checks
        if _num(r.get("peak_mem_mb")) and (device == "cuda" or part == "kernels"):
            out[f"{key}/peak_mem_mb"] = metric(_num(r["peak_mem_mb"]), "memory", "lower")
    return out


def step_memory_metrics(rows: list[dict]) -> dict:
    out = {}
    for r in _ok(rows):
        key = f"step_memory/batch{r['effective_batch']}"
        out[f"{key}/padded_tokens_pass2"] = metric(int(r["padded_tokens_pass2"]), "exact", "lower")
        out[f"{key}/saved_act_peak_mb"] = metric(_num(r["saved_act_peak_mb"]), "bytes", "lower")
        out[f"{key}/peak_rss_mb"] = metric(_num(r["peak_rss_mb"]), "memory", "lower")
    return out
