"""Training data: the record reader, the multi-dataset sampler (mixture.py)."""
