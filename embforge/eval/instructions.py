"""The public E5-mistral instruction table for common MTEB tasks (data/e5_instructions.json)."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def e5_instructions() -> dict[str, str]:
    """Task name -> instruction, as published with E5-mistral (keys starting with '_' are metadata)."""
    text = resources.files("embforge.eval").joinpath("data/e5_instructions.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def instruction_for(task: str) -> str:
    """Instruction for an MTEB task name (case-insensitive); KeyError lists close names when unknown."""
    table = e5_instructions()
    if task in table:
        return table[task]
    lowered = {k.lower(): v for k, v in table.items()}
    if task.lower() in lowered:
        return lowered[task.lower()]
    import difflib

    close = difflib.get_close_matches(task, list(table), n=3, cutoff=0.5)
    raise KeyError(f"no E5 instruction for task {task!r}" + (f"; did you mean {close}?" if close else
                                                              f"; known tasks: {sorted(table)}"))
