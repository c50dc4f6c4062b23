"""The shapes of the end-to-end benchmark (model, batch, lengths, chunk budgets) per part and device: the one type
e2e.py and levers.py both read, so neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass

from embforge.bench import synthetic


@dataclass(frozen=True)
class Setup:
    name: str
    shape: str                     # embforge.bench.models.SHAPES key
    n_queries: int
    docs_per_query: int            # positive + hard negatives per query
    lengths: synthetic.LengthSpec
    max_length: int
    chunk_tokens: int              # tokens per chunk (ours): real ones when packed, else padded -- the memory budget
    chunk_tokens_no_ckpt: int      # the budget for the no-checkpointing lever: a chunk must fit without it
    steps: int
    warmup_queries: int
    quantization: str              # base weights of the headline run: "nf4" | "none"
    gradient_checkpointing: bool = True
    lora_r: int = 16
    temperature: float = 0.02
    lr: float = 1e-4

    @property
    def peer_mini_batch(self) -> int:
        """ST slices globally padded columns into mini-batches of this many sequences: at max_length each, the
        same padded-token (activation memory) budget as our chunks."""
        return max(1, self.chunk_tokens // self.max_length)


def setup_for(part: str, device: str, quick: bool = False) -> Setup:
    if device == "cuda":
        if part == "e2e_big":  # issue 3/6 memory target: 2048 queries + 2048 positives + 2048 hard negatives
            return Setup("7b-2048q", "7b", 2048, 2, synthetic.LengthSpec(), 512, 8192, 2048, steps=1,
                         warmup_queries=0, quantization="nf4")
        # No small warm-up batch: the first full step is the warm-up, on the clock but reported apart
        # (first_step_ms). On the H100 it was 40.7 s against 27.4 s for the next: work such as compiling kernel
        # specializations for each new chunk shape happens once per shape, so only an identical step warms up.
        return Setup("7b-256q", "7b", 256, 2, synthetic.LengthSpec(), 512, 8192, 2048, steps=2, warmup_queries=0,
                     quantization="nf4")
    lengths = synthetic.LengthSpec().scaled(0.25)  # queries 4-16, documents median 40, up to 128 tokens
    if part == "e2e_big":
        return Setup("small-512q", "small", 512, 2, lengths, 128, 1024, 512, steps=1, warmup_queries=0,
                     quantization="none")
    if quick:  # the CI check: a few seconds a step on 2 cores
        return Setup("small-16q", "small", 16, 2, lengths, 128, 256, 128, steps=3, warmup_queries=4,
                     quantization="none")
    return Setup("small-32q", "small", 32, 2, lengths, 128, 512, 256, steps=5, warmup_queries=8,
                 quantization="none")
