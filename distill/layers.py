"""Choosing which layers to distil: the LongReD criterion (per-layer attention KL), which the paper's code
never shipped.

The extended model's attention distributions drift from the original's most at a few layers; LongReD
distils the hidden states of the M layers with the largest attention-distribution KL, plus the last layer
(M = 6 at 32K, 3 at 128K).
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def eager_attention(model):
    """Temporarily switch a model to eager attention, the only backend that returns the probabilities."""
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


@torch.no_grad()
def attention_kl(student, teacher, input_ids: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Per-layer KL(teacher ‖ student) of attention distributions, mean over rows, heads and queries.

    Args:
        input_ids: (B, T) token ids of short sample text (one document per row, positions 0..T-1).

    Returns:
        (L,) tensor: entry i is the KL at decoder layer i (whose output is hidden_states[i + 1]).
    """
    total, rows = None, 0
    with eager_attention(student), eager_attention(teacher):
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start: start + batch_size]
            mask = torch.ones_like(ids)
            s = student.get_decoder()(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
            t = teacher.get_decoder()(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
            per_layer = []
            for a_s, a_t in zip(s.attentions, t.attentions):  # (B, heads, T, T) each
                p_t = a_t.float().clamp_min(1e-12)
                p_s = a_s.float().clamp_min(1e-12)
                kl = (a_t.float() * (p_t.log() - p_s.log())).sum(-1)  # (B, heads, T)
                per_layer.append(kl.mean(dim=(1, 2)).sum())
            layer_sums = torch.stack(per_layer)
            total = layer_sums if total is None else total + layer_sums
            rows += ids.shape[0]
    return total / rows


def select_layers(student, teacher, input_ids: torch.Tensor, top_k: int = 6) -> dict:
    """The top-k layers by attention KL, as hidden_states indices, plus the last layer.

    Returns:
        {"layers": sorted hidden_states indices, "kl": per-layer KL list, "ranking": layer indices by KL}.
    """
    kl = attention_kl(student, teacher, input_ids)
    num_layers = kl.numel()
    ranking = torch.argsort(kl, descending=True).tolist()
    chosen = {i + 1 for i in ranking[: min(top_k, num_layers)]} | {num_layers}
    return {"layers": sorted(chosen), "kl": kl.tolist(), "ranking": [i + 1 for i in ranking]}
