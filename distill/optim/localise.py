"""Gradient localisation (Fernandez, Bisk & Strubell, EMNLP Findings 2024, arXiv 2411.04448): where in the
model continual pre-training's gradients concentrate, and training only there.

- `grad_groups`: the student's trainable parameters by part: `embed`, `layers.<i>.attn` (attention and its
  input norm), `layers.<i>.mlp` (MLP and its norm), `layers.<i>.interp` (an expanded block's interpolation
  parameters) and `head` (final norm and lm_head). The strategies reduce each part's sum of squares over
  shards (`Strategy.grad_norms`); the step logs them every `log.layer_grad_every` steps, for the step and per
  stream, and `plot_layer_grads` draws the layer × step heatmap.
- `optim.layers: {mode: traced}`: `diagnostic_norms` measures each decoder layer's gradient norm of the LM
  loss on a diagnostic batch (hooks free each gradient as it arrives, so no model-sized gradient is held);
  `layer_plan` turns the norms relative to their mean into the layers to train (`above_mean`) or per-layer
  LR factors (`lr_scale`).
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
from torch import nn

from distill.model.decoder import decoder_layers
from distill.model.objectives import lm_loss

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def part_of(name: str) -> str:
    """The group of parameter `name` (a student's `named_parameters` name)."""
    m = _LAYER.search(name)
    if m is None:
        if "embed" in name or name.endswith("wte.weight"):
            return "embed"
        return "head"  # the final norm and lm_head
    i, rest = m.groups()
    leaf = rest.removeprefix("expanded.").removeprefix("original.")
    if "attn" in leaf or leaf.startswith("input_layernorm"):
        return f"layers.{i}.attn"
    if "mlp" in leaf or leaf.startswith("post_attention_layernorm"):
        return f"layers.{i}.mlp"
    return f"layers.{i}.interp"


def layer_index(name: str) -> int | None:
    """The decoder layer of parameter `name`, None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def grad_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters by part, in a fixed order (embed, layers in order, head): every rank builds
    the same dict, so reductions over it line up."""
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(part_of(name), []).append(p)
    return dict(sorted(groups.items(), key=lambda kv: _order(kv[0])))


def _order(part: str) -> tuple:
    if part == "embed":
        return (0, 0, "")
    if part == "head":
        return (2, 0, "")
    _, i, kind = part.split(".")
    return (1, int(i), kind)


def layer_norms(part_norms: dict[str, float]) -> dict[int, float]:
    """Per decoder layer: the norm over all its parts (√Σ part²)."""
    out: dict[int, float] = {}
    for part, norm in part_norms.items():
        if part.startswith("layers."):
            i = int(part.split(".")[1])
            out[i] = out.get(i, 0.0) + norm ** 2
    return {i: v ** 0.5 for i, v in sorted(out.items())}


# ---------------------------------------------------------------------------------------------------------
# optim.layers: traced
# ---------------------------------------------------------------------------------------------------------
def diagnostic_loss(forward, output_weight, batch: dict, autocast=None) -> torch.Tensor:
    """The per-token LM loss of the diagnostic `batch` ({"input_ids", "position_ids", "labels"}, (1, n)
    flattened packed rows) through `forward` (a model's, or a strategy's when sharded); `output_weight()`
    gives the lm_head weight after that forward. The one loss both measurements back-propagate."""
    with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
        out = forward(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                      output_hidden_states=True, use_cache=False, logits_to_keep=1)
        total, count = lm_loss(out.hidden_states[-1], output_weight(), batch["labels"])
    return total / count.clamp(min=1)


def diagnostic_norms(model: nn.Module, batch: dict, autocast=None) -> dict[int, float]:
    """Each decoder layer's gradient norm of the per-token LM loss on `batch` ({"input_ids", "position_ids",
    "labels"}, (1, n) flattened packed rows), on a whole model. Every trainable parameter's gradient is added
    to its layer's sum of squares and freed as soon as it is accumulated; the model is left without
    gradients."""
    sums: dict[int, torch.Tensor] = {}
    handles = []
    for name, p in model.named_parameters():
        i = layer_index(name)
        if not p.requires_grad:
            continue

        def hook(param, i=i):
            if i is not None:
                sums[i] = sums.get(i, 0.0) + param.grad.detach().double().pow(2).sum()
            param.grad = None

        handles.append(p.register_post_accumulate_grad_hook(hook))
    try:
        diagnostic_loss(model, lambda: model.get_output_embeddings().weight, batch, autocast).backward()
    finally:
        for h in handles:
            h.remove()
    return {i: float(v) ** 0.5 for i, v in sorted(sums.items())}


def layer_plan(norms: dict[int, float], select: str, max_scale: float) -> dict:
    """From per-layer norms: {"norms", "relative" (norm / mean over layers), "trained" (the layers to train),
    "scales" (per-layer LR factors)}; keys are layer indices as strings (JSON)."""
    mean = sum(norms.values()) / max(len(norms), 1)
    relative = {i: (n / mean if mean > 0 else 1.0) for i, n in norms.items()}
    if select == "above_mean":
        trained = [i for i, r in relative.items() if r > 1.0] or [max(relative, key=relative.get)]
        scales = {i: 1.0 for i in relative}
    else:
        trained = list(relative)
        scales = {i: min(r, max_scale) for i, r in relative.items()}
    return {"norms": {str(i): v for i, v in norms.items()},
            "relative": {str(i): v for i, v in relative.items()}, "trained": trained,
            "scales": {str(i): v for i, v in scales.items()}, "select": select}


def freeze_untraced(model: nn.Module, trained: list[int]) -> list[int]:
    """Freeze every decoder layer not in `trained`; returns the frozen layers."""
    frozen = []
    for i, layer in enumerate(decoder_layers(model)):
        if i not in trained:
            layer.requires_grad_(False)
            frozen.append(i)
    return frozen


def lr_scales_by_param(model: nn.Module, scales: dict) -> dict[int, tuple[int, float]]:
    """{id(param): (layer, factor)} for the parameters of the decoder layers `scales` names (string or int
    keys), for `distill.optim.optimizer.param_groups`."""
    by_layer = {int(k): float(v) for k, v in scales.items()}
    out = {}
    for name, p in model.named_parameters():
        i = layer_index(name)
        if i is not None and i in by_layer:
            out[id(p)] = (i, by_layer[i])
    return out


# ---------------------------------------------------------------------------------------------------------
# the heatmap
# ---------------------------------------------------------------------------------------------------------
def plot_layer_grads(metrics_path: str, out_png: str) -> str | None:
    """A part × step heatmap of the step's per-part gradient norms (`grad_norm/embed`,
    `grad_norm/layers.<i>.<part>`, `grad_norm/head`; log colour scale); None when no record has them."""
    rows = []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                parts = {k[len("grad_norm/"):]: v for k, v in rec.items()  # the step's, not per stream
                         if k.startswith("grad_norm/") and k.count("/") == 1 and isinstance(v, (int, float))}
                if parts:
                    rows.append((rec["step"], parts))
    if not rows:
        return None
    import matplotlib  # heavy: only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = sorted({k for _, parts in rows for k in parts}, key=_order)
    grid = np.full((len(names), len(rows)), np.nan)
    for j, (_, parts) in enumerate(rows):
        for r, name in enumerate(names):
            v = parts.get(name)
            if v is not None and v > 0:
                grid[r, j] = np.log10(v)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(rows) + 3), max(3.0, 0.22 * len(names) + 1.5)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = list(range(0, len(rows), max(1, len(rows) // 10)))
    ax.set_xticks(ticks, [str(rows[t][0]) for t in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title("gradient norm per layer part (log10)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
