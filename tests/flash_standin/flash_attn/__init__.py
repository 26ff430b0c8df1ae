"""A CPU stand-in for flash-attn 2: its entry points, argument names and contracts, exact attention by SDPA.

flash-attn has no CPU build, so the code transformers runs for `attn_implementation="flash_attention_2"` (its
varlen path for packed rows, its dtype handling, its padding helpers) never runs in CI. With this directory on
the path (tests/flash_standin: this package, its `flash-attn` distribution metadata and a `sitecustomize`
that patches transformers' availability checks, `flash_attn.standin.patch_transformers`), transformers takes
that path on the CPU and calls these functions exactly as it calls the real ones on a GPU.

What is kept of flash-attn 2.x (its `flash_attn_interface.py` docstrings are the contract):
- layouts: `flash_attn_func` takes (B, Sq, Hq, D) queries and (B, Sk, Hk, D) keys/values; the varlen entry
  point takes (total, H, D) with int32 `cu_seqlens` of shape (batch + 1,);
- dtypes: fp16 or bf16 only (`RuntimeError: FlashAttention only support fp16 and bf16 data type`), the same
  for q, k and v; int32 `cu_seqlens`;
- grouped-query attention: Hq a multiple of Hk;
- `causal` aligned to the bottom-right corner when Sq != Sk (flash-attn ≥ 2.1), `window_size=(left, right)`
  with -1 for no limit, `softmax_scale` defaulting to 1/sqrt(D), `dropout_p`;
- the output has the query's dtype and shape.
Not kept: the kernels (each document is one `scaled_dot_product_attention` in fp32), `softcap`, ALiBi,
returned attention probabilities and the KV-cache entry point (each raises).

Every call is recorded (`standin.CALLS`: entry point, documents and their boundaries, dtype, causal, window)
and, when FLASH_STANDIN_RECORD_DIR is set, written there as JSON when the process exits, so a test can check
what a multi-process run sent to attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flash_attn import standin

__version__ = "2.8.3"

_HALF = (torch.float16, torch.bfloat16)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: int) -> None:
    if q.dtype not in _HALF:
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError("query and key must have the same dtype")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != dims:
            raise RuntimeError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise RuntimeError("Input tensor must have contiguous last dimension")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    if k.shape != v.shape:
        raise RuntimeError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[-1] > 256:
        raise RuntimeError("FlashAttention forward only supports head dimension at most 256")


def _unsupported(softcap: float, alibi_slopes, return_attn_probs: bool) -> None:
    if softcap:
        raise RuntimeError("flash_attn stand-in: softcap is not implemented")
    if alibi_slopes is not None:
        raise RuntimeError("flash_attn stand-in: alibi_slopes is not implemented")
    if return_attn_probs:
        raise RuntimeError("flash_attn stand-in: return_attn_probs is not implemented")


def _allowed(sq: int, sk: int, causal: bool, window_size, device) -> torch.Tensor | None:
    """(sq, sk) bool: which keys each query may see (None: all of them). Query i sits at key position
    i + sk - sq (bottom-right alignment); causal keeps keys ≤ it, the window keeps [it - left, it + right]."""
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    at = torch.arange(sq, device=device)[:, None] + (sk - sq)  # (sq, 1)
    keys = torch.arange(sk, device=device)[None, :]  # (1, sk)
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= keys <= at + right
    if left >= 0:
        ok &= keys >= at - left
    return ok


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float, causal: bool,
            window_size) -> torch.Tensor:
    """One sequence: q (Sq, Hq, D), k/v (Sk, Hk, D) → (Sq, Hq, D) in q's dtype, computed in fp32."""
    sq, sk = q.shape[0], k.shape[0]
    qf, kf, vf = (t.float().transpose(0, 1)[None] for t in (q, k, v))  # (1, H, S, D)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        kf, vf = kf.repeat_interleave(groups, dim=1), vf.repeat_interleave(groups, dim=1)
    plain_causal = causal and sq == sk and int(window_size[0]) < 0
    allowed = None if plain_causal else _allowed(sq, sk, causal, window_size, q.device)
    with torch.autocast(q.device.type, enabled=False):
        if plain_causal:
            out = F.scaled_dot_product_attention(qf, kf, vf, dropout_p=dropout_p, scale=scale, is_causal=True)
        elif allowed is None:
            out = F.scaled_dot_product_attention(qf, kf, vf, dropout_p=dropout_p, scale=scale)
        else:
            # A query that may see no key (sq > sk with causal) gets zeros, as flash-attn returns.
            empty = ~allowed.any(-1, keepdim=True)  # (sq, 1)
            mask = allowed | empty
            out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, dropout_p=dropout_p, scale=scale)
            out = out.masked_fill(empty, 0.0)
    return out[0].transpose(0, 1).to(q.dtype)  # (Sq, Hq, D)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hk, D) → (B, Sq, Hq, D)."""
    del deterministic
    _check_qkv(q, k, v, 4)
    _unsupported(softcap, alibi_slopes, return_attn_probs)
    if q.shape[0] != k.shape[0]:
        raise RuntimeError("batch size must be the same for q, k and v")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    standin.record("flash_attn_func", q, causal, window_size, rows=q.shape[0], seq_q=q.shape[1])
    return torch.stack([_attend(q[b], k[b], v[b], dropout_p, scale, causal, window_size)
                        for b in range(q.shape[0])])


def _check_cu(name: str, cu: torch.Tensor, total: int) -> list[int]:
    if cu.dtype != torch.int32:
        raise RuntimeError(f"{name} must have dtype int32")
    if cu.dim() != 1 or cu.numel() < 2:
        raise RuntimeError(f"{name} must be a 1-D tensor of batch_size + 1 offsets")
    offsets = cu.tolist()
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise RuntimeError(f"{name} must rise from 0 to the {total} tokens, got {offsets}")
    return offsets


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """Packed sequences: q (total_q, Hq, D), k/v (total_k, Hk, D), cu_seqlens int32 (batch + 1,) →
    (total_q, Hq, D); sequence i is q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]] against its own keys."""
    del deterministic
    _check_qkv(q, k, v, 3)
    _unsupported(softcap, alibi_slopes, return_attn_probs)
    if block_table is not None:
        raise RuntimeError("flash_attn stand-in: block_table (paged KV cache) is not implemented")
    cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cu_q) != len(cu_k):
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must hold the same number of sequences")
    lengths_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lengths_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if max(lengths_q) > int(max_seqlen_q) or max(lengths_k) > int(max_seqlen_k):
        raise RuntimeError(f"max_seqlen_q/k ({int(max_seqlen_q)}, {int(max_seqlen_k)}) below the longest "
                           f"sequence ({max(lengths_q)}, {max(lengths_k)})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    standin.record("flash_attn_varlen_func", q, causal, window_size, cu_seqlens=cu_q)
    pieces = [_attend(qi, ki, vi, dropout_p, scale, causal, window_size)
              for qi, ki, vi in zip(q.split(lengths_q), k.split(lengths_k), v.split(lengths_k))]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """Not implemented by the stand-in (decoding with a paged cache is not a training path)."""
    raise RuntimeError("flash_attn stand-in: flash_attn_with_kvcache is not implemented")
