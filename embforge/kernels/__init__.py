"""Fused kernels with plain-PyTorch references beside them.

infonce_loss      normalization + scaled cosine + online-softmax InfoNCE, forward and backward, chunked so the
                  B x N similarity matrix is never held (embforge/kernels/infonce.py)
last_token_pool   last-token pooling fused with L2 normalization, padded or packed input (pooling.py)
mean_pool         masked mean pooling (+ normalization), padded or packed (mean_pool_packed)
"""
from embforge.kernels.infonce import infonce_loss, infonce_loss_eager
from embforge.kernels.pooling import last_token_pool, last_token_pool_packed, mean_pool, mean_pool_packed

__all__ = ["infonce_loss", "infonce_loss_eager", "last_token_pool", "last_token_pool_packed", "mean_pool",
           "mean_pool_packed"]
