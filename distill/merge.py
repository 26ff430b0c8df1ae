"""Weight-space tools for after the extension, streamed shard by shard from safetensors.

- `interpolate`: θ(α) = (1 − α)·θ_original + α·θ_extended for every tensor (model soups / WiSE-FT style;
  LongRecipe merges 50/50), one output directory per α; config (the extended RoPE) and tokenizer from the
  extended model.
- `residual`: θ = θ_target + λ·(θ_instruct − θ_base), the instruction residual of Jindal et al. 2024
  (arXiv 2410.10739): extend the base, add what instruction tuning changed; config (the extended RoPE) from
  the target, tokenizer and chat template from the instruct model. Rows the base never trained (Llama-3's chat
  tokens) come out as the instruct model's, which is the point.

Memory is about one shard per input: the output is written shard by shard in the layout of the model whose
config it takes, each tensor read on demand from the others (`safe_open`), computed in fp32 and stored in
that model's dtype (bf16 stays bf16). Mismatched architectures, tensor names or shapes, and tokenizers that
disagree on their shared vocabulary are refused with one line (`MergeError`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable

import torch

from distill.model.export import consolidate

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ARCHITECTURE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "generation_config.json")


class MergeError(ValueError):
    """Inputs that cannot be merged (one line: which, what differs)."""


class Checkpoint:
    """A Hugging Face model directory read lazily: tensor name → shard file, config."""

    def __init__(self, path: str, role: str):
        path = consolidate(path)  # a sharded training checkpoint: its safetensors written once beside it
        self.path, self.role = path, role
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise MergeError(f"--{role} {path}: not a model directory (no config.json)")
        with open(config_path, encoding="utf-8") as f:
            self.config = json.load(f)
        index_path = os.path.join(path, INDEX)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                self.index = json.load(f)
            self.files = dict(self.index["weight_map"])
        elif os.path.isfile(os.path.join(path, SINGLE)):
            from safetensors import safe_open

            self.index = None
            with safe_open(os.path.join(path, SINGLE), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise MergeError(f"--{role} {path}: no safetensors weights ({SINGLE} or {INDEX})")
        self._shapes: dict[str, tuple[int, ...]] = {}

    def shards(self) -> dict[str, list[str]]:
        """{shard file: the tensor names in it}, in file order."""
        out: dict[str, list[str]] = {}
        for name, file in self.files.items():
            out.setdefault(file, []).append(name)
        return dict(sorted(out.items()))

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            from safetensors import safe_open

            with safe_open(os.path.join(self.path, self.files[name]), framework="pt") as f:
                self._shapes[name] = tuple(f.get_slice(name).get_shape())
        return self._shapes[name]

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(os.path.join(self.path, self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


def check_compatible(reference: Checkpoint, *others: Checkpoint) -> None:
    """Same architecture (config), same tensor names, same shapes; MergeError naming the first difference."""
    for other in others:
        for key in ARCHITECTURE_KEYS:
            a, b = reference.config.get(key), other.config.get(key)
            if a != b:
                raise MergeError(f"--{other.role} {other.path}: config {key} is {b!r}, --{reference.role} "
                                 f"has {a!r}; the models must share one architecture")
        missing = sorted(set(reference.files) ^ set(other.files))
        if missing:
            raise MergeError(f"--{other.role} {other.path}: tensor {missing[0]!r} is in one model and not "
                             f"the other ({len(missing)} such)")
        for name in reference.files:
            if reference.shape(name) != other.shape(name):
                raise MergeError(f"--{other.role} {other.path}: tensor {name} has shape {other.shape(name)}, "
                                 f"--{reference.role} {reference.shape(name)}")


def check_tokenizers(base: str, other: str, roles: tuple[str, str]) -> None:
    """Both tokenizers give every token of the smaller vocabulary the same id (else MergeError)."""
    from transformers import AutoTokenizer

    try:
        a = AutoTokenizer.from_pretrained(base).get_vocab()
        b = AutoTokenizer.from_pretrained(other).get_vocab()
    except Exception as err:  # noqa: BLE001 - any failure is an unusable input
        raise MergeError(f"cannot load the tokenizers of --{roles[0]} / --{roles[1]}: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    differ = [t for t, i in small.items() if large.get(t) != i]
    if differ:
        raise MergeError(f"--{roles[0]} and --{roles[1]} tokenizers disagree on {len(differ)} shared tokens "
                         f"(e.g. {differ[0]!r}: {a.get(differ[0])} vs {b.get(differ[0])})")


def _write(layout: Checkpoint, out: str, combine: Callable[[str], torch.Tensor], progress: bool,
           desc: str) -> None:
    """Write combine(name) for every tensor of `layout`, shard by shard in its layout, with its index."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    shards = layout.shards()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layout.files), desc=desc, unit="tensor")
    for file, names in shards.items():
        tensors = {}
        for name in names:
            tensors[name] = combine(name).contiguous()
            if bar is not None:
                bar.update(1)
        save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
        del tensors  # one shard in memory at a time
    if bar is not None:
        bar.close()
    if layout.index is not None:
        with open(os.path.join(out, INDEX), "w", encoding="utf-8") as f:
            json.dump(layout.index, f, indent=2)


def _copy(source: str, out: str, names) -> None:
    for name in names:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copy(path, os.path.join(out, name))


def interpolate(original: str, extended: str, alphas: list[float], out: str,
                progress: bool = True) -> list[str]:
    """θ(α) = (1 − α)·θ_original + α·θ_extended for each α, into `out/alpha-<α>/`; returns the directories."""
    a, b = Checkpoint(original, "original"), Checkpoint(extended, "extended")
    check_compatible(b, a)
    check_tokenizers(extended, original, ("extended", "original"))
    written = []
    for alpha in alphas:
        target = os.path.join(out, f"alpha-{alpha:g}")

        def combine(name: str, alpha=alpha) -> torch.Tensor:
            wb = b.tensor(name)
            mixed = (1.0 - alpha) * a.tensor(name).float() + alpha * wb.float()
            return mixed.to(wb.dtype)

        _write(b, target, combine, progress, f"alpha {alpha:g}")
        _copy(extended, target, ("config.json", *TOKENIZER_FILES))
        written.append(target)
        logger.info("wrote %s", target)
    return written


def residual(base: str, instruct: str, target: str, out: str, scale: float = 1.0,
             progress: bool = True) -> str:
    """θ_target + scale·(θ_instruct − θ_base) into `out`: config from the target, tokenizer from the
    instruct model."""
    b, i, t = Checkpoint(base, "base"), Checkpoint(instruct, "instruct"), Checkpoint(target, "target")
    check_compatible(t, b, i)
    check_tokenizers(base, instruct, ("base", "instruct"))
    check_tokenizers(base, target, ("base", "target"))

    def combine(name: str) -> torch.Tensor:
        wt = t.tensor(name)
        delta = i.tensor(name).float() - b.tensor(name).float()
        return (wt.float() + scale * delta).to(wt.dtype)

    _write(t, out, combine, progress, "residual")
    _copy(target, out, ("config.json",))
    _copy(instruct, out, TOKENIZER_FILES)
    return out
