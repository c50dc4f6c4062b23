"""The training-record format and its one reader: our JSONL and the raw E5 formats, read lazily by byte offset so a
resume is exact. Every consumer validates through `parse_record` (training, `read_records` for mining and the
held-out split, synth's output), so a record is either usable everywhere or rejected with file:line.

Accepted records (one JSON object per line):
  {"instruction", "query", "positive", "negatives": [...]}                  (ours; `embforge synth` writes it)
  {"user_query", "positive_document", "hard_negative_document"}             (E5 short-long / long-long)
  {"input_text", "label", "misleading_label"}                               (E5 long-short classification)
  {"input", "positive_document"}                                            (E5 short-short / long-long)
  {"S1", "S2", "S3"}                                                        (E5 STS / bitext)
"""
from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from embforge.common import read_jsonl

STS_INSTRUCTION = "Retrieve semantically similar text."


class DataError(ValueError):
    """A malformed training line; the message names file:line."""


@dataclass
class Example:
    instruction: str | None
    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    task_type: str | None = None
    language: str | None = None


def _str(rec, key, where):
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: field '{key}' must be a non-empty string, got {v!r}")
    return v


def _negatives(rec: dict):
    negs = rec.get("negatives") or []
    return [negs] if isinstance(negs, str) else negs


def parse_record(rec: dict, where: str, default_instruction: str | None = None) -> Example:
    """One record as an Example; `default_instruction` (a dataset's) is given to records that carry none, before
    the STS format's generic one."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if rec.get("instruction") is not None and not isinstance(rec["instruction"], str):
        raise DataError(f"{where}: field 'instruction' must be a string")
    instr = rec.get("instruction") or rec.get("task") or default_instruction or None
    if "query" in rec:
        negs = _negatives(rec)
        if not isinstance(negs, list) or not all(isinstance(n, str) for n in negs):
            raise DataError(f"{where}: field 'negatives' must be a list of strings")
        return Example(instr, _str(rec, "query", where), _str(rec, "positive", where), negs,
                       rec.get("task_type"), rec.get("language"))
    if "user_query" in rec:
        negs = [rec["hard_negative_document"]] if rec.get("hard_negative_document") else []
        return Example(instr, _str(rec, "user_query", where), _str(rec, "positive_document", where), negs)
    if "input_text" in rec:
        negs = [rec["misleading_label"]] if rec.get("misleading_label") else []
        return Example(instr, _str(rec, "input_text", where), _str(rec, "label", where), negs)
    if "input" in rec:
        return Example(instr, _str(rec, "input", where), _str(rec, "positive_document", where), [])
    if "S1" in rec:
        negs = [rec["S3"]] if rec.get("S3") else []
        return Example(instr or STS_INSTRUCTION, _str(rec, "S1", where), _str(rec, "S2", where), negs)
    raise DataError(f"{where}: unrecognised record: keys {sorted(rec)} match none of the supported formats "
                    "(query/positive, user_query, input_text, input, S1/S2/S3)")


class ExampleFile:
    """Index of line byte offsets (not the data) for one or more JSONL files; examples are read on demand."""

    def __init__(self, paths, *, skip_bad_lines: bool = False, instruction: str | None = None):
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        self.instruction = instruction    # for records that carry none (parse_record's default_instruction)
        self.offsets: list[tuple[int, int, int]] = []   # (file index, byte offset, line number)
        self.skipped: list[str] = []
        for fi, path in enumerate(self.paths):
            if not path.exists():
                raise FileNotFoundError(f"training data not found: {path}")
            with open(path, "rb") as f:
                pos, lineno = 0, 0
                for raw in f:
                    lineno += 1
                    if raw.strip():
                        where = f"{path}:{lineno}"
                        try:
                            parse_record(json.loads(raw), where)
                            self.offsets.append((fi, pos, lineno))
                        except (json.JSONDecodeError, UnicodeDecodeError, DataError) as e:
                            msg = e if isinstance(e, DataError) else DataError(f"{where}: invalid JSON: {e}")
                            if not skip_bad_lines:
                                raise msg from None
                            self.skipped.append(str(msg))
                    pos += len(raw)
        if not self.offsets:
            raise DataError(f"no usable training examples in {', '.join(map(str, self.paths))}")

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i) -> Example:
        fi, pos, lineno = self.offsets[i]
        with open(self.paths[fi], "rb") as f:
            f.seek(pos)
            return parse_record(json.loads(f.readline()), f"{self.paths[fi]}:{lineno}", self.instruction)


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The example order of one epoch: a pure function of (seed, epoch), so a resume reproduces it."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def batch_at(data: ExampleFile, position: int, size: int, seed: int) -> tuple[list[Example], int]:
    """`size` examples starting at global position `position` (epochs concatenated); returns the next position."""
    out = []
    n = len(data)
    while len(out) < size:
        epoch, idx = divmod(position, n)
        out.append(data[epoch_order(n, seed, epoch)[idx]])
        position += 1
    return out, position


def read_examples(path, *, skip_bad_lines: bool = False):
    """Stream Examples from one JSONL file in file order (validated up front, read lazily)."""
    data = ExampleFile(path, skip_bad_lines=skip_bad_lines)
    for i in range(len(data)):
        yield data[i]


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every record of a JSONL file in our format ({"instruction", "query", "positive",
    "negatives"}, fields beyond these kept), each validated by `parse_record`; `negatives` normalized to a list.
    For the tools that rewrite or split records (mine, the held-out evaluation split)."""
    records = []
    for line_no, rec in read_jsonl(path, error=DataError):
        where = f"{path}:{line_no}"
        if "query" not in rec:
            raise DataError(f"{where}: field 'query' must be a non-empty string")
        parse_record(rec, where)
        records.append((line_no, {**rec, "negatives": _negatives(rec)}))
    return records
