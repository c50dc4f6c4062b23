"""Padding-free chunks: sequences concatenated into one row, attention confined to each sequence.

A chunk of b sequences becomes input_ids [1, total] with position ids restarting at 0 at every sequence start and
cu_seqlens [b + 1] marking the boundaries; nothing is padded, so every token the decoder computes is a real one.
The embedding is pooled straight from the packed hidden states by cu_seqlens (last_token_pool_packed /
mean_pool_packed). Which kernel keeps attention inside each sequence depends on the device:

    flash_attention_2   transformers' own varlen path: flash_attn_varlen_func with our cu_seqlens (CUDA)
    varlen              torch.nn.attention.varlen.varlen_attn (flash kernels shipped with torch) behind a
                        registered transformers attention function; padded calls fall through to SDPA (CUDA)
    mask                transformers' packed-sequence detection (masking_utils: attention_mask=None and position
                        ids that restart) builds an exact block-diagonal causal mask for SDPA/eager. It computes the
                        cross-sequence blocks and throws them away, so it is only used off CUDA, and there on a few
                        rows of MASK_ROW_TOKENS tokens (or the longest sequence) instead of one long row.

Both varlen kernels skip the cross-sequence blocks entirely. Packing is exact only for causal attention over
sequences that see nothing but their own tokens: a bidirectional model (model.attention) is refused.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

# Families whose decoder takes position_ids through to RoPE and whose masks transformers builds in masking_utils
# (packed-sequence aware). Others could work, but "auto" only packs where exactness was checked.
PACKABLE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
VARLEN_ATTENTION = "embforge_varlen"
MASK_ROW_TOKENS = 256   # CPU rows: a dense mask computes every cross-sequence block of its row


def make_packed_chunks(lengths: list[int], chunk_tokens: int, max_chunk_seqs: int | None = None) -> list[list[int]]:
    """Group sequence indices into chunks of at most `chunk_tokens` REAL tokens (first-fit decreasing: longest
    first, each into the first chunk with room). A sequence longer than the budget gets a chunk of its own;
    `max_chunk_seqs` caps the sequences per chunk."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if max_chunk_seqs is not None and max_chunk_seqs < 1:
        raise ValueError(f"max_chunk_seqs must be >= 1 or None, got {max_chunk_seqs}")
    bad = [i for i, n in enumerate(lengths) if n < 1]
    if bad:
        raise ValueError(f"make_packed_chunks: sequence(s) {bad[:10]} are empty")
    chunks: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for c, free in enumerate(room):
            if n <= free and (max_chunk_seqs is None or len(chunks[c]) < max_chunk_seqs):
                chunks[c].append(i)
                room[c] -= n
                break
        else:
            chunks.append([i])
            room.append(chunk_tokens - n)   # negative when over budget: nothing else will fit
    return chunks


@dataclass
class PackedRows:
    input_ids: torch.Tensor      # [rows, length]
    position_ids: torch.Tensor   # [rows, length], 0.. at every sequence start
    cu_seqlens: torch.Tensor     # [segments + 1] int32 over the flattened rows, on the device
    max_len: int
    order: torch.Tensor          # [b] segment index of each input sequence (the others are row-tail filler)


def pack_sequences(seqs: list[list[int]], device, row_tokens: int | None = None, pad_id: int = 0) -> PackedRows:
    """One padding-free row of all `seqs` (row_tokens=None), or rows of `row_tokens` tokens filled first-fit: the
    tail of a row that is not full becomes a filler segment of `pad_id` with its own restarting positions, so it
    attends only to itself and is never pooled."""
    if not seqs:
        raise ValueError("pack_sequences: no sequences")
    empty = [i for i, s in enumerate(seqs) if len(s) == 0]
    if empty:
        raise ValueError(f"pack_sequences: sequence(s) {empty[:10]} are empty")
    lengths = [len(s) for s in seqs]
    if row_tokens is None or sum(lengths) <= row_tokens:
        rows = [list(range(len(seqs)))]
        width = sum(lengths)
    else:
        width = max(row_tokens, max(lengths))
        rows = make_packed_chunks(lengths, width)
    ids, pos, seg_lengths, order = [], [], [], [0] * len(seqs)
    for row in rows:
        for i in row:
            order[i] = len(seg_lengths)
            seg_lengths.append(lengths[i])
            ids += seqs[i]
            pos += range(lengths[i])
        tail = width - sum(lengths[i] for i in row)
        if tail:
            seg_lengths.append(tail)
            ids += [pad_id] * tail
            pos += range(tail)
    cu = torch.zeros(len(seg_lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seg_lengths).cumsum(0)
    shape = (len(rows), width)
    return PackedRows(torch.tensor(ids).view(shape).to(device), torch.tensor(pos).view(shape).to(device),
                      cu.to(device), max(seg_lengths), torch.tensor(order, device=device))


# ------------------------------------------------------------------------------------------------ attention
def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: varlen flash attention for packed calls (cu_seq_lens_q given), SDPA for
    everything else (padded chunks of the same model)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    cu = kwargs.pop("cu_seq_lens_q", None)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    from torch.nn.attention.varlen import varlen_attn
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one packed row, got batch {query.shape[0]}")
    # [1, heads, total, d] -> [total, heads, d]
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    max_len = int(kwargs["max_length_q"])
    window = kwargs.get("sliding_window")
    if window is not None and max_len > window:
        raise ValueError(f"packed attention: a sequence of {max_len} tokens exceeds the model's sliding window "
                         f"({window}); use batch.packing=false")
    k, v, opts = _varlen_inputs(varlen_attn, q, k, v, scaling)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **opts)
    return out[None], None   # [1, total, heads, d], as transformers' attention functions return


def _varlen_inputs(varlen_attn, q, k, v, scaling) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """k, v and the keyword options for causal attention in the spelling of the installed torch's varlen_attn,
    read off its signature. What each release's torch/nn/attention/varlen.py says (read 2026-12-03 from the
    released wheels; 2.13 from lock.txt's install):

        2.9    no torch.nn.attention.varlen (torch_varlen_available() is False: packing needs flash-attn)
        2.10   varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None): no scale, no GQA
        2.11   (the device image) ..., max_k, *, return_aux=None, scale=None, window_size=(-1, -1): causal is
               window_size=(-1, 0), compared as a tuple; no GQA flag, k/v documented as [total, heads, d]
        2.13   (lock.txt) 2.11's keywords plus enable_gqa=False (and seqused_k, block_table, num_splits); without
               the flag it raises when query and key head counts differ

    So on 2.10/2.11 grouped-query models (every family here: 4 query / 2 kv heads in the tiny models, 32/8 on the
    7B bench shape) get k and v expanded to the query's heads: repeat_interleave on the head dim, the grouping of
    transformers' repeat_kv (query head h reads kv head h // group); autograd sums each group's gradients back.
    Where enable_gqa exists, k and v go unexpanded with the flag (no copy)."""
    import inspect
    params = inspect.signature(varlen_attn).parameters
    opts = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        if heads % kv_heads:
            raise ValueError(f"packed attention: {heads} query heads is not a multiple of {kv_heads} kv heads")
        if "enable_gqa" in params:
            opts["enable_gqa"] = True
        else:
            group = heads // kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if "scale" in params:
        opts["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"this torch's varlen_attn takes no scale, and the model's {scaling} is not 1/sqrt(d)")
    return k, v, opts


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """Packed calls need no mask (the kernel gets cu_seqlens); padded calls get SDPA's."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, _varlen_mask)


def packed_kernel(attn_implementation: str, device: torch.device) -> str | None:
    """How a model loaded with `attn_implementation` on `device` confines attention to each packed sequence,
    or None where packing would not skip the cross-sequence blocks on a GPU."""
    if attn_implementation.startswith("flash_attention"):
        return "flash_attention_2"
    if attn_implementation == VARLEN_ATTENTION:
        return "varlen"
    if device.type == "cuda":
        return None   # a dense block-diagonal mask on a GPU: exact, but it computes what it masks
    if attn_implementation in ("sdpa", "eager"):
        return "mask"
    return None


def resolve_packing(requested, embedder) -> bool:
    """batch.packing: true | false | "auto" (true wherever it is exact and a kernel skips the cross-sequence
    blocks). `true` where that does not hold is an error naming why."""
    if requested not in (True, False, "auto"):
        raise ValueError(f"batch.packing must be true, false or 'auto', got {requested!r}")
    if requested is False:
        return False
    why = why_not_packable(embedder)
    if why is None:
        return True
    if requested == "auto":
        return False
    raise ValueError(f"batch.packing=true is not possible here: {why}; set batch.packing to false or 'auto'")


def why_not_packable(embedder) -> str | None:
    family = embedder.model.config.model_type
    attention = getattr(embedder.config, "attention", "causal")
    if attention != "causal":
        return (f"model.attention={attention!r}: packed sequences are only exact with causal attention "
                "(a bidirectional block-diagonal mask is not implemented)")
    if family not in PACKABLE_FAMILIES:
        return f"model family {family!r} is not one of the packing-checked families {PACKABLE_FAMILIES}"
    impl = embedder.model.config._attn_implementation
    if packed_kernel(impl, embedder.device) is None:
        return (f"attention {impl!r} on {embedder.device.type} has no varlen kernel (install flash-attn, or use a "
                "torch with torch.nn.attention.varlen and bf16/fp16)")
    return None


# ------------------------------------------------------------------------------------------------ forward
def packed_hidden(model, rows: PackedRows, kernel: str) -> torch.Tensor:
    """Decoder hidden states [rows x length, H] of packed rows, flattened (cu_seqlens indexes into them)."""
    kwargs = {}
    if kernel in ("flash_attention_2", "varlen"):
        if rows.input_ids.shape[0] != 1:
            raise ValueError("varlen attention takes one packed row")
        # Given explicitly, the boundaries are not re-derived from position ids in every layer.
        kwargs = dict(cu_seq_lens_q=rows.cu_seqlens, cu_seq_lens_k=rows.cu_seqlens, max_length_q=rows.max_len,
                      max_length_k=rows.max_len)
    # attention_mask=None with restarting position ids is transformers' packed format (masking_utils).
    out = model(input_ids=rows.input_ids, position_ids=rows.position_ids, attention_mask=None, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.flatten(0, 1)


def embed_packed(embedder, seqs: list[list[int]]) -> torch.Tensor:
    """Raw pooled fp32 embeddings [b, H] of `seqs`, computed padding-free: one packed row for the varlen kernels;
    for the dense block-diagonal mask (CPU) rows of MASK_ROW_TOKENS (or the longest sequence), since the mask's
    cost grows with the square of the row (measured on SmolLM2, 2 CPU cores, forward: one 4096-token row of 32
    sequences took about 2x the time of the same 32 sequences padded)."""
    from embforge.kernels import last_token_pool_packed, mean_pool_packed
    kernel = embedder.packed_kernel
    rows = pack_sequences(seqs, embedder.device, MASK_ROW_TOKENS if kernel == "mask" else None,
                          embedder.tokenizer.pad_token_id)
    hidden = packed_hidden(embedder.model, rows, kernel)
    pool = mean_pool_packed if embedder.config.pooling == "mean" else last_token_pool_packed
    pooled = pool(hidden, rows.cu_seqlens, normalize=False, out_dtype=torch.float32)
    return pooled.index_select(0, rows.order)   # input order, filler segments dropped
