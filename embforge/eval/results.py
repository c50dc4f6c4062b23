"""Result records: one JSON object per metric with model, data, metric, value, commit and timestamp."""
from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the embforge checkout (None outside git or before the first commit)."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def format_table(records: list[dict]) -> str:
    """Plain-text metric/value table for the terminal."""
    width = max((len(r["metric"]) for r in records), default=6)
    lines = [f"{'metric':<{width}}  value"]
    for r in records:
        v = r["value"]
        lines.append(f"{r['metric']:<{width}}  {v:.4f}" if isinstance(v, float) else f"{r['metric']:<{width}}  {v}")
    return "\n".join(lines)
