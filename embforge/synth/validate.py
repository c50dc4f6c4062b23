"""Checks on generated examples and duplicate removal.

Each check returns a short reason code; the run report counts them. Near-duplicates are found with MinHash
over character 5-grams (word shingles fail on Chinese/Japanese, which have no spaces) and LSH banding, so
the cost per record stays constant however large the output grows.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass

import numpy as np

from embforge.data.records import DataError, parse_record

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_SPACE = re.compile(r"\s+")
_LEFTOVER = re.compile(r"\$\{?[a-z_]+\}?|\{[a-z_]+\}")  # an unfilled placeholder echoed back by the model


@dataclass
class ValidationConfig:
    min_chars: int = 2            # any field
    max_chars: int = 20000        # any field
    long_min_words: int = 300     # long-long fields (E5: at least 300 words)
    short_max_words: int = 200    # the query side of short-long and both sides of short-short
    near_dup_threshold: float = 0.9  # estimated Jaccard over char 5-grams; 1.0 disables near-dup removal
    dedup: bool = True
    # A text shorter than this fraction of the length its prompt asked for ("about 200 words", "at least 50") is
    # rejected: a small model answering "123" for a 100-word document has not done the task. 0 disables.
    min_length_fraction: float = 0.25


def count_words(text: str) -> int:
    """Whitespace words, but each CJK character counts as one: those scripts do not separate words."""
    cjk = len(_CJK.findall(text))
    return len(_CJK.sub(" ", text).split()) + cjk


def normalize(text: str) -> str:
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def check_example(task_name: str, payload: dict, keys: tuple[str, ...], long_fields: tuple[str, ...],
                  cfg: ValidationConfig) -> str | None:
    """None if the payload is usable, else a reason code."""
    for k in keys:
        v = payload.get(k)
        if not isinstance(v, str):
            return f"field_not_string:{k}"
        if len(v.strip()) < cfg.min_chars:
            return f"field_too_short:{k}"
        if len(v) > cfg.max_chars:
            return f"field_too_long:{k}"
        if _LEFTOVER.search(v):
            return f"placeholder_left:{k}"
    for k in long_fields:
        if count_words(payload[k]) < cfg.long_min_words:
            return f"too_few_words:{k}"
    short = {"short-long": keys[:1], "short-short": keys}.get(task_name, ())
    for k in short:
        if count_words(payload[k]) > cfg.short_max_words:
            return f"too_many_words:{k}"
    texts = [normalize(payload[k]) for k in keys]
    if len(set(texts)) < len(texts):
        return "fields_identical"
    return None


# Placeholders a model echoes instead of content: a bare ellipsis, `<query>`, `[document]`, `{text}`, TODO.
_PLACEHOLDER = re.compile(r"^\W*(\.{2,}|…+|<[^<>]{1,40}>|\[[^\[\]]{1,40}\]|\{[^{}]{1,40}\}|todo|tbd|n/?a|"
                          r"lorem ipsum.*|(your|the) (query|document|text|instruction|task)( here)?)\W*$", re.I)
_LETTER = re.compile(r"[^\W\d_]")      # any letter of any script
# spec field of a task type -> the record field whose length it sets (synth/templates/example_*.txt)
LENGTH_SPECS = {"short-long": {"num_words": ("positive", "negatives"), "query_length": ("query",)},
                "long-short": {"num_words": ("query",)}}


def min_words(spec) -> int | None:
    """The fewest words a length spec asks for: 200, "about 200", "at least 50", "5 to 15 words" -> 200, 200, 50,
    5; "less than 10" asks for no minimum (None)."""
    text = str(spec).strip().lower()
    if text.startswith(("less than", "fewer than", "at most", "up to")):
        return None
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def _texts(rec: dict, field: str) -> list[str]:
    v = rec.get(field)
    return list(v) if isinstance(v, list) else [v] if isinstance(v, str) else []


def check_content(rec: dict, task_name: str, params: dict, cfg: ValidationConfig) -> str | None:
    """Degenerate records a well-formed JSON answer can still be: a placeholder instead of text, the instruction
    repeated as the query, a text far shorter than its prompt asked, or one without a single letter (numbers
    only) where a language was asked for. Returns a reason code or None."""
    for field in ("instruction", "query", "positive", "negatives"):
        for text in _texts(rec, field):
            if _PLACEHOLDER.match(text.strip()):
                return f"placeholder:{field}"
            if not _LETTER.search(text):
                return f"no_letters:{field}"
    if rec.get("instruction") and normalize(rec["instruction"]) == normalize(rec.get("query", "")):
        return "instruction_is_query"
    if cfg.min_length_fraction > 0:
        for spec_name, fields in LENGTH_SPECS.get(task_name, {}).items():
            want = min_words(params.get(spec_name, ""))
            if not want:
                continue
            for field in fields:
                if any(count_words(t) < cfg.min_length_fraction * want for t in _texts(rec, field)):
                    return f"too_short_for_spec:{field}"
    return None


def check_record(rec: dict) -> str | None:
    """The training-record contract the trainer reads; returns a reason code or None."""
    for k in ("instruction", "query", "positive"):
        if not isinstance(rec.get(k), str) or not rec[k].strip():
            return f"record_missing:{k}"
    if not isinstance(rec.get("negatives"), list) or not all(isinstance(n, str) for n in rec["negatives"]):
        return "record_bad_negatives"
    try:
        parse_record(rec, "synth record")   # the reader training uses: what synth accepts, the trainer reads
    except DataError:
        return "record_unreadable"
    return None


_PRIME = (1 << 31) - 1  # Mersenne prime; a*h stays below 2^62, so uint64 never wraps


class Deduper:
    """Exact (normalised text hash) and near-duplicate (MinHash-LSH) detection over records seen so far."""

    def __init__(self, threshold: float = 0.9, num_perm: int = 64, bands: int = 16, seed: int = 1):
        self.threshold = threshold
        self.exact: set[str] = set()
        self.bands, self.rows = bands, num_perm // bands
        rng = np.random.default_rng(seed)
        # Universal hashing (a*h + b) mod p needs a*h to wrap around p many times; with p = 2^31-1 and h < p
        # it does, and the product still fits in uint64 exactly.
        self.a = rng.integers(1, _PRIME, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, num_perm, dtype=np.uint64)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    @staticmethod
    def key(rec: dict) -> str:
        return normalize(rec["query"]) + "\x1f" + normalize(rec["positive"])

    def _signature(self, text: str) -> np.ndarray:
        grams = {text[i:i + 5] for i in range(max(1, len(text) - 4))}
        h = np.fromiter((zlib.crc32(g.encode("utf-8")) % _PRIME for g in grams), dtype=np.uint64, count=len(grams))
        return ((h[None, :] * self.a[:, None] + self.b[:, None]) % np.uint64(_PRIME)).min(axis=1)

    def check(self, rec: dict) -> str | None:
        """Reason code if `rec` duplicates an earlier record; otherwise remembers it and returns None."""
        key = self.key(rec)
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
        if digest in self.exact:
            return "duplicate_exact"
        sig = None
        if self.threshold < 1.0:
            sig = self._signature(key)
            seen: set[int] = set()
            for band in range(self.bands):
                chunk = sig[band * self.rows:(band + 1) * self.rows].tobytes()
                for idx in self.buckets[band].get(chunk, ()):
                    if idx in seen:
                        continue
                    seen.add(idx)
                    if float(np.mean(self.signatures[idx] == sig)) >= self.threshold:
                        return "duplicate_near"
        self.exact.add(digest)
        if sig is not None:
            idx = len(self.signatures)
            self.signatures.append(sig)
            for band in range(self.bands):
                self.buckets[band].setdefault(sig[band * self.rows:(band + 1) * self.rows].tobytes(), []).append(idx)
        return None
