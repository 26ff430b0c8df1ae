"""The trade-off between the original and the extended model: interpolate their weights in memory,
θ(α) = (1 − α)·θ_original + α·θ_extended (the extended model's config, so its RoPE), evaluate each α with
the evaluation suite, and plot short-text quality against long-context quality (a Pareto plot), with other
models (Long CPT, LongReD, the teacher, ...) as points.

`scripts/merge.py interpolate` writes the same θ(α) to disk (streamed shard by shard); here the three
models (the original as teacher, the extended one, and one working copy of its weights) live in memory at
once, which is what evaluating them needs anyway.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from distill.eval.common import pyplot, write_json
from distill.eval.suite import evaluate_suite

logger = logging.getLogger(__name__)

# The figures of one point of the sweep (and of every other model put on the plot).
POINT_KEYS = ("short_nll", "short_nll_se", "short_nll_gap", "short_nll_gap_se", "kl_teacher_student",
              "long_nll_beyond", "long_nll_beyond_se", "passkey_accuracy_within_window",
              "passkey_accuracy_beyond_window")


class SweepError(ValueError):
    """Models that cannot be interpolated (one line)."""


@torch.no_grad()
def interpolate_into(model, original: dict[str, torch.Tensor], extended: dict[str, torch.Tensor],
                     alpha: float) -> None:
    """Set every parameter of `model` to (1 − α)·original + α·extended, computed in fp32 and stored in the
    model's dtype. Buffers (RoPE frequencies) stay the model's own."""
    params = dict(model.named_parameters())
    for name, b in extended.items():
        a = original[name]
        params[name].copy_(((1.0 - alpha) * a.float() + alpha * b.float()).to(params[name].dtype))


def weights_of(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's parameters (tied ones once)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def check_same_layout(original: dict[str, torch.Tensor], extended: dict[str, torch.Tensor]) -> None:
    for name, tensor in extended.items():
        if name not in original:
            raise SweepError(f"the extended model has {name}, the original does not (another architecture)")
        if original[name].shape != tensor.shape:
            raise SweepError(f"{name}: shape {tuple(tensor.shape)} in the extended model, "
                             f"{tuple(original[name].shape)} in the original")
    missing = sorted(set(original) - set(extended))
    if missing:
        raise SweepError(f"the original model has {missing[0]}, the extended one does not")


def point(figures: dict) -> dict:
    """The plotted figures of one model's `evaluate_suite` result (NaN when absent)."""
    return {k: math.nan if figures.get(k) is None else float(figures[k]) for k in POINT_KEYS}


def teacher_point(figures: dict) -> dict:
    """The original model as a point: no gap to itself, long NLL through its own rolling window (its
    honest figure beyond the window), passkey as scored at every length."""
    return {**{k: math.nan for k in POINT_KEYS}, "short_nll": figures.get("teacher_short_nll", math.nan),
            "short_nll_gap": 0.0,
            "long_nll_beyond": figures.get("teacher_rolling_long_nll_beyond", math.nan),
            "long_nll_beyond_se": figures.get("teacher_rolling_long_nll_beyond_se", math.nan),
            "passkey_accuracy_within_window": figures.get("teacher_passkey_accuracy_within_window", math.nan),
            "passkey_accuracy_beyond_window": figures.get("teacher_passkey_accuracy_beyond_window", math.nan)}


def run_sweep(teacher, extended, alphas: list[float], short_stream, long_stream, original_length: int,
              target_length: int, out_dir: str, points: dict[str, dict] | None = None, progress: bool = True,
              **suite_kwargs) -> dict:
    """Evaluate θ(α) for every α (the `extended` model is modified in place and restored at the end).

    Args:
        teacher: the original model (its own config: the retention figures' reference and the α = 0 end).
        extended: the extended model (its config is every θ(α)'s).
        alphas: the grid, each in [0, 1].
        points: {name: point figures} of other models to put on the plot.
        suite_kwargs: passed to `evaluate_suite` (max_rows, passkey_samples, tokenizer, passkey_lengths, ...).

    Returns:
        the sweep record, also written to `out_dir/sweep.json` (with `sweep.md` and `pareto.png`):
        {"alphas", "rows": [{"alpha", <POINT_KEYS>}], "points": {name: {...}}, "teacher": {...}}.
    """
    bad = [a for a in alphas if not 0.0 <= a <= 1.0]
    if bad:
        raise SweepError(f"alpha {bad[0]} is outside [0, 1]")
    original = weights_of(teacher)
    trained = weights_of(extended)
    check_same_layout(original, trained)
    rows, teacher_fig = [], None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(alphas), desc="sweep", unit="α", dynamic_ncols=True)
    try:
        for k, alpha in enumerate(alphas):
            interpolate_into(extended, original, trained, alpha)
            figures = evaluate_suite(extended, teacher, short_stream, long_stream, original_length,
                                     target_length, out_dir=os.path.join(out_dir, f"alpha_{alpha:g}"),
                                     teacher_baselines=k == 0, teacher_rolling=k == 0, **suite_kwargs)
            if k == 0:
                teacher_fig = teacher_point(figures)
            rows.append({"alpha": float(alpha), **point(figures)})
            logger.info("α %.2f: short NLL gap %+.4f, long NLL beyond %.4f", alpha,
                        rows[-1]["short_nll_gap"], rows[-1]["long_nll_beyond"])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        interpolate_into(extended, original, trained, 1.0)  # the extended model as it was
    record = {"alphas": [float(a) for a in alphas], "original_length": int(original_length),
              "target_length": int(target_length), "rows": rows, "teacher": teacher_fig,
              "points": points or {}}
    write_sweep(record, out_dir)
    return record


def write_sweep(record: dict, out_dir: str) -> None:
    """sweep.json, sweep.md (one table row per α and per point) and pareto.png."""
    write_json(os.path.join(out_dir, "sweep.json"), record, indent=1)
    lines = ["| model | short NLL gap | long NLL beyond window | passkey within | passkey beyond |",
             "|---|---|---|---|---|"]

    def row(name, p):
        return (f"| {name} | {p['short_nll_gap']:+.4f} ± {p['short_nll_gap_se']:.4f} | "
                f"{p['long_nll_beyond']:.4f} ± {p['long_nll_beyond_se']:.4f} | "
                f"{p['passkey_accuracy_within_window']:.2f} | {p['passkey_accuracy_beyond_window']:.2f} |")

    for r in record["rows"]:
        lines.append(row(f"α = {r['alpha']:g}", r))
    if record.get("teacher"):
        lines.append(row("teacher (rolling window)", record["teacher"]))
    for name, p in record.get("points", {}).items():
        lines.append(row(name, {**{k: math.nan for k in POINT_KEYS}, **p}))
    with open(os.path.join(out_dir, "sweep.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    plot_pareto({"sweep": record}, os.path.join(out_dir, "pareto.png"))


def plot_pareto(sweeps: dict[str, dict], path: str,
                title: str = "short-text cost vs long-context gain") -> str:
    """Two panels sharing x = short NLL gap to the teacher: long NLL beyond the original window (lower is
    better) and passkey accuracy beyond it (higher is better). One line per sweep (α annotated), one marker
    per other model (the points of every sweep record, and the teacher)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = (("long_nll_beyond", "long NLL beyond the original window (nats)"),
              ("passkey_accuracy_beyond_window", "passkey accuracy beyond the original window"))
    seen = {}
    for name, record in sweeps.items():
        for ax, (key, label) in zip(axes, panels):
            xs = [r["short_nll_gap"] for r in record["rows"]]
            ys = [r[key] for r in record["rows"]]
            line, = ax.plot(xs, ys, marker="o", label=f"{name}: α sweep")
            for r, x, y in zip(record["rows"], xs, ys):
                ax.annotate(f"{r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
        if record.get("teacher"):
            seen["teacher"] = record["teacher"]
        seen.update(record.get("points", {}))
    markers = "s^Dv*Ph"
    for i, (name, p) in enumerate(seen.items()):
        for ax, (key, _) in zip(axes, panels):
            x, y = p.get("short_nll_gap"), p.get(key)
            if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
                continue
            ax.scatter([x], [y], marker=markers[i % len(markers)], s=60, color="black" if name == "teacher"
                       else None, zorder=3, label=name)
    for ax, (_, label) in zip(axes, panels):
        ax.set_xlabel("short NLL gap to the teacher (nats, lower is better)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[1].legend(handles.values(), handles.keys(), fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
