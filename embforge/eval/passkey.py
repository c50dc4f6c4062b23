"""E5's personalised passkey retrieval, for long-context embedders.

For each context length: `n_candidates` documents of filler text, each hiding one sentence that gives a unique
person's pass key at a random position; `n_queries` queries "what is the pass key for <name>?" must retrieve
their document as top-1 among the candidates. Lengths are measured with the model's own tokenizer.
(A longer context: `model.rope_theta`, applied by embforge/engine/rope.py before the model is built; E5 used base
1e5 to reach 32k tokens.)
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_FIRST = ["Ada", "Bela", "Chen", "Dario", "Elif", "Farah", "Goran", "Hana", "Ivo", "Jamal", "Kaito", "Lena",
          "Mateo", "Nia", "Oskar", "Priya", "Quinn", "Rosa", "Sven", "Tomas", "Uma", "Vera", "Wanjiru", "Ximena"]
_LAST = ["Abara", "Brandt", "Costa", "Dimitrov", "Eriksen", "Fischer", "Garcia", "Horvat", "Ivanova", "Jensen",
         "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quispe", "Rossi", "Sato", "Tanaka"]


@dataclass
class PasskeyTask:
    length: int
    documents: list[str]
    doc_tokens: list[int]
    names: list[str]
    passkeys: list[str]
    queries: list[str]
    answers: list[int]  # index of the right document for each query


def _n_tokens(tokenizer, text: str) -> int:
    # verbose=False: documents are meant to exceed the tokenizer's max length; the warning would be noise.
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def make_passkey_task(tokenizer, length: int, *, n_candidates: int = 100, n_queries: int = 50,
                      seed: int = 0) -> PasskeyTask:
    """Build one context length's candidates and queries; every document is at most `length` tokens."""
    if n_candidates > len(_FIRST) * len(_LAST):
        raise ValueError(f"at most {len(_FIRST) * len(_LAST)} candidates have unique names")
    if not 1 <= n_queries <= n_candidates:
        raise ValueError(f"n_queries must be in [1, n_candidates={n_candidates}], got {n_queries}")
    rng = random.Random(f"{seed}-{length}")
    names = [f"{f} {l}" for f, l in rng.sample([(f, l) for f in _FIRST for l in _LAST], n_candidates)]
    keys = [str(rng.randint(10000, 99999)) for _ in names]
    unit = _n_tokens(tokenizer, " " + FILLER)
    docs, doc_tokens = [], []
    for name, key in zip(names, keys):
        needle = f"The pass key of {name} is {key}. Remember it. {key} is the pass key of {name}."
        n_units = max(0, (length - _n_tokens(tokenizer, needle)) // unit)
        pos = rng.randint(0, n_units)  # where the needle sits among the filler sentences
        while True:  # the token estimate is additive; trim filler if merges at the joins made it overshoot
            doc = " ".join([FILLER] * pos + [needle] + [FILLER] * (n_units - pos))
            n = _n_tokens(tokenizer, doc)
            if n <= length or n_units == 0:
                break
            n_units -= 1
            pos = min(pos, n_units)
        docs.append(doc)
        doc_tokens.append(n)
    answers = rng.sample(range(n_candidates), n_queries)
    queries = [f"what is the pass key for {names[i]}?" for i in answers]
    return PasskeyTask(length, docs, doc_tokens, names, keys, queries, answers)


def evaluate_passkey(encoder, tokenizer, lengths=LENGTHS, *, n_candidates: int = 100, n_queries: int = 50,
                     instruction: str | None = None, batch_size: int = 8, seed: int = 0,
                     progress: bool = True) -> dict[str, float]:
    """Top-1 accuracy per length: {"passkey_acc_at_<length>": accuracy, ...}."""
    out = {}
    for length in tqdm(list(lengths), desc="passkey lengths", file=sys.stderr, disable=not progress):
        task = make_passkey_task(tokenizer, length, n_candidates=n_candidates, n_queries=n_queries, seed=seed)
        d = encoder.encode(task.documents, instruction=None, batch_size=batch_size)
        q = encoder.encode(task.queries, instruction=instruction, batch_size=batch_size)
        top1 = (q @ d.T).argmax(dim=1)
        out[f"passkey_acc_at_{length}"] = (top1 == torch.tensor(task.answers)).float().mean().item()
    return out
