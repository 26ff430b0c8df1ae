"""NLL by position on held-out long rows (buckets of positions, sliding windows past the row length), the
figure beyond the original window, and its plot."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from distill.data.dataset import IGNORE_INDEX, PackedStream
from distill.eval import common


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
        doc = common.doc_ids(pos, offset=start * stream.seq_len)
        yield batch["input_ids"], pos, batch["labels"], pos, doc


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
    stream = common.open_stream(stream)
    indices = common.row_indices(stream, max_rows)
    device = common.model_device(model)
    weight, bias = common.lm_head_of(model)
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
    totals, within, beyond = common.DocTotals(), common.DocTotals(), common.DocTotals()
    with common.eval_mode(model), common.autocast_for(device, model):
        for ids, pos, labels, doc_pos, doc in batches:
            final = common.final_hidden(model, ids.to(device), pos.to(device))  # (B, T, H)
            # (B, T) each
            nll, has_target = common.token_nll(final, weight, labels.to(device), bias, chunk_size)
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
        nll_b.append(common.safe_mean(s, c))
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


def plot_nll_by_position(results: dict, path: str, original_length: int | None = None,
                         title: str = "NLL by position") -> str:
    """One line per model (`results`: {name: nll_by_position result}); a dashed line at the original
    window."""
    plt = common.pyplot()
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
