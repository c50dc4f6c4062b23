"""`embforge data build-demo` and `embforge mine`: training data preparation (library: embforge/data/)."""
from __future__ import annotations

import sys
from pathlib import Path

from embforge.cli import one_line
from embforge.cli.cached import cache_flags, report_cache, with_cache
from embforge.data.mine import MineConfig


def add_parser(subparsers) -> None:
    m = subparsers.add_parser("mine", help="mine hard negatives for training JSONL (rank window + margin filter)")
    m.add_argument("--data", required=True, nargs="+", metavar="DATA",
                   help="JSONL of {instruction, query, positive[, negatives]}; several files or a directory of "
                        "*.jsonl: one dataset each, mined separately into OUT/<name>.jsonl")
    m.add_argument("--out", required=True, help="output JSONL (may equal --data: written atomically); a directory "
                                                "when --data names several files or a directory")
    m.add_argument("--model", required=True,
                   help="an embforge model folder, a sentence-transformers folder, 'minilm' or 'hashing'")
    m.add_argument("--corpus", default=None, help="BEIR folder or corpus JSONL (default: the data's own texts)")
    d = MineConfig()
    m.add_argument("--ranks", default=f"{d.rank_start}-{d.rank_end}", help="rank window START-END (1-based)")
    m.add_argument("--negatives", type=int, default=d.negatives, help="negatives per record")
    m.add_argument("--margin", type=float, default=d.margin, help="drop candidates >= MARGIN x positive score")
    m.add_argument("--near-dup", type=float, default=d.near_dup, help="word Jaccard that counts as a duplicate")
    m.add_argument("--mode", choices=("replace", "append"), default=d.mode)
    m.add_argument("--on-short", choices=("keep", "fail"), default=d.on_short,
                   help="a record that gets fewer mined negatives than --negatives: keep its own negatives after "
                        "the mined ones (default), or fail (exit 1, nothing written)")
    m.add_argument("--shard-size", type=int, default=d.shard_size, help="queries per resumable shard")
    m.add_argument("--batch-size", type=int, default=d.batch_size)
    m.add_argument("--scores", action="store_true",
                   help="also write each record's teacher scores: the encoder's cosines of the query with the "
                        "positive and each negative (\"scores\": [positive, negative 1, ...]; loss.distill_weight)")
    m.add_argument("--max-seq-length", type=int, default=None,
                   help="truncate texts to N tokens for mining (match the training's max lengths; faster)")
    cache_flags(m)
    m.set_defaults(func=cmd_mine)

    dp = subparsers.add_parser("data", help="build training data (the demo's offline sources)",
                              description="Build training JSONL from real offline text (docs/data.md).")
    dsub = dp.add_subparsers(dest="data_command", metavar="<action>")
    dp.set_defaults(func=lambda args: (dp.print_help(), 2)[1])
    b = dsub.add_parser("build-demo", help="the CPU demo's training JSONL: Python docs, FOLDOC, Jargon File, "
                                           "manual pages, Debian package descriptions")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-dir", help="one JSONL per source, OUT_DIR/<source>.jsonl: the datasets of a mixture "
                                         "(docs/train.md)")
    where.add_argument("--out", help="one JSONL of every source shuffled together (written atomically)")
    b.add_argument("--cap-per-source", type=int, default=None, help="at most N records from each source")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--sources", nargs="+", default=None, metavar="SOURCE",
                   help="subset of the sources (default: all of them)")
    b.set_defaults(func=cmd_build_demo)


def _truncate(encoder, n: int):
    if n < 2:
        raise ValueError(f"--max-seq-length must be >= 2, got {n}")
    if hasattr(encoder, "model") and hasattr(encoder.model, "max_seq_length"):       # sentence-transformers
        encoder.model.max_seq_length = n
    elif hasattr(encoder, "config") and hasattr(encoder.config, "doc_max_length"):   # embforge Embedder
        encoder.config.query_max_length = encoder.config.doc_max_length = n
    else:
        raise ValueError(f"--max-seq-length: {type(encoder).__name__} has no max length to set")


def cmd_mine(args) -> int:
    from embforge.data.mine import ShortError, format_report, mine
    from embforge.eval.encoders import load_encoder
    try:
        start, _, end = args.ranks.partition("-")
        cfg = MineConfig(rank_start=int(start), rank_end=int(end or start), negatives=args.negatives,
                         margin=args.margin, near_dup=args.near_dup, mode=args.mode, on_short=args.on_short,
                         shard_size=args.shard_size, batch_size=args.batch_size, scores=args.scores)
        cfg.validate()
        jobs = _mine_jobs(args.data, args.out)
        encoder = load_encoder(args.model)
        if args.max_seq_length:
            _truncate(encoder, args.max_seq_length)
        encoder = with_cache(encoder, args)    # after truncation: the max length is part of the fingerprint
        for data, out in jobs:
            # each dataset against its own texts (unless --corpus): its negatives come from its own task
            report = mine(data, out, encoder, corpus=args.corpus, cfg=cfg, model_name=args.model)
            print((f"{data} -> {out}: " if len(jobs) > 1 else "") + format_report(report), file=sys.stderr)
        report_cache(encoder)
    except ShortError as e:
        print(f"embforge mine: error: {one_line(e)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"embforge mine: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _mine_jobs(data: list[str], out: str) -> list[tuple[Path, Path]]:
    """(input, output) pairs: one file -> OUT as given; several files or a directory -> OUT/<stem>.jsonl each."""
    if len(data) == 1 and not Path(data[0]).is_dir():
        return [(Path(data[0]), Path(out))]
    files = []
    for d in map(Path, data):
        if d.is_dir():
            found = sorted(d.glob("*.jsonl"))
            if not found:
                raise FileNotFoundError(f"--data {d}: no *.jsonl files in this directory")
            files += found
        elif not d.exists():
            raise FileNotFoundError(f"--data {d}: not found")
        else:
            files.append(d)
    stems = [f.stem for f in files]
    clash = next((s for s in stems if stems.count(s) > 1), None)
    if clash:
        raise ValueError(f"--data: two inputs are named {clash}.jsonl; their outputs would be the same file")
    if Path(out).is_file():
        raise ValueError(f"--out {out}: with several datasets --out is a directory, and this is a file")
    return [(f, Path(out) / f"{f.stem}.jsonl") for f in files]


def cmd_build_demo(args) -> int:
    from embforge.data.sources import SOURCES, build, build_per_source

    unknown = sorted(set(args.sources or ()) - set(SOURCES))
    if unknown:
        print(f"embforge data build-demo: error: unknown source {unknown[0]!r} (known: {', '.join(SOURCES)})",
              file=sys.stderr)
        return 2
    if args.cap_per_source is not None and args.cap_per_source < 1:
        print(f"embforge data build-demo: error: --cap-per-source must be >= 1, got {args.cap_per_source}",
              file=sys.stderr)
        return 2
    kw = dict(seed=args.seed, sources=tuple(args.sources or SOURCES), cap_per_source=args.cap_per_source)
    if args.out_dir:
        counts = build_per_source(args.out_dir, **kw)
        for name, n in counts.items():
            print(f"{Path(args.out_dir) / name}.jsonl: {n} examples")
        return 0
    n = build(args.out, **kw)
    print(f"{n} examples")
    return 0
