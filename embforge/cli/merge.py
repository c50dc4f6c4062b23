"""`embforge merge`: LoRA models trained from one base, merged in weight space (embforge/engine/merge.py)."""
from __future__ import annotations

import sys


def add_parser(subparsers) -> None:
    m = subparsers.add_parser("merge", help="merge LoRA models trained from one base in weight space "
                                            "(average or slerp of the deltas scale * B @ A)")
    m.add_argument("--models", nargs="+", default=[], metavar="DIR",
                   help="model folders (a run's final/, an export, a checkpoint folder, or a run folder)")
    m.add_argument("--run", help="a run folder whose last --last K checkpoints join the merge")
    m.add_argument("--last", type=int, metavar="K", help="with --run: merge the run's last K checkpoints")
    m.add_argument("--out", required=True, help="new folder for the merged model")
    m.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per model, normalized to sum to 1 (default: uniform)")
    m.add_argument("--method", default="linear", choices=("linear", "slerp"),
                   help="linear: weighted average of the deltas; slerp: spherical interpolation of two")
    m.add_argument("--rank", type=int, metavar="R",
                   help="write a rank-R LoRA adapter (truncated SVD of each merged delta) instead of a full model")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the full merged model (the rounding error is reported)")
    m.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    from embforge.engine.merge import MergeError, last_checkpoints, merge_models, summary
    try:
        if (args.run is None) != (args.last is None):
            raise MergeError("--run and --last go together: --last K --run RUNDIR")
        models = list(args.models) + ([str(p) for p in last_checkpoints(args.run, args.last)] if args.run else [])
        report = merge_models(models, args.out, weights=args.weights, method=args.method, rank=args.rank,
                              dtype=args.dtype)
    except (MergeError, FileNotFoundError) as e:
        print(f"embforge merge: error: {e}", file=sys.stderr)
        return 2
    print(summary(report), file=sys.stderr)
    print(f"wrote {args.out} (report: {args.out}/merge.json)", file=sys.stderr)
    return 0
