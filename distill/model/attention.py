"""`sdpa_varlen`: per-document causal attention for packed rows, without flash-attn.

transformers isolates the documents of a packed row (positions restarting at 0, `attention_mask` None) by
building a dense (B, 1, T, T) boolean mask and handing it to `scaled_dot_product_attention`. That costs
the whole T² score matrix (plus the mask) however short the documents are, and a masked SDPA is slower
than its `is_causal` kernel. flash-attn's varlen kernel (`flash_attention_2` on CUDA) avoids both; this
module is the same idea with stock SDPA: each document of a row is its own causal attention, so the cost is
Σ nᵢ² instead of T², and no mask is ever built.

Registered with transformers as the attention implementation "sdpa_varlen" (and its mask function), so a
model loads with `attn_implementation="sdpa_varlen"`; `distill.model.load.resolve_attention` picks it for
`attention: auto` when flash-attn is not usable and the model type is one of `SUPPORTED`. It handles
only the case it is for and hands every other call to transformers' own `sdpa` unchanged:
- packed rows (`attention_mask` None, queries = keys, no cache offset): one causal SDPA per document,
  where a document starts wherever a position does not increase (`pos[t] <= pos[t-1]`), or at the offsets
  `cu_seq_lens_q` of a flattened row when the caller passes them (as flash-attn's varlen path takes them).
  Skipped
  positions (a short-to-long row's jumps) keep increasing, so such a row stays one causal document (as
  with flash-attn's varlen path; transformers' sdpa would cut it at every jump). A packed prompt's
  prefill with a KV cache is isolated too (transformers' sdpa does not isolate with a cache);
- an explicit mask (padding, or all ones): transformers' sdpa, which never splits a row with a mask; an
  all-ones mask travels as a 1×1×1×1 marker, so the causal kernel runs without a T×T mask;
- decoding with a cache, sliding windows: transformers' `sdpa` path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"

SUPPORTED = ("llama", "mistral", "qwen2")
"""Model types whose decoders hand the mask function's result straight to the attention and build no
other mask (no block / and-mask functions): `auto` picks sdpa_varlen only for these."""

_NO_SPLIT: dict = {}
"""Per device, the marker the mask function returns for an explicit mask that needs no masking (all ones):
attention stays causal over the whole row, as with transformers' sdpa, and no T×T mask is built."""


def document_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) spans of its documents; None when every row is one document.

    position_ids: (B, T). A document starts at t = 0 and wherever position_ids[t] <= position_ids[t - 1].
    Computed from the boundaries only (one small transfer), at every layer: nothing is cached, so a
    position buffer refilled in place can never be read stale.
    """
    B, T = position_ids.shape
    starts = (position_ids[:, 1:] <= position_ids[:, :-1]).nonzero()  # (K, 2): (row, t - 1)
    if starts.shape[0] == 0:
        return None
    cuts: list[list[int]] = [[0] for _ in range(B)]
    for row, t in starts.tolist():  # row-major order: each row's cuts ascend
        cuts[row].append(t + 1)
    return [list(zip(c, c[1:] + [T])) for c in cuts]


def document_offsets(position_ids: torch.Tensor) -> dict:
    """transformers' `FlashAttentionKwargs` of ONE flattened row (1, N), from its positions: a document starts
    at 0 and wherever a position does not increase. Computed once per micro-batch on the host (no device
    sync), so no attention layer derives them again (transformers' flash path otherwise runs
    `prepare_fa_kwargs_from_position_ids`, with a `nonzero`, in every layer, forward and recompute).

    Returns:
        {"cu_seq_lens_q", "cu_seq_lens_k": int32 (D + 1,), "max_length_q", "max_length_k": int}.
    """
    total = position_ids.numel()
    spans = document_segments(position_ids.reshape(1, total))  # the same boundary rule as sdpa_varlen's
    cuts = [0, total] if spans is None else [start for start, _ in spans[0]] + [total]
    offsets = torch.tensor(cuts, dtype=torch.int32)
    longest = max(b - a for a, b in zip(cuts, cuts[1:]))
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest,
            "max_length_k": longest}


FLATTENED = ("flash_attention_2",)
"""Attention implementations that separate packed documents only in a flattened (1, B·T) micro-batch:
transformers' flash path reads documents from position_ids (or cu_seq_lens) only when the batch has one row.
transformers' sdpa must NOT be flattened: its dense mask would grow from B·T² to (B·T)² (2.6-2.8x slower at
4 × 1024 here, benchmarks/micro_batch_layout.py); sdpa_varlen splits each row itself."""


def flattens(implementation: str) -> bool:
    """Whether micro-batches for this attention implementation are flattened to one row."""
    return implementation in FLATTENED


def _no_split_marker(device) -> torch.Tensor:
    device = torch.device(device)
    if device not in _NO_SPLIT:
        _NO_SPLIT[device] = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    return _NO_SPLIT[device]


def _is_marker(mask) -> bool:
    return mask is not None and any(mask is m for m in _NO_SPLIT.values())


def _sliding(module, kwargs) -> bool:
    return kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """The attention interface: query (B, Hq, T, D), key/value (B, Hkv, T, D) → ((B, T, Hq, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _is_marker(attention_mask):  # an explicit all-ones mask: causal over the whole row, no split
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    position_ids = kwargs.get("position_ids")
    offsets = kwargs.get("cu_seq_lens_q")  # a flattened row's document offsets, when the step passes them
    plain = (attention_mask is not None or (position_ids is None and offsets is None)
             or query.shape[2] != key.shape[2]
             or query.shape[2] < 2 or is_causal is False or not getattr(module, "is_causal", True)
             or _sliding(module, kwargs)
             or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux")))
    if plain:
        segments = None
    elif offsets is not None and query.shape[0] == 1:
        cuts = offsets.tolist()
        segments = [list(zip(cuts, cuts[1:]))] if len(cuts) > 2 else None
    else:
        segments = document_segments(position_ids)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # Grouped-query attention inside the kernel (as transformers' sdpa does without a mask): no repeated
    # key/value copies held for backward.
    gqa = {"enable_gqa": True} if getattr(module, "num_key_value_groups", 1) > 1 else {}
    if len(segments) == 1 and query.shape[0] > 1:  # one row of positions shared by the batch
        segments = segments * query.shape[0]
    dtype = query.dtype  # returned in: a bf16 model without autocast needs bf16 into its o_proj
    if query.device.type == "cpu":
        # On the CPU the fp32 flash kernel is ~2x faster than the bf16 one on document-sized blocks
        # (benchmarks/throughput.py diagnostics): run the segments in fp32 with autocast off.
        query, key, value = query.float(), key.float(), value.float()
        context = torch.autocast("cpu", enabled=False)
    else:
        context = contextlib.nullcontext()
    # unbind / split, not slicing: their backward is one stack / cat, not a zero-filled copy per piece; and
    # 4-D pieces, as the CPU kernel is much slower on 3-D inputs.
    rows = []
    with context:
        # (H, T, D) each
        for spans, q, k, v in zip(segments, query.unbind(0), key.unbind(0), value.unbind(0)):
            lengths = [e - s for s, e in spans]
            pieces = zip(q[None].split(lengths, 2), k[None].split(lengths, 2), v[None].split(lengths, 2))
            parts = [F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout, scale=scaling,
                                                    is_causal=True, **gqa)
                     for qi, ki, vi in pieces]  # (1, Hq, n, D) each
            rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])  # (1, Hq, T, D)
    out = torch.cat(rows) if len(rows) > 1 else rows[0]  # (B, Hq, T, D)
    return out.transpose(1, 2).to(dtype).contiguous(), None


def sdpa_varlen_mask(*args, **kwargs):
    """The mask function. No explicit mask and no cache: None (the attention finds the documents from
    position_ids). An explicit mask: transformers' sdpa mask, except that where it would skip an all-ones
    mask (None) this returns the no-split marker, so the row stays one causal sequence exactly as
    transformers' sdpa runs it. Sliding windows and cache offsets: transformers' sdpa mask."""
    from transformers.masking_utils import sdpa_mask

    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    config = kwargs.get("config")
    windowed = config is not None and getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True)
    given = kwargs.get("attention_mask") is not None
    if (not windowed and not given and q_length is not None and q_length == kv_length
            and not kwargs.get("q_offset") and not kwargs.get("kv_offset")
            and kwargs.get("local_size") is None):
        return None
    mask = sdpa_mask(*args, **kwargs)
    if mask is None and given and q_length is not None and q_length > 1:
        return _no_split_marker(kwargs.get("device", "cpu"))
    return mask


def register() -> str:
    """Make "sdpa_varlen" known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, sdpa_varlen_mask)
    return NAME
