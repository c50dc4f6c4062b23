"""Regression check: a run's metrics against the stored baseline of the same device.

Every metric has a kind that fixes how strictly it is compared, because CPU timings on 2 shared CI cores are noisy
while much of what decides throughput is not a timing at all:
  exact   counts that do not depend on the machine (real and padded tokens per step, chunks per pass, model and
          hardware FLOPs): any change in the bad direction fails; an improvement passes with a note to update
  bytes   autograd-saved activation bytes per chunk (machine-independent): 5%
  memory  measured peak memory (CUDA allocator; CPU RSS, which the runtime dominates): 10% CUDA, 30% CPU
  time    timings normalized by a same-run dense matmul (or ratios within the run, such as the speed-up over the
          peer): --tolerance, raised to the baseline's own floor (`min_time_tolerance`, set for CPU baselines)
"""
from __future__ import annotations

import json
from pathlib import Path

KIND_TOLERANCE = {"exact": 0.0, "bytes": 0.05}
MEMORY_TOLERANCE = {"cpu": 0.30, "cuda": 0.10}


def metric(value, kind: str, better: str) -> dict:
    assert kind in ("exact", "bytes", "memory", "time") and better in ("lower", "higher", "equal")
    return {"value": value, "kind": kind, "better": better}


def load(path: str | Path) -> dict:
    with open(path) as f:
        data = json.load(f)
    if "metrics" not in data:
        raise ValueError(f"{path}: not a benchmark summary (no 'metrics')")
    return data


def tolerance_for(kind: str, device_type: str, time_tolerance: float, baseline: dict) -> float:
    if kind == "time":
        return max(time_tolerance, float(baseline.get("min_time_tolerance", 0.0)))
    if kind == "memory":
        return MEMORY_TOLERANCE["cuda" if device_type == "cuda" else "cpu"]
    return KIND_TOLERANCE[kind]


def compare(run: dict, baseline: dict, time_tolerance: float = 0.3) -> tuple[list[str], list[str]]:
    """(failures, notes). Only the parts present in both are compared; a baseline metric missing from a part that
    ran is a failure (a lever that errored or vanished)."""
    failures, notes = [], []
    device_type = "cuda" if run.get("device_slug", "cpu") != "cpu" else "cpu"
    if run.get("device_slug") != baseline.get("device_slug"):
        failures.append(f"baseline is for device {baseline.get('device_slug')!r}, this run is "
                        f"{run.get('device_slug')!r}")
        return failures, notes
    parts = set(run.get("parts_ok", [])) & set(baseline.get("parts_ok", []))
    for p in sorted(set(baseline.get("parts_ok", [])) & set(run.get("parts", [])) - parts):
        failures.append(f"part {p!r} failed in this run (it passed in the baseline)")
    for p in sorted(parts):
        if run.get("config", {}).get(p) != baseline.get("config", {}).get(p):
            failures.append(f"part {p!r} ran a different configuration than the baseline "
                            f"({run.get('config', {}).get(p)} vs {baseline.get('config', {}).get(p)}); "
                            "compare like with like or update the baseline")
    if failures:
        return failures, notes
    compared = 0
    attempted = run.get("attempted", {})
    for key, ref in sorted(baseline["metrics"].items()):
        part, group = (key.split("/") + [""])[:2]
        if part not in parts or (part in attempted and group not in attempted[part]):
            continue  # a part not run, or an e2e lever this run did not ask for
        cur = run["metrics"].get(key)
        if cur is None:
            failures.append(f"{key}: in the baseline ({ref['value']}) but not measured in this run")
            continue
        compared += 1
        tol = tolerance_for(ref["kind"], device_type, time_tolerance, baseline)
        v, r = float(cur["value"]), float(ref["value"])
        hi, lo = r + tol * abs(r), r - tol * abs(r)
        worse = {"lower": v > hi, "higher": v < lo, "equal": not lo <= v <= hi}[ref["better"]]
        better = {"lower": v < lo, "higher": v > hi, "equal": False}[ref["better"]]
        desc = f"{key}: {v:g} vs baseline {r:g} ({ref['kind']}, {ref['better']} is better, tolerance {tol:.0%})"
        if worse:
            failures.append(desc)
        elif better:
            notes.append(desc + " -- improved: update the baseline to lock it in")
    for key in sorted(set(run["metrics"]) - set(baseline["metrics"])):
        if key.split("/")[0] in parts:
            notes.append(f"{key}: new metric, not in the baseline")
    if compared == 0 and not failures:
        failures.append("no metric compared: the run and the baseline share no successful part")
    return failures, notes
