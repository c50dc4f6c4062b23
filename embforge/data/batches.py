"""Training batches from JSONL files: what `embforge train` feeds the trainer (engine/train.py's BatchSource).

Position-indexed (epochs concatenated, each epoch's order a pure function of the seed), so the position a checkpoint
stores resumes exactly the same sequence of batches, and every rank reading the same position gets the same global
batch (it then takes its slice: engine/batch.py shard_batch).
"""
from __future__ import annotations

from embforge.data.plan import repeat_warning
from embforge.data.records import ExampleFile, batch_at
from embforge.engine.batch import ContrastiveBatch, to_batch


class ExampleBatches:
    def __init__(self, paths, *, queries: int, negatives: int, seed: int, skip_bad_lines: bool = False):
        self.data = ExampleFile(paths, skip_bad_lines=skip_bad_lines)
        self.queries, self.negatives, self.seed = queries, negatives, seed

    @property
    def notes(self) -> list[str]:
        """Lines for the training log (rank 0 prints them once)."""
        skipped = self.data.skipped
        notes = [f"[train] skipped {len(skipped)} bad lines; first: {skipped[0]}"] if skipped else []
        return notes + [w for w in [repeat_warning(len(self.data), self.queries)] if w]

    def __call__(self, position: int) -> tuple[ContrastiveBatch, int]:
        """The global batch at `position` and the position after it."""
        examples, position = batch_at(self.data, position, self.queries, self.seed)
        return to_batch(examples, self.negatives), position
