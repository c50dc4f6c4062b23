"""`embforge bench`: the whole benchmark suite in one entry, and the throughput regression check.

    embforge bench [--device cpu|cuda] [--quick] [--parts kernels,pooling,e2e] [--out-dir DIR]
                   [--check [--baseline FILE] [--tolerance 0.3]] [--update-baseline]

Parts: kernels (InfoNCE), pooling, e2e (GradCache step on a Mistral-shaped model + the sentence-transformers peer +
levers), e2e_big (2048 queries + 4096 documents per step, memory target), step_memory (peak RSS vs effective batch
on SmolLM2, CPU), distributed (CPU: 2 gloo ranks give the one-process gradients; a correctness row, not a speed
claim). Default: kernels,pooling,e2e. On CUDA the kernel parts run their short sweep (the full sweeps are
`python bench/bench_infonce.py` / `bench_pooling.py`) and e2e gets what is left of an 8-minute budget, so the
default suite fits in 10 minutes on one H100 including model initialization (levers that would not fit are
skipped, each with a row saying so).
Writes each part's CSV/JSONL/PNG and bench_summary_<device>.json (metrics, device, versions, commit) to --out-dir.
--check compares the summary with bench/baselines/<device>.json and exits 1 past the tolerances (check.py).
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASELINES = REPO / "bench" / "baselines"
PARTS = ["kernels", "pooling", "e2e", "e2e_big", "step_memory", "distributed"]
DEFAULT_PARTS = "kernels,pooling,e2e"
CUDA_SUITE_BUDGET_S = 480  # e2e skips a lever whose estimate would pass this; the rest of 10 min is margin


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run the benchmark suite; --check compares with the stored baseline",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="CI-sized shapes and fewer repetitions")
    p.add_argument("--parts", default=DEFAULT_PARTS, help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--check", action="store_true", help="compare with the stored baseline; exit 1 on regression")
    p.add_argument("--baseline", default=None,
                   help="baseline file or folder (default bench/baselines/<device>[-quick].json)")
    p.add_argument("--tolerance", type=float, default=0.3, help="relative tolerance of normalized timings")
    p.add_argument("--update-baseline", action="store_true", help="store this run as the device's baseline")
    p.add_argument("--budget-s", type=float, default=None,
                   help="e2e skips a lever when time spent + its estimate would pass this (default on CUDA: what is "
                        f"left of {CUDA_SUITE_BUDGET_S} s)")
    p.add_argument("--levers", default=None, help="comma-separated e2e levers to run (default: all)")
    p.add_argument("--model-cache", default=None, help="where random-weight benchmark models are written")
    p.set_defaults(func=run)


def _load_script(name: str):
    """bench/<name>.py is a script beside the package, not a module of it: load it by path."""
    path = REPO / "bench" / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the kernel benchmarks live in the repository's bench/ folder")
    spec = importlib.util.spec_from_file_location(f"_embforge_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO))
    spec.loader.exec_module(mod)
    return mod


def _baseline_path(arg: str | None, slug: str, quick: bool) -> Path:
    """bench/baselines/<device>[-quick].json: quick (CI-sized) and full runs measure different shapes."""
    name = f"{slug}{'-quick' if quick else ''}.json"
    if arg is None:
        return BASELINES / name
    p = Path(arg)
    return p / name if p.is_dir() or arg.endswith("/") else p


def run_parts(args, device: str, plant: dict | None = None) -> dict:
    """Run the parts, write the summary, return it. `plant` (tests only) injects a known regression into e2e."""
    import torch

    from embforge.bench import common, e2e, summary
    from embforge.bench.setup import setup_for
    t0 = time.monotonic()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"embforge bench: unknown part(s) {unknown}; known: {PARTS}")
    reference = common.reference_matmul(device)
    slug = common.device_slug(device)
    result = {"device_slug": slug, **common.env_columns(device), "quick": args.quick, "parts": parts,
              "parts_ok": [], "part_errors": {}, "config": {}, "attempted": {}, "reference": reference, "metrics": {}}
    if slug == "cpu":
        result["min_time_tolerance"] = 0.5  # 2 shared cores: docs/bench.md gives the measured spread
    kernel_quick = args.quick or device == "cuda"
    for part in parts:
        print(f"== embforge bench: {part} on {device} ({time.monotonic() - t0:.0f}s)", file=sys.stderr, flush=True)
        try:
            if part == "kernels":
                rows = _load_script("bench_infonce").run(device, out_dir, kernel_quick)
                metrics = summary.kernel_metrics(part, rows, reference["matmul_ms"], device)
                config = {"quick": kernel_quick}
            elif part == "pooling":
                rows = _load_script("bench_pooling").run(device, out_dir, kernel_quick)
                metrics = summary.kernel_metrics(part, rows, reference["matmul_ms"], device)
                config = {"quick": kernel_quick}
            elif part in ("e2e", "e2e_big"):
                budget = args.budget_s
                if budget is None and device == "cuda" and part == "e2e":
                    budget = CUDA_SUITE_BUDGET_S - (time.monotonic() - t0)
                levers = args.levers.split(",") if args.levers else None
                rows = e2e.run(device, out_dir, args.quick, part=part, model_cache=args.model_cache,
                               budget_s=budget, levers=levers, plant=plant)
                metrics = summary.e2e_metrics(part, rows, device)
                config = e2e.setup_dict(setup_for(part, device, args.quick))
                result["attempted"][part] = [r["lever"] for r in rows]
                if not any(r.get("status") == "ok" for r in rows):
                    raise RuntimeError("no e2e configuration ran: " + "; ".join(r["status"] for r in rows))
            elif part == "distributed":
                from embforge.bench import distributed
                rows = distributed.run(device, out_dir, args.quick)
                metrics, config = {}, {"world_size": rows[0]["world_size"], "backend": "gloo"}
            else:  # step_memory
                rows = _load_script("bench_step_memory").run(device, out_dir, args.quick)
                metrics = summary.step_memory_metrics(rows)
                config = {"quick": args.quick}
            result["metrics"].update(metrics)
            result["config"][part] = json.loads(json.dumps(config, default=str))
            result["parts_ok"].append(part)
        except Exception as e:  # noqa: BLE001 -- the other parts still run and report
            traceback.print_exc(file=sys.stderr)
            result["part_errors"][part] = f"{type(e).__name__}: {e}"[:500]
        if device == "cuda":
            torch.cuda.empty_cache()
    result["wall_s"] = round(time.monotonic() - t0, 1)
    path = out_dir / f"bench_summary_{slug}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    print(f"wrote {path} ({len(result['metrics'])} metrics, {result['wall_s']}s)", file=sys.stderr)
    return result


def run(args) -> int:
    import torch

    from embforge.bench import check
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("embforge bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    result = run_parts(args, device)
    code = 0 if not result["part_errors"] else 1
    baseline_file = _baseline_path(args.baseline, result["device_slug"], args.quick)
    if args.check:
        if not baseline_file.exists():
            print(f"embforge bench --check: no baseline {baseline_file}; create it with --update-baseline",
                  file=sys.stderr)
            return 2
        failures, notes = check.compare(result, check.load(baseline_file), args.tolerance)
        for n in notes:
            print(f"note: {n}", file=sys.stderr)
        for f in failures:
            print(f"REGRESSION: {f}", file=sys.stderr)
        print(f"check against {baseline_file}: {'FAIL' if failures else 'ok'} "
              f"({len(failures)} failure(s), {len(notes)} note(s))", file=sys.stderr)
        code = max(code, 1 if failures else 0)
    if args.update_baseline:
        if result["part_errors"]:
            print(f"not updating the baseline: part(s) failed: {result['part_errors']}", file=sys.stderr)
            return 1
        baseline_file.parent.mkdir(parents=True, exist_ok=True)
        baseline_file.write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
        print(f"baseline written: {baseline_file}", file=sys.stderr)
    return code
