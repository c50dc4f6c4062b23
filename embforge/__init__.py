"""embforge: turn a decoder LLM into a text embedder on one GPU.

Subpackages:
  kernels  fused Triton kernels (pooling, InfoNCE) with plain-PyTorch references
  engine   the single-GPU GradCache trainer (QLoRA last-token embedder)
  synth    E5 / Gecko synthetic data generation against OpenAI-compatible endpoints
  eval     retrieval / STS metrics, MTEB adapter, passkey long-context task
  bench    benchmark suite behind `embforge bench`
"""

__version__ = "0.1.0"
