"""Append-only JSONL files that survive `kill -9`.

Every line is written with one write() call, then flushed and fsynced, so after a crash a file holds whole
lines plus at most one torn line at the end. On reopening, a torn tail (no final newline) is moved to a
`.torn` side file (never silently dropped) and the file is truncated back to its last complete line.
A bad line anywhere else is corruption we did not cause: we stop and name the file and line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from embforge import common


class StoreError(ValueError):
    pass


def repair_tail(path: Path) -> int:
    """Cut a torn last line off `path`; returns the number of bytes moved to `<path>.torn`."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        # Read back in blocks until the last newline: the tail after it is the torn part.
        pos, tail = size, b""
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            block = f.read(step)
            idx = block.rfind(b"\n")
            if idx >= 0:
                tail = block[idx + 1:] + tail
                break
            tail = block + tail
            pos -= step
        if not tail:
            return 0
        with open(str(path) + ".torn", "ab") as side:
            side.write(tail + b"\n")
            side.flush()
            os.fsync(side.fileno())
        f.truncate(size - len(tail))
        f.flush()
        os.fsync(f.fileno())
        return len(tail)


def read_jsonl(path: str | Path, *, skip_bad: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object); a malformed line raises StoreError naming file:line unless skip_bad."""
    return common.read_jsonl(path, error=StoreError, skip_bad=skip_bad)


class JsonlAppender:
    """Durable appender: one line per record, flushed and fsynced before `append` returns."""

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.torn_bytes = repair_tail(self.path)
        self._f = open(self.path, "ab")
        self._fsync = fsync

    def append(self, obj: dict) -> None:
        data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        self._f.write(data)
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
