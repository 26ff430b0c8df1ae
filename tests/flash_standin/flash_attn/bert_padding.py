"""flash-attn 2's padding helpers (`flash_attn.bert_padding`): between (B, S, ...) padded tensors and the
(total, ...) packed layout of the varlen entry point."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def index_first_axis(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (N, ...), indices (n,) → (n, ...)."""
    return tensor[indices]


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """values (n, ...) scattered into zeros (first_axis_dim, ...) at indices."""
    out = torch.zeros((first_axis_dim, *values.shape[1:]), dtype=values.dtype, device=values.device)
    out[indices] = values
    return out


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """hidden_states (B, S, ...), attention_mask (B, S) with 1 for real tokens →
    (hidden (total, ...), indices (total,), cu_seqlens int32 (B + 1,), max_seqlen, seqused int32 (B,))."""
    used = attention_mask if unused_mask is None else attention_mask + unused_mask
    seqlens = used.sum(dim=-1, dtype=torch.int32)  # (B,)
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(used.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item())
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """hidden_states (total, ...) back to (batch, seqlen, ...), zeros where there was padding."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_states.shape[1:])
