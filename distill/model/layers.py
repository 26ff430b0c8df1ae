"""Choosing which layers to distil: the LongReD criterion (per-layer attention KL), which the paper's code
never shipped.

The extended model's attention distributions drift from the original's most at a few layers; LongReD
distils the hidden states of the M layers with the largest attention-distribution KL, plus the last layer
(M = 6 at 32K, 3 at 128K).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from distill.config import ConfigError
from distill.data.dataset import DataError, PackedStream


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
def attention_kl(student, teacher, input_ids: torch.Tensor, batch_size: int = 1, forward=None,
                 autocast=contextlib.nullcontext) -> torch.Tensor:
    """Per-layer KL(teacher ‖ student) of attention distributions, mean over rows, heads and queries.

    Args:
        input_ids: (B, T) token ids of short sample text (one document per row, positions 0..T-1).
        forward: the student's forward (a strategy's, through the root of a sharded model; every rank calls
            it with the same rows); None calls `student` itself.
        autocast: the step's precision.

    Returns:
        (L,) tensor: entry i is the KL at decoder layer i (whose output is hidden_states[i + 1]).
    """
    forward = forward or student
    total, rows = None, 0
    with eager_attention(student), eager_attention(teacher), autocast():
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start: start + batch_size]
            mask = torch.ones_like(ids)
            # Through the roots (logits of one token): a sharded student gathers its embeddings there.
            s = forward(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False,
                        logits_to_keep=1)
            t = teacher(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False,
                        logits_to_keep=1)
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


def sample_documents(stream, count: int = 2, max_tokens: int = 512, scan_rows: int = 64) -> torch.Tensor:
    """Up to `count` single documents from a stream, cut to one common length, for attention-KL measurements.

    Scans the first `scan_rows` rows, takes the longest documents (any document of a packed row, whole), and
    truncates them to min(max_tokens, the shortest chosen). Each returned row is ONE document with positions
    0..T-1, as `distill.model.layers.attention_kl` expects.

    Returns:
        (N, T) int64 token ids, N ≤ count.
    """
    if not isinstance(stream, PackedStream):
        stream = PackedStream(stream)
    docs = []
    for i in range(min(scan_rows, len(stream))):
        ids = stream.input_ids(i)
        start = 0
        for n in stream.lengths(i):
            docs.append(ids[start: start + n])
            start += n
    docs = [d for d in docs if len(d) >= 2]
    if not docs:
        raise DataError(f"{stream.path}: no document of at least 2 tokens in the first {scan_rows} rows")
    docs.sort(key=len, reverse=True)  # stable: ties keep stream order, so the choice is deterministic
    chosen = docs[:count]
    length = min(int(max_tokens), min(len(d) for d in chosen))
    return torch.from_numpy(np.stack([d[:length].astype(np.int64) for d in chosen]))


def select_layers(student, teacher, input_ids: torch.Tensor, top_k: int = 6, forward=None,
                  autocast=contextlib.nullcontext) -> dict:
    """The top-k layers by attention KL, as hidden_states indices, plus the last layer (`forward`,
    `autocast`: as for `attention_kl`).

    Returns:
        {"layers": sorted hidden_states indices, "kl": per-layer KL list, "ranking": layer indices by KL}.
    """
    kl = attention_kl(student, teacher, input_ids, forward=forward, autocast=autocast).float()
    num_layers = kl.numel()
    ranking = torch.argsort(kl, descending=True).tolist()
    chosen = {i + 1 for i in ranking[: min(top_k, num_layers)]} | {num_layers}
    return {"layers": sorted(chosen), "kl": kl.tolist(), "ranking": [i + 1 for i in ranking]}


def resolve_layers(cfg, num_layers: int, student=None, teacher=None, streams=None, documents: int = 4,
                   max_tokens: int = 1024, forward=None,
                   autocast=contextlib.nullcontext) -> dict[str, list[int]]:
    """Hidden-state indices per stream with a `hidden` objective, range-checked ('last' = num_layers, the
    final-norm output). `layers: auto` runs `select_layers` on `documents` single documents of the stream's
    own data (each alone, positions 0..T-1, as scripts/select_layers.py does: a packed row would let
    attention cross documents), cut to `max_tokens`, through `forward` under `autocast` (the trainer passes
    its strategy's, after the models are laid out).

    Raises:
        ConfigError: an index out of range, or `auto` without a teacher to compare with.
    """
    resolved = {}
    for name, stream in cfg.streams.items():
        hidden = stream.objectives.hidden
        if hidden is None:
            continue
        if hidden.layers == "auto":
            if teacher is None or student is None or streams is None:
                raise ConfigError(f"streams.{name}.objectives.hidden.layers: 'auto' needs a teacher to rank "
                                  f"layers against")
            device = next(student.parameters()).device
            docs = sample_documents(streams[name], documents, max_tokens).to(device)  # (N, T)
            resolved[name] = select_layers(student, teacher, docs, top_k=hidden.top_k, forward=forward,
                                           autocast=autocast)["layers"]
            continue
        layers = []
        for i, layer in enumerate(hidden.layers):
            index = num_layers if layer == "last" else layer
            if not 0 <= index <= num_layers:
                raise ConfigError(
                    f"streams.{name}.objectives.hidden.layers[{i}]: {layer} is out of range; allowed: "
                    f"0..{num_layers} (0 = embeddings, {num_layers} = final-norm output) or 'last'")
            layers.append(index)
        resolved[name] = sorted(set(layers))
    return resolved
