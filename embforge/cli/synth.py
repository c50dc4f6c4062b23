"""`embforge synth generate|relabel` argument parsing; the work lives in embforge/synth/generate.py and relabel.py."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from embforge.cli import one_line

# Exit status. Scripts must be able to tell "done" from "stopped early": a run that leaves work behind never
# exits 0. Documented in docs/synth.md and in each subcommand's --help.
EXIT_COMPLETE = 0    # every planned request finished (and, for generate, at least one example was accepted)
EXIT_ERROR = 1       # stopped by an error a rerun alone will not fix: bad key, unknown model, endpoint unreachable
EXIT_USAGE = 2       # bad flags, configuration or input file (argparse uses 2 too); no key for a remote endpoint
EXIT_INCOMPLETE = 3  # ended with work left: budget, requests that outlived their retries, nothing accepted

EXIT_BY_STOP_REASON = {"complete": EXIT_COMPLETE, "fatal": EXIT_ERROR, "unreachable": EXIT_ERROR}


def exit_code(report: dict) -> int:
    """Exit status for a finished run's report (any stop reason not listed above means work is left)."""
    return EXIT_BY_STOP_REASON.get(report.get("stop_reason"), EXIT_INCOMPLETE)


EPILOG = """\
exit status (the report is written first whenever the run started):
  0  complete: every planned request finished{what}
  1  stopped by an error: the endpoint refused the key or model (401/403/404), or cannot be reached
     (DNS failure, connection refused) after the retries; the local server failed to start
  2  bad usage, configuration or input: unknown flag or config key, a missing required value, no API key
     for a remote endpoint (set the variable named by --api-key-env), a malformed line in an input,
     output or ledger file (named file:line)
  3  incomplete: requests still pending (budget reached, transient faults outlived the retries, a batch
     still running){nothing}; rerun the same command to continue (finished requests are kept)
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (keys of SynthConfig / RelabelConfig); flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set validation.near_dup_threshold=0.95")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="model name as the endpoint knows it")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key (default "
                                                        "OPENAI_API_KEY); not needed for loopback servers")
    p.add_argument("--concurrency", type=int, help="requests in flight at once")
    p.add_argument("--budget-usd", type=float, help="stop dispatching before spending more than this (all runs "
                                                    "into the same output together)")
    p.add_argument("--structured-output", choices=["auto", "json_schema", "json_object_schema", "json_object",
                                                   "text"])
    p.add_argument("--timeout", type=float, dest="request_timeout", help="seconds per request attempt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local", action="store_true", help="start a llama.cpp server with SmolLM2-135M (offline) "
                                                        "and use it; stopped when done")


def add_parser(subparsers) -> None:
    synth = subparsers.add_parser("synth", help="generate synthetic training data with an LLM (E5, Gecko)")
    sub = synth.add_subparsers(dest="synth_command", metavar="<generate|relabel>")

    g = sub.add_parser("generate", help="E5 two-step generation into training JSONL (resumable)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG.format(what=" and at least one example was accepted",
                                            nothing=", or nothing was accepted"))
    _common(g)
    g.add_argument("--out", help="output training JSONL (DATA.raw.jsonl and DATA.report.json go beside it)")
    g.add_argument("--tasks-per-type", type=int, help="task definitions per task type")
    g.add_argument("--examples-per-task", type=int, help="examples generated for each task definition")
    g.add_argument("--task-types", help="comma-separated subset of: short-long,long-short,short-short,long-long,"
                                        "sts,bitext")
    g.add_argument("--seed", type=int)
    g.add_argument("--batch", action="store_true", help="use the OpenAI Batch API (half price, up to 24 h)")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("relabel", help="Gecko relabelling: retrieve neighbours, LLM-grade, fuse, pick pos/neg",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG.format(what=" and every input record was written", nothing=""))
    _common(r)
    r.add_argument("--input", help="records to relabel (our training JSONL)")
    r.add_argument("--corpus", help="passages: JSONL with a 'text' field, or .txt with one per line "
                                    "(default: the positives and negatives of --input)")
    r.add_argument("--out", help="relabelled training JSONL")
    r.add_argument("--embedder", help="'minilm' (bundled all-MiniLM-L6-v2), a sentence-transformers folder, "
                                      "an exported embforge model, or 'hashing'")
    r.add_argument("--top-k", type=int, help="neighbours retrieved and graded per query")
    r.add_argument("--negative-ranks", help="comma-separated fused ranks to use as hard negatives "
                                            "(1 = best; negative counts from the bottom, -1 = lowest)")
    r.set_defaults(func=cmd_relabel)
    synth.set_defaults(func=lambda args: (synth.print_help(), EXIT_USAGE)[1])


def _load(cls, args, mapping: dict) -> object:
    from embforge.config import load_config

    overrides = list(args.set)
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None and value is not False:
            overrides.append(f"{key}={json.dumps(value)}")
    return load_config(cls, args.config, overrides)


COMMON = {"base_url": "base_url", "model": "model", "api_key_env": "api_key_env", "concurrency": "concurrency",
          "budget_usd": "budget_usd", "structured_output": "structured_output", "request_timeout": "request_timeout"}


def _fail(msg, code: int) -> int:
    print(f"embforge synth: error: {one_line(msg) if isinstance(msg, BaseException) else msg}", file=sys.stderr)
    return code


def cmd_generate(args) -> int:
    from embforge.config import ConfigError

    from embforge.synth.client import FatalAPIError
    from embforge.synth.config import SynthConfig
    from embforge.synth.cost import BudgetError
    from embforge.synth.generate import run_generate
    from embforge.synth.local import LlamaServer, LocalServerError, local_preset
    from embforge.synth.store import StoreError
    from embforge.synth.templates import TemplateError

    mapping = dict(COMMON, out="out", tasks_per_type="tasks_per_type", examples_per_task="examples_per_task",
                   seed="seed")
    try:
        cfg = _load(SynthConfig, args, mapping)
        if args.task_types:
            cfg.task_types = [t.strip() for t in args.task_types.split(",") if t.strip()]
            cfg.validate()
        if args.batch:
            cfg.batch.enabled = True
        if args.no_progress:
            cfg.progress = False
        _check_args(cfg, ("out", "model") if not args.local else ("out",))
        if args.local:
            local_preset(cfg)
            with LlamaServer(cfg.local.model_path or None, n_ctx=cfg.local.n_ctx, port=cfg.local.port,
                             startup_timeout=cfg.local.startup_timeout) as base_url:
                cfg.base_url = base_url
                report = run_generate(cfg)
        else:
            report = run_generate(cfg)
    except (ConfigError, BudgetError, StoreError, TemplateError, ValueError) as e:
        return _fail(e, EXIT_USAGE)
    except (FatalAPIError, LocalServerError) as e:
        return _fail(e, EXIT_ERROR)
    except TimeoutError as e:  # a Batch API job still running past batch.max_wait: the report says what is left
        return _fail(e, EXIT_INCOMPLETE)
    from embforge.synth.generate import sidecar
    _print_summary(report, sidecar(cfg.out, ".report.json"))
    return exit_code(report)


def _check_args(cfg, required: tuple[str, ...], files: tuple[str, ...] = ()) -> None:
    """Argument errors before anything starts (a --local server takes a while to come up, then would only stop)."""
    for key in required:
        if not getattr(cfg, key, None):
            raise ValueError(f"{key}: required (--{key.replace('_', '-')})")
    for key in files:
        value = getattr(cfg, key, None)
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"{key}: {value} not found")


def _print_summary(report: dict, report_path) -> None:
    """Counts by outcome (rejections by reason, as in the report), then the report's path on the last line."""
    cost = report.get("cost", {})
    outcomes = report.get("example_outcomes", {})
    rejected = {k: v for k, v in outcomes.items() if not k.startswith("accepted")}   # "status:reason" keys
    print(f"[synth] {report.get('stop_reason')}: accepted {sum(report.get('examples_accepted', {}).values())} "
          f"example(s), rejected or failed {sum(rejected.values())}; cost ${cost.get('total_usd', 0):.4f}",
          file=sys.stderr)
    if rejected:
        print("[synth] rejected by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items(),
                                                                                  key=lambda kv: -kv[1])),
              file=sys.stderr)
    if report.get("fatal_error"):
        print(f"[synth] stopped by: {report['fatal_error']}", file=sys.stderr)
    print(f"[synth] report: {report_path}", file=sys.stderr)


def cmd_relabel(args) -> int:
    from embforge.config import ConfigError

    from embforge.synth.client import FatalAPIError
    from embforge.synth.cost import BudgetError
    from embforge.synth.local import LlamaServer, LocalServerError, local_preset
    from embforge.eval.encoders import load_encoder
    from embforge.synth.relabel import RelabelConfig, run_relabel
    from embforge.synth.store import StoreError

    mapping = dict(COMMON, input="input", corpus="corpus", out="out", embedder="embedder", top_k="top_k")
    try:
        cfg = _load(RelabelConfig, args, mapping)
        if args.negative_ranks:
            cfg.negative_ranks = [int(x) for x in args.negative_ranks.split(",") if x.strip()]
            cfg.validate()
        if args.no_progress:
            cfg.progress = False
        _check_args(cfg, ("input", "out"), files=("input", "corpus"))
        if args.local:
            local_preset(cfg)
            with LlamaServer(n_ctx=2048) as base_url:
                cfg.base_url = base_url
                report = run_relabel(cfg, load_encoder=load_encoder)
        else:
            report = run_relabel(cfg, load_encoder=load_encoder)
    except (ConfigError, BudgetError, StoreError, FileNotFoundError, ValueError) as e:
        return _fail(e, EXIT_USAGE)
    except (FatalAPIError, LocalServerError) as e:
        return _fail(e, EXIT_ERROR)
    print(f"[synth] relabel {report.get('stop_reason')}: wrote {report.get('records_written')} record(s), "
          f"{report.get('records_pending')} pending; positive changed for {report.get('positive_changed')}; "
          f"cost ${report['cost']['total_usd']:.4f}", file=sys.stderr)
    if report.get("fatal_error"):
        print(f"[synth] stopped by: {report['fatal_error']}", file=sys.stderr)
    from embforge.synth.generate import sidecar
    print(f"[synth] report: {sidecar(cfg.out, '.report.json')}", file=sys.stderr)
    return exit_code(report)
