"""Hybrid expansion (Control LLM, Wei et al. 2025, arXiv 2501.10979): keep what the model knew by training a
copy of selected decoder blocks beside their frozen originals.

A selected block becomes an `ExpandedBlock`: the original block (frozen) and a trainable copy run on the same
input; their outputs h_p (original) and h_e (copy) are interpolated

    h = g(h_p) + α · (h_e − g(h_p))          (= (1 − α)·g(h_p) + α·h_e)

with g the identity except for `progressive` (a trainable d×d lateral map, started at the identity), and α

    lerp         σ(f), one scalar f per block (f = 0: α = ½)
    dlerp        σ(Linear(2d→1)[h_p; h_e]) per token
    dlerp_in     σ(Linear(d→1) x) per token, x the block's input
    progressive  σ(f), as lerp, over the lateral map of h_p
    moe          a per-token gate softmax(Linear(d→2) x) choosing one branch (hard choice forward, the
                 softmax's gradient backward: straight-through)

The copy starts equal to its original, so h_e = h_p and step 0 is exactly the original model, whatever α
(the interpolation parameters start at zero, the lateral map at the identity). Everything outside the copies
and the interpolation parameters is frozen by `expand`.

An alignment loss D(h_p, h_e) (cosine or MSE, averaged over the expanded blocks) keeps the copies near their
originals; the step reads the pairs of the last forward with `take_pairs`.

Export folds each pair back into one block by weight interpolation, θ = (1 − ᾱ)·θ_p + ᾱ·θ_e (`fold_state`):
ᾱ = σ(f) for lerp and progressive (whose lateral map has no place in a plain block: the folded model is an
approximation there, measured by scripts/evaluate.py), the mean α over held-out tokens for the dynamic
kinds (`measure_alphas`). The unfolded model is saved too (`save_unfolded`), with `expansion.json` beside
its weights, and `load_unfolded` rebuilds it for scripts/evaluate.py.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import re

import torch
from torch import nn

from distill.config import ConfigError, ExpansionConfig
from distill.model.decoder import decoder_layers
from distill.model.export import export
from distill.model.load import refresh_inv_freq, resolve_attention

logger = logging.getLogger(__name__)

SPEC_FILE = "expansion.json"
KINDS = ("lerp", "dlerp", "dlerp_in", "progressive", "moe")


def expanded_indices(layers: int | list[int], num_layers: int) -> list[int]:
    """The block indices `model.expansion.layers` selects: k evenly spaced blocks (the last of each run of
    L/k, as Control LLM's every (L/k)-th block), or the given list; ConfigError when out of range."""
    if isinstance(layers, int):
        if not 1 <= layers <= num_layers:
            raise ConfigError(f"model.expansion.layers: {layers} blocks of a {num_layers}-layer model; "
                              f"allowed: "
                              f"1..{num_layers} or a list of indices 0..{num_layers - 1}")
        stride = num_layers / layers
        return sorted({int(round((j + 1) * stride)) - 1 for j in range(layers)})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"model.expansion.layers: block {bad[0]} does not exist; "
                          f"allowed: 0..{num_layers - 1}")
    return sorted(layers)


class ExpandedBlock(nn.Module):
    """A frozen decoder block and its trainable copy, interpolated (see the module docstring).

    The branches are called through `.forward`, not `__call__`: transformers' hidden-state capture hooks on
    decoder-layer classes must record this block's output once, not each branch's (`expand` installs that
    hook on the block). Activation checkpointing still applies to each branch (transformers wraps the
    layer class's `forward`). Under FSDP2 the block is one unit: its pre-forward gathers both branches.
    """

    def __init__(self, original: nn.Module, kind: str, hidden_size: int):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"interpolation {kind!r}; allowed: {', '.join(KINDS)}")
        self.kind = kind
        self.original = original.requires_grad_(False)
        self.expanded = copy.deepcopy(original).requires_grad_(True)
        for name in ("attention_type", "layer_idx"):  # read by some decoders' loops (sliding-window masks)
            if hasattr(original, name):
                setattr(self, name, getattr(original, name))
        if kind in ("lerp", "progressive"):
            self.gate = nn.Parameter(torch.zeros(1))  # f: α = σ(f), ½ at the start
        elif kind == "dlerp":
            self.gate = nn.Linear(2 * hidden_size, 1)
        elif kind == "dlerp_in":
            self.gate = nn.Linear(hidden_size, 1)
        else:  # moe
            self.gate = nn.Linear(hidden_size, 2)
        if isinstance(self.gate, nn.Linear):
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        if kind == "progressive":
            self.lateral = nn.Parameter(torch.eye(hidden_size))
        self.keep_pair = False
        """Whether training forwards keep (h_p, h_e) for the alignment loss (set by `expand`)."""
        self.pair: tuple[torch.Tensor, torch.Tensor] | None = None
        """(h_p, h_e) of the last forward with gradients, for the alignment loss (`take_pairs`)."""
        self.alpha_sum: torch.Tensor | None = None
        """While measuring (`measure_alphas`): Σ α over tokens and their count."""
        self.alpha_count = 0

    def alpha(self, x: torch.Tensor, h_p: torch.Tensor, h_e: torch.Tensor) -> torch.Tensor:
        """α, broadcastable against (B, T, H): (1,) for lerp / progressive, (B, T, 1) otherwise."""
        if self.kind in ("lerp", "progressive"):
            return torch.sigmoid(self.gate)
        if self.kind == "dlerp":
            return torch.sigmoid(self.gate(torch.cat([h_p, h_e], dim=-1)))
        if self.kind == "dlerp_in":
            return torch.sigmoid(self.gate(x))
        p = torch.softmax(self.gate(x).float(), dim=-1)[..., 1:]  # the copy's probability
        hard = (p > 0.5).to(p.dtype)  # a tie (the zero-initialised gate) picks the original
        return hard + (p - p.detach())  # forward: exactly the hard choice; backward: the softmax's gradient

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        h_p = self.original.forward(hidden_states, *args, **kwargs)
        h_e = self.expanded.forward(hidden_states, *args, **kwargs)
        rest = ()
        if isinstance(h_p, tuple):  # older decoder layers return (hidden, ...)
            (h_p, *rest_p), (h_e, *_) = h_p, h_e
            rest = tuple(rest_p)
        base = h_p
        if self.kind == "progressive":
            with torch.autocast(h_p.device.type, enabled=False):  # exact identity at the start
                base = nn.functional.linear(h_p.float(), self.lateral.float()).to(h_p.dtype)
        alpha = self.alpha(hidden_states, h_p, h_e)
        out = base + alpha.to(base.dtype) * (h_e - base)
        if self.keep_pair and self.training and torch.is_grad_enabled():
            self.pair = (h_p, h_e)
        if self.alpha_sum is not None:
            a = alpha.detach().float()
            tokens = h_p.shape[0] * h_p.shape[1]
            self.alpha_sum += a.sum() if a.numel() > 1 else a.sum() * tokens
            self.alpha_count += tokens
        return (out, *rest) if rest else out


def _install_capture_hook(block: nn.Module) -> None:
    """transformers records `hidden_states` with a forward hook on each decoder-layer instance; the block
    replaces a layer, so it gets the same hook (its branches, called through `.forward`, never fire
    theirs)."""
    from transformers.utils import output_capturing

    install = getattr(output_capturing, "install_output_capuring_hook", None) or \
        getattr(output_capturing, "install_output_capturing_hook", None)
    if install is None:
        raise RuntimeError("this transformers version has no output-capturing hook to install on expanded "
                           "blocks; hybrid expansion needs transformers 5.x")
    install(block, "hidden_states", 0, True)


def blocks(model: nn.Module) -> list[tuple[int, ExpandedBlock]]:
    """(index, block) of every expanded block of `model`, in layer order."""
    return [(i, layer) for i, layer in enumerate(decoder_layers(model)) if isinstance(layer, ExpandedBlock)]


def expand(model: nn.Module, spec: ExpansionConfig) -> list[int]:
    """Expand `model` in place per `spec` and freeze everything but the copies and the interpolation
    parameters; returns the expanded block indices."""
    layers = decoder_layers(model)
    indices = expanded_indices(spec.layers, len(layers))
    model.requires_grad_(False)
    hidden = int(model.config.hidden_size)
    for i in indices:
        block = ExpandedBlock(layers[i], spec.interpolation, hidden).to(next(layers[i].parameters()).device)
        block.keep_pair = spec.alignment is not None and spec.alignment.weight > 0
        _install_capture_hook(block)
        layers[i] = block
    return indices


def take_pairs(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (h_p, h_e) of every expanded block's last training forward, in layer order; cleared."""
    pairs = []
    for _, block in blocks(model):
        if block.pair is None:
            raise RuntimeError("an expanded block recorded no branch outputs in this forward")
        pairs.append(block.pair)
        block.pair = None
    return pairs


@torch.no_grad()
def measure_alphas(model: nn.Module, batches, forward=None) -> dict[int, float]:
    """The mean α over the tokens of `batches` (dicts of model inputs), per expanded block.

    Args:
        forward: how to run the model (a strategy's forward when sharded); default `model(**batch)`.
    """
    run = forward or (lambda **kw: model(**kw))
    found = blocks(model)
    was_training = model.training
    model.eval()
    for _, block in found:
        block.alpha_sum, block.alpha_count = torch.zeros((), dtype=torch.float64), 0
    try:
        for batch in batches:
            run(**batch, use_cache=False, logits_to_keep=1)
        return {i: float(b.alpha_sum / max(b.alpha_count, 1)) for i, b in found}
    finally:
        for _, block in found:
            block.alpha_sum, block.alpha_count = None, 0
        model.train(was_training)


def fold_alphas(model: nn.Module, state: dict[str, torch.Tensor], batches=None, forward=None) \
        -> dict[int, float]:
    """ᾱ per expanded block for `fold_state`: σ(f) read from the full state dict for lerp and progressive, the
    mean α over `batches` for the dynamic kinds.

    Sharded, every rank calls it (the measurement runs forwards, collectives) and only the rank holding the
    full `state` gets the σ(f) entries; the others get the measured ones alone.
    """
    found = blocks(model)
    dynamic = [i for i, b in found if b.kind not in ("lerp", "progressive")]
    if dynamic and batches is None:
        raise ValueError("the dynamic interpolations need data to measure their mean α on")
    alphas = measure_alphas(model, batches, forward) if dynamic else {}
    for i, block in found:
        if block.kind in ("lerp", "progressive") and state:
            key = next((k for k in state if re.search(rf"(?:^|\.)layers\.{i}\.gate$", k)), None)
            if key is None:
                raise ValueError(f"block {i}: no interpolation parameter in the state dict")
            alphas[i] = float(torch.sigmoid(state[key].float()).reshape(-1)[0])
    return dict(sorted(alphas.items()))


_BRANCH = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<i>\d+)\.(?P<part>original|expanded)\.(?P<rest>.+)$")
_INTERP = re.compile(r"^(?:.*\.)?layers\.\d+\.(?:gate|lateral)(?:\..+)?$")


def fold_state(state: dict[str, torch.Tensor], alphas: dict[int, float]) -> dict[str, torch.Tensor]:
    """A plain model's state dict from an expanded one: each pair's tensors folded as (1 − ᾱ)·θ_p + ᾱ·θ_e
    (in fp32, written back in the tensors' dtype); the interpolation parameters dropped."""
    out, pending = {}, {}
    for key, value in state.items():
        m = _BRANCH.match(key)
        if m is not None:
            i = int(m["i"])
            if i not in alphas:
                raise ValueError(f"{key}: block {i} is expanded but has no α to fold with")
            pending.setdefault((m["prefix"], i, m["rest"]), {})[m["part"]] = value
        elif not _INTERP.match(key):
            out[key] = value
    for (prefix, i, rest), parts in pending.items():
        if parts.keys() != {"original", "expanded"}:
            raise ValueError(f"{prefix}{i}.{rest}: only one branch of the pair is in the state dict")
        a = alphas[i]
        p, e = parts["original"], parts["expanded"]
        out[f"{prefix}{i}.{rest}"] = ((1 - a) * p.float() + a * e.float()).to(p.dtype) if \
            p.is_floating_point() else p
    return out


# ---------------------------------------------------------------------------------------------------------
# The unfolded model on disk
# ---------------------------------------------------------------------------------------------------------
def save_unfolded(model: nn.Module, tokenizer, out_dir: str, state: dict[str, torch.Tensor],
                  spec: ExpansionConfig, alphas: dict[int, float], dtype: torch.dtype | None = None) -> str:
    """The expanded model as a directory scripts/evaluate.py loads (`load_unfolded`): the plain config (with
    the extended RoPE), the expanded state dict as safetensors, the tokenizer, and expansion.json (the spec,
    the expanded indices and the ᾱ the folded export used)."""
    export(model, tokenizer, out_dir, state_dict=state, dtype=dtype)
    record = {"layers": [i for i, _ in blocks(model)], "interpolation": spec.interpolation,
              "alignment": None if spec.alignment is None else {"kind": spec.alignment.kind,
                                                                "weight": spec.alignment.weight},
              "fold_alphas": {str(i): a for i, a in alphas.items()}}
    with open(os.path.join(out_dir, SPEC_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return out_dir


def is_unfolded(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SPEC_FILE))


def read_spec(path: str) -> dict:
    with open(os.path.join(path, SPEC_FILE), encoding="utf-8") as f:
        return json.load(f)


def _read_state(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"{path}: no safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(file))
    return state


def load_unfolded(path: str, dtype: torch.dtype = torch.float32, attention: str = "sdpa",
                  device: str | torch.device = "cpu") -> tuple[nn.Module, dict[int, float]]:
    """An unfolded expanded model saved by `save_unfolded`, frozen in eval mode, and the ᾱ its export folded
    with. ConfigError when the directory does not hold one."""
    from transformers import AutoConfig, AutoModelForCausalLM


    spec = read_spec(path)
    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = resolve_attention(attention, device, config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expand(model, ExpansionConfig(layers=list(spec["layers"]), interpolation=spec["interpolation"]))
    state = _read_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(f"{path}: the weights do not match {SPEC_FILE} (missing {sorted(missing)[:2]}, "
                          f"unexpected {sorted(unexpected)[:2]})")
    refresh_inv_freq(model)
    model.to(device).eval().requires_grad_(False)
    return model, {int(i): float(a) for i, a in spec["fold_alphas"].items()}


def folded_model(model: nn.Module, alphas: dict[int, float]) -> nn.Module:
    """A plain model of the same architecture holding `fold_state` of the expanded `model` (frozen, eval)."""
    from transformers import AutoModelForCausalLM


    plain = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(fold_state(model.state_dict(), alphas), strict=True)
    refresh_inv_freq(plain)
    device = next(model.parameters()).device
    return plain.to(device).eval().requires_grad_(False)


@torch.no_grad()
def fold_figures(model: nn.Module, alphas: dict[int, float], stream, rows: list[int]) -> dict[str, float]:
    """How far the folded model is from the unfolded `model` on rows of a built stream (each row alone, its
    packed documents separated by their positions): the max and mean |logit difference|, the mean
    KL(unfolded ‖ folded) per next-token prediction, and both models' NLL on those predictions."""
    folded = folded_model(model, alphas)
    device = next(model.parameters()).device
    max_abs, sum_abs, n_logits = 0.0, 0.0, 0
    kl, nll_unfolded, nll_folded, n = 0.0, 0.0, 0.0, 0
    for i in rows:
        b = stream.batch([i])
        ids, pos = b["input_ids"].to(device), b["position_ids"].to(device)
        targets = b["labels"][:, 1:].to(device)  # (1, T-1)
        keep = targets != -100
        a = model(input_ids=ids, position_ids=pos).logits.float()[:, :-1][keep]  # (n, V)
        f = folded(input_ids=ids, position_ids=pos).logits.float()[:, :-1][keep]
        diff = (a - f).abs()
        max_abs, sum_abs, n_logits = max(max_abs, float(diff.max())), sum_abs + float(diff.sum()), \
            n_logits + diff.numel()
        la, lf = torch.log_softmax(a, -1), torch.log_softmax(f, -1)
        kl += float((la.exp() * (la - lf)).sum())
        t = targets[keep]
        nll_unfolded -= float(la.gather(-1, t[:, None]).sum())
        nll_folded -= float(lf.gather(-1, t[:, None]).sum())
        n += int(keep.sum())
    n = max(n, 1)
    return {"fold_logit_max_abs_diff": max_abs, "fold_logit_mean_abs_diff": sum_abs / max(n_logits, 1),
            "fold_kl": kl / n, "fold_nll_unfolded": nll_unfolded / n, "fold_nll_folded": nll_folded / n}
