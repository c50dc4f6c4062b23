"""`embforge train | encode | export`, and `run_training`: the trainer wired to its data and its evaluation."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def run_training(cfg, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """`embforge train` as a function: the TrainConfig's datasets (embforge/data: the multi-dataset sampler) as the
    batch source, retrieval on cfg.eval.data (embforge/eval) as the evaluation hook, then engine.train.train.
    Returns train's result."""
    from embforge.data.batches import ExampleBatches
    from embforge.engine.train import train

    batches = ExampleBatches(cfg.data.train, queries=cfg.batch.queries, negatives=cfg.batch.negatives, seed=cfg.seed,
                             sampling=cfg.batch.sampling, skip_bad_lines=cfg.data.skip_bad_lines)
    _check_step_supports(batches.datasets)
    if cfg.loss.distill_weight > 0 and not batches.scored:
        from embforge.config import ConfigError
        raise ConfigError(f"loss.distill_weight: {cfg.loss.distill_weight} > 0 but no record of data.train carries "
                          "teacher 'scores' (write them with `embforge synth relabel` or `embforge mine --scores`)")
    evaluate = None
    if cfg.eval.data:
        from embforge.eval.training import evaluate as evaluate_retrieval

        def evaluate(embedder, step: int) -> dict:
            return evaluate_retrieval(embedder, cfg.eval.data, cfg.output_dir, step, instruction=cfg.eval.instruction,
                                      max_queries=cfg.eval.max_queries)
    return train(cfg, batches, evaluate=evaluate, resume=resume, progress=progress, stop_after=stop_after)


def _check_step_supports(datasets) -> None:
    """Refuse, before any model loads, a dataset setting the GradCache step cannot honour."""
    import inspect

    from embforge.config import ConfigError
    from embforge.engine.gradcache import contrastive_step

    off = [d.key for d in datasets if not d.in_batch_negatives]
    if off and "in_batch_negatives" not in inspect.signature(contrastive_step).parameters:
        raise ConfigError(f"{off[0]}.in_batch_negatives: false is not supported by this build: the GradCache step "
                          "(engine/gradcache.contrastive_step) has no in_batch_negatives option yet")


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("train", help="contrastive fine-tuning (GradCache, QLoRA) from a YAML config")
    t.add_argument("--config", required=True, help="YAML mapped onto TrainConfig (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed training lines")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes of this node: runs `torchrun --standalone --nproc_per_node=N -m "
                        "embforge train ...` (several nodes: call torchrun yourself, see docs/distributed.md)")
    t.set_defaults(func=cmd_train)

    e = subparsers.add_parser("encode", help="embed texts with a trained model")
    e.add_argument("--model", required=True, help="an embforge model folder (output_dir/final or an export)")
    e.add_argument("texts", nargs="*", help="texts to embed (or --file)")
    e.add_argument("--file", help="one text per line, or JSONL with a 'text' field")
    e.add_argument("--instruction", help="embed as queries with this task instruction")
    e.add_argument("--batch-size", type=int, default=32)
    where = e.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help=".pt (tensor) or .jsonl (one embedding per line)")
    where.add_argument("--out-dir", help="a corpus: shards + manifest.json, resumable (rerun the same command after "
                                         "an interruption; finished shards are kept)")
    e.add_argument("--shard-size", type=int, default=4096, help="with --out-dir: texts per shard")
    e.add_argument("--token-budget", type=int, default=16384,
                   help="with --out-dir: tokens per batch (real tokens when packed, else batch x longest)")
    e.set_defaults(func=cmd_encode)

    x = subparsers.add_parser("export", help="write adapter (+ merged model, + sentence-transformers folder)")
    x.add_argument("--model", required=True, help="output_dir/final of a run (or an earlier export)")
    x.add_argument("--out", required=True)
    x.add_argument("--merge", action="store_true", help="also write OUT/merged: the base with LoRA merged in")
    x.add_argument("--sentence-transformers", action="store_true",
                   help="also write OUT/sentence-transformers: SentenceTransformer(path).encode_query / "
                        "encode_document reproduce embforge encode")
    x.add_argument("--instruction", default=None,
                   help="task instruction baked into the sentence-transformers 'query' prompt "
                        "(default: a generic web-search retrieval instruction)")
    x.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the merged weights (auto: float32; the base is never exported 4-bit)")
    x.set_defaults(func=cmd_export)


def cmd_train(args) -> int:
    from embforge.config import ConfigError, load_config
    from embforge.data.records import DataError
    from embforge.engine.distributed import check_launch, launched_by_torchrun
    from embforge.engine.train import TrainConfig

    overrides = list(args.set) + (["data.skip_bad_lines=true"] if args.skip_bad_lines else [])
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        if args.nproc is not None:
            if args.nproc < 1:
                raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
            if launched_by_torchrun():
                raise ValueError("--nproc inside torchrun: drop one of them")
            check_launch(cfg, args.nproc)        # refuse before starting N processes
            return _run_torchrun(args)
        result = run_training(cfg, resume=args.resume)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"embforge train: error: {e}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    if result["main"]:   # one voice: Dist.is_main, as train decided it
        print(json.dumps({"final_loss": result["losses"][-1], "steps": len(result["losses"]),
                          "datasets": result["datasets"], "eval": result["eval"]}, indent=2))
    return 0


def _run_torchrun(args) -> int:
    """torchrun on this node; its exit status is ours (non-zero when any rank failed)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "embforge", "train", "--config", args.config]
    for item in args.set:
        cmd += ["--set", item]
    cmd += ["--resume"] * args.resume + ["--skip-bad-lines"] * args.skip_bad_lines
    print(f"embforge train: {' '.join(cmd[2:])}", file=sys.stderr)
    return subprocess.call(cmd)


def _leave_process_group():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _read_texts(args, ids: list | None = None) -> list[str]:
    """Texts from the command line and --file; `ids` (if given) receives each text's id: a JSONL line's `_id` or
    `id`, else its position."""
    texts = list(args.texts)
    if args.file and args.file.endswith(".jsonl"):
        from embforge.common import read_jsonl
        for n, rec in read_jsonl(args.file):
            if not isinstance(rec.get("text"), str):
                raise ValueError(f"{args.file}:{n}: missing field 'text'")
            if ids is not None:
                ids.append(str(rec.get("_id", rec.get("id", len(texts)))))
            texts.append(rec["text"])
    elif args.file:
        texts += [line for line in Path(args.file).read_text().splitlines() if line.strip()]
    if ids is not None and len(ids) < len(texts):
        ids[:0] = [str(i) for i in range(len(texts) - len(ids))]   # positional texts, or a plain text file
    if not texts:
        raise ValueError("no texts given (positional texts or --file)")
    return texts


def cmd_encode(args) -> int:
    import torch

    from embforge.engine import Embedder
    from embforge.engine.corpus import encode_corpus
    try:
        ids = [] if args.out_dir else None
        texts = _read_texts(args, ids)
        emb = Embedder.from_pretrained(args.model)
        if args.out_dir:
            done = encode_corpus(emb, texts, args.out_dir, ids=ids, instruction=args.instruction,
                                 shard_size=args.shard_size, token_budget=args.token_budget)
            print(f"{args.out_dir}: {done['n']} embeddings of dim {done['dim']} in {len(done['shards'])} shards "
                  f"({done['encoded_now']} encoded now, the rest kept from before)", file=sys.stderr)
            return 0
    except (ValueError, FileNotFoundError) as e:   # CorpusError is a ValueError
        print(f"embforge encode: error: {e}", file=sys.stderr)
        return 2
    vecs = emb.encode(texts, instruction=args.instruction, batch_size=args.batch_size, progress=True)
    if args.out.endswith(".jsonl"):
        with open(args.out, "w") as f:
            for t, v in zip(texts, vecs.tolist()):
                f.write(json.dumps({"text": t, "embedding": v}) + "\n")
    else:
        torch.save(vecs, args.out)
    print(f"wrote {len(texts)} embeddings of dim {vecs.shape[1]} to {args.out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from embforge.engine.export import DEFAULT_EXPORT_INSTRUCTION, ExportError, export
    try:
        written = export(args.model, args.out, merge=args.merge, sentence_transformers=args.sentence_transformers,
                         instruction=args.instruction or DEFAULT_EXPORT_INSTRUCTION, dtype=args.dtype)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"embforge export: error: {e}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"exported {kind}: {path}", file=sys.stderr)
    return 0
