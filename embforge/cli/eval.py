"""`embforge eval {retrieval,sts,passkey,mteb,heldout,report}`: offline evaluation; every run writes JSON results."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embforge.cli import one_line
from embforge.cli.cached import cache_flags, report_cache, with_cache

HELP = {
    "retrieval": "nDCG@10, MRR@10, Recall@10/100, MAP on a BEIR folder (or the built-in chatterbot set)",
    "sts": "Spearman/Pearson of cosine similarity on STS pairs (.jsonl or .tsv)",
    "passkey": "E5 personalised passkey retrieval, top-1 accuracy per context length",
    "mteb": "run a local BEIR folder through mteb.evaluate with the embforge encoder adapter",
    "heldout": "score one model on the demo's held-out sets (chatterbot Q/A, GCIDE word -> definition, GCIDE "
               "sense pairs): one JSON file",
    "report": "print the markdown summary of a demo run folder (stages.tsv, train/metrics.jsonl, eval_*.json)",
}


def _common(p: argparse.ArgumentParser,
            instruction_help: str = "query instruction (E5 template applied to queries only)") -> None:
    p.add_argument("--model", required=True,
                   help="embforge checkpoint or sentence-transformers folder ('minilm' = bundled all-MiniLM-L6-v2)")
    p.add_argument("--out", type=Path, help="write result records (JSON list) here")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--instruction", default=None, help=instruction_help)
    p.add_argument("--task", default=None, help="take the instruction from the E5 table for this MTEB task name")
    cache_flags(p)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate an embedder (retrieval, STS, passkey, mteb; the demo's "
                                           "heldout sets and report)",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="eval_command", metavar="<evaluation>")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    r = sub.add_parser("retrieval", help=HELP["retrieval"])
    _common(r)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or 'chatterbot'")
    src.add_argument("--synthetic", type=Path, help="synthetic JSONL: evaluate on its deterministic held-out slice")
    r.add_argument("--heldout-fraction", type=float, default=0.1)
    r.add_argument("--split", default="test")
    r.add_argument("--k", type=int, nargs="+", default=[10, 100], help="cut-offs (MAP uses the largest)")
    r.add_argument("--corpus-chunk", type=int, default=10_000, help="documents encoded and scored per chunk")
    r.set_defaults(func=run_retrieval)

    s = sub.add_parser("sts", help=HELP["sts"])
    _common(s, "instruction applied to BOTH sentences of every pair (E5 template; STS is symmetric)")
    s.add_argument("--data", required=True, type=Path)
    s.set_defaults(func=run_sts)

    k = sub.add_parser("passkey", help=HELP["passkey"])
    _common(k)
    k.add_argument("--lengths", type=int, nargs="+", default=None, help="context lengths in tokens (256..32768)")
    k.add_argument("--candidates", type=int, default=100)
    k.add_argument("--queries", type=int, default=50)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's own)")
    k.set_defaults(func=run_passkey)

    m = sub.add_parser("mteb", help=HELP["mteb"])
    _common(m)
    m.add_argument("--data", required=True, help="BEIR folder or 'chatterbot'")
    m.add_argument("--split", default="test")
    m.add_argument("--name", default="EmbforgeLocalRetrieval", help="task name shown by mteb")
    m.set_defaults(func=run_mteb_cmd)

    h = sub.add_parser("heldout", help=HELP["heldout"])
    h.add_argument("--model", required=True,
                   help="base:CONFIG.yaml (the config's model without adapter: the untrained base), a model folder, "
                        "or minilm")
    h.add_argument("--out", required=True, type=Path)
    h.add_argument("--max-queries", type=int, default=None, help="score N queries of each set (a fixed-seed sample, the same every run)")
    h.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of a base:CONFIG (e.g. model.pooling=mean)")
    h.add_argument("--gcide-queries", type=int, default=300, help="GCIDE words to retrieve definitions for")
    h.add_argument("--gcide-docs", type=int, default=1000, help="GCIDE definitions searched (queries' own + "
                                                                "distractors)")
    h.add_argument("--sts-pairs", type=int, default=300, help="GCIDE sense pairs scored")
    h.add_argument("--chatterbot-docs", type=int, default=None,
                   help="chatterbot answers searched (the scored queries' own + distractors); default: all")
    h.add_argument("--sets", default=None, metavar="A,B",
                   help="score only these held-out sets (chatterbot, gcide, fortunes, gcide_sts); default: all")
    h.add_argument("--small", action="store_true", help="smaller held-out sets (100 GCIDE words, 300 docs, "
                                                        "100 pairs) for quick comparisons")
    h.set_defaults(func=run_heldout)

    rep = sub.add_parser("report", help=HELP["report"])
    rep.add_argument("run_dir", nargs="?", default="runs/demo")
    rep.set_defaults(func=run_report)


def _clean_errors(func):
    """Bad input (malformed files, unknown task names, missing folders) exits 2 with its file:line message."""
    import functools

    @functools.wraps(func)
    def wrapper(args) -> int:
        from embforge.config import ConfigError
        from embforge.data.records import DataError
        from embforge.eval.beir import BeirFormatError
        from embforge.eval.sts import StsFormatError

        try:
            return func(args)
        except (BeirFormatError, StsFormatError, DataError, ConfigError, FileNotFoundError, KeyError,
                ValueError) as e:
            print(f"embforge eval: error: {one_line(e)}", file=sys.stderr)
            return 2
    return wrapper


def _instruction(args) -> str | None:
    if args.instruction and args.task:
        raise SystemExit("give --instruction or --task, not both")
    if args.task:
        from embforge.eval.instructions import instruction_for

        return instruction_for(args.task)
    return args.instruction


def _finish(args, data: str, metrics: dict, **extra) -> int:
    from embforge.eval.results import format_table, make_records, write_results

    records = make_records(args.model, data, metrics, **extra)
    print(format_table(records))
    if args.out:
        write_results(args.out, records)
        print(f"wrote {len(records)} records to {args.out}", file=sys.stderr)
    return 0


def _load_data(spec: str, split: str):
    from embforge.eval.beir import load_beir
    from embforge.eval.datasets import chatterbot_beir

    return chatterbot_beir(split=split) if spec == "chatterbot" else load_beir(spec, split)


@_clean_errors
def run_retrieval(args) -> int:
    from embforge.eval.encoders import load_encoder
    from embforge.eval.retrieval import evaluate_retrieval

    if args.synthetic:
        from embforge.eval.datasets import synthetic_beir

        ds, data = synthetic_beir(args.synthetic, fraction=args.heldout_fraction), f"{args.synthetic}:heldout"
    else:
        ds, data = _load_data(args.data, args.split), args.data
    instruction = _instruction(args)
    encoder = with_cache(load_encoder(args.model, args.device), args)
    metrics = evaluate_retrieval(encoder, ds, instruction=instruction, batch_size=args.batch_size, k_values=args.k,
                                 corpus_chunk=args.corpus_chunk)
    report_cache(encoder)
    return _finish(args, data, metrics, split=ds.split, instruction=instruction)


@_clean_errors
def run_sts(args) -> int:
    from embforge.eval.encoders import load_encoder
    from embforge.eval.sts import evaluate_sts

    instruction = _instruction(args)
    encoder = with_cache(load_encoder(args.model, args.device), args)
    metrics = evaluate_sts(encoder, args.data, instruction=instruction, batch_size=args.batch_size)
    report_cache(encoder)
    return _finish(args, str(args.data), metrics, instruction=instruction)


@_clean_errors
def run_passkey(args) -> int:
    from embforge.eval.encoders import load_encoder
    from embforge.eval.passkey import LENGTHS, evaluate_passkey

    encoder = load_encoder(args.model, args.device)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = getattr(encoder, "tokenizer", None)
        if tokenizer is None:
            raise SystemExit(f"{args.model}: encoder exposes no tokenizer; pass --tokenizer")
    instruction = _instruction(args)
    metrics = evaluate_passkey(encoder, tokenizer, args.lengths or LENGTHS, n_candidates=args.candidates,
                               n_queries=args.queries, instruction=instruction, batch_size=args.batch_size,
                               seed=args.seed)
    return _finish(args, "passkey", metrics, instruction=instruction, seed=args.seed,
                   candidates=args.candidates, queries=args.queries)


@_clean_errors
def run_mteb_cmd(args) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from embforge.eval.encoders import load_encoder
    from embforge.eval.mteb_adapter import beir_task, run_mteb

    task = beir_task(_load_data(args.data, args.split), name=args.name, split=args.split,
                     instruction=_instruction(args))
    scores = run_mteb(load_encoder(args.model, args.device), [task], name="embforge/" + Path(args.model).name,
                      batch_size=args.batch_size)[args.name]
    wanted = {k: v for k, v in scores.items() if k.split("_at_")[0] in ("ndcg", "mrr", "recall", "map")
              and k.rsplit("_", 1)[-1] in ("10", "100")}
    return _finish(args, args.data, wanted, split=args.split, evaluator="mteb")


def load_heldout_model(spec: str, overrides: list[str] = ()):
    """`base:CONFIG.yaml` (the config's model, no adapter: the untrained base), `minilm`, or a model folder."""
    from embforge.eval.encoders import load_encoder
    if spec.startswith("base:"):
        import dataclasses

        from embforge.config import load_config
        from embforge.engine import Embedder
        from embforge.engine.train import TrainConfig
        cfg = load_config(TrainConfig, spec[len("base:"):], list(overrides))
        emb = Embedder.from_config(dataclasses.replace(cfg.model, lora=None), "cpu")
        emb.eval()
        return emb
    return merged_for_inference(load_encoder(spec, device="cpu"))


def merged_for_inference(encoder):
    """An fp32 LoRA model scores with its adapter folded into the weights: the same function without the adapter's
    extra matmuls on every projection (on CPU they made an evaluation about a third slower). Low-precision or
    quantized weights keep the adapter apart (folding would round it)."""
    import torch
    model = getattr(encoder, "model", None)
    if hasattr(model, "merge_and_unload") and all(p.dtype == torch.float32 for p in model.parameters()):
        encoder.model = model.merge_and_unload()
    return encoder


@_clean_errors
def run_heldout(args) -> int:
    import json
    import time

    from embforge.common import atomic_write_json
    from embforge.eval.report import evaluate_model

    t0 = time.perf_counter()
    sizes = dict(gcide_queries=100, gcide_docs=300, sts_pairs=100) if args.small else dict(
        gcide_queries=args.gcide_queries, gcide_docs=args.gcide_docs, sts_pairs=args.sts_pairs)
    if sizes["gcide_docs"] < sizes["gcide_queries"] or min(sizes.values()) < 1:
        raise ValueError(f"--gcide-docs ({sizes['gcide_docs']}) must be >= --gcide-queries "
                         f"({sizes['gcide_queries']}) and every size >= 1")
    res = evaluate_model(load_heldout_model(args.model, args.set), plain=args.model == "minilm",
                         max_queries=args.max_queries, chatterbot_docs=args.chatterbot_docs, only=args.sets.split(",") if args.sets else None, **sizes)
    res["model"], res["seconds"] = args.model, round(time.perf_counter() - t0, 1)
    atomic_write_json(args.out, res, indent=2)
    print(json.dumps({k: {m: v.get(m) for m in ("ndcg_at_10", "spearman") if m in v}
                      for k, v in res.items() if isinstance(v, dict)}), file=sys.stderr)
    return 0


@_clean_errors
def run_report(args) -> int:
    from embforge.eval.report import report

    sys.stdout.write(report(args.run_dir))
    return 0
