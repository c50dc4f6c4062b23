"""Result records: one JSON object per metric with model, data, metric, value, commit and timestamp."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from embforge.common import atomic_write_text, git_commit


def make_records(model: str, data: str, metrics: dict, **extra) -> list[dict]:
    """Flatten numeric metrics into records; `extra` (split, instruction, step...) is copied into each."""
    commit = git_commit()
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return [{"model": str(model), "data": str(data), "metric": name, "value": value, "commit": commit,
             "timestamp": stamp, **extra}
            for name, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]


def write_results(path: str | Path, records: list[dict]) -> Path:
    """Write records as a JSON list (parents created; written atomically so a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    return path


def format_table(records: list[dict]) -> str:
    """Plain-text metric/value table for the terminal."""
    width = max((len(r["metric"]) for r in records), default=6)
    lines = [f"{'metric':<{width}}  value"]
    for r in records:
        v = r["value"]
        lines.append(f"{r['metric']:<{width}}  {v:.4f}" if isinstance(v, float) else f"{r['metric']:<{width}}  {v}")
    return "\n".join(lines)
