"""STS: Spearman and Pearson correlation of cosine similarity with gold scores.

Input: JSONL rows {"sentence1", "sentence2", "score"} or a TSV with a header naming those three columns.
E5 treats STS as symmetric: the instruction (default none; E5 uses "Retrieve semantically similar text.")
is applied to both sentences.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from embforge.common import read_jsonl

from .encoders import encode_unique
from .metrics import sts_metrics

FIELDS = ("sentence1", "sentence2", "score")


class StsFormatError(ValueError):
    """An STS file is malformed; the message starts with `file:line:`."""


@dataclass
class StsPairs:
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]
    name: str = "sts"


def _parse_row(row: dict, path: Path, line_no: int) -> tuple[str, str, float]:
    for key in FIELDS:
        if key not in row or row[key] is None:
            raise StsFormatError(f"{path}:{line_no}: missing field '{key}'")
    s1, s2 = row["sentence1"], row["sentence2"]
    for key, val in (("sentence1", s1), ("sentence2", s2)):
        if not isinstance(val, str):
            raise StsFormatError(f"{path}:{line_no}: field '{key}' must be a string, got {type(val).__name__}")
    try:
        score = float(row["score"])
    except (TypeError, ValueError):
        raise StsFormatError(f"{path}:{line_no}: field 'score' is not a number: {row['score']!r}") from None
    if math.isnan(score):
        raise StsFormatError(f"{path}:{line_no}: field 'score' is NaN")
    return s1, s2, score


def load_sts(path: str | Path) -> StsPairs:
    """Read `.jsonl` or `.tsv` STS pairs; errors name file:line and the field."""
    path = Path(path)
    rows: list[tuple[str, str, float]] = []
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix == ".jsonl":
            for line_no, obj in read_jsonl(path, error=StsFormatError):
                rows.append(_parse_row(obj, path, line_no))
        else:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = [k for k in FIELDS if k not in (reader.fieldnames or [])]
            if missing:
                raise StsFormatError(f"{path}:1: header lacks column(s) {missing} (need {list(FIELDS)})")
            for i, row in enumerate(reader, 2):  # header is line 1
                rows.append(_parse_row(row, path, i))
    if len(rows) < 2:
        raise StsFormatError(f"{path}: need at least 2 pairs, found {len(rows)}")
    s1, s2, sc = zip(*rows)
    return StsPairs(list(s1), list(s2), list(sc), name=path.stem)


def evaluate_sts(encoder, pairs: StsPairs | str | Path, *, instruction: str | None = None,
                 batch_size: int = 32) -> dict[str, float]:
    """Spearman/Pearson of cosine(sentence1, sentence2) against the gold scores."""
    pairs = pairs if isinstance(pairs, StsPairs) else load_sts(pairs)
    n = len(pairs.sentence1)
    both = encode_unique(encoder, pairs.sentence1 + pairs.sentence2, instruction=instruction, batch_size=batch_size)
    a, b = both[:n], both[n:]
    # Rows are unit vectors by contract; renormalising costs nothing and guards against encoders that forget.
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (a * b).sum(dim=1).tolist()
    return sts_metrics(cos, pairs.scores)
