"""Short-text retention: NLL on held-out short rows against the teacher, next-token KL, hidden-state cosine
and attention KL, one process or sharded across the ranks of a run (in-training evaluation)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from distill.eval import common
from distill.model.decoder import TruncatedTeacher, forward_hidden, packed_layout
from distill.model.layers import attention_kl, sample_documents
from distill.model.objectives import kl_loss
from distill.parallel.memory import FinalState


def _teacher_kl(s_final, s_weight, t_final, t_weight, has_target, chunk_size: int,
                device) -> tuple[float, int]:
    """Summed KL(teacher ‖ student) of next-token distributions and its count. Position t predicts token t+1:
    only positions whose next token has a target count."""
    predicting = torch.zeros_like(has_target)
    predicting[:, :-1] = has_target[:, 1:]
    with common.exact_fp32(device):
        kl, count = kl_loss(s_final, s_weight, t_final, t_weight, predicting, kind="forward",
                            chunk_size=chunk_size)
    return kl.item(), int(count.item())


def _short_figures(totals: common.DocTotals, t_totals: common.DocTotals | None) -> dict:
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
    stream = common.open_stream(stream)
    indices = common.row_indices(stream, max_rows)
    device = common.model_device(model)
    s_weight, s_bias = common.lm_head_of(model)
    t_weight, t_bias = common.lm_head_of(teacher) if teacher is not None else (None, None)
    kl_sum = 0.0
    n_real = n_kl = 0
    cos_sums = None
    totals, t_totals = common.DocTotals(), common.DocTotals()
    with common.eval_mode(model, teacher), common.autocast_for(device, model, teacher):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start: start + batch_size]
            batch = stream.batch(chunk)
            ids = batch["input_ids"].to(device)  # (B, T)
            pos = batch["position_ids"].to(device)  # (B, T)
            labels = batch["labels"].to(device)  # (B, T)
            real = stream.real_mask(chunk).to(device)  # (B, T)
            doc = common.doc_ids(pos, offset=start * stream.seq_len)  # (B, T)
            if teacher is None:
                s_final = common.final_hidden(model, ids, pos)  # (B, T, H)
                nll, has_target = common.token_nll(s_final, s_weight, labels, s_bias, chunk_size)
                totals.add(nll, has_target, doc)
                continue
            s_states, s_final = forward_hidden(model, ids, pos, attention_mask=None)  # L+1 × (B, T, H)
            t_states, t_final = forward_hidden(teacher, ids, pos, attention_mask=None)
            nll, has_target = common.token_nll(s_final, s_weight, labels, s_bias, chunk_size)
            t_nll, _ = common.token_nll(t_final, t_weight, labels, t_bias, chunk_size)
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
    out["kl_teacher_student"] = common.safe_mean(kl_sum, n_kl)
    same_shape = model.config.hidden_size == teacher.config.hidden_size
    out["hidden_cosine"] = [common.safe_mean(c, n_real) for c in cos_sums] if same_shape and cos_sums else []
    if attention_rows > 0:
        docs = sample_documents(stream, attention_rows, attention_tokens)
        with common.eval_mode(model, teacher), common.autocast_for(device, model, teacher):
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
        strategy: the run's `distill.parallel.base.Strategy` (its student, forward, output_weight, procs).
        teacher: the frozen teacher as the strategy laid it out, or None (then only NLL figures).
        autocast: the step's compute context (a callable returning a context manager).
        flatten: lay packed rows out as one row with document offsets (flash attention); None: from the
            student's attention name.

    Returns:
        {"short_nll", "short_nll_se", "short_ppl", "short_tokens", "short_documents", and with a teacher
         "teacher_short_nll", "teacher_short_nll_se", "short_nll_gap_se", "kl_teacher_student"}.
    """
    procs = strategy.procs
    stream = common.open_stream(stream)
    indices = common.row_indices(stream, max_rows)
    mine = indices[procs.rank::procs.world]
    batches = math.ceil(math.ceil(len(indices) / procs.world) / batch_size)  # the same on every rank
    student = getattr(strategy.student, "module", strategy.student)
    device = procs.device
    runner = TruncatedTeacher(teacher) if teacher is not None else None
    t_weight, t_bias = common.lm_head_of(teacher) if teacher is not None else (None, None)
    totals, t_totals = common.DocTotals(), common.DocTotals()
    kl_sum, n_kl = 0.0, 0
    # The root forward keeps logits for one token: the final-norm states come from a hook (as in training).
    with FinalState(student) as final, common.eval_mode(student, teacher), autocast():
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
            nll, has_target = common.token_nll(s_final, s_weight, labels, s_bias, chunk_size)
            totals.add(nll, has_target, doc)
            if t_final is None:
                continue
            t_nll, _ = common.token_nll(t_final, t_weight, labels, t_bias, chunk_size)
            t_totals.add(t_nll, has_target, doc)
            kl, count = _teacher_kl(s_final, s_weight, t_final, t_weight, has_target, chunk_size, device)
            kl_sum, n_kl = kl_sum + kl, n_kl + count
    gathered = procs.gather_objects((totals.sums, totals.counts, t_totals.sums, kl_sum, n_kl))
    totals, t_totals = common.DocTotals(), common.DocTotals()
    for sums, counts, t_sums, _, _ in gathered:  # documents are disjoint between ranks
        totals.sums.update(sums)
        totals.counts.update(counts)
        t_totals.sums.update(t_sums)
        t_totals.counts.update({d: counts[d] for d in t_sums})
    out = _short_figures(totals, t_totals if teacher is not None else None)
    if teacher is None:
        return out
    out["kl_teacher_student"] = common.safe_mean(sum(g[3] for g in gathered), sum(g[4] for g in gathered))
    return out
