"""Training batches from JSONL datasets: what `embforge train` feeds the trainer (engine/train.py's BatchSource).

The multi-dataset sampler (mixture.py) picks each step's examples; this turns them into the grouped
ContrastiveBatch, tagged with its dataset and whether in-batch negatives are on. Position-indexed, so the position a
checkpoint stores resumes exactly the same sequence of batches, and every rank reading the same position gets the
same global batch (it then takes its slice: engine/batch.py shard_batch).
"""
from __future__ import annotations

from embforge.data.mixture import open_mixture
from embforge.engine.batch import ContrastiveBatch, to_batch


class ExampleBatches:
    def __init__(self, entries, *, queries: int, negatives: int, seed: int, sampling: str | None = None,
                 skip_bad_lines: bool = False):
        self.sampler = open_mixture(entries, queries=queries, negatives=negatives, sampling=sampling, seed=seed,
                                    skip_bad_lines=skip_bad_lines)
        self.notes = self.sampler.notes     # one list: the sampler adds lines, the trainer prints and removes them

    @property
    def datasets(self):
        return self.sampler.datasets

    @property
    def files(self) -> list:
        """Every training file, in dataset order (the checked launch compares each rank's copies)."""
        return [path for d in self.datasets for path in d.data.paths]

    @property
    def scored(self) -> int:
        """Training records carrying teacher scores (what loss.distill_weight distils from)."""
        return sum(d.data.scored for d in self.datasets)

    def __call__(self, position) -> tuple[ContrastiveBatch, object]:
        """The global batch at `position` and the position after it."""
        b, position = self.sampler(position)
        return to_batch(b.examples, b.negatives, dataset=b.dataset, in_batch_negatives=b.in_batch_negatives), position
