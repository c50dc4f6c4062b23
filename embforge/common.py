"""What every room needs, written once: JSONL reading with file:line errors, JSONL appends, atomic writes, and the
git commit a result was produced by. Standard library only, so any layer may import it.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import IO, Iterator


def read_jsonl(path: str | Path, *, error: type[Exception] = ValueError,
               skip_bad: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line. A line that is not a JSON object raises `error`
    with a message starting `file:line:` (or is skipped with skip_bad)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if skip_bad:
                    continue
                raise error(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                if skip_bad:
                    continue
                raise error(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def append_jsonl(path: str | Path, *records: dict) -> None:
    """Append records as JSON lines (one open, one write per call)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def open_atomic(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """A file opened on `<path>.tmp` and renamed over `path` when the block ends without an error: a crash leaves
    the old file or the new one, never half of one (an error leaves `path` untouched and removes the temp file)."""
    path = Path(path)
    tmp = _tmp(path)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with open_atomic(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj, *, indent: int | None = None, ensure_ascii: bool = True,
                      trailing_newline: bool = False) -> Path:
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + ("\n" if trailing_newline else "")
    return atomic_write_text(path, text)


def git_commit() -> str:
    """The commit a result comes from: short HEAD hash of the embforge checkout, "-dirty" when tracked files differ
    from it; $EMBFORGE_COMMIT when set (a copy of the tree without .git, e.g. on a GPU machine); "unknown"
    outside git."""
    if os.environ.get("EMBFORGE_COMMIT"):
        return os.environ["EMBFORGE_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty else "")
