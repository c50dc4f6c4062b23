"""`embforge train | encode | export`, and `run_training`: the trainer wired to its data and its evaluation."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from embforge.cli import one_line


def check_inputs(cfg):
    """Everything a run reads, checked before any model loads: every line of every training dataset (the
    multi-dataset sampler, embforge/data), the evaluation data, the model's files (config only). Returns the batch
    source. Errors name file:line or the config key."""
    from embforge.data.batches import ExampleBatches
    from embforge.engine.modelfiles import check_model_files

    batches = ExampleBatches(cfg.data.train, queries=cfg.batch.queries, negatives=cfg.batch.negatives, seed=cfg.seed,
                             sampling=cfg.batch.sampling, skip_bad_lines=cfg.data.skip_bad_lines)
    if cfg.loss.distill_weight > 0 and not batches.scored:
        from embforge.config import ConfigError
        raise ConfigError(f"loss.distill_weight: {cfg.loss.distill_weight} > 0 but no record of data.train carries "
                          "teacher 'scores' (write them with `embforge synth relabel` or `embforge mine --scores`)")
    if cfg.eval.data and cfg.eval.data != "chatterbot":
        from embforge.eval.beir import load_beir
        if not Path(cfg.eval.data).is_dir():
            raise ValueError(f"eval.data: {cfg.eval.data} is neither 'chatterbot' nor a BEIR folder")
        load_beir(cfg.eval.data)
    check_model_files(cfg.model.path)
    return batches


def run_training(cfg, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                 stop_after: int | None = None) -> dict:
    """`embforge train` as a function: the TrainConfig's datasets (embforge/data: the multi-dataset sampler) as the
    batch source, retrieval on cfg.eval.data (embforge/eval) as the evaluation hook, then engine.train.train.
    Returns train's result. An output_dir that holds a run needs resume (continue) or overwrite (start over)."""
    from embforge.engine.distributed import run_mode
    from embforge.engine.rundir import check_output_dir
    from embforge.engine.train import train

    resume, overwrite = run_mode(resume, overwrite)   # a worker torchrun restarted resumes (train() applies it too)
    check_output_dir(cfg.output_dir, resume=resume, overwrite=overwrite)   # read only; train() removes on overwrite
    batches = check_inputs(cfg)
    evaluate = None
    if cfg.eval.data:
        from embforge.eval.training import evaluate as evaluate_retrieval

        def evaluate(embedder, step: int, record: bool = True) -> dict:
            return evaluate_retrieval(embedder, cfg.eval.data, cfg.output_dir, step, instruction=cfg.eval.instruction,
                                      max_queries=cfg.eval.max_queries, record=record)
    return train(cfg, batches, evaluate=evaluate, resume=resume, overwrite=overwrite, progress=progress,
                 stop_after=stop_after)


def dry_run(cfg, *, resume: bool = False, overwrite: bool = False) -> str:
    """`embforge train --dry-run`: the checks of a run (config, every data line, evaluation data, model config and
    tokenizer, output_dir) without loading weights; returns the plan as text."""
    from embforge.data.plan import format_plan, training_plan
    from embforge.engine.modelfiles import load_model_files
    from embforge.engine.rundir import check_output_dir

    check_output_dir(cfg.output_dir, resume=resume, overwrite=overwrite)
    batches = check_inputs(cfg)
    hf_config, tokenizer = load_model_files(cfg.model.path)
    model = (f"{cfg.model.path} ({hf_config.model_type}, {hf_config.num_hidden_layers} layers, hidden "
             f"{hf_config.hidden_size})")
    return format_plan(training_plan(cfg, batches, tokenizer), model)


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("train", help="contrastive fine-tuning (GradCache, QLoRA) from a YAML config")
    t.add_argument("--config", required=True, help="YAML mapped onto TrainConfig (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--overwrite", action="store_true",
                   help="output_dir holds an earlier run: remove it (before anything new is written) and start over")
    t.add_argument("--dry-run", action="store_true",
                   help="check the config, every data line and the model's config/tokenizer (no weights), print "
                        "the plan (datasets, examples, steps per epoch, tokens and chunks per step) and exit")
    t.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed training lines")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes of this node: runs `torchrun --standalone --nproc_per_node=N -m "
                        "embforge train ...` (several nodes: call torchrun yourself, see docs/distributed.md)")
    t.add_argument("--max-restarts", type=int, default=None, metavar="K",
                   help="with --nproc: torchrun restarts all workers up to K times after one fails; each restart "
                        "resumes from the latest checkpoint in output_dir (set checkpoint_every)")
    t.set_defaults(func=cmd_train)

    e = subparsers.add_parser("encode", help="embed texts with a trained model")
    e.add_argument("--model", required=True, help="an embforge model folder (output_dir/final or an export)")
    e.add_argument("texts", nargs="*", help="texts to embed (or --file)")
    e.add_argument("--file", help="one text per line, or JSONL with a 'text' field")
    e.add_argument("--instruction", help="embed as queries with this task instruction")
    e.add_argument("--batch-size", type=int, default=32)
    where = e.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help=".npy (numpy.load reads it), .pt (torch.load: a tensor) or .jsonl (one JSON list "
                                     "of floats per line, in input order)")
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
        if args.max_restarts is not None and (args.nproc is None or args.max_restarts < 0):
            raise ValueError("--max-restarts needs --nproc N and a count >= 0 (under torchrun give torchrun "
                             "--max-restarts instead)")
        if args.nproc is not None:
            if args.nproc < 1:
                raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
            if launched_by_torchrun():
                raise ValueError("--nproc inside torchrun: drop one of them")
            check_launch(cfg, args.nproc)        # refuse before starting N processes
            if not args.dry_run:
                return _run_torchrun(args)
        if args.dry_run:
            print(dry_run(cfg, resume=args.resume, overwrite=args.overwrite))
            return 0
        result = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"embforge train: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    if result["main"]:   # one voice: Dist.is_main, as train decided it
        print(json.dumps({"final_loss": result["losses"][-1], "steps": len(result["losses"]),
                          "datasets": result["datasets"], "eval": result["eval"]}, indent=2))
    return 0


def _run_torchrun(args) -> int:
    """torchrun on this node; its exit status is ours (non-zero when any rank failed)."""
    import os
    import subprocess

    from embforge.engine.distributed import SEPARATE_STORE_ENV

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           *([f"--max-restarts={args.max_restarts}"] if args.max_restarts is not None else []),
           "-m", "embforge", "train", "--config", args.config]
    for item in args.set:
        cmd += ["--set", item]
    cmd += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite + ["--skip-bad-lines"] * args.skip_bad_lines
    env = dict(os.environ)
    if args.max_restarts:
        # torchrun shares its rendezvous TCPStore with the workers and does not separate one restart's keys from the
        # last: a restarted rank can read a dead peer's address and fail to connect (pytorch/pytorch#135712). One
        # store per restart, hosted by rank 0, avoids that.
        env.setdefault(SEPARATE_STORE_ENV, "1")
    print(f"embforge train: {' '.join(cmd[2:])}", file=sys.stderr)
    return subprocess.call(cmd, env=env)


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


ENCODE_FORMATS = (".npy", ".pt", ".jsonl")


def cmd_encode(args) -> int:
    import torch

    from embforge.engine import Embedder
    from embforge.engine.corpus import encode_corpus
    try:
        if args.out and not args.out.endswith(ENCODE_FORMATS):
            raise ValueError(f"--out {args.out}: give a file ending in {', '.join(ENCODE_FORMATS)}")
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
        print(f"embforge encode: error: {one_line(e)}", file=sys.stderr)
        return 2
    vecs = emb.encode(texts, instruction=args.instruction, batch_size=args.batch_size, progress=True)
    if args.out.endswith(".jsonl"):
        with open(args.out, "w") as f:
            f.writelines(json.dumps(v) + "\n" for v in vecs.tolist())
    elif args.out.endswith(".npy"):
        import numpy as np
        np.save(args.out, vecs.numpy())
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
        print(f"embforge export: error: {one_line(e)}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"exported {kind}: {path}", file=sys.stderr)
    return 0
