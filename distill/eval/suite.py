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
only setting in which transformers isolates packed documents, see `distill.model`). fp32 on CPU, bf16
autocast on CUDA. Logits are never materialised for a whole row: they are computed in chunks of tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from distill.data.dataset import holdout_of
from distill.eval.common import write_json
from distill.eval.passkey import PASSKEY_TEMPLATES, filler_from_stream, needle_grid
from distill.eval.position import nll_by_position, plot_nll_by_position
from distill.eval.retention import short_retention
from distill.eval.ruler import TASKS, ruler_suite

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# The suite
# ------------------------------------------------------------------------------------------------------------


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
        details["short"] = _short_part(figures, model, teacher, short_stream, max_rows, batch_size,
                                       attention_rows, attention_tokens)
    rolling = teacher if teacher_rolling else None
    if long_stream is not None:
        details["long"] = _long_part(figures, model, teacher if teacher_baselines else None, rolling,
                                     long_stream, long_rows, buckets, original_length, long_batch_size,
                                     batch_size)
        if out_dir is not None:
            plots.append(plot_nll_by_position(details["long"], os.path.join(out_dir, "nll_by_position.png"),
                                              original_length))
    if short_whole_stream is not None:
        details["short_whole"] = _short_whole_part(figures, model, rolling, short_whole_stream, max_rows,
                                                   buckets, original_length, long_batch_size, batch_size)
    source = long_stream if long_stream is not None else short_stream
    lengths = sorted({int(original_length), int(target_length)})
    runs = {"": model, **({"teacher_": teacher} if teacher_baselines and teacher is not None else {})}
    if passkey_samples > 0:
        if tokenizer is None:
            raise ValueError("passkey evaluation needs a tokenizer")
        if source is None:
            raise ValueError("passkey evaluation needs held-out text (a long or short stream) for the filler")
        filler = filler_from_stream(source, tokenizer=tokenizer, mark=PASSKEY_TEMPLATES[passkey_template][2])
        details["passkey"] = {}
        for prefix, m in runs.items():
            name = prefix.rstrip("_") or "student"
            path = os.path.join(out_dir, f"needle_{name}.png") if out_dir is not None else None
            details["passkey"][name] = needle_grid(
                m, tokenizer, filler, list(passkey_lengths) if passkey_lengths else lengths, passkey_depths,
                passkey_samples, seed, path, title=f"passkey retrieval: {name}", batch_size=batch_size,
                template=passkey_template)
            _passkey_figures(figures, prefix, details["passkey"][name], original_length)
            plots.extend([path] if path is not None else [])
    if ruler_samples > 0:
        if tokenizer is None or source is None:
            raise ValueError("RULER tasks need a tokenizer and held-out text for the haystack")
        haystack = filler_from_stream(source, tokenizer=tokenizer)
        for prefix, m in runs.items():
            result = ruler_suite(m, tokenizer, haystack, list(ruler_lengths or passkey_lengths or lengths),
                                 ruler_samples, ruler_tasks or TASKS, seed)
            figures.update({f"{prefix}ruler/{k}": v for k, v in result.items()})
    if out_dir is not None:
        write_json(os.path.join(out_dir, "eval.json"),
                   {"figures": figures, "details": details, "plots": [os.path.basename(p) for p in plots]})
    return figures


SHORT_KEYS = ("short_nll", "short_nll_se", "short_ppl", "teacher_short_nll", "teacher_short_nll_se",
              "kl_teacher_student", "short_nll_gap", "short_nll_gap_se")


def _short_part(figures: dict, model, teacher, stream, max_rows, batch_size, attention_rows,
                attention_tokens) -> dict:
    """Short-text retention into `figures` (its flat keys, per-layer cosine and attention KL); its details."""
    short = short_retention(model, teacher, stream, max_rows, batch_size, attention_rows, attention_tokens)
    figures.update({key: short[key] for key in SHORT_KEYS if key in short})
    cos = short.get("hidden_cosine") or []
    if cos:
        figures["hidden_cosine_mean"] = float(np.mean(cos[1:] if len(cos) > 1 else cos))
        figures["hidden_cosine_last"] = cos[-1]
        figures.update({f"hidden_cosine/{i}": c for i, c in enumerate(cos)})
    akl = short.get("attention_kl") or []
    if akl:
        figures["attention_kl_mean"] = float(np.mean(akl))
        figures.update({f"attention_kl/{i}": v for i, v in enumerate(akl)})
    return short


def _long_part(figures: dict, model, teacher, rolling, stream, rows, buckets, original_length: int,
               long_batch_size: int, batch_size: int) -> dict:
    """NLL by position of the student (and of `teacher` whole, and of `rolling` through its own window)
    into `figures` with their standard errors; the curves."""
    curves = {"student": nll_by_position(model, stream, rows, buckets, original_length, long_batch_size)}
    if teacher is not None:
        curves["teacher"] = nll_by_position(teacher, stream, rows, buckets, original_length, long_batch_size)
    if rolling is not None:
        curves["teacher_rolling"] = nll_by_position(rolling, stream, rows, buckets, original_length,
                                                    batch_size, window=original_length)
    for name, res in curves.items():
        prefix = {"student": "", "teacher": "teacher_", "teacher_rolling": "teacher_rolling_"}[name]
        for key in ("long_nll", "long_ppl", "long_nll_within", "long_nll_beyond"):
            figures[prefix + key] = res.get(key, float("nan"))
            if key != "long_ppl":
                figures[prefix + key + "_se"] = res.get(key + "_se", float("nan"))
    return curves


def _short_whole_part(figures: dict, model, rolling, stream, max_rows, buckets, original_length: int,
                      long_batch_size: int, batch_size: int) -> dict:
    """Whole short documents: the student's NLL over them, the teacher's through its rolling window."""
    whole = {"student": nll_by_position(model, stream, max_rows, buckets, original_length, long_batch_size)}
    if rolling is not None:
        whole["teacher_rolling"] = nll_by_position(rolling, stream, max_rows, buckets, original_length,
                                                   batch_size, window=original_length)
    for name, res in whole.items():
        prefix = "" if name == "student" else "teacher_"
        figures[prefix + "short_whole_nll"] = res["long_nll"]
        figures[prefix + "short_whole_nll_se"] = res["long_nll_se"]
    return whole


def _passkey_figures(figures: dict, prefix: str, grid: dict, original_length: int) -> None:
    """A needle grid's flat figures: accuracy, log-prob, by length, and within / beyond the window."""
    figures[prefix + "passkey_accuracy"] = grid["accuracy"]
    figures[prefix + "passkey_logprob"] = grid["logprob"]
    figures.update({f"{prefix}passkey_accuracy/{n}": a for n, a in grid["by_length"].items()})
    for side, keep in (("within", lambda n: n <= original_length), ("beyond", lambda n: n > original_length)):
        accs = [a for n, a in grid["by_length"].items() if keep(int(n))]
        figures[f"{prefix}passkey_accuracy_{side}_window"] = float(np.mean(accs)) if accs else float("nan")
