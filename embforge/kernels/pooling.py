"""Last-token and mean pooling fused with L2 normalization (TEMPORARY torch-only version; Triton kernel to come)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, for left or right padding."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device)
    return torch.where(attention_mask.bool(), pos, -1).amax(dim=1)


def last_token_pool(hidden, attention_mask, *, normalize=True, backend="auto", eps=1e-6):
    idx = last_token_index(attention_mask)
    out = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    return F.normalize(out.float(), dim=-1, eps=eps).to(hidden.dtype) if normalize else out


def last_token_pool_packed(hidden, cu_seqlens, *, normalize=True, backend="auto", eps=1e-6):
    out = hidden[cu_seqlens[1:].long() - 1]
    return F.normalize(out.float(), dim=-1, eps=eps).to(hidden.dtype) if normalize else out


def mean_pool(hidden, attention_mask, *, normalize=True, backend="auto", eps=1e-6):
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    out = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    return F.normalize(out.float(), dim=-1, eps=eps).to(hidden.dtype) if normalize else out
