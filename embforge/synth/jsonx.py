"""Pull one JSON value out of free-form LLM text, without eval().

Models wrap JSON in code fences, prose ("Sure! Here is ...") or emit trailing commas. We try, in order:
the whole text, each fenced block, then every '{' / '[' position with a real JSON decoder; the first value
that satisfies `accept` wins. A light repair pass (trailing commas, smart quotes) runs only when strict
decoding found nothing, so valid JSON is never rewritten.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_SMART = str.maketrans({"\u201c": '"', "\u201d": '"'})


class JSONExtractError(ValueError):
    pass


def _candidates(text: str):
    yield text.strip()
    for m in _FENCE.finditer(text):
        yield m.group(1).strip()


def _scan(text: str, accept: Callable[[Any], bool]) -> tuple[bool, Any]:
    decoder = json.JSONDecoder()
    for chunk in _candidates(text):
        try:
            value = json.loads(chunk)
            if accept(value):
                return True, value
        except ValueError:
            pass
    for i, ch in enumerate(text):
        if ch not in "{[":
            continue
        try:
            value, _ = decoder.raw_decode(text, i)
        except ValueError:
            continue
        if accept(value):
            return True, value
    return False, None


def extract_json(text: str | None, accept: Callable[[Any], bool] | None = None) -> Any:
    """Return the first JSON value in `text` for which `accept(value)` is true (default: dict or list)."""
    if not text or not text.strip():
        raise JSONExtractError("empty response")
    accept = accept or (lambda v: isinstance(v, (dict, list)))
    ok, value = _scan(text, accept)
    if ok:
        return value
    repaired = _TRAILING_COMMA.sub(r"\1", text.translate(_SMART))
    if repaired != text:
        ok, value = _scan(repaired, accept)
        if ok:
            return value
    raise JSONExtractError(f"no acceptable JSON value in response ({len(text)} chars): {text[:80]!r}")
