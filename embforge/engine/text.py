"""Text to token ids, the E5-mistral way, and per-group padding.

Queries become `Instruct: {instruction}\\nQuery: {query}`; documents stay plain. Each sequence is truncated first
and EOS appended after, so a long text still ends in the token whose hidden state is the embedding. Padding uses
the tokenizer's pad id, which is often EOS itself: nothing downstream may find the last token by id, only by mask.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery: {query}"


def check_template(template: str, field: str = "model.query_template"):
    """Fail at config time, not mid-training, on a template `str.format` cannot fill."""
    if "{query}" not in template:
        raise ValueError(f"{field} must contain {{query}}, got {template!r}")
    try:
        template.format(instruction="i", query="q")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{field}: only {{instruction}} and {{query}} may be used, got {template!r} ({e!r})") from e


def format_query(template: str, query: str, instruction: str | None) -> str:
    """A query without instruction stays plain (E5 documents and instruction-free queries look alike)."""
    if not instruction:
        return query
    return template.format(instruction=instruction, query=query)


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text: special tokens the tokenizer adds (BOS), truncated to max_length - 1, then EOS."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one token and EOS), got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; last-token pooling needs one")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"text #{bad[0]} is {type(texts[bad[0]]).__name__}, not str")
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        if ids and ids[-1] == eos:  # some tokenizers append EOS themselves: never twice, never truncated away
            ids = ids[:-1]
        out.append(ids[: max_length - 1] + [eos])
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, T] ids and mask, T = the longest of *these* sequences (per-chunk padding, never global)."""
    if not seqs:
        raise ValueError("pad_batch: no sequences")
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError(f"pad_batch: sequence #{i} is empty")
        cols = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, cols] = torch.as_tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)
