"""The demo recipe's levers on the held-out sets, over seeds: mean and spread per set, beside the untrained base at
its strongest and all-MiniLM-L6-v2.

    python bench/bench_recipe.py run --run runs/demo --variant homogeneous --seeds 0 1 2 -- --set batch.sampling=homogeneous
    python bench/bench_recipe.py table --run runs/demo --out bench/results/recipe_cpu.md

Why: one lucky run is not a result. `run` trains the demo's config on the data a finished `bash scripts/demo.sh`
left in RUN (RUN/mined/*.jsonl, RUN/synth/synth.jsonl: one named dataset each, as the demo trains) with the extra
`--set` overrides after `--`, once per seed, and scores each trained model with `embforge eval heldout`; every
stage is an `embforge` command, run as a subprocess. Each run goes to RUN/recipe/VARIANT/seedS/ (train/,
eval_trained.json, command.sh). `--data-dir D` trains on D/*.jsonl instead of RUN/mined (e.g. a copy of the mined
files carrying teacher scores, for distillation). `table` reads every RUN/recipe/*/seed*/eval_trained.json and
writes one markdown table per held-out set: mean, min-max over seeds, and in how many seeds the variant beat the
untrained base's strongest configuration (RUN/eval_base*.json). Nothing is typed in.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embforge.common import read_jsonl  # noqa: E402
from embforge.eval.report import SETS, strongest_base  # noqa: E402


DEMO_HELDOUT = "--max-queries 200 --chatterbot-docs 400 --gcide-queries 150 --gcide-docs 400 --sts-pairs 150"  # demo.sh HELDOUT
SIZE_KEYS = ("num_queries", "num_docs", "num_pairs")


def _datasets(run: Path, data_dir: Path | None) -> str:
    files = sorted((data_dir or run / "mined").glob("*.jsonl"))
    synth = run / "synth" / "synth.jsonl"
    if synth.exists() and synth.stat().st_size:
        files.append(synth)
    if not files:
        raise SystemExit(f"no training data under {data_dir or run / 'mined'}: run `bash scripts/demo.sh` first")
    items = [f"{{path: {f}, name: {'synth' if f == synth else f.stem}}}" for f in files]
    return "[" + ", ".join(items) + "]"


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"exit {rc}: {shlex.join(cmd)} (log: {log})")
    return time.perf_counter() - t0


def run(args, overrides: list[str]) -> None:
    run_dir = Path(args.run)
    data = _datasets(run_dir, Path(args.data_dir) if args.data_dir else None)
    for seed in args.seeds:
        out = run_dir / "recipe" / args.variant / f"seed{seed}"
        if (out / "eval_trained.json").exists() and not args.redo:
            print(f"[recipe] {out}: done already (--redo to run again)", file=sys.stderr)
            continue
        out.mkdir(parents=True, exist_ok=True)
        train = ["embforge", "train", "--config", args.config, "--set", f"data.train={data}",
                 "--set", f"output_dir={out / 'train'}", "--set", f"seed={seed}", "--overwrite", *overrides]
        heldout = ["embforge", "eval", "heldout", "--model", str(out / "train" / "final"),
                   "--out", str(out / "eval_trained.json"), *shlex.split(args.heldout)]
        (out / "command.sh").write_text(shlex.join(train) + "\n" + shlex.join(heldout) + "\n")
        print(f"[recipe] {args.variant} seed {seed}: training", file=sys.stderr, flush=True)
        t_train = _run(train, out / "log.txt")
        t_eval = _run(heldout, out / "log.txt")
        (out / "times.json").write_text(json.dumps({"train_s": round(t_train, 1), "eval_s": round(t_eval, 1)}))
        print(f"[recipe] {args.variant} seed {seed}: train {t_train:.0f} s, eval {t_eval:.0f} s",
              file=sys.stderr, flush=True)


def _variant_runs(run_dir: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for f in sorted(run_dir.glob("recipe/*/seed*/eval_trained.json")):
        variant, seed = f.parent.parent.name, int(f.parent.name[len("seed"):])
        metrics_f = f.parent / "train" / "metrics.jsonl"
        metrics = [rec for _, rec in read_jsonl(metrics_f)] if metrics_f.exists() else []
        command = (f.parent / "command.sh").read_text().splitlines()[0] if (f.parent / "command.sh").exists() else ""
        found.setdefault(variant, []).append({"seed": seed, "eval": json.loads(f.read_text()), "metrics": metrics,
                                              "command": command})
    return found


def table(args) -> str:
    import torch

    run_dir = Path(args.run)
    base, which = strongest_base(run_dir)
    minilm_f = run_dir / "eval_minilm.json"
    minilm = json.loads(minilm_f.read_text()) if minilm_f.exists() else {}
    variants = _variant_runs(run_dir)
    reference = json.loads((run_dir / "eval_base.json").read_text()) if (run_dir / "eval_base.json").exists() else {}
    for v, runs in variants.items():       # a table compares only what was scored on the same sets
        for r in runs:
            for key, _title, _metric in SETS:
                if key not in reference:    # a base configuration evaluated on some sets only (scripts/demo.sh)
                    continue
                got = {k: r["eval"].get(key, {}).get(k) for k in SIZE_KEYS}
                want = {k: reference.get(key, {}).get(k) for k in SIZE_KEYS}
                if reference and got != want:
                    raise SystemExit(f"{v} seed {r['seed']}: {key} sizes {got} differ from eval_base.json's {want}")
    order = [v for v in args.order if v in variants] + sorted(v for v in variants if v not in args.order)
    lines = [f"CPU: {torch.backends.cpu.get_cpu_capability()} capability, {os.cpu_count()} cores; "
             f"torch {torch.__version__}; generated {time.strftime('%Y-%m-%d')} by `python bench/bench_recipe.py "
             f"table --run {args.run}` from RUN/recipe/*/seed*/eval_trained.json.", *([args.note] if args.note else []),
             ""]
    for key, title, metric in SETS:
        b = base.get(key, {}).get(metric)
        m = minilm.get(key, {}).get(metric)
        lines += [f"**{title}** ({metric.replace('_at_', '@')}; untrained base at its strongest "
                  f"({which.get(key, 'n/a')}): {'n/a' if b is None else f'{b:.4f}'}; all-MiniLM-L6-v2: "
                  f"{'n/a' if m is None else f'{m:.4f}'})", "",
                  "| variant | seeds | mean | min - max | beats base in |", "|---|---|---:|---:|---:|"]
        for v in order:
            vals = [(r["seed"], r["eval"].get(key, {}).get(metric)) for r in variants[v]]
            vals = [(s, x) for s, x in vals if x is not None]
            if not vals:
                continue
            xs = [x for _, x in vals]
            wins = sum(x > b for x in xs) if b is not None else 0
            lines.append(f"| {v} | {','.join(str(s) for s, _ in vals)} | {statistics.mean(xs):.4f} | "
                         f"{min(xs):.4f} - {max(xs):.4f} | {wins}/{len(xs)} |")
        lines.append("")
    lines += ["| variant | median step s | loss first 3 -> last 3 (mean over seeds) | overrides |", "|---|---:|---|---|"]
    for v in order:
        steps = [m for r in variants[v] for m in r["metrics"] if "seconds" in m]
        firsts = [statistics.mean(m["loss"] for m in r["metrics"][:3]) for r in variants[v] if r["metrics"]]
        lasts = [statistics.mean(m["loss"] for m in r["metrics"][-3:]) for r in variants[v] if r["metrics"]]
        sets = shlex.split(variants[v][0]["command"])
        extra = [s for i, s in enumerate(sets) if i and sets[i - 1] == "--set" and not s.startswith(
            ("data.train=", "output_dir=", "seed="))]
        data = next((s for s in sets if s.startswith("data.train=")), "")
        if data and f"{run_dir / 'mined'}/" not in data:      # trained on another copy of the data (--data-dir)
            extra.append("data: " + ", ".join(sorted({Path(t.split("path: ")[1]).parent.name
                                                      for t in data.split("}") if "path: " in t})))
        lines.append(f"| {v} | {statistics.median(m['seconds'] for m in steps):.1f} | "
                     f"{statistics.mean(firsts):.3f} -> {statistics.mean(lasts):.3f} | "
                     f"{' '.join(extra) or '(the config as is)'} |" if steps else f"| {v} | n/a | n/a | |")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    return text


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--run", default="runs/demo")
    r.add_argument("--config", default="configs/cpu-demo.yaml")
    r.add_argument("--variant", required=True)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--data-dir", default=None, help="train on DIR/*.jsonl instead of RUN/mined/*.jsonl")
    r.add_argument("--redo", action="store_true")
    r.add_argument("--heldout", default=DEMO_HELDOUT, help="`embforge eval heldout` size flags (default: the "
                                                          "demo's, scripts/demo.sh HELDOUT)")
    t = sub.add_parser("table")
    t.add_argument("--run", default="runs/demo")
    t.add_argument("--out", default=None)
    t.add_argument("--order", nargs="*", default=["mixed", "homogeneous"])
    t.add_argument("--note", default="", help="a line under the header (how the runs were run)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        run(args, overrides)
    else:
        print(table(args), end="")


if __name__ == "__main__":
    main()
