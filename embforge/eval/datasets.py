"""Offline evaluation sets built at run time (never committed).

- `chatterbot_beir`: chatterbot-corpus English question -> answer pairs as a BEIR split. Each conversation's
  first line is the query and its second line the relevant answer; a question asked in several
  conversations has all of their answers as relevant documents, and an answer shared by questions is one doc.
- `synthetic_beir`: a deterministic held-out slice of synthetic JSONL ({"instruction", "query", "positive",
  "negatives", ...}) as a BEIR split with per-query instructions; `is_heldout` lets the trainer skip the
  same records.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from .beir import BeirDataset, write_beir

# embforge's own wording (not from the E5 table, which has no chatterbot task).
CHATTERBOT_INSTRUCTION = "Given a question or remark in a conversation, retrieve the reply that answers it"


class SyntheticFormatError(ValueError):
    """A synthetic JSONL record is malformed; the message starts with `file:line:`."""


def chatterbot_dir() -> Path:
    """English data folder of the installed chatterbot-corpus package (located without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package chatterbot-corpus is not installed (pip install chatterbot-corpus)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: chatterbot-corpus has no English data folder")
    return path


def chatterbot_pairs(data_dir: str | Path | None = None) -> list[tuple[str, str, str]]:
    """(question, answer, source file) for every conversation, in file order, exact duplicates removed."""
    import yaml

    data_dir = Path(data_dir) if data_dir else chatterbot_dir()
    files = sorted(data_dir.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"{data_dir}: no .yml files")
    seen, pairs = set(), []
    for path in files:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({e})") from None
        convs = (doc or {}).get("conversations")
        if not isinstance(convs, list):
            raise ValueError(f"{path}: missing 'conversations' list")
        for i, conv in enumerate(convs):
            if not isinstance(conv, list) or len(conv) < 2:
                # The shipped corpus has such entries (trivia.yml holds a bare string): say so, keep going.
                warnings.warn(f"{path}: conversations[{i}] is not a [question, answer, ...] list; skipped: "
                              f"{str(conv)[:80]!r}", stacklevel=2)
                continue
            q, a = str(conv[0]).strip(), str(conv[1]).strip()
            if q and a and (q, a) not in seen:
                seen.add((q, a))
                pairs.append((q, a, path.name))
    return pairs


def chatterbot_beir(out_dir: str | Path | None = None, *, data_dir: str | Path | None = None,
                    instruction: str | None = None, split: str = "test") -> BeirDataset:
    """BEIR split from chatterbot-corpus English; written to `out_dir` when given.

    `instruction` (e.g. CHATTERBOT_INSTRUCTION) is stored per query, so it travels with the written files.
    """
    corpus: dict[str, str] = {}
    doc_of: dict[str, str] = {}
    queries: dict[str, str] = {}
    qid_of: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for q, a, _src in chatterbot_pairs(data_dir):
        if a not in doc_of:
            doc_of[a] = f"d{len(doc_of)}"
            corpus[doc_of[a]] = a
        if q not in qid_of:
            qid_of[q] = f"q{len(qid_of)}"
            queries[qid_of[q]] = q
        qrels.setdefault(qid_of[q], {})[doc_of[a]] = 1
    ds = BeirDataset(corpus=corpus, queries=queries, qrels=qrels, name="chatterbot-en", split=split,
                     instructions={qid: instruction for qid in queries} if instruction else {})
    if out_dir is not None:
        write_beir(ds, out_dir)
    return ds


def is_heldout(query: str, fraction: float = 0.1, seed: int = 0) -> bool:
    """Deterministic held-out membership from a hash of the query (stable across runs and machines)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")
    digest = hashlib.sha256(f"{seed}\0{query}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def read_synthetic(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for each synthetic JSONL record, validating the fields evaluation needs."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SyntheticFormatError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise SyntheticFormatError(f"{path}:{line_no}: expected a JSON object")
            for key in ("query", "positive"):
                if not isinstance(rec.get(key), str) or not rec[key].strip():
                    raise SyntheticFormatError(f"{path}:{line_no}: field '{key}' must be a non-empty string")
            if rec.get("instruction") is not None and not isinstance(rec["instruction"], str):
                raise SyntheticFormatError(f"{path}:{line_no}: field 'instruction' must be a string")
            negs = rec.get("negatives") or []
            if isinstance(negs, str):
                negs = [negs]
            if not isinstance(negs, list) or not all(isinstance(n, str) for n in negs):
                raise SyntheticFormatError(f"{path}:{line_no}: field 'negatives' must be a list of strings")
            records.append((line_no, {**rec, "negatives": negs}))
    return records


def synthetic_beir(path: str | Path, out_dir: str | Path | None = None, *, fraction: float = 0.1,
                   seed: int = 0, split: str = "test") -> BeirDataset:
    """BEIR split from the held-out records of a synthetic JSONL file (see `is_heldout`).

    Corpus = the positives and hard negatives of held-out records (identical texts share one id); each query's
    relevant document is its positive and its own instruction travels in queries.jsonl.
    """
    corpus, doc_of, queries, instructions, qrels = {}, {}, {}, {}, {}

    def doc_id(text: str) -> str:
        if text not in doc_of:
            doc_of[text] = f"d{len(doc_of)}"
            corpus[doc_of[text]] = text
        return doc_of[text]

    for line_no, rec in read_synthetic(path):
        if not is_heldout(rec["query"], fraction, seed):
            continue
        qid = f"q{line_no}"  # line numbers make every query traceable back to its record
        queries[qid] = rec["query"]
        if rec.get("instruction"):
            instructions[qid] = rec["instruction"]
        qrels[qid] = {doc_id(rec["positive"]): 1}
        for neg in rec["negatives"]:
            doc_id(neg)
    if not queries:
        raise ValueError(f"{path}: no record fell in the held-out fraction {fraction} (seed {seed})")
    ds = BeirDataset(corpus=corpus, queries=queries, qrels=qrels, instructions=instructions,
                     name=f"{Path(path).stem}-heldout", split=split)
    if out_dir is not None:
        write_beir(ds, out_dir)
    return ds
