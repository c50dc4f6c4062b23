"""Multi-dataset training data: named, weighted datasets and the sampler that turns them into global batches.

`data.train` entries are a path (a JSONL file, a directory of *.jsonl shards, or a glob) or a mapping (DatasetSpec):
    {path, name (default: the file stem), weight (default: the dataset's size), instruction (for records that carry
     none), negatives (overrides batch.negatives), in_batch_negatives (default true)}

`batch.sampling`:
  mixed        one shuffled stream over every file, exactly the single-dataset trainer's order (the default for one
               dataset). Its position is one integer, as in checkpoints written before mixtures existed.
  homogeneous  (the default for several datasets) each optimizer step's whole global batch comes from one dataset,
               drawn by weight with a generator seeded by (seed, step): a pure function of the step, so no rank and
               no resume can draw differently. Each dataset walks its own epochs (order seeded by seed and its name)
               from its own position, and within a batch no query or positive text appears twice where the data
               allows it: a duplicate is deferred to that dataset's next batch (skipped, never dropped).

`sampler(position) -> (batch, next position)` is a pure function of the position, which is all a checkpoint stores
(mixed: an int; homogeneous: the step plus, per dataset, its stream position and deferred positions). Every rank
computes the same global batch from the same position, and a resume after kill -9 continues exactly.
"""
from __future__ import annotations

import bisect
import glob
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from embforge.config import ConfigError
from embforge.data.records import Example, ExampleFile, epoch_order
from embforge.engine.train import DatasetSpec

SAMPLING = ("homogeneous", "mixed")
LOOKAHEAD = 4    # a homogeneous batch of B queries looks at most 4*B candidates for distinct texts


@dataclass
class Dataset:
    """A resolved spec: its files indexed (reading records with its instruction as their default), its defaults
    filled in."""
    name: str
    data: ExampleFile
    weight: float
    instruction: str | None
    negatives: int | None
    in_batch_negatives: bool
    key: str                               # data.train[i], for messages


@dataclass
class MixtureBatch:
    """One global batch: its examples (records without an instruction got their dataset's) and the settings the step
    uses for it."""
    dataset: str                           # the dataset's name; "mixed" for a mixed batch of several datasets
    examples: list[Example]
    negatives: int
    in_batch_negatives: bool
    positions: list[int] = field(default_factory=list)   # stream positions taken (tests, debugging)


# ------------------------------------------------------------------------------------------------ specs
def as_spec(entry) -> DatasetSpec:
    return entry if isinstance(entry, DatasetSpec) else DatasetSpec(path=str(entry))


def expand_path(path: str, key: str) -> list[Path]:
    """The JSONL files a dataset path names: the file, a directory's *.jsonl (sorted), or a glob's matches."""
    if glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"{key}: no files match {path!r}")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.jsonl") if f.is_file())
        if not files:
            raise ConfigError(f"{key}: directory {path} holds no *.jsonl files")
        return files
    if not p.exists():
        raise ConfigError(f"{key}: training data not found: {path}")
    return [p]


def default_name(path: str) -> str:
    """The file stem; a directory's name; a glob's stem without its wildcards (or its folder's name)."""
    p = Path(path.rstrip("/"))
    if glob.has_magic(path):
        stem = p.name.split(".")[0]
        for c in "*?[]":
            stem = stem.replace(c, "")
        stem = stem.strip("-_. ")
        return stem or p.parent.name or "data"
    return p.name if p.is_dir() else p.stem


def resolve(entries, *, skip_bad_lines: bool = False) -> list[Dataset]:
    """Index every dataset's files; errors name `data.train[i].key` (or the file:line of a bad record)."""
    if not entries:
        raise ConfigError("data.train: give at least one training JSONL file")
    out: list[Dataset] = []
    names: dict[str, int] = {}
    for i, entry in enumerate(entries):
        spec = as_spec(entry)
        key = f"data.train[{i}]"
        files = expand_path(spec.path, f"{key}.path" if isinstance(entry, DatasetSpec) else key)
        name = spec.name or default_name(spec.path)
        if name in names:
            raise ConfigError(f"{key}.name: {name!r} is already data.train[{names[name]}]'s name; give each dataset "
                              "its own name")
        names[name] = i
        data = ExampleFile(files, skip_bad_lines=skip_bad_lines, instruction=spec.instruction)
        out.append(Dataset(name, data, spec.weight if spec.weight is not None else float(len(data)),
                           spec.instruction, spec.negatives, spec.in_batch_negatives, key))
    return out


# ------------------------------------------------------------------------------------------------ streams
class _Stream:
    """A dataset's epochs concatenated: position p is row epoch_order(n, seed, p // n)[p % n]."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._orders: dict[int, tuple[int, ...]] = {}

    def row(self, position: int) -> int:
        epoch, idx = divmod(position, self.n)
        order = self._orders.get(epoch)
        if order is None:
            # own cache: alternating datasets would evict each other from epoch_order's shared one
            order = self._orders[epoch] = epoch_order(self.n, self.seed, epoch)
            for old in sorted(self._orders)[:-3]:
                del self._orders[old]
        return order[idx]


class _Concat:
    """Several datasets' rows as one index space, in list order (what one ExampleFile over all their files was)."""

    def __init__(self, datasets: list[Dataset]):
        self.datasets = datasets
        self.starts = [0]
        for d in datasets:
            self.starts.append(self.starts[-1] + len(d.data))

    def __len__(self):
        return self.starts[-1]

    def locate(self, i: int) -> tuple[Dataset, int]:
        k = bisect.bisect_right(self.starts, i) - 1
        return self.datasets[k], i - self.starts[k]


# ------------------------------------------------------------------------------------------------ the sampler
class MixtureSampler:
    """`sampler(position) -> (MixtureBatch, next position)`; start from `sampler.initial_position()`.

    `notes` collects lines for the training log (rank 0 prints them): bad lines skipped, datasets smaller than a
    batch, batches that had to repeat a text. The trainer drains it after each call."""

    def __init__(self, datasets: list[Dataset], *, queries: int, negatives: int, sampling: str | None = None,
                 seed: int = 0):
        if sampling is None:
            sampling = "homogeneous" if len(datasets) > 1 else "mixed"
        if sampling not in SAMPLING:
            raise ConfigError(f"batch.sampling: {sampling!r} is not one of {list(SAMPLING)}")
        if queries < 1:
            raise ConfigError(f"batch.queries: must be >= 1, got {queries}")
        self.datasets, self.queries, self.negatives = datasets, queries, negatives
        self.sampling, self.seed = sampling, seed
        self.notes: list[str] = []
        self._warned: set[str] = set()
        for d in datasets:
            if d.data.skipped:
                self.notes.append(f"[train] {d.name}: skipped {len(d.data.skipped)} bad lines; first: "
                                  f"{d.data.skipped[0]}")
        if sampling == "mixed":
            self._check_mixed()
            self._all = _Concat(datasets)
            self._stream = _Stream(len(self._all), seed)
            if len(self._all) < queries:
                self.notes.append(f"[train] {len(self._all)} training examples but batch.queries is {queries}: "
                                  "every batch repeats examples")
        else:
            self._streams = {d.name: _Stream(len(d.data), seed + zlib.crc32(d.name.encode())) for d in datasets}
            total = sum(d.weight for d in datasets)
            self._cumulative = [sum(d.weight for d in datasets[:k + 1]) / total for k in range(len(datasets))]
            for d in datasets:
                if len(d.data) < queries:
                    self.notes.append(f"[train] {d.name}: {len(d.data)} examples but batch.queries is {queries}: "
                                      "its batches repeat examples")

    def _check_mixed(self):
        """A mixed batch has one layout and one loss: per-dataset settings that change those need homogeneous."""
        if len(self.datasets) == 1:
            return
        for d in self.datasets:
            if d.negatives is not None and d.negatives != self.negatives:
                raise ConfigError(f"{d.key}.negatives: a per-dataset negatives count needs batch.sampling: "
                                  "homogeneous (a mixed batch has one layout)")
            if not d.in_batch_negatives:
                raise ConfigError(f"{d.key}.in_batch_negatives: false needs batch.sampling: homogeneous (a mixed "
                                  "batch shares its negatives)")

    # -- positions
    def initial_position(self):
        if self.sampling == "mixed":
            return 0
        return {"step": 0, "streams": {d.name: {"position": 0, "deferred": []} for d in self.datasets}}

    def __call__(self, position) -> tuple[MixtureBatch, object]:
        if self.sampling == "mixed":
            if not isinstance(position, int):
                raise ValueError("batch.sampling=mixed cannot resume a checkpoint written with batch.sampling="
                                 "homogeneous (its data position is per dataset)")
            return self._mixed(position)
        if isinstance(position, int):
            if position != 0:
                raise ValueError("batch.sampling=homogeneous cannot resume a checkpoint written with one mixed "
                                 "stream (batch.sampling=mixed, or before datasets existed); resume with "
                                 "batch.sampling=mixed")
            position = self.initial_position()
        return self._homogeneous(position)

    # -- mixed: the single-stream order, unchanged
    def _mixed(self, position: int) -> tuple[MixtureBatch, int]:
        examples, positions = [], []
        for p in range(position, position + self.queries):
            d, row = self._all.locate(self._stream.row(p))
            examples.append(d.data[row])
            positions.append(p)
        only = self.datasets[0] if len(self.datasets) == 1 else None
        batch = MixtureBatch(only.name if only else "mixed", examples,
                             self.negatives if only is None or only.negatives is None else only.negatives,
                             only.in_batch_negatives if only else True, positions)
        return batch, position + self.queries

    # -- homogeneous
    def choose(self, step: int) -> Dataset:
        """The dataset of a step: drawn by weight from a generator seeded by (seed, step), the same on every rank."""
        u = random.Random(f"embforge-mixture:{self.seed}:{step}").random()
        return self.datasets[min(bisect.bisect_right(self._cumulative, u), len(self.datasets) - 1)]

    def _homogeneous(self, position: dict) -> tuple[MixtureBatch, dict]:
        step = position["step"]
        d = self.choose(step)
        state = position["streams"].get(d.name, {"position": 0, "deferred": []})
        positions, state = self._take_distinct(d, state)
        stream = self._streams[d.name]
        examples = [d.data[stream.row(p)] for p in positions]
        streams = dict(position["streams"])
        streams[d.name] = state
        batch = MixtureBatch(d.name, examples, self.negatives if d.negatives is None else d.negatives,
                             d.in_batch_negatives, positions)
        return batch, {"step": step + 1, "streams": streams}

    def _take_distinct(self, d: Dataset, state: dict) -> tuple[list[int], dict]:
        """B stream positions whose query and positive texts are distinct in the batch, scanning the deferred
        positions first (oldest first, so none waits forever), then the stream. A candidate whose text is already
        in the batch is deferred. If LOOKAHEAD*B candidates do not hold B distinct ones, the earliest deferred fill
        the batch (the data does not allow more) and the log says so once."""
        size, stream = self.queries, self._streams[d.name]
        pending, next_pos = list(state["deferred"]), state["position"]
        chosen, deferred, seen = [], [], set()
        window = LOOKAHEAD * size
        scanned = 0
        while len(chosen) < size and scanned < window:
            if scanned < len(pending):
                p = pending[scanned]
            else:
                p, next_pos = next_pos, next_pos + 1
            scanned += 1
            ex = d.data[stream.row(p)]
            if ex.query in seen or ex.positive in seen:
                deferred.append(p)
            else:
                chosen.append(p)
                seen.update((ex.query, ex.positive))
        if len(chosen) < size:
            short = size - len(chosen)
            if d.name not in self._warned:
                self._warned.add(d.name)
                self.notes.append(f"[train] {d.name}: only {len(chosen)} distinct query/positive texts among "
                                  f"{scanned} candidates for a batch of {size}; {short} examples repeat a text in "
                                  "this batch (the loss masks duplicate texts; said once per dataset)")
            deferred.sort()
            chosen += deferred[:short]
            deferred = deferred[short:]
        left = sorted(deferred + pending[scanned:])
        return chosen, {"position": next_pos, "deferred": left}


def open_mixture(entries, *, queries: int, negatives: int, sampling: str | None = None, seed: int = 0,
                 skip_bad_lines: bool = False) -> MixtureSampler:
    """`data.train` (+ batch settings) -> the sampler."""
    return MixtureSampler(resolve(entries, skip_bad_lines=skip_bad_lines), queries=queries, negatives=negatives,
                          sampling=sampling, seed=seed)
