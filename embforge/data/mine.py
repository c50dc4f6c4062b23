"""Hard-negative mining (`embforge mine`; its flags live in embforge/cli/data.py): hard negatives for
(instruction, query, positive[, negatives]) JSONL records.

For each record: encode the query (with its instruction, as at training time), search the corpus exactly (our
streaming top-k, embforge/engine/search.py), and keep candidates from a rank window after three filters:

1. the positive itself (same text);
2. exact or near duplicates of the positive (case/space-folded text equal, or word-set Jaccard >= `near_dup`);
3. likely false negatives: candidate score >= `margin` x the positive's score (NV-Retriever's positive-aware
   "TopK-PercPos" rule; a relative margin works across models whose score scales differ);

then the rank window (1-based ranks in the raw retrieval list, `rank_start`..`rank_end` inclusive; the very top is
skipped because it holds most unlabelled positives) and the first `negatives` survivors are written.

Teacher scores (`scores=True`, `embforge mine --scores`): each written record gets `"scores": [positive, negative 1,
...]`, the encoder's cosine of the query with each of them, in the order written (docs/train.md: distillation). A
record's old "scores" are kept only if its negatives came out unchanged; otherwise they would no longer line up with
the negatives (the reader refuses that), so they are dropped (counted in the report) unless --scores rewrites them.

Resumable: queries are processed in shards; corpus embeddings and finished shards are kept under `<out>.parts/`
together with a fingerprint of the inputs and settings, so a rerun after an interruption skips finished work and a
rerun with other inputs starts over. The output is written to a temporary file and renamed (atomic); input fields
other than `negatives` are copied unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from embforge.common import atomic_write_bytes, atomic_write_text, open_atomic, read_jsonl
from embforge.data.records import read_records
from embforge.engine.search import search_chunks

FILTERS = ("positive", "duplicate", "margin", "above_window")


@dataclass
class MineConfig:
    rank_start: int = 10         # first rank (1-based) a negative may come from
    rank_end: int = 100          # last rank considered (the search depth)
    negatives: int = 7           # negatives written per record
    margin: float = 0.95         # drop candidates scoring >= margin * positive score
    near_dup: float = 0.9        # drop candidates whose word-set Jaccard with the positive is >= this
    mode: str = "replace"        # replace | append (keep the record's own negatives first)
    # A record left with fewer mined negatives than asked: "keep" its own negatives (after the mined ones; never
    # fewer than it had), or "fail" (nothing written, exit non-zero). Replacing a record's negatives with fewer
    # mined ones would silently delete data the user had.
    on_short: str = "keep"
    shard_size: int = 2048       # queries per resumable shard
    corpus_shard: int = 8192     # documents per cached corpus-embedding shard
    batch_size: int = 32
    scores: bool = False         # write the encoder's cosines of [positive, *negatives] as teacher scores

    def validate(self):
        if not 1 <= self.rank_start <= self.rank_end:
            raise ValueError(f"rank window must satisfy 1 <= start <= end, got {self.rank_start}-{self.rank_end}")
        if self.negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {self.negatives}")
        if not 0.0 < self.margin:
            raise ValueError(f"margin must be > 0, got {self.margin}")
        if not 0.0 < self.near_dup <= 1.0:
            raise ValueError(f"near_dup must lie in (0, 1], got {self.near_dup}")
        if self.mode not in ("replace", "append"):
            raise ValueError(f"mode must be replace or append, got {self.mode!r}")
        if self.on_short not in ("keep", "fail"):
            raise ValueError(f"on_short must be keep or fail, got {self.on_short!r}")
        for name in ("shard_size", "corpus_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def is_near_duplicate(a: str, b: str, threshold: float) -> bool:
    """Exact after case/whitespace folding, or word-set Jaccard >= threshold."""
    if _fold(a) == _fold(b):
        return True
    wa, wb = _words(a), _words(b)
    if not wa or not wb:
        return False
    return len(wa & wb) / len(wa | wb) >= threshold


def read_corpus(path: str | Path | None, records: list[tuple[int, dict]]) -> list[str]:
    """Corpus texts: a BEIR folder or corpus JSONL (`_id`, `text`, optional `title`), a JSONL of {"text"}, or
    (path None) the records' own positives and negatives, deduplicated in first-seen order."""
    if path is None:
        seen: dict[str, None] = {}
        for _, rec in records:
            for text in [rec["positive"], *rec["negatives"]]:
                seen.setdefault(text, None)
        return list(seen)
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus file not found")
    texts, seen = [], set()
    for line_no, row in read_jsonl(path):   # file:line errors for bad JSON / non-objects
        if not isinstance(row.get("text"), str):
            raise ValueError(f"{path}:{line_no}: field 'text' must be a string")
        title = row.get("title")
        text = f"{title} {row['text']}".strip() if isinstance(title, str) and title else row["text"]
        if text.strip() and text not in seen:   # duplicates would fill the window with one text
            seen.add(text)
            texts.append(text)
    if not texts:
        raise ValueError(f"{path}: corpus is empty")
    return texts


def select_negatives(positive: str, pos_score: float, cand_texts: list[str], cand_scores: list[float],
                     cfg: MineConfig, counts: dict[str, int]) -> list[str]:
    """Apply the filters to one query's ranked candidates (best first); `counts` gains what each filter removed."""
    kept = []
    for rank, (text, score) in enumerate(zip(cand_texts, cand_scores), 1):
        counts["retrieved"] += 1
        if text == positive:
            counts["positive"] += 1
        elif is_near_duplicate(text, positive, cfg.near_dup):
            counts["duplicate"] += 1
        elif score >= cfg.margin * pos_score:
            counts["margin"] += 1
        elif rank < cfg.rank_start:
            counts["above_window"] += 1
        elif len(kept) >= cfg.negatives:
            counts["surplus"] += 1
        else:
            kept.append(text)
    return kept


def _encode_queries(encoder, recs: list[dict], batch_size: int) -> torch.Tensor:
    """Queries grouped by instruction: one encode call per distinct instruction."""
    groups: dict[str | None, list[int]] = {}
    for i, rec in enumerate(recs):
        groups.setdefault(rec.get("instruction") or None, []).append(i)
    out = None
    for inst, rows in groups.items():
        emb = encoder.encode([recs[i]["query"] for i in rows], instruction=inst, batch_size=batch_size)
        out = emb.new_empty((len(recs), emb.shape[1])) if out is None else out
        out[rows] = emb.float()
    return out


def _doc_embeddings(encoder, texts: list[str], row_of: dict[str, int], corpus_files: list[Path],
                    cfg: MineConfig) -> torch.Tensor:
    """Document embeddings of `texts`: read back from the cached corpus when the text is there (the default corpus
    holds every positive and negative), encoded otherwise."""
    rows = [row_of.get(t) for t in texts]
    missing = [i for i, row in enumerate(rows) if row is None]
    out = None
    if missing:
        emb = encoder.encode([texts[i] for i in missing], instruction=None, batch_size=cfg.batch_size)
        out = emb.new_zeros((len(texts), emb.shape[1])).float()
        out[missing] = emb.float()
    for s, f in enumerate(corpus_files):
        lo, hi = s * cfg.corpus_shard, (s + 1) * cfg.corpus_shard
        want = [(i, row - lo) for i, row in enumerate(rows) if row is not None and lo <= row < hi]
        if want:
            shard = torch.load(f)
            out = shard.new_zeros((len(texts), shard.shape[1])) if out is None else out
            out[[i for i, _ in want]] = shard[[r for _, r in want]]
    return out


def _kept_own(rec: dict, mined: list[str], cfg: MineConfig) -> bool:
    """Replace mode found fewer negatives than asked: the record keeps its own after the mined ones (on_short keep;
    on_short fail stops before anything is written)."""
    return cfg.mode == "replace" and len(mined) < cfg.negatives and bool(rec["negatives"])


def _final_negatives(rec: dict, mined: list[str], cfg: MineConfig) -> list[str]:
    if cfg.mode != "replace":
        return list(dict.fromkeys([*rec["negatives"], *mined]))
    return list(dict.fromkeys([*mined, *rec["negatives"]])) if _kept_own(rec, mined, cfg) else mined


def _teacher_scores(encoder, q: torch.Tensor, recs: list[dict], negs: list[list[str]], row_of, corpus_files,
                    cfg: MineConfig) -> list[list[float]]:
    """Per record: the cosine of its query with its positive and each written negative (the encoder's rows are
    normalized, so a dot product)."""
    groups = [[r["positive"], *_final_negatives(r, n, cfg)] for r, n in zip(recs, negs)]
    emb = _doc_embeddings(encoder, [t for g in groups for t in g], row_of, corpus_files, cfg)
    out, k = [], 0
    for i, g in enumerate(groups):
        out.append((emb[k:k + len(g)] @ q[i]).tolist())
        k += len(g)
    return out


def _fingerprint(data: Path, corpus: str | None, model: str, cfg: MineConfig) -> str:
    parts = [str(data.resolve()), str(data.stat().st_size), str(data.stat().st_mtime_ns), str(corpus),
             str(model), json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k != "on_short"},
                                    sort_keys=True)]
    if corpus and Path(corpus).exists():
        c = Path(corpus) / "corpus.jsonl" if Path(corpus).is_dir() else Path(corpus)
        parts += [str(c.stat().st_size), str(c.stat().st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def mine(data: str | Path, out: str | Path, encoder, *, corpus: str | Path | None = None,
         cfg: MineConfig | None = None, model_name: str = "encoder", progress: bool = True,
         stop_after_shards: int | None = None) -> dict:
    """Mine negatives for every record of `data` into `out`; returns the report (also written to
    `<out>.report.json`). `encoder.encode(texts, instruction=None, batch_size=...)` gives normalized rows.
    `stop_after_shards` simulates an interruption (tests)."""
    from tqdm import tqdm

    cfg = cfg or MineConfig()
    cfg.validate()
    data, out = Path(data), Path(out)
    records = read_records(data)   # validates every record with file:line errors
    if not records:
        raise ValueError(f"{data}: no records")
    texts = read_corpus(corpus, records)
    parts = out.with_name(out.name + ".parts")
    fp = _fingerprint(data, None if corpus is None else str(corpus), model_name, cfg)
    state_file = parts / "state.json"
    if state_file.exists() and json.loads(state_file.read_text()).get("fingerprint") != fp:
        print(f"[mine] {parts}: left by a run with other inputs or settings; starting over", file=sys.stderr)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_file, json.dumps({"fingerprint": fp, "data": str(data), "corpus": str(corpus),
                                          "model": model_name, "config": dataclasses.asdict(cfg)}))

    # Corpus embeddings, cached per shard (the expensive part on a large corpus).
    corpus_files = []
    bar = tqdm(total=len(texts), desc="mine: encode corpus", unit="doc", file=sys.stderr, disable=not progress)
    for i, start in enumerate(range(0, len(texts), cfg.corpus_shard)):
        f = parts / f"corpus-{i:05d}.pt"
        chunk = texts[start:start + cfg.corpus_shard]
        if not f.exists():
            pieces = []
            for j in range(0, len(chunk), 512):   # small encode calls: the progress bar moves
                pieces.append(encoder.encode(chunk[j:j + 512], instruction=None, batch_size=cfg.batch_size).float())
                bar.update(len(pieces[-1]))
            buf = io.BytesIO()
            torch.save(torch.cat(pieces), buf)
            atomic_write_bytes(f, buf.getvalue())
        else:
            bar.update(len(chunk))
        corpus_files.append(f)
    bar.close()

    depth = min(cfg.rank_end, len(texts))
    row_of = {t: i for i, t in enumerate(texts)}
    n_shards = (len(records) + cfg.shard_size - 1) // cfg.shard_size
    bar = tqdm(total=len(records), desc="mine: queries", unit="query", file=sys.stderr, disable=not progress)
    for s in range(n_shards):
        shard = records[s * cfg.shard_size:(s + 1) * cfg.shard_size]
        f = parts / f"shard-{s:05d}.json"
        if not f.exists():
            if stop_after_shards is not None and s >= stop_after_shards:
                bar.close()
                return {"stopped_after_shards": s}
            recs = [r for _, r in shard]
            q = _encode_queries(encoder, recs, cfg.batch_size)
            positives = _doc_embeddings(encoder, [r["positive"] for r in recs], row_of, corpus_files, cfg)
            pos_scores = (q * positives).sum(-1).tolist()
            scores, idx = search_chunks(q, (torch.load(c) for c in corpus_files), depth)
            counts = dict.fromkeys(("retrieved", *FILTERS, "surplus"), 0)
            negs = [select_negatives(r["positive"], ps, [texts[j] for j in irow], srow, cfg, counts)
                    for r, ps, srow, irow in zip(recs, pos_scores, scores.tolist(), idx.tolist())]
            teacher = _teacher_scores(encoder, q, recs, negs, row_of, corpus_files, cfg) if cfg.scores else None
            atomic_write_text(f, json.dumps({"negatives": negs, "counts": counts, "scores": teacher,
                                         "short": sum(len(n) < cfg.negatives for n in negs)}))
        bar.update(len(shard))
    bar.close()

    short = _short_records(parts, n_shards, records, cfg)
    if short and cfg.on_short == "fail":
        line, rec, got = short[0]
        raise ShortError(f"{data}:{line}: {got} negative(s) mined, {cfg.negatives} asked ({len(short)} of "
                         f"{len(records)} records short; a {len(texts)}-text corpus and ranks {cfg.rank_start}-"
                         f"{cfg.rank_end} leave too few candidates); nothing written. Widen --ranks, give a larger "
                         "--corpus, or --on-short keep (keeps the records' own negatives)")

    # Assemble: every record with its mined negatives, then one rename.
    report = {"records": len(records), "corpus": len(texts), "rank_window": [cfg.rank_start, cfg.rank_end],
              "margin": cfg.margin, "near_dup": cfg.near_dup, "model": model_name,
              "removed": dict.fromkeys(FILTERS, 0), "retrieved": 0, "surplus": 0, "written": 0, "short": 0,
              "scored": 0, "scores_dropped": 0, "kept_own": 0}
    with open_atomic(out) as fo:
        for s in range(n_shards):
            shard_out = json.loads((parts / f"shard-{s:05d}.json").read_text())
            for k, v in shard_out["counts"].items():
                if k in FILTERS:
                    report["removed"][k] += v
                else:
                    report[k] += v
            report["short"] += shard_out["short"]
            teacher = shard_out.get("scores") or [None] * len(shard_out["negatives"])
            for (_, rec), mined, scores in zip(records[s * cfg.shard_size:(s + 1) * cfg.shard_size],
                                               shard_out["negatives"], teacher):
                negs = _final_negatives(rec, mined, cfg)
                report["kept_own"] += _kept_own(rec, mined, cfg)
                report["written"] += len(negs)
                new = {**rec, "negatives": negs}
                if scores is not None:
                    new["scores"] = scores
                    report["scored"] += 1
                elif rec.get("scores") is not None and negs != rec["negatives"]:
                    del new["scores"]         # they scored the old negatives
                    report["scores_dropped"] += 1
                fo.write(json.dumps(new, ensure_ascii=False) + "\n")
    atomic_write_text(out.with_name(out.name + ".report.json"), json.dumps(report, indent=2))
    shutil.rmtree(parts)
    return report


class ShortError(ValueError):
    """mine --on-short fail: some records would get fewer negatives than asked; the message names the first."""


def _short_records(parts: Path, n_shards: int, records: list, cfg: MineConfig) -> list[tuple[int, dict, int]]:
    """(line, record, negatives mined) of every record that got fewer than cfg.negatives."""
    out = []
    for s in range(n_shards):
        mined = json.loads((parts / f"shard-{s:05d}.json").read_text())["negatives"]
        for (line, rec), negs in zip(records[s * cfg.shard_size:(s + 1) * cfg.shard_size], mined):
            if len(negs) < cfg.negatives:
                out.append((line, rec, len(negs)))
    return out


def format_report(r: dict) -> str:
    lines = [f"mined {r['records']} records against {r['corpus']} documents (ranks {r['rank_window'][0]}-"
             f"{r['rank_window'][1]}, margin {r['margin']}, near-dup Jaccard {r['near_dup']})",
             f"  candidates retrieved: {r['retrieved']}"]
    lines += [f"  removed by {name}: {n}" for name, n in r["removed"].items()]
    lines += [f"  beyond the per-record count: {r['surplus']}",
              f"  negatives written: {r['written']} ({r['short']} records got fewer than asked)"]
    if r.get("scored"):
        lines.append(f"  teacher scores (the encoder's cosines) written for {r['scored']} records")
    if r.get("scores_dropped"):
        lines.append(f"  old teacher scores dropped from {r['scores_dropped']} records (their negatives changed; "
                     "--scores writes new ones)")
    if r.get("kept_own"):
        lines.append(f"  records that kept their own negatives (too few mined): {r['kept_own']}")
    return "\n".join(lines)
