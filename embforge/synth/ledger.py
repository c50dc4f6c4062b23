"""The raw-response ledger: one line per finished attempt at a request, the source of truth for resume.

An entry's status is "accepted" / "rejected" (final: a rerun never asks again) or "failed" (a transient
fault outlived the retries: a rerun asks again). Accepted examples carry their training record, so a
crash between writing the ledger and writing the output file is repaired on the next start.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from .store import JsonlAppender, StoreError, read_jsonl

FINAL = ("accepted", "rejected")


class Ledger:
    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self.latest: dict[str, dict] = {}
        self.usage: list[tuple[str, dict, float]] = []  # (model, usage, price multiplier) of every entry
        self._appender = JsonlAppender(self.path, fsync=fsync)  # repairs a torn tail first
        for lineno, entry in read_jsonl(self.path):
            if entry.get("type") != "result":
                continue
            if "id" not in entry or "status" not in entry:
                raise StoreError(f"{self.path}:{lineno}: ledger entry without id/status")
            self.latest[entry["id"]] = entry
            self.usage.append((entry.get("model", ""), entry.get("usage") or {}, entry.get("price_factor", 1.0)))

    @property
    def torn_bytes(self) -> int:
        return self._appender.torn_bytes

    def finished(self, rid: str) -> bool:
        e = self.latest.get(rid)
        return e is not None and e["status"] in FINAL

    def append(self, entry: dict) -> None:
        entry = {"type": "result", "time": round(time.time(), 3), **entry}
        self._appender.append(entry)
        self.latest[entry["id"]] = entry

    def note(self, entry: dict) -> None:
        """Run-level events (start, stop reason) for the audit trail."""
        self._appender.append({"time": round(time.time(), 3), **entry})

    def reasons(self, kind: str | None = None) -> Counter:
        c: Counter = Counter()
        for e in self.latest.values():
            if kind is None or e.get("kind") == kind:
                c[f"{e['status']}:{e.get('reason') or 'ok'}"] += 1
        return c

    def close(self) -> None:
        self._appender.close()
