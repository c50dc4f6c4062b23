"""Training data: the record format and its one reader (records.py), the multi-dataset sampler
(mixture.py: named, weighted datasets; homogeneous or mixed batches) and the batches the trainer is fed (batches.py),
hard-negative mining (mine.py), and the offline text sources the CPU demo builds from (sources.py, dictd.py).
Commands: `embforge data build-demo`, `embforge mine` (embforge/cli/data.py)."""
