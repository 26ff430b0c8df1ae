"""What every measure of the evaluation shares: eval mode, the autocast rule, rows of a built stream,
chunked token NLL from final hidden states, per-document totals and their standard errors, plots' pyplot."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distill.data.dataset import IGNORE_INDEX, DataError, PackedStream
from distill.model.decoder import decoder_of, packed_layout


@contextlib.contextmanager
def eval_mode(*models):
    """Put models in eval() and restore every submodule's own train/eval flag afterwards."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def autocast_for(device: torch.device, *models):
    """bf16 autocast on CUDA, or wherever a model runs flash_attention_2 (flash-attn computes in fp16/bf16
    only; the same precision on every device); else plain fp32 (the parameters' dtype)."""
    flash = any(m is not None and m.config._attn_implementation == "flash_attention_2" for m in models)
    if device.type == "cuda" or flash:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def open_stream(stream) -> PackedStream:
    return stream if isinstance(stream, PackedStream) else PackedStream(stream)


def row_indices(stream: PackedStream, max_rows: int | None) -> list[int]:
    if len(stream) == 0:
        raise DataError(f"{stream.path}: the stream has no rows to evaluate on")
    n = len(stream) if max_rows is None else min(int(max_rows), len(stream))
    return list(range(n))


def exact_fp32(device: torch.device):
    """Autocast off: losses and logits are computed in fp32 even inside a bf16-autocast forward region."""
    return torch.autocast(device.type, enabled=False)


def lm_head_of(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
              bias: torch.Tensor | None = None, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token causal-LM NLL from final hidden states, in fp32 chunks (no (B·T, V) logits at once).

    Args:
        hidden: (B, T, H) final-norm hidden states.
        weight: (V, H) lm_head weight; bias: optional (V,).
        labels: (B, T) aligned with input_ids (-100: no target); hidden state t predicts labels[:, t + 1].

    Returns:
        (nll, has_target): (B, T) fp32 NLL of the token at position t (0 where there is no target) and (B, T)
        bool. Entry t is the loss of *predicting token t* (from tokens < t), so it lines up with position_ids.
    """
    with exact_fp32(hidden.device):
        return _token_nll(hidden, weight, labels, bias, chunk_size)


def _token_nll(hidden, weight, labels, bias, chunk_size):
    B, T, H = hidden.shape
    targets = labels[:, 1:].reshape(-1)  # (B·(T-1),)
    flat = hidden[:, :-1].reshape(-1, H)  # (B·(T-1), H)
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
    losses = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    w32 = weight.float()
    b32 = bias.float() if bias is not None else None
    for start in range(0, index.numel(), chunk_size):
        rows = index[start: start + chunk_size]
        logits = flat.index_select(0, rows).float() @ w32.t()  # (c, V)
        if b32 is not None:
            logits += b32
        losses[rows] = F.cross_entropy(logits, targets[rows], reduction="none")
        del logits
    nll = torch.zeros((B, T), dtype=torch.float32, device=hidden.device)
    nll[:, 1:] = losses.view(B, T - 1)
    has_target = torch.zeros((B, T), dtype=torch.bool, device=hidden.device)
    has_target[:, 1:] = (targets != IGNORE_INDEX).view(B, T - 1)
    return nll, has_target


def final_hidden(model, input_ids, position_ids) -> torch.Tensor:
    """(B, T, H) final-norm hidden states of a packed batch, without keeping the per-layer states."""
    ids, pos, extra, unflatten = packed_layout(model, input_ids, position_ids)
    out = decoder_of(model)(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False, **extra)
    return unflatten(out.last_hidden_state)


def safe_mean(total: float, count: int) -> float:
    return total / count if count else float("nan")


def mean_se(sums: Sequence[float], counts: Sequence[int]) -> float:
    """Standard error of a token-weighted mean Σs/Σn whose independent units are documents (document d
    contributes the NLL sum s_d over n_d tokens): tokens of one document are correlated, documents are not.

    The ratio estimator's SE, sqrt(D/(D-1) · Σ_d (s_d − m·n_d)²) / Σn with m = Σs/Σn over the D documents
    with tokens; NaN with fewer than 2.
    """
    s = np.asarray(sums, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    keep = n > 0
    s, n = s[keep], n[keep]
    if len(n) < 2:
        return float("nan")
    m = s.sum() / n.sum()
    return float(math.sqrt(len(n) / (len(n) - 1) * ((s - m * n) ** 2).sum()) / n.sum())


class DocTotals:
    """NLL sums and target counts per document, accumulated over batches (for `mean_se`)."""

    def __init__(self):
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def add(self, nll: torch.Tensor, mask: torch.Tensor, doc: torch.Tensor) -> None:
        """nll (B, T) fp32, mask (B, T) bool (the tokens to count), doc (B, T) int64 document ids."""
        ids = doc[mask].cpu()
        if ids.numel() == 0:
            return
        uniq, inverse = torch.unique(ids, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, nll[mask].double().cpu())
        counts = torch.bincount(inverse, minlength=len(uniq))
        for d, total, count in zip(uniq.tolist(), sums.tolist(), counts.tolist()):
            self.sums[d] = self.sums.get(d, 0.0) + total
            self.counts[d] = self.counts.get(d, 0) + count

    def mean(self) -> float:
        return safe_mean(sum(self.sums.values()), sum(self.counts.values()))

    def se(self) -> float:
        docs = sorted(self.sums)
        return mean_se([self.sums[d] for d in docs], [self.counts[d] for d in docs])

    def minus(self, other: DocTotals) -> DocTotals:
        """Per-document differences of sums over the same tokens (a paired difference, e.g. a gap)."""
        out = DocTotals()
        for d, total in self.sums.items():
            out.sums[d] = total - other.sums.get(d, 0.0)
            out.counts[d] = self.counts[d]
        return out


def doc_ids(position_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """(B, T) int64 document ids of packed rows (a document starts where position_ids is 0), unique across
    the rows of the batch and, with `offset` = B·T of the batches before, across batches."""
    B, T = position_ids.shape
    local = (position_ids == 0).long().cumsum(1) - 1  # (B, T)
    return local + torch.arange(B, device=position_ids.device)[:, None] * T + offset


def pyplot():
    import matplotlib  # heavy: only the plots need it

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def finite(x):
    """JSON-safe numbers: NaN/inf become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_json(path: str, record: dict, indent: int = 2) -> None:
    """`record` as JSON at `path`, replaced whole (written beside it first; non-finite numbers as strings)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(finite(record), f, indent=indent)
    os.replace(path + ".tmp", path)
