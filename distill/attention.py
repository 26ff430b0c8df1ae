"""`sdpa_varlen`: per-document causal attention for packed rows, without flash-attn.

transformers isolates the documents of a packed row (positions restarting at 0, `attention_mask` None) by
building a dense (B, 1, T, T) boolean mask and handing it to `scaled_dot_product_attention`. That costs
the whole T² score matrix (plus the mask) however short the documents are, and a masked SDPA is slower
than its `is_causal` kernel. flash-attn's varlen kernel (`flash_attention_2` on CUDA) avoids both; this
module is the same idea with stock SDPA: each document of a row is its own causal attention, so the cost is
Σ nᵢ² instead of T², and no mask is ever built.

Registered with transformers as the attention implementation "sdpa_varlen" (and its mask function), so a
model loads with `attn_implementation="sdpa_varlen"`; `distill.models.resolve_attention` picks it for
`attention: auto` when flash-attn is not usable. It handles only the case it is for and hands every
other call to transformers' own `sdpa` unchanged:
- packed rows (`attention_mask` None, queries = keys, no cache): one causal SDPA per document, where a
  document starts wherever a position does not increase (`pos[t] <= pos[t-1]`). Skipped positions (a
  short-to-long row's jumps) keep increasing, so such a row stays one causal document;
- an explicit mask (padding), a KV cache, decoding, sliding windows: transformers' `sdpa` path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"

_memo: dict = {"ids": None, "version": -1, "segments": None}


def document_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) spans of its documents; None when every row is one document.

    position_ids: (B, T). A document starts at t = 0 and wherever position_ids[t] <= position_ids[t - 1].
    """
    starts = position_ids[:, 1:] <= position_ids[:, :-1]  # (B, T-1)
    if not bool(starts.any()):
        return None
    T = position_ids.shape[1]
    out = []
    for row in starts.cpu().tolist():
        bounds = [0] + [t + 1 for t, s in enumerate(row) if s] + [T]
        out.append(list(zip(bounds[:-1], bounds[1:])))
    return out


def _segments_of(position_ids: torch.Tensor):
    """`document_segments`, computed once per forward: every layer receives the same position_ids tensor."""
    if _memo["ids"] is position_ids and _memo["version"] == position_ids._version:
        return _memo["segments"]
    segments = document_segments(position_ids)
    _memo.update(ids=position_ids, version=position_ids._version, segments=segments)
    return segments


def _sliding(module, kwargs) -> bool:
    return kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None) is not None


def sdpa_varlen_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """The attention interface: query (B, Hq, T, D), key/value (B, Hkv, T, D) → ((B, T, Hq, D), None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    plain = (attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
             or query.shape[2] < 2 or is_causal is False or not getattr(module, "is_causal", True)
             or _sliding(module, kwargs) or kwargs.get("position_bias") is not None)
    segments = None if plain else _segments_of(position_ids)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, Hq, T, D)
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
        for spans, q, k, v in zip(segments, query.unbind(0), key.unbind(0), value.unbind(0)):  # (H, T, D) each
            lengths = [e - s for s, e in spans]
            pieces = zip(q[None].split(lengths, 2), k[None].split(lengths, 2), v[None].split(lengths, 2))
            parts = [F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout, scale=scaling, is_causal=True)
                     for qi, ki, vi in pieces]  # (1, Hq, n, D) each
            rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])  # (1, Hq, T, D)
    out = torch.cat(rows) if len(rows) > 1 else rows[0]  # (B, Hq, T, D)
    return out.transpose(1, 2).to(dtype).contiguous(), None


def sdpa_varlen_mask(*args, **kwargs):
    """The mask function: none for packed rows without a cache (the attention finds the documents from
    position_ids); transformers' sdpa mask for everything else (padding, cache offsets)."""
    from transformers.masking_utils import sdpa_mask

    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    config = kwargs.get("config")
    windowed = config is not None and getattr(config, "sliding_window", None) is not None and getattr(
        config, "use_sliding_window", True)
    if (not windowed and kwargs.get("attention_mask") is None and q_length is not None and q_length == kv_length
            and not kwargs.get("q_offset") and not kwargs.get("kv_offset") and kwargs.get("local_size") is None):
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Make "sdpa_varlen" known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, sdpa_varlen_mask)
    return NAME
