"""BEIR-format retrieval data: `corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`.

Every parse error names the file, the line and the field, so a broken row in a million-line corpus can be found.
Nothing is silently dropped: qrels that point at unknown ids are an error, not a skipped row.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from embforge.common import read_jsonl


class BeirFormatError(ValueError):
    """A BEIR file is malformed; the message starts with `file:line:`."""


@dataclass
class BeirDataset:
    """An in-memory BEIR split.

    `corpus` maps doc id -> text (title and body joined, as sentence-transformers and mteb do);
    `queries` maps query id -> text; `instructions` holds a per-query instruction when queries.jsonl
    carries one (the synthetic held-out set does); `qrels` maps query id -> {doc id: relevance}.
    """

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    instructions: dict[str, str] = field(default_factory=dict)
    name: str = "beir"
    split: str = "test"


def _read_jsonl(path: Path):
    """(line_no, dict) for each non-blank line; BeirFormatError names file:line on bad JSON."""
    return read_jsonl(path, error=BeirFormatError)


def _field(row: dict, key: str, path: Path, line_no: int, *, required: bool = True) -> str:
    if key not in row:
        if required:
            raise BeirFormatError(f"{path}:{line_no}: missing field '{key}'")
        return ""
    value = row[key]
    if value is None and not required:
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise BeirFormatError(f"{path}:{line_no}: field '{key}' must be a string, got {type(value).__name__}")
    return str(value)


def load_corpus(path: str | Path) -> dict[str, str]:
    path = Path(path)
    corpus: dict[str, str] = {}
    for line_no, row in _read_jsonl(path):
        doc_id = _field(row, "_id", path, line_no)
        if doc_id in corpus:
            raise BeirFormatError(f"{path}:{line_no}: duplicate '_id' {doc_id!r}")
        title = _field(row, "title", path, line_no, required=False)
        text = _field(row, "text", path, line_no)
        corpus[doc_id] = f"{title} {text}".strip() if title else text
    if not corpus:
        raise BeirFormatError(f"{path}: corpus is empty")
    return corpus


def load_queries(path: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Return (queries, per-query instructions)."""
    path = Path(path)
    queries: dict[str, str] = {}
    instructions: dict[str, str] = {}
    for line_no, row in _read_jsonl(path):
        qid = _field(row, "_id", path, line_no)
        if qid in queries:
            raise BeirFormatError(f"{path}:{line_no}: duplicate '_id' {qid!r}")
        queries[qid] = _field(row, "text", path, line_no)
        instruction = _field(row, "instruction", path, line_no, required=False)
        if instruction:
            instructions[qid] = instruction
    return queries, instructions


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Read a `query-id  corpus-id  score` TSV; the header row is optional."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, cols in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not cols or all(not c.strip() for c in cols):
                continue
            if line_no == 1 and cols[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(cols) < 3:
                raise BeirFormatError(f"{path}:{line_no}: expected 3 tab-separated columns "
                                      f"(query-id, corpus-id, score), got {len(cols)}")
            qid, doc_id, score = cols[0].strip(), cols[1].strip(), cols[2].strip()
            try:
                rel = int(float(score))
            except ValueError:
                raise BeirFormatError(f"{path}:{line_no}: field 'score' is not a number: {score!r}") from None
            qrels.setdefault(qid, {})[doc_id] = rel
    if not qrels:
        raise BeirFormatError(f"{path}: no relevance judgements")
    return qrels


def _check_qrels(qrels, queries, corpus, path: Path) -> None:
    # Report the first few dangling ids with their source so the user can fix the files, not guess.
    missing_q = [q for q in qrels if q not in queries]
    if missing_q:
        raise BeirFormatError(f"{path}: {len(missing_q)} query id(s) not in queries.jsonl, e.g. {missing_q[:3]}")
    missing_d = sorted({d for rels in qrels.values() for d in rels if d not in corpus})
    if missing_d:
        raise BeirFormatError(f"{path}: {len(missing_d)} corpus id(s) not in corpus.jsonl, e.g. {missing_d[:3]}")


def load_beir(data_dir: str | Path, split: str = "test") -> BeirDataset:
    """Load a BEIR folder; raises BeirFormatError (file:line: field) on any malformed row."""
    data_dir = Path(data_dir)
    paths = {"corpus": data_dir / "corpus.jsonl", "queries": data_dir / "queries.jsonl",
             "qrels": data_dir / "qrels" / f"{split}.tsv"}
    for what, p in paths.items():
        if not p.is_file():
            have = sorted(x.stem for x in (data_dir / "qrels").glob("*.tsv")) if what == "qrels" else None
            hint = f" (available splits: {have})" if have else ""
            raise FileNotFoundError(f"{p}: BEIR {what} file not found{hint}")
    corpus = load_corpus(paths["corpus"])
    queries, instructions = load_queries(paths["queries"])
    qrels = load_qrels(paths["qrels"])
    _check_qrels(qrels, queries, corpus, paths["qrels"])
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels, instructions=instructions,
                       name=data_dir.name, split=split)


def write_beir(ds: BeirDataset, out_dir: str | Path) -> Path:
    """Write `ds` as a BEIR folder (titles are not split back out: the text is already joined)."""
    out_dir = Path(out_dir)
    (out_dir / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc_id, text in ds.corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": "", "text": text}, ensure_ascii=False) + "\n")
    with open(out_dir / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid, text in ds.queries.items():
            row = {"_id": qid, "text": text}
            if qid in ds.instructions:
                row["instruction"] = ds.instructions[qid]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(out_dir / "qrels" / f"{ds.split}.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, rels in ds.qrels.items():
            for doc_id, rel in rels.items():
                f.write(f"{qid}\t{doc_id}\t{rel}\n")
    return out_dir
