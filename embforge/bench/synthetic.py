"""Synthetic benchmark inputs that need no download: a word-level tokenizer and texts of chosen token lengths.

Every vocabulary word is exactly one token, so a text of k words is k tokens (plus what the template and EOS add):
the length spread of a benchmark batch is set here, not by a tokenizer's whims. The words are random, so no two
texts of a batch collide (duplicate masking would otherwise change the loss, not the cost).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPECIALS = ["<unk>", "<s>", "</s>"]
TEMPLATE_WORDS = ["Instruct:", "Query:"]  # the query template's own words, so they are not <unk>


def build_tokenizer(vocab_size: int):
    """A fast tokenizer with vocab_size entries: <unk> <s> </s>, the template words, then w5, w6, ...
    pad = eos = </s>, as with Mistral-family tokenizers that have no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = SPECIALS + TEMPLATE_WORDS
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", model_max_length=1 << 20)


def save_tokenizer(vocab_size: int, directory: str | Path) -> Path:
    directory = Path(directory)
    build_tokenizer(vocab_size).save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class LengthSpec:
    """Word counts of one step's texts. Queries uniform in [q_min, q_max] tokens including the instruction;
    documents lognormal (median doc_median, log-sd doc_sigma) clipped to [doc_min, doc_max] — the long right tail of
    real passages, which is what makes global padding expensive."""
    q_min: int = 16
    q_max: int = 64
    doc_median: float = 160.0
    doc_sigma: float = 0.6
    doc_min: int = 64
    doc_max: int = 511  # + EOS = 512 tokens

    def scaled(self, factor: float) -> "LengthSpec":
        """The same spread at a fraction of the lengths (CPU-sized steps)."""
        s = lambda v: max(2, int(round(v * factor)))  # noqa: E731
        return LengthSpec(s(self.q_min), s(self.q_max), self.doc_median * factor, self.doc_sigma, s(self.doc_min),
                          s(self.doc_max))


INSTRUCTION_WORDS = 6  # "Instruct: <6 words>\nQuery: ..." -- a short E5-style task definition


def make_batch_texts(n_queries: int, docs_per_query: int, spec: LengthSpec, vocab_size: int, seed: int = 0):
    """(queries, instructions, documents) with query i owning documents[i*G:(i+1)*G] (positive first).
    Query word counts subtract the template's words so the tokenized query length follows spec."""
    rng = np.random.default_rng(seed)
    first = len(SPECIALS) + len(TEMPLATE_WORDS)

    def words(k: int) -> str:
        return " ".join(f"w{int(i)}" for i in rng.integers(first, vocab_size, size=k))

    template_tokens = INSTRUCTION_WORDS + len(TEMPLATE_WORDS) + 1  # + EOS
    q_lens = rng.integers(spec.q_min, spec.q_max + 1, size=n_queries)
    n_docs = n_queries * docs_per_query
    d_lens = np.clip(np.round(np.exp(rng.normal(math.log(spec.doc_median), spec.doc_sigma, size=n_docs))),
                     spec.doc_min, spec.doc_max).astype(int)
    instructions = [words(INSTRUCTION_WORDS) for _ in range(n_queries)]
    queries = [words(max(1, int(n) - template_tokens)) for n in q_lens]
    documents = [words(int(n)) for n in d_lens]
    return queries, instructions, documents
