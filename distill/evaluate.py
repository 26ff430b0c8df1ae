"""Evaluation suite: short-text retention against the teacher, NLL by position on long text, passkey retrieval
(needle in a haystack), per-layer drift, and plots.

What each figure answers (docs/method.md, "Why short-text ability degrades"):
- `short_nll` / `kl_teacher_student` / `hidden_cosine` / `attention_kl` on held-out short rows: how far the
  extended student has drifted from the original model where the original was good (short text). The paper
  tracks hidden-state cosine and attention KL; at toy scale the next-token KL and NLL gap are the sharper
  signals.
- `long_nll` by position on held-out long rows: whether the student uses context beyond the original window.
  On local text (code) this barely separates methods, hence:
- passkey retrieval: a key stated once, asked for at the end; the teacher solves it inside its window and
  fails beyond it, so it measures long-context skill directly.

All forwards run under `torch.no_grad()` with `use_cache=False`; packed rows use `attention_mask=None` (the
only setting in which transformers isolates packed documents, see `distill.models`). fp32 on CPU, bf16
autocast on CUDA. Logits are never materialised for a whole row: they are computed in chunks of tokens.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from distill.data.dataset import IGNORE_INDEX, DataError, PackedStream, holdout_of
from distill.layers import attention_kl, sample_documents
from distill.models import decoder_of, forward_hidden, packed_layout
from distill.objectives import kl_loss

logger = logging.getLogger(__name__)

PASSKEY_DIGITS = 5
# The retrieval statements, as one line each inside code: the needle states a key, the look-up repeats the
# needle's own words so the answer follows the same tokens in both (scripts/demo.py writes its training
# corpus with these templates, so the evaluation asks in the form the model has seen).
PASSKEY_NEEDLE = "PASSKEY = {key}"
PASSKEY_LOOKUP = "assert PASSKEY == {key}"
PASSKEY_TEMPLATES = {
    "code": (PASSKEY_NEEDLE, PASSKEY_LOOKUP, "PASSKEY"),
    # The classic passkey task (Mohtashami & Jaggi 2023), for pretrained language models (docs/real_model.md).
    "text": ("The pass key is {key}. Remember it. {key} is the pass key.",
             "What is the pass key? The pass key is {key}", "pass key"),
}
"""(needle, look-up, the key's name) per passkey template: "code" (the demo's corpus states and looks up
keys in this form), "text" (natural language)."""


# ------------------------------------------------------------------------------------------------------------
# Plumbing
# ------------------------------------------------------------------------------------------------------------

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


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device, *models):
    """bf16 autocast on CUDA, or wherever a model runs flash_attention_2 (flash-attn computes in fp16/bf16
    only; the same precision on every device); else plain fp32 (the parameters' dtype)."""
    flash = any(m is not None and m.config._attn_implementation == "flash_attention_2" for m in models)
    if device.type == "cuda" or flash:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _open(stream) -> PackedStream:
    return stream if isinstance(stream, PackedStream) else PackedStream(stream)


def _row_indices(stream: PackedStream, max_rows: int | None) -> list[int]:
    if len(stream) == 0:
        raise DataError(f"{stream.path}: the stream has no rows to evaluate on")
    n = len(stream) if max_rows is None else min(int(max_rows), len(stream))
    return list(range(n))


def _exact(device: torch.device):
    """Autocast off: losses and logits are computed in fp32 even inside a bf16-autocast forward region."""
    return torch.autocast(device.type, enabled=False)


def _lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
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
    with _exact(hidden.device):
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


def _final_hidden(model, input_ids, position_ids) -> torch.Tensor:
    """(B, T, H) final-norm hidden states of a packed batch, without keeping the per-layer states."""
    ids, pos, extra, unflatten = packed_layout(model, input_ids, position_ids)
    out = decoder_of(model)(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False, **extra)
    return unflatten(out.last_hidden_state)


def _mean(total: float, count: int) -> float:
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
        return _mean(sum(self.sums.values()), sum(self.counts.values()))

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


# ------------------------------------------------------------------------------------------------------------
# Short-text retention
# ------------------------------------------------------------------------------------------------------------

def _teacher_kl(s_final, s_weight, t_final, t_weight, has_target, chunk_size: int,
                device) -> tuple[float, int]:
    """Summed KL(teacher ‖ student) of next-token distributions and its count. Position t predicts token t+1:
    only positions whose next token has a target count."""
    predicting = torch.zeros_like(has_target)
    predicting[:, :-1] = has_target[:, 1:]
    with _exact(device):
        kl, count = kl_loss(s_final, s_weight, t_final, t_weight, predicting, kind="forward",
                            chunk_size=chunk_size)
    return kl.item(), int(count.item())


def _short_figures(totals: DocTotals, t_totals: DocTotals | None) -> dict:
    """The short-text figures from per-document totals (and the teacher's on the same documents): NLL with its
    standard error over documents, perplexity, counts, and the paired standard error of the gap."""
    n_targets = sum(totals.counts.values())
    out = {"short_nll": totals.mean(), "short_nll_se": totals.se(), "short_tokens": n_targets,
           "short_documents": sum(1 for n in totals.counts.values() if n)}
    out["short_ppl"] = math.exp(out["short_nll"]) if n_targets else float("nan")
    if t_totals is not None:
        out["teacher_short_nll"] = t_totals.mean()
        out["teacher_short_nll_se"] = t_totals.se()
        out["short_nll_gap"] = out["short_nll"] - out["teacher_short_nll"]
        out["short_nll_gap_se"] = totals.minus(t_totals).se()  # paired over the same documents
    return out


@torch.no_grad()
def short_retention(model, teacher, stream, max_rows: int | None = 8, batch_size: int = 4,
                    attention_rows: int = 2, attention_tokens: int = 512, chunk_size: int = 4096) -> dict:
    """Short-text retention of the student against the teacher on held-out short rows.

    Args:
        model: the (extended) student.
        teacher: the original model, or None (then only NLL figures).
        stream: a PackedStream or a built stream directory (held-out short rows, several documents per row).
        max_rows: rows to evaluate (the first ones; None: all).
        batch_size: rows per forward.
        attention_rows: documents for the per-layer attention KL (0: skip it; it needs eager attention).
        attention_tokens: cut those documents to at most this many tokens (eager attention is O(T²) memory).

    Returns:
        {"short_nll": mean NLL per predicted token (labels), "short_nll_se" (its standard error over
         documents, `mean_se`), "short_ppl", "short_tokens", "short_documents",
         and with a teacher: "teacher_short_nll", "teacher_short_nll_se", "short_nll_gap" and
         "short_nll_gap_se" (student − teacher, its standard error paired over documents),
         "kl_teacher_student" (mean KL(teacher ‖ student) of the
         next-token distributions per predicting token, i.e. real tokens whose next token is in the same
         document), "hidden_cosine" (list over hidden_states indices 0..L of the mean cosine per real token),
         "attention_kl" (list over decoder layers 0..L-1, KL(teacher ‖ student) of attention distributions)}.
    """
    stream = _open(stream)
    indices = _row_indices(stream, max_rows)
    device = _device(model)
    s_weight, s_bias = _lm_head(model)
    t_weight, t_bias = _lm_head(teacher) if teacher is not None else (None, None)
    kl_sum = 0.0
    n_real = n_kl = 0
    cos_sums = None
    totals, t_totals = DocTotals(), DocTotals()
    with eval_mode(model, teacher), _autocast(device, model, teacher):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start: start + batch_size]
            batch = stream.batch(chunk)
            ids = batch["input_ids"].to(device)  # (B, T)
            pos = batch["position_ids"].to(device)  # (B, T)
            labels = batch["labels"].to(device)  # (B, T)
            real = stream.real_mask(chunk).to(device)  # (B, T)
            doc = doc_ids(pos, offset=start * stream.seq_len)  # (B, T)
            if teacher is None:
                s_final = _final_hidden(model, ids, pos)  # (B, T, H)
                nll, has_target = token_nll(s_final, s_weight, labels, s_bias, chunk_size)
                totals.add(nll, has_target, doc)
                continue
            s_states, s_final = forward_hidden(model, ids, pos, attention_mask=None)  # L+1 × (B, T, H)
            t_states, t_final = forward_hidden(teacher, ids, pos, attention_mask=None)
            nll, has_target = token_nll(s_final, s_weight, labels, s_bias, chunk_size)
            t_nll, _ = token_nll(t_final, t_weight, labels, t_bias, chunk_size)
            totals.add(nll, has_target, doc)
            t_totals.add(t_nll, has_target, doc)
            kl, count = _teacher_kl(s_final, s_weight, t_final, t_weight, has_target, chunk_size, device)
            kl_sum, n_kl = kl_sum + kl, n_kl + count
            if cos_sums is None:
                cos_sums = [0.0] * len(s_states)
            if len(s_states) == len(t_states) and s_states[0].shape == t_states[0].shape:
                for i, (s, t) in enumerate(zip(s_states, t_states)):
                    cos = F.cosine_similarity(s.float(), t.float(), dim=-1)  # (B, T)
                    cos_sums[i] += cos[real].sum().item()
            n_real += int(real.sum().item())
            del s_states, t_states, s_final, t_final
    out = _short_figures(totals, t_totals if teacher is not None else None)
    if teacher is None:
        return out
    out["kl_teacher_student"] = _mean(kl_sum, n_kl)
    same_shape = model.config.hidden_size == teacher.config.hidden_size
    out["hidden_cosine"] = [_mean(c, n_real) for c in cos_sums] if same_shape and cos_sums else []
    if attention_rows > 0:
        docs = sample_documents(stream, attention_rows, attention_tokens)
        with eval_mode(model, teacher), _autocast(device, model, teacher):
            out["attention_kl"] = attention_kl(model, teacher, docs.to(device)).float().cpu().tolist()
    return out


@torch.no_grad()
def sharded_short_retention(strategy, teacher, stream, max_rows: int | None = 8, batch_size: int = 4,
                            autocast=contextlib.nullcontext, flatten: bool | None = None,
                            chunk_size: int = 4096) -> dict:
    """`short_retention`'s NLL and KL figures for a student sharded over ranks (FSDP2, ZeRO-3); every rank
    calls it.

    Each forward of a sharded model is a collective (its layers are all-gathered), so every rank runs the
    same number of forwards, the student's through the strategy's root forward (which gathers embeddings and
    lm_head) and the teacher's through `TruncatedTeacher`, each on its share of the rows (a rank short of
    rows repeats one and does not count it). Per-document totals are gathered, so every rank returns the
    same figures, equal to `short_retention`'s on one process up to summation order.

    Args:
        strategy: the run's `distill.strategies.Strategy` (its student, forward, output_weight, procs).
        teacher: the frozen teacher as the strategy laid it out, or None (then only NLL figures).
        autocast: the step's compute context (a callable returning a context manager).
        flatten: lay packed rows out as one row with document offsets (flash attention); None: from the
            student's attention name.

    Returns:
        {"short_nll", "short_nll_se", "short_ppl", "short_tokens", "short_documents", and with a teacher
         "teacher_short_nll", "teacher_short_nll_se", "short_nll_gap_se", "kl_teacher_student"}.
    """
    from distill.memory import FinalState
    from distill.models import TruncatedTeacher

    procs = strategy.procs
    stream = _open(stream)
    indices = _row_indices(stream, max_rows)
    mine = indices[procs.rank::procs.world]
    batches = math.ceil(math.ceil(len(indices) / procs.world) / batch_size)  # the same on every rank
    student = getattr(strategy.student, "module", strategy.student)
    device = procs.device
    runner = TruncatedTeacher(teacher) if teacher is not None else None
    t_weight, t_bias = _lm_head(teacher) if teacher is not None else (None, None)
    totals, t_totals = DocTotals(), DocTotals()
    kl_sum, n_kl = 0.0, 0
    # The root forward keeps logits for one token: the final-norm states come from a hook (as in training).
    with FinalState(student) as final, eval_mode(student, teacher), autocast():
        for b in range(batches):
            rows = mine[b * batch_size: (b + 1) * batch_size]
            counted = bool(rows)
            rows = rows or indices[:1]  # a rank out of rows still takes part in the collectives
            batch = stream.batch(rows)
            ids = batch["input_ids"].to(device)  # (B, T)
            pos = batch["position_ids"].to(device)  # (B, T)
            labels = batch["labels"].to(device)  # (B, T)
            B, T = ids.shape
            flat_ids, flat_pos, extra, unflatten = packed_layout(student, ids, pos, flatten=flatten)
            strategy.forward(input_ids=flat_ids, position_ids=flat_pos, attention_mask=None,
                             use_cache=False, logits_to_keep=1, **extra)
            s_final = unflatten(final.value)  # (B, T, H)
            s_weight = strategy.output_weight()
            s_bias = getattr(student.get_output_embeddings(), "bias", None)
            t_final = None
            if runner is not None:
                t_final = unflatten(runner(flat_ids, flat_pos, None, [], True, **extra)[runner.n_layers])
            if not counted:
                continue
            # Document ids unique over the whole stream: a row's documents offset by its row index.
            doc = (pos == 0).long().cumsum(1) - 1 + torch.tensor(rows, device=device)[:, None] * T
            nll, has_target = token_nll(s_final, s_weight, labels, s_bias, chunk_size)
            totals.add(nll, has_target, doc)
            if t_final is None:
                continue
            t_nll, _ = token_nll(t_final, t_weight, labels, t_bias, chunk_size)
            t_totals.add(t_nll, has_target, doc)
            kl, count = _teacher_kl(s_final, s_weight, t_final, t_weight, has_target, chunk_size, device)
            kl_sum, n_kl = kl_sum + kl, n_kl + count
    gathered = procs.gather_objects((totals.sums, totals.counts, t_totals.sums, kl_sum, n_kl))
    totals, t_totals = DocTotals(), DocTotals()
    for sums, counts, t_sums, _, _ in gathered:  # documents are disjoint between ranks
        totals.sums.update(sums)
        totals.counts.update(counts)
        t_totals.sums.update(t_sums)
        t_totals.counts.update({d: counts[d] for d in t_sums})
    out = _short_figures(totals, t_totals if teacher is not None else None)
    if teacher is None:
        return out
    out["kl_teacher_student"] = _mean(sum(g[3] for g in gathered), sum(g[4] for g in gathered))
    return out


# ------------------------------------------------------------------------------------------------------------
# NLL by position on long text
# ------------------------------------------------------------------------------------------------------------

def bucket_edges(seq_len: int, buckets: int | Sequence[int] | str = 16) -> list[int]:
    """Bucket edges over document positions [0, seq_len].

    Args:
        buckets: an int n → n equal-width buckets; "log2" → [0, 1, 2, 4, ..., seq_len]; a sequence → those
            edges (sorted, ending at seq_len or beyond).
    """
    if isinstance(buckets, str):
        if buckets != "log2":
            raise ValueError(f"buckets {buckets!r}: an int, a list of edges or 'log2'")
        edges, p = [0, 1], 2
        while p < seq_len:
            edges.append(p)
            p *= 2
        return edges + [seq_len]
    if isinstance(buckets, int):
        if buckets <= 0:
            raise ValueError(f"buckets must be positive, got {buckets}")
        width = max(1, math.ceil(seq_len / buckets))
        return list(range(0, seq_len, width)) + [seq_len]
    edges = sorted(int(e) for e in buckets)
    if len(edges) < 2 or edges[0] < 0:
        raise ValueError(f"bucket edges {list(buckets)}: need at least two non-negative edges")
    return edges


def _row_batches(stream: PackedStream, indices: list[int], batch_size: int):
    """Whole packed rows: (input_ids, position_ids, labels, document position, document id), each (B, T)."""
    for start in range(0, len(indices), batch_size):
        batch = stream.batch(indices[start: start + batch_size])
        pos = batch["position_ids"]
        yield batch["input_ids"], pos, batch["labels"], pos, doc_ids(pos, offset=start * stream.seq_len)


def _windows(stream: PackedStream, indices: list[int], window: int, stride: int):
    """Every document of the rows cut into overlapping windows of at most `window` tokens, each scoring the
    tokens the windows before it did not: (tokens, document position of its first token, first scored index,
    document id). Every token after the first `window` of a document is predicted from at least
    window − stride tokens before it."""
    for i in indices:
        for k, doc in enumerate(stream.documents(i)):
            doc, n = np.asarray(doc, dtype=np.int64), len(doc)
            doc_id = i * stream.seq_len + k
            yield doc[:window], 0, 1, doc_id
            end = min(window, n)
            while end < n:
                new_end = min(end + stride, n)
                begin = new_end - window
                yield doc[begin:new_end], begin, end - begin, doc_id
                end = new_end


def _window_batches(stream: PackedStream, indices: list[int], window: int, stride: int, batch_size: int):
    """Rolling windows batched as rows of `window` tokens at native positions 0..window−1; labels only on
    the tokens each window scores. Same tuple as `_row_batches`."""
    pending = []

    def emit():
        B = len(pending)
        ids = torch.zeros((B, window), dtype=torch.int64)
        labels = torch.full((B, window), IGNORE_INDEX, dtype=torch.int64)
        doc_pos = torch.zeros((B, window), dtype=torch.int64)
        doc = torch.zeros((B, window), dtype=torch.int64)
        for r, (tokens, first, score_from, doc_id) in enumerate(pending):
            n = len(tokens)
            ids[r, :n] = torch.from_numpy(tokens)
            labels[r, score_from:n] = ids[r, score_from:n]
            doc_pos[r, :n] = torch.arange(first, first + n)
            doc[r] = doc_id
        pos = torch.arange(window)[None].expand(B, -1)  # the model's own window, every row from 0
        return ids, pos, labels, doc_pos, doc

    for item in _windows(stream, indices, window, stride):
        pending.append(item)
        if len(pending) == batch_size:
            yield emit()
            pending = []
    if pending:
        yield emit()


@torch.no_grad()
def nll_by_position(model, stream, max_rows: int | None = 8, buckets: int | Sequence[int] | str = 16,
                    original_length: int | None = None, batch_size: int = 1, chunk_size: int = 4096,
                    window: int | None = None, stride: int | None = None) -> dict:
    """Mean NLL per document-relative position bucket on held-out long rows.

    The position of a token is its `position_ids` entry (restarting at 0 per packed document): the token at
    position p is predicted from the p tokens before it in its document. Bucket k holds positions
    [edges[k], edges[k+1]).

    Args:
        stream: a PackedStream or a built long stream directory (held-out rows at the target length).
        buckets: see `bucket_edges`.
        original_length: the original window T0; adds "long_nll_within" (positions < T0) and
            "long_nll_beyond" (positions ≥ T0: tokens that never fit in one T0-token window with the
            document start).
        window: None scores whole documents. An int scores them through a rolling window of that many tokens
            at positions 0..window−1 (the original model's honest view of long text: each token predicted
            from up to `window` tokens before it, never from positions it was not trained on), advancing by
            `stride` (default window // 2); the figures stay indexed by the position in the document.
        batch_size: rows (whole) or windows (rolling) per forward; rolling uses at least 8.

    Returns:
        {"edges", "centers", "nll" (per bucket, NaN when empty), "count", "long_nll", "long_nll_se",
         "long_ppl", "long_tokens", "long_documents", "original_length", "window", "long_nll_within",
         "long_nll_beyond" and their "_se"}; standard errors treat documents as the units (`mean_se`).
    """
    stream = _open(stream)
    indices = _row_indices(stream, max_rows)
    device = _device(model)
    weight, bias = _lm_head(model)
    if window is None:
        batches = _row_batches(stream, indices, batch_size)
    else:
        window = int(window)
        stride = int(stride or max(1, window // 2))
        if window < 2 or not 0 < stride <= window - 1:
            raise ValueError(f"rolling window {window}, stride {stride}: need window ≥ 2 and "
                             f"0 < stride < window")
        batches = _window_batches(stream, indices, window, stride, max(8, batch_size))
    t0 = int(original_length) if original_length is not None else None
    per_sum = torch.zeros(stream.seq_len, dtype=torch.float64)  # (T,) NLL sum per document position
    per_count = torch.zeros(stream.seq_len, dtype=torch.float64)  # (T,)
    totals, within, beyond = DocTotals(), DocTotals(), DocTotals()
    with eval_mode(model), _autocast(device, model):
        for ids, pos, labels, doc_pos, doc in batches:
            final = _final_hidden(model, ids.to(device), pos.to(device))  # (B, T, H)
            nll, has_target = token_nll(final, weight, labels.to(device), bias, chunk_size)  # (B, T) each
            del final
            nll, has_target = nll.cpu(), has_target.cpu()
            p = doc_pos[has_target]
            per_sum.index_add_(0, p, nll[has_target].double())
            per_count.index_add_(0, p, torch.ones_like(p, dtype=torch.float64))
            totals.add(nll, has_target, doc)
            if t0 is not None:
                within.add(nll, has_target & (doc_pos < t0), doc)
                beyond.add(nll, has_target & (doc_pos >= t0), doc)
    edges = bucket_edges(stream.seq_len, buckets)
    nll_b, count_b, centers = [], [], []
    for lo, hi in itertools.pairwise(edges):
        s = per_sum[lo:hi].sum().item()
        c = int(per_count[lo:hi].sum().item())
        nll_b.append(_mean(s, c))
        count_b.append(c)
        centers.append((lo + min(hi, stream.seq_len) - 1) / 2)
    n = int(per_count.sum().item())
    out = {"edges": edges, "centers": centers, "nll": nll_b, "count": count_b, "long_nll": totals.mean(),
           "long_nll_se": totals.se(), "long_tokens": n,
           "long_documents": sum(1 for c in totals.counts.values() if c),
           "original_length": original_length, "window": window}
    out["long_ppl"] = math.exp(out["long_nll"]) if n else float("nan")
    if t0 is not None:
        out["long_nll_within"], out["long_nll_within_se"] = within.mean(), within.se()
        out["long_nll_beyond"], out["long_nll_beyond_se"] = beyond.mean(), beyond.se()
    return out


def long_nll_beyond(result: dict, original_length: int | None = None) -> float:
    """`long_nll_beyond` of an `nll_by_position` result (computed there when it had the original length)."""
    if original_length is None or original_length == result.get("original_length"):
        return result.get("long_nll_beyond", float("nan"))
    raise ValueError("recompute nll_by_position with original_length= to get the NLL beyond another window")


# ------------------------------------------------------------------------------------------------------------
# Passkey retrieval / needle in a haystack
# ------------------------------------------------------------------------------------------------------------

def random_key(rng: random.Random) -> str:
    """A passkey: `PASSKEY_DIGITS` random digits."""
    return str(rng.randint(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS - 1))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_inline(tokenizer, text: str) -> list[int]:
    """Token ids of `text` ("\n..."), as it tokenizes in the middle of a document: without the leading
    piece a sentencepiece tokenizer puts before text it encodes on its own (its "dummy prefix")."""
    if not text.startswith("\n"):
        raise ValueError(f"inline text must start with a newline, got {text!r}")
    ids = _encode(tokenizer, text)
    newline = _encode(tokenizer, "\n")  # [newline] or [dummy prefix, newline]
    lead = newline[:-1]
    if lead and ids[: len(lead)] == lead:
        ids = ids[len(lead):]
    return ids


PASSKEY_MARK = PASSKEY_NEEDLE.split(" ")[0]
"""The key's name, in both the statement and the look-up."""


def _without_key_lines(tokenizer, ids: np.ndarray, mark: str = PASSKEY_MARK) -> np.ndarray:
    """A document's ids with the lines mentioning `mark` dropped (unchanged when there is none); a
    special token closing the document (its separator) is kept."""
    special = set(tokenizer.all_special_ids)
    tail = [int(ids[-1])] if len(ids) and int(ids[-1]) in special else []
    body = ids[: len(ids) - len(tail)].tolist()
    text = tokenizer.decode(body, skip_special_tokens=True)
    if mark not in text:
        return ids
    kept = "\n".join(line for line in text.split("\n") if mark not in line)
    return np.asarray(_encode(tokenizer, kept) + tail, dtype=np.int64)  # as the builder encodes a document


def filler_from_stream(stream, max_rows: int = 16, max_tokens: int = 1 << 20, tokenizer=None,
                       mark: str = PASSKEY_MARK) -> np.ndarray:
    """Filler text for passkey prompts: the real (non-padding) tokens of the first rows of a held-out stream,
    joined (documents keep the separators the builder put between them).

    With `tokenizer`, every line of a document that mentions the key's name (`PASSKEY_MARK`: the key
    statements and look-ups of a corpus like the demo's) is dropped, the rest of that document re-encoded:
    such lines would put other keys in a prompt beside its needle (the demo's held-out long rows hold about
    one per 900 tokens).
    """
    stream = _open(stream)
    parts, total = [], 0
    for i in range(min(max_rows, len(stream))):
        for doc in stream.documents(i):
            ids = np.asarray(doc, dtype=np.int64)
            if tokenizer is not None:
                ids = _without_key_lines(tokenizer, ids, mark)
            parts.append(ids)
            total += len(ids)
        if total >= max_tokens:
            break
    if total == 0:
        raise DataError(f"{stream.path}: no tokens to use as passkey filler")
    return np.concatenate(parts)[:max_tokens]


def passkey_prompts(tokenizer, filler_ids, context_length: int, depth: float,
                    rng: random.Random | int, template: str = "code") -> tuple[list[int], list[int]]:
    """One passkey prompt: a key statement at a relative depth inside filler, then the question.

    Layout (code-like, since the demo models are trained on Python code):
        <filler ...> \\nPASSKEY = 48213\\n <filler ...> \\nassert PASSKEY ==   → answer " 48213"
    The filler is a contiguous slice of `filler_ids` (wrapped around when too short) starting at a random
    offset; the key is `PASSKEY_DIGITS` random digits. The needle's first token sits at filler index
    round(depth · filler_budget), so depth 0 puts it at the very start, 1 right before the question.

    Args:
        filler_ids: 1-D token ids of held-out text.
        context_length: exact prompt length in tokens (the answer follows it).
        depth: relative position of the needle in [0, 1].
        rng: a `random.Random` (or an int seed): the same state gives the same prompt.
        template: a key of `PASSKEY_TEMPLATES` (the needle and the look-up).

    Returns:
        (prompt_ids, answer_ids): len(prompt_ids) == context_length.
    """
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth {depth} must be in [0, 1]")
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    filler = np.asarray(filler_ids, dtype=np.int64).reshape(-1)
    if filler.size == 0:
        raise ValueError("filler_ids is empty")
    key = random_key(rng)
    needle_text, lookup_text, _ = PASSKEY_TEMPLATES[template]
    needle = _encode_inline(tokenizer, "\n" + needle_text.format(key=key) + "\n")
    question_text = "\n" + lookup_text.split("{key}")[0].rstrip(" ")
    question = _encode_inline(tokenizer, question_text)
    full = _encode_inline(tokenizer, "\n" + lookup_text.format(key=key))
    # Tokenizers may merge the space with the first digit: split where the question's own encoding stops
    # agreeing with the encoding of question + answer, so the answer is exactly what the model should emit.
    common = 0
    while common < min(len(question), len(full)) and question[common] == full[common]:
        common += 1
    question, answer = full[:common], full[common:]
    if not answer:
        raise ValueError(f"tokenizer produced no answer tokens for key {key}")
    budget = int(context_length) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"context_length {context_length} is shorter than the needle and question "
                         f"({len(needle) + len(question)} tokens)")
    offset = rng.randrange(filler.size)
    take = np.take(filler, np.arange(offset, offset + budget), mode="wrap").tolist()
    at = round(float(depth) * budget)
    prompt = take[:at] + needle + take[at:] + question
    assert len(prompt) == context_length
    return prompt, answer


def _prompt_rng(seed: int, length: int, depth: float, sample: int) -> random.Random:
    # A string seed is hashed deterministically (sha512), independent of PYTHONHASHSEED and of the grid.
    return random.Random(f"passkey/{seed}/{length}/{float(depth)!r}/{sample}")


@torch.no_grad()
def _score_answers(model, prompts: list[list[int]],
                   answers: list[list[int]]) -> tuple[list[bool], list[float]]:
    """Exact greedy match and mean answer log-prob for same-length prompts (one forward per batch)."""
    device = _device(model)
    weight, bias = _lm_head(model)
    seqs = [p + a for p, a in zip(prompts, answers)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    ids = ids.to(device)
    pos = torch.arange(width, device=device)[None].expand(len(seqs), -1)  # (B, T): one document per row
    final = _final_hidden(model, ids, pos)  # (B, T, H)
    hits, logps = [], []
    with _exact(device):
        for r, (p, a) in enumerate(zip(prompts, answers)):
            h, l_ = _score_one(final[r], p, a, weight, bias)
            hits.append(h)
            logps.append(l_)
    return hits, logps


def _score_one(final: torch.Tensor, prompt: list[int], answer: list[int], weight, bias) -> tuple[bool, float]:
    """(exact match, mean log-prob) of `answer` from one row's final hidden states (T, H)."""
    # (n, H): the states predicting the answer
    h = final[len(prompt) - 1: len(prompt) - 1 + len(answer)].float()
    logits = h @ weight.float().t()  # (n, V)
    if bias is not None:
        logits += bias.float()
    target = torch.tensor(answer, device=final.device)  # (n,)
    logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)  # (n,)
    return bool((logits.argmax(-1) == target).all().item()), logp.mean().item()


@torch.no_grad()
def greedy_decode(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with full forwards (no KV cache): the reference for `passkey_accuracy`."""
    device = _device(model)
    weight, bias = _lm_head(model)
    seq = list(prompt_ids)
    with eval_mode(model), _autocast(device, model):
        for _ in range(max_new_tokens):
            ids = torch.tensor([seq], device=device)
            pos = torch.arange(len(seq), device=device)[None]
            h = _final_hidden(model, ids, pos)[0, -1].float()  # (H,)
            logits = h @ weight.float().t() + (bias.float() if bias is not None else 0.0)  # (V,)
            seq.append(int(logits.argmax().item()))
    return seq[len(prompt_ids):]


def passkey_accuracy(model, tokenizer, filler_ids, lengths: Sequence[int] = (256,),
                     depths: Sequence[float] = (0.0, 0.5, 1.0), samples: int = 4, seed: int = 0,
                     batch_size: int = 4, template: str = "code") -> dict:
    """Passkey retrieval accuracy per (context length, depth) and overall.

    Exact match under greedy decoding is scored with one teacher-forced forward over prompt + answer: greedy
    decoding reproduces the answer exactly iff, at every answer step, the argmax given the correct prefix is
    the correct token — which is what is checked (identical to a decode loop, `greedy_decode`, and one forward
    instead of len(answer)). The mean per-token log-prob of the answer is the softer signal.

    Returns:
        {"lengths", "depths", "samples", "accuracy" (overall), "logprob" (overall mean),
         "grid_accuracy" / "grid_logprob" (len(lengths) × len(depths) lists),
         "by_length": {str(length): accuracy}}.
    """
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    device = _device(model)
    acc = np.zeros((len(lengths), len(depths)))
    lp = np.zeros((len(lengths), len(depths)))
    with eval_mode(model), _autocast(device, model):
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                cases = [passkey_prompts(tokenizer, filler_ids, length, depth,
                                         _prompt_rng(seed, length, depth, k), template)
                         for k in range(samples)]
                hits, logps = [], []
                for start in range(0, len(cases), batch_size):
                    part = cases[start: start + batch_size]
                    h, l_ = _score_answers(model, [c[0] for c in part], [c[1] for c in part])
                    hits += h
                    logps += l_
                acc[i, j] = float(np.mean(hits)) if hits else float("nan")
                lp[i, j] = float(np.mean(logps)) if logps else float("nan")
    return {"lengths": lengths, "depths": depths, "samples": int(samples),
            "accuracy": float(acc.mean()), "logprob": float(lp.mean()),
            "grid_accuracy": acc.tolist(), "grid_logprob": lp.tolist(),
            "by_length": {str(n): float(acc[i].mean()) for i, n in enumerate(lengths)}}


def needle_grid(model, tokenizer, filler_ids, lengths: Sequence[int], depths: Sequence[float],
                samples: int = 4, seed: int = 0, path: str | None = None, title: str = "passkey retrieval",
                batch_size: int = 4, template: str = "code") -> dict:
    """`passkey_accuracy` over context length × depth, plus a heatmap PNG at `path` when given."""
    grid = passkey_accuracy(model, tokenizer, filler_ids, lengths, depths, samples, seed, batch_size,
                            template)
    if path is not None:
        plot_needle_heatmap(grid, path, title=title)
    return grid


# ------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_nll_by_position(results: dict, path: str, original_length: int | None = None,
                         title: str = "NLL by position") -> str:
    """One line per model (`results`: {name: nll_by_position result}); a dashed line at the original
    window."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        ax.plot(res["centers"], res["nll"], marker="o", markersize=3, label=name)
        if original_length is None:
            original_length = res.get("original_length")
    if original_length:
        ax.axvline(original_length, color="grey", linestyle="--",
                   label=f"original window ({original_length})")
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("NLL (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_needle_heatmap(grid: dict, path: str, title: str = "passkey retrieval") -> str:
    """Accuracy heatmap: depth (rows) × context length (columns), values annotated."""
    plt = _pyplot()
    acc = np.asarray(grid["grid_accuracy"], dtype=float).T  # (depths, lengths)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * acc.shape[1], 1.2 + 0.6 * acc.shape[0]))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
    ax.set_yticks(range(len(grid["depths"])), [f"{d:g}" for d in grid["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for (r, c), v in np.ndenumerate(acc):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title} (n={grid.get('samples', '?')})")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------------
# The suite
# ------------------------------------------------------------------------------------------------------------

def _finite(x):
    """JSON-safe numbers: NaN/inf become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def eval_streams(cfg) -> tuple[str | None, str | None]:
    """Held-out short and long data for in-training evaluation (`eval.short_data` / `eval.long_data`, or
    the held-out splits of the recipe's streams: the first native-position stream with a teacher objective
    for short text; a native-position stream named ...long, else the first one, for long text)."""
    short, long = cfg.eval.short_data, cfg.eval.long_data
    if short is None:
        held = [holdout_of(s.data) for s in cfg.streams.values()
                if s.positions == "native" and s.objectives.needs_teacher]
        short = next((h for h in held if h), None)
    if long is None:
        native = [(s.data.endswith("long"), h) for s in cfg.streams.values()
                  if s.positions == "native" and (h := holdout_of(s.data))]
        if native:
            long = max(native, key=lambda x: x[0])[1]  # a stream named ...long first, else the first one
    return short, long


def evaluate_suite(model, teacher, short_stream, long_stream, original_length: int, target_length: int,
                   out_dir: str | None = None, max_rows: int = 8, passkey_samples: int = 0, tokenizer=None,
                   passkey_lengths: Sequence[int] | None = None,
                   passkey_depths: Sequence[float] = (0.0, 0.5, 1.0),
                   seed: int = 0, batch_size: int = 4, long_batch_size: int = 1,
                   buckets: int | Sequence[int] | str = 16, attention_rows: int = 2,
                   attention_tokens: int = 512,
                   teacher_baselines: bool = False, short_whole_stream=None,
                   long_rows: int | None | str = "max_rows", teacher_rolling: bool = True,
                   passkey_template: str = "code", ruler_samples: int = 0,
                   ruler_tasks: Sequence[str] | None = None,
                   ruler_lengths: Sequence[int] | None = None) -> dict:
    """Every evaluation as flat figures; the trainer logs them under `eval/...` every `eval_every` steps.

    Cheap with a small `max_rows`; leaves `model` (and `teacher`) in their original train/eval mode.

    Args:
        model: the student (extended RoPE).
        teacher: the original model or None (no retention figures then).
        short_stream / long_stream: PackedStream or built directory (held-out), or None to skip that part.
        original_length / target_length: the original and the extended window.
        out_dir: when given, write eval.json (figures + details) and PNG plots there.
        passkey_samples: prompts per (length, depth); 0 skips passkey (needs `tokenizer` otherwise).
        passkey_lengths: context lengths (default: original and target length).
        teacher_baselines: also evaluate the teacher's long NLL and passkey (a reference line / grid).
        long_rows: rows of the long stream (default: `max_rows`; None: all).
        teacher_rolling: score the teacher through its rolling window (below); a sweep does it once.
        short_whole_stream: held-out short documents packed whole into rows of the target length, or None:
            the student scores them whole ("short_whole_nll"), the teacher through a rolling window of its
            original length ("teacher_short_whole_nll").

    With a teacher and a long stream, the teacher is also scored through a rolling window of its original
    length over the long documents ("teacher_rolling_long_nll", "..._beyond"): the figure an extended
    model must beat to have gained anything from the positions beyond that window. Every NLL comes with
    its standard error over documents ("<key>_se").

    Returns:
        {"short_nll", "short_ppl", "teacher_short_nll", "short_nll_gap", "kl_teacher_student",
         "short_whole_nll", "teacher_short_whole_nll", "teacher_rolling_long_nll(_beyond)",
         "passkey_accuracy_within_window" / "..._beyond_window" (context lengths ≤ / > the original length),
         "hidden_cosine_mean", "hidden_cosine_last", "hidden_cosine/<i>", "attention_kl_mean",
         "attention_kl/<i>", "long_nll", "long_ppl", "long_nll_within", "long_nll_beyond", "passkey_accuracy",
         "passkey_logprob", "passkey_accuracy/<length>", and "teacher_..." twins with `teacher_baselines`};
         absent parts are omitted.
    """
    figures: dict = {}
    details: dict = {"original_length": int(original_length), "target_length": int(target_length)}
    if long_rows == "max_rows":
        long_rows = max_rows
    plots: list[str] = []
    if short_stream is not None:
        short = short_retention(model, teacher, short_stream, max_rows, batch_size, attention_rows,
                                attention_tokens)
        details["short"] = short
        for key in ("short_nll", "short_nll_se", "short_ppl", "teacher_short_nll", "teacher_short_nll_se",
                    "kl_teacher_student", "short_nll_gap", "short_nll_gap_se"):
            if key in short:
                figures[key] = short[key]
        cos = short.get("hidden_cosine") or []
        if cos:
            figures["hidden_cosine_mean"] = float(np.mean(cos[1:] if len(cos) > 1 else cos))
            figures["hidden_cosine_last"] = cos[-1]
            figures.update({f"hidden_cosine/{i}": c for i, c in enumerate(cos)})
        akl = short.get("attention_kl") or []
        if akl:
            figures["attention_kl_mean"] = float(np.mean(akl))
            figures.update({f"attention_kl/{i}": v for i, v in enumerate(akl)})
    if long_stream is not None:
        curves = {"student": nll_by_position(model, long_stream, long_rows, buckets, original_length,
                                             long_batch_size)}
        if teacher_baselines and teacher is not None:
            curves["teacher"] = nll_by_position(teacher, long_stream, long_rows, buckets, original_length,
                                                long_batch_size)
        if teacher is not None and teacher_rolling:
            curves["teacher_rolling"] = nll_by_position(teacher, long_stream, long_rows, buckets,
                                                        original_length, batch_size,
                                                        window=original_length)
        details["long"] = curves
        for name, res in curves.items():
            prefix = {"student": "", "teacher": "teacher_", "teacher_rolling": "teacher_rolling_"}[name]
            for key in ("long_nll", "long_ppl", "long_nll_within", "long_nll_beyond"):
                figures[prefix + key] = res.get(key, float("nan"))
                if key != "long_ppl":
                    figures[prefix + key + "_se"] = res.get(key + "_se", float("nan"))
        if out_dir is not None:
            plots.append(plot_nll_by_position(curves, os.path.join(out_dir, "nll_by_position.png"),
                                              original_length))
    if short_whole_stream is not None:
        whole = {"student": nll_by_position(model, short_whole_stream, max_rows, buckets, original_length,
                                            long_batch_size)}
        if teacher is not None and teacher_rolling:
            whole["teacher_rolling"] = nll_by_position(teacher, short_whole_stream, max_rows, buckets,
                                                       original_length, batch_size, window=original_length)
        details["short_whole"] = whole
        for name, res in whole.items():
            prefix = "" if name == "student" else "teacher_"
            figures[prefix + "short_whole_nll"] = res["long_nll"]
            figures[prefix + "short_whole_nll_se"] = res["long_nll_se"]
    if passkey_samples > 0:
        if tokenizer is None:
            raise ValueError("passkey evaluation needs a tokenizer")
        source = long_stream if long_stream is not None else short_stream
        if source is None:
            raise ValueError("passkey evaluation needs held-out text (a long or short stream) for the filler")
        filler = filler_from_stream(source, tokenizer=tokenizer, mark=PASSKEY_TEMPLATES[passkey_template][2])
        lengths = (list(passkey_lengths) if passkey_lengths
                   else sorted({int(original_length), int(target_length)}))
        runs = {"student": model}
        if teacher_baselines and teacher is not None:
            runs["teacher"] = teacher
        details["passkey"] = {}
        for name, m in runs.items():
            path = os.path.join(out_dir, f"needle_{name}.png") if out_dir is not None else None
            grid = needle_grid(m, tokenizer, filler, lengths, passkey_depths, passkey_samples, seed, path,
                               title=f"passkey retrieval: {name}", batch_size=batch_size,
                               template=passkey_template)
            details["passkey"][name] = grid
            prefix = "" if name == "student" else "teacher_"
            figures[prefix + "passkey_accuracy"] = grid["accuracy"]
            figures[prefix + "passkey_logprob"] = grid["logprob"]
            figures.update({f"{prefix}passkey_accuracy/{n}": a for n, a in grid["by_length"].items()})
            for side, keep in (("within", lambda n: n <= original_length),
                               ("beyond", lambda n: n > original_length)):
                accs = [a for n, a in grid["by_length"].items() if keep(int(n))]
                figures[f"{prefix}passkey_accuracy_{side}_window"] = (float(np.mean(accs)) if accs
                                                                      else float("nan"))
            if path is not None:
                plots.append(path)
    if ruler_samples > 0:
        from distill.ruler import TASKS, ruler_suite

        source = long_stream if long_stream is not None else short_stream
        if tokenizer is None or source is None:
            raise ValueError("RULER tasks need a tokenizer and held-out text for the haystack")
        haystack = filler_from_stream(source, tokenizer=tokenizer)
        lengths = list(ruler_lengths or passkey_lengths or sorted({int(original_length), int(target_length)}))
        runs = {"": model, **({"teacher_": teacher} if teacher_baselines and teacher is not None else {})}
        for prefix, m in runs.items():
            result = ruler_suite(m, tokenizer, haystack, lengths, ruler_samples, ruler_tasks or TASKS, seed)
            figures.update({f"{prefix}ruler/{k}": v for k, v in result.items()})
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        record = {"figures": figures, "details": details, "plots": [os.path.basename(p) for p in plots]}
        tmp = os.path.join(out_dir, "eval.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_finite(record), f, indent=2)
        os.replace(tmp, os.path.join(out_dir, "eval.json"))
    return figures
