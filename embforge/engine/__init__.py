"""The single-GPU trainer: embedder (HF decoder + QLoRA + pooling) and the GradCache contrastive step."""
from embforge.engine.gradcache import ContrastiveBatch, StepResult, auto_chunk_tokens, contrastive_step, make_chunks
from embforge.engine.model import Embedder, LoraConfig, ModelConfig

__all__ = ["Embedder", "ModelConfig", "LoraConfig", "ContrastiveBatch", "StepResult", "contrastive_step",
           "make_chunks", "auto_chunk_tokens"]
