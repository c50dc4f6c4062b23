"""How an embedder is built and trained: the embedder (HF decoder + QLoRA + pooling), the GradCache contrastive
step, the trainer (train.py) and export. Other packages use what this module exports."""
from embforge.engine.batch import ContrastiveBatch
from embforge.engine.gradcache import StepResult, auto_chunk_tokens, contrastive_step, make_chunks
from embforge.engine.model import Embedder, LoraConfig, ModelConfig

__all__ = ["Embedder", "ModelConfig", "LoraConfig", "ContrastiveBatch", "StepResult", "contrastive_step",
           "make_chunks", "auto_chunk_tokens"]
