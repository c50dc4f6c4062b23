"""embforge: turn a decoder LLM into a text embedder on one GPU.

Subpackages, in layer order (each imports only the ones below it; docs/DEVELOPING.md):
  cli      every `embforge <command>` and the wiring between the layers
  bench    benchmark suite behind `embforge bench`
  eval     retrieval / STS metrics, MTEB adapter, passkey long-context task, the demo's report
  synth    E5 / Gecko synthetic data generation against OpenAI-compatible endpoints
  data     the training-record format and reader, hard-negative mining, the demo's offline sources
  engine   how an embedder is built and trained (embedder, GradCache step, trainer, export)
  kernels  fused Triton kernels (pooling, InfoNCE) with plain-PyTorch references
  common, config   JSONL / atomic writes / git commit; YAML -> typed dataclasses
"""

__version__ = "0.1.0"
