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
import re
import warnings
from pathlib import Path

from embforge.data.records import read_records

from .beir import BeirDataset, write_beir

# embforge's own wording (not from the E5 table, which has no chatterbot task).
CHATTERBOT_INSTRUCTION = "Given a question or remark in a conversation, retrieve the reply that answers it"


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

    for line_no, rec in read_records(path):   # file:line errors for malformed records
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


# ------------------------------------------------------------------------------------------ GCIDE (held out)
GCIDE_INSTRUCTION = "Given a word, retrieve its dictionary definition"


def _gcide_split(seed: int):
    """GCIDE words (not FOLDOC / Jargon terms, which the demo trains on), shuffled deterministically, and their
    senses. Retrieval takes words from the front, STS from the back: the two sets never share a word."""
    import random

    from embforge.data.dictd import foldoc_or_jargon_definitions, gcide_senses

    senses = gcide_senses()
    trained_terms = set()
    for name in ("foldoc", "jargon"):
        try:
            trained_terms |= set(foldoc_or_jargon_definitions(name))
        except FileNotFoundError:
            pass
    words = sorted(w for w in senses if w not in trained_terms)
    random.Random(seed).shuffle(words)
    return words, senses


def gcide_beir(out_dir: str | Path | None = None, *, n_queries: int = 300, n_distractors: int = 700,
               seed: int = 0, split: str = "test") -> BeirDataset:
    """Word -> definition retrieval from GCIDE (Debian dict-gcide, GPL): each query is a word, its relevant
    document its first numbered sense; other words' first senses fill the corpus. Never trained on."""
    words, senses = _gcide_split(seed)
    if len(words) < n_queries + n_distractors:
        raise ValueError(f"GCIDE has only {len(words)} usable words, {n_queries + n_distractors} asked")
    corpus, queries, qrels = {}, {}, {}
    for i, w in enumerate(words[: n_queries + n_distractors]):
        corpus[f"d{i}"] = senses[w][0]
        if i < n_queries:
            queries[f"q{i}"] = w
            qrels[f"q{i}"] = {f"d{i}": 1}
    ds = BeirDataset(corpus=corpus, queries=queries, qrels=qrels, name="gcide-word2def", split=split,
                     instructions={q: GCIDE_INSTRUCTION for q in queries})
    if out_dir is not None:
        write_beir(ds, out_dir)
    return ds


def gcide_sts(out_path: str | Path | None = None, *, n_pairs: int = 300, seed: int = 0):
    """Sentence-pair similarity from GCIDE: two senses of one word score 1, senses of two different words score 0
    (half each). Graded by the dictionary's structure, not by people: it measures whether a model puts
    definitions of the same word closer than definitions of unrelated words. Words disjoint from gcide_beir's."""
    import random

    from .sts import StsPairs

    words, senses = _gcide_split(seed)
    rng = random.Random(seed + 1)
    pool = [w for w in reversed(words) if len(senses[w]) >= 2][: n_pairs * 2]
    s1, s2, scores = [], [], []
    for i in range(n_pairs):
        w = pool[i]
        if i % 2 == 0:
            a, b = rng.sample(senses[w], 2)
            score = 1.0
        else:
            other = pool[n_pairs + i]
            a, b, score = rng.choice(senses[w]), rng.choice(senses[other]), 0.0
        s1.append(a)
        s2.append(b)
        scores.append(score)
    pairs = StsPairs(s1, s2, scores, name="gcide-senses")
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            for a, b, s in zip(s1, s2, scores):
                f.write(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n")
    return pairs


FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_TOPICS = ("food", "love", "science", "politics", "sports", "medicine", "law", "education", "drugs", "kids")
FORTUNES_INSTRUCTION = "Given a quotation, retrieve quotations on the same topic"


def fortunes_by_topic(data_dir: str | Path | None = None, topics=FORTUNES_TOPICS) -> dict[str, list[str]]:
    """General-English quotations and jokes from the Debian `fortunes` package (BSD fortune files, one file per
    topic, entries separated by `%` lines), attribution lines (`-- Author`) removed so a model cannot match by name.
    Kept: 40-400 characters, each text once (in the first topic it appears in)."""
    data_dir = Path(data_dir) if data_dir is not None else FORTUNES_DIR
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for topic in topics:
        path = data_dir / topic
        if not path.is_file():
            raise FileNotFoundError(f"{path}: fortune file not found (Debian package 'fortunes': "
                                    "apt-get install fortunes)")
        texts = []
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [ln for ln in entry.splitlines() if not re.match(r"\s*--\s", ln) and ln.strip() != "%"]
            text = " ".join(" ".join(lines).split())
            if 40 <= len(text) <= 400 and text not in seen:
                seen.add(text)
                texts.append(text)
        out[topic] = texts
    return out


def fortunes_beir(out_dir: str | Path | None = None, *, queries_per_topic: int = 10, docs_per_topic: int = 36,
                  seed: int = 0, data_dir: str | Path | None = None, topics=FORTUNES_TOPICS,
                  split: str = "test") -> BeirDataset:
    """Same-topic retrieval over general English (a general-similarity set beside the dictionary ones): each query
    is a quotation, its relevant documents every corpus quotation of the same topic file (food, love, science,
    politics, ...); queries and corpus are disjoint. Topic labels are the fortune files' own, so they are coarse:
    the set ranks models by how well topic survives in the embedding, not by paraphrase detection. Never trained
    on (docs/data.md)."""
    import random

    by_topic = fortunes_by_topic(data_dir, topics)
    rng = random.Random(seed)
    corpus, queries, qrels = {}, {}, {}
    for topic, texts in by_topic.items():
        need = queries_per_topic + docs_per_topic
        if len(texts) < need:
            raise ValueError(f"fortunes topic {topic!r} has {len(texts)} usable entries, {need} asked")
        texts = rng.sample(texts, need)
        docs = {f"{topic}-d{i}": t for i, t in enumerate(texts[queries_per_topic:])}
        corpus.update(docs)
        for i, t in enumerate(texts[:queries_per_topic]):
            queries[f"{topic}-q{i}"] = t
            qrels[f"{topic}-q{i}"] = {d: 1 for d in docs}
    ds = BeirDataset(corpus=corpus, queries=queries, qrels=qrels, name="fortunes-topics", split=split,
                     instructions={q: FORTUNES_INSTRUCTION for q in queries})
    if out_dir is not None:
        write_beir(ds, out_dir)
    return ds
