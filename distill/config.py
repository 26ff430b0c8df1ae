"""Typed configuration: dataclasses loaded from YAML, with `a.b=value` overrides.

Every command (data builder, trainer, evaluation) goes through `load`. YAML mirrors the dataclasses one
to one: unknown keys and wrong types are `ConfigError`s naming the dotted key, the value and what is
allowed (with the closest valid key for a typo), so a user sees one clear line instead of a traceback.
A file may extend another with `base: path/relative/to/this/file.yaml` (deep-merged: mappings merge, lists
and scalars replace), before the command line's overrides; the resolved recipe holds no `base`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A user mistake in a recipe, a data spec or an override: one line, no traceback."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _where(path: str) -> str:
    return path or "<top level>"


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the type hint `tp` and build nested dataclasses; raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{_where(path)}: expected null, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise ConfigError(f"{_where(path)}: {value!r} is not allowed; "
                          f"allowed: {', '.join(map(repr, allowed))}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{_where(path)}: must not be null; expected {_type_name(tp)}")
        errors = []
        # Try plain types before dataclasses so `share: 3` stays a number.
        ordered = sorted(args, key=lambda a: dataclasses.is_dataclass(a))
        for arg in ordered:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as err:
                errors.append(err)
        # A mapping given for a dataclass member: report that member's own error (most specific).
        if isinstance(value, dict):
            for arg, err in zip([a for a in ordered if a is not type(None)], errors):
                if dataclasses.is_dataclass(arg):
                    raise err
        raise ConfigError(f"{_where(path)}: {value!r} is not a valid {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(path)}: expected a mapping ({tp.__name__}), got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (item_tp,) = typing.get_args(tp)[:1] or (Any,)
            items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        raise ConfigError(f"{_where(path)}: expected a list, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(path)}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{_where(path)}: keys must be strings, got {k!r}")
            out[k] = _convert(val_tp, v, f"{path}.{k}" if path else k)
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(path)}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{_where(path)}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 1.0e9 in YAML is a float
            return int(value)
        raise ConfigError(f"{_where(path)}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{_where(path)}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ConfigError(f"{_where(path)}: expected a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):  # PyYAML reads `2e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{_where(path)}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{_where(path)}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; reject unknown keys (suggesting the closest) and bad types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(path)}: expected a mapping ({cls.__name__}), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{dotted}: unknown key{hint} (allowed: {', '.join(fields)})")
        kwargs[key] = _convert(hints[key], value, dotted)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{missing[0]}: required key is missing ({cls.__name__})")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(path)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain YAML-ready data from a config tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[list[str], Any]]:
    """`a.b=value` strings → (key path, value parsed by yaml.safe_load)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        keys = [k for k in key.strip().split(".")]
        if not all(keys):
            raise ConfigError(f"override {item!r}: empty key in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(
                f"override {item!r}: value is not valid YAML ({str(err).splitlines()[0]})") from None
        parsed.append((keys, value))
    return parsed


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `a.b=value` overrides to a nested mapping in place (creating mappings as needed).

    A number indexes into an existing list: `sources.1.path=/data/x.jsonl`; so does the `name` of one of its
    items: `sources.instruct.path=/data/x.jsonl`.
    """
    for keys, value in parse_overrides(overrides):
        node = data
        for i, k in enumerate(keys):
            where = ".".join(keys[: i + 1])
            last = i == len(keys) - 1
            if isinstance(node, list):
                names = [item.get("name") if isinstance(item, dict) else None for item in node]
                if not k.isdigit() and k in names:
                    k = names.index(k)
                elif not k.isdigit() or int(k) >= len(node):
                    given = [str(n) for n in names if n is not None]
                    named = f" or a name ({', '.join(given)})" if given else ""
                    raise ConfigError(f"override {'.'.join(keys)}: {where} is not an index of a list of "
                                      f"{len(node)} items (0..{len(node) - 1}){named}")
                else:
                    k = int(k)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {'.'.join(keys)}: {'.'.join(keys[:i])} "
                                  f"is not a mapping or a list")
            if last:
                node[k] = value
                break
            nxt = node[k] if isinstance(node, list) else node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            node = nxt
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping with yaml.safe_load; ConfigError for a missing file or a syntax error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


BASE_KEY = "base"
"""A recipe's (or data spec's) `base: other.yaml`: the file it extends, relative to the file naming it."""


def merge(base: dict, override: dict) -> dict:
    """`override` deep-merged onto `base` (a new mapping): mappings merge key by key; a list, a scalar or
    null replaces what the base had (a list is one value: `layers: [last]` is not appended to)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_with_bases(path: str | os.PathLike, _chain: tuple[str, ...] = ()) -> dict:
    """Read a YAML mapping and, when it names a `base`, merge it onto that file's (recursively) content.

    The base path is relative to the directory of the file that names it (so a recipe can be run from any
    directory); chains are allowed, a cycle is a ConfigError. The result holds no `base` key.
    """
    path = os.fspath(path)
    data = read_yaml(path)
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {BASE_KEY}: expected a file path relative to this file, got {base!r}")
    target = os.path.normpath(os.path.join(os.path.dirname(path), base))
    chain = (*_chain, os.path.abspath(path))
    if os.path.abspath(target) in chain:
        start = os.path.dirname(chain[0])  # name the files as seen from the first one
        names = [os.path.relpath(p, start) for p in (*chain, os.path.abspath(target))]
        raise ConfigError(f"{path}: {BASE_KEY}: {base}: a cycle of bases ({' -> '.join(names)})")
    if not os.path.isfile(target):
        raise ConfigError(f"{path}: {BASE_KEY}: {base}: file not found (looked for {target})")
    return merge(read_with_bases(target, chain), data)


def load(cls: type, path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load dataclass `cls` from a YAML file (or from overrides alone when path is None): the file merged onto
    its `base` chain first, then the `a.b=value` overrides."""
    data = read_with_bases(path) if path is not None else {}
    apply_overrides(data, overrides)
    return from_dict(cls, data)


def check(condition: bool, path: str, message: str) -> None:
    """Raise ConfigError(`path: message`) unless condition holds (for `validate` methods)."""
    if not condition:
        raise ConfigError(f"{_where(path)}: {message}")


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---------------------------------------------------------------------------------------------------
# The training recipe (recipes/*.yaml). Each field's docstring sits under it.
# ---------------------------------------------------------------------------------------------------

DTypeName = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass
class RunConfig:
    name: str = "run"
    """Run name (wandb run name, log prefix)."""
    output_dir: str = "runs/run"
    """Where config.yaml, metrics.jsonl, checkpoints/ and final/ go."""
    seed: int = 42
    """Seed of the data plan, skipped positions and any random init."""


@dataclasses.dataclass
class AlignmentConfig:
    kind: Literal["cosine", "mse"] = "cosine"
    """D(h_p, h_e) per token: cosine = 1 − cos; mse = the mean squared difference over the hidden size."""
    weight: float = 0.0
    """Weight of the per-token mean of D averaged over the expanded layers (an objective `alignment` of
    every stream, normalised by the stream's real tokens like `hidden`); 0 turns it off."""

    def validate(self, path: str) -> None:
        check(self.weight >= 0, join(path, "weight"), f"must be >= 0, got {self.weight}")


@dataclasses.dataclass
class ExpansionConfig:
    layers: int | list[int] = 8
    """k: every (L/k)-th decoder block (the last of each run of L/k), as Control LLM; or a list of block
    indices 0..L−1."""
    interpolation: Literal["lerp", "dlerp", "dlerp_in", "progressive", "moe"] = "lerp"
    """How a block's frozen output h_p and its trainable copy's h_e combine (distill.model.expansion)."""
    alignment: AlignmentConfig | None = None
    """An alignment loss keeping h_e near h_p; null: none."""
    fold_rows: int = 16
    """Held-out rows on which the export measures the mean α of the dynamic kinds (dlerp, dlerp_in, moe) to
    fold each pair back into one block."""

    def validate(self, path: str) -> None:
        if isinstance(self.layers, int):
            check(self.layers > 0, join(path, "layers"), f"must be a positive count or a list of indices, "
                                                         f"got {self.layers}")
        else:
            check(len(self.layers) > 0, join(path, "layers"), "must list at least one block index")
            check(len(set(self.layers)) == len(self.layers), join(path, "layers"), "lists a block twice")
            for i, layer in enumerate(self.layers):
                check(layer >= 0, f"{join(path, 'layers')}[{i}]", f"must be >= 0, got {layer}")
        check(self.fold_rows > 0, join(path, "fold_rows"), "must be positive")


@dataclasses.dataclass
class ModelConfig:
    path: str
    """Hugging Face id or local directory of the model to extend (the student starts from it)."""
    dtype: DTypeName = "bfloat16"
    """Parameter dtype of the student; the teacher runs in the same dtype."""
    attention: Literal["auto", "sdpa_varlen", "sdpa", "eager", "flash_attention_2"] = "auto"
    """auto: flash_attention_2 on CUDA when flash-attn is installed, else sdpa_varlen
    (`distill.model.attention`:
    one causal SDPA per packed document, no T×T mask; transformers' sdpa for everything else)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (needed at 32K+ tokens)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint directory; off unless you trust it."""
    expansion: ExpansionConfig | None = None
    """Hybrid expansion (Control LLM): selected blocks become a frozen original plus a trainable copy whose
    outputs are interpolated; everything else is frozen. null: the whole model trains."""


@dataclasses.dataclass
class RopeConfig:
    method: Literal["abf", "pi", "yarn", "llama3", "none"] = "abf"
    """abf: new rope_theta; pi: linear position interpolation by `factor`; yarn; llama3; none: keep RoPE."""
    target_length: int = 32768
    """Extended context length; becomes max_position_embeddings of the student."""
    theta: float | None = None
    """New rope_theta for abf (required there)."""
    factor: float | None = None
    """Scaling factor for pi / yarn / llama3 (default: target_length / original length)."""
    original_length: int | None = None
    """The original context window (default: the checkpoint's max_position_embeddings)."""
    low_freq_factor: float = 1.0
    """llama3 only."""
    high_freq_factor: float = 4.0
    """llama3 only."""
    beta_fast: float = 32.0
    """yarn only."""
    beta_slow: float = 1.0
    """yarn only."""

    def validate(self, path: str) -> None:
        check(self.target_length > 0, join(path, "target_length"),
              f"must be positive, got {self.target_length}")
        if self.method == "abf":
            check(self.theta is not None and self.theta > 0, join(path, "theta"),
                  "abf needs a positive rope theta (e.g. 2.0e7)")
        if self.factor is not None:
            check(self.factor > 1.0, join(path, "factor"), f"must be > 1, got {self.factor}")
        if self.original_length is not None:
            check(self.original_length > 0, join(path, "original_length"), "must be positive")


@dataclasses.dataclass
class TeacherConfig:
    path: str | None = None
    """The frozen original model; null = model.path with its native RoPE."""


@dataclasses.dataclass
class LMObjectiveConfig:
    weight: float = 1.0
    """Weight of the per-token mean cross-entropy of this stream."""
    chunk_size: int = 4096
    """Tokens per chunk of the memory-bounded loss (never materialises (T, V) logits)."""
    fused: bool = False
    """Use liger-kernel's fused linear cross-entropy when it is installed and the model is on CUDA
    (otherwise the chunked loss runs)."""

    def validate(self, path: str) -> None:
        check(self.weight >= 0, join(path, "weight"), f"must be >= 0, got {self.weight}")
        check(self.chunk_size > 0, join(path, "chunk_size"), f"must be positive, got {self.chunk_size}")


@dataclasses.dataclass
class HiddenObjectiveConfig:
    weight: float = 1.0
    """Weight of Σ_layers (1 − mean-token cosine) against the teacher (LongReD Eq. 2/3)."""
    layers: list[int | str] | str = dataclasses.field(default_factory=lambda: ["last"])
    """Indices into the hidden_states tuple (0 = embeddings, L = final-norm output), 'last', or 'auto'."""
    top_k: int = 6
    """layers: auto picks the top_k layers by attention KL, plus the last layer."""

    def validate(self, path: str) -> None:
        check(self.weight >= 0, join(path, "weight"), f"must be >= 0, got {self.weight}")
        if isinstance(self.layers, str):
            check(self.layers in ("auto", "last"), join(path, "layers"),
                  f"{self.layers!r} is not allowed; allowed: a list of layer indices, 'last', 'auto'")
            self.layers = ["last"] if self.layers == "last" else "auto"
        else:
            check(len(self.layers) > 0, join(path, "layers"), "must list at least one layer")
            for i, layer in enumerate(self.layers):
                if isinstance(layer, str):
                    check(layer == "last", f"{join(path, 'layers')}[{i}]",
                          f"{layer!r} is not allowed; allowed: an integer index or 'last'")
                else:
                    check(layer >= 0, f"{join(path, 'layers')}[{i}]", f"must be >= 0, got {layer}")
        check(self.top_k > 0, join(path, "top_k"), "must be positive")


@dataclasses.dataclass
class KLObjectiveConfig:
    weight: float = 1.0
    """Weight of the per-token mean divergence of next-token distributions against the teacher."""
    kind: Literal["forward", "reverse", "jsd"] = "forward"
    """forward: KL(teacher ‖ student); reverse: KL(student ‖ teacher); jsd: Jensen–Shannon (β = 0.5)."""
    temperature: float = 1.0
    """Softmax temperature applied to both logits (the loss is scaled by T²)."""
    chunk_size: int = 2048
    """Tokens per chunk (the teacher's logits are computed chunk by chunk too)."""

    def validate(self, path: str) -> None:
        check(self.weight >= 0, join(path, "weight"), f"must be >= 0, got {self.weight}")
        check(self.temperature > 0, join(path, "temperature"), "must be positive")
        check(self.chunk_size > 0, join(path, "chunk_size"), "must be positive")


@dataclasses.dataclass
class ObjectivesConfig:
    lm: LMObjectiveConfig | float | None = None
    """Causal-LM cross-entropy; a number is its weight."""
    hidden: HiddenObjectiveConfig | float | None = None
    """Hidden-state cosine distillation; a number is its weight (layers: last)."""
    kl: KLObjectiveConfig | float | None = None
    """Logits distillation; a number is its weight."""

    def validate(self, path: str) -> None:
        # Numbers are shorthand for {weight: number}.
        if isinstance(self.lm, float):
            self.lm = from_dict(LMObjectiveConfig, {"weight": self.lm}, join(path, "lm"))
        if isinstance(self.hidden, float):
            self.hidden = from_dict(HiddenObjectiveConfig, {"weight": self.hidden}, join(path, "hidden"))
        if isinstance(self.kl, float):
            self.kl = from_dict(KLObjectiveConfig, {"weight": self.kl}, join(path, "kl"))
        check(any(o is not None for o in (self.lm, self.hidden, self.kl)), path,
              "a stream needs at least one objective (lm, hidden, kl)")

    def active(self) -> dict[str, Any]:
        return {k: v for k, v in (("lm", self.lm), ("hidden", self.hidden), ("kl", self.kl)) if v is not None}

    @property
    def needs_teacher(self) -> bool:
        return self.hidden is not None or self.kl is not None


@dataclasses.dataclass
class ShareScheduleConfig:
    name: Literal["constant", "linear", "cosine", "stages"] = "constant"
    """How the stream's token share moves over steps."""
    start: float = 1.0
    """Share at step 0 (constant: the share)."""
    end: float = 1.0
    """Share at `steps` and after (linear, cosine)."""
    steps: int = 1
    """Length of the linear / cosine ramp in optimiser steps."""
    stages: list[list[float]] = dataclasses.field(default_factory=list)
    """stages: [[from_step, share], ...], sorted by step; the first must start at 0."""

    def validate(self, path: str) -> None:
        check(self.start >= 0 and self.end >= 0, path, "shares must be >= 0")
        check(self.steps > 0, join(path, "steps"), "must be positive")
        if self.name == "stages":
            check(len(self.stages) > 0, join(path, "stages"), "needs at least one [from_step, share] pair")
            prev = -1
            for i, stage in enumerate(self.stages):
                check(len(stage) == 2, f"{join(path, 'stages')}[{i}]", "must be [from_step, share]")
                check(stage[0] > prev, f"{join(path, 'stages')}[{i}]", "steps must increase")
                check(stage[1] >= 0, f"{join(path, 'stages')}[{i}]", "share must be >= 0")
                prev = stage[0]
            check(self.stages[0][0] == 0, f"{join(path, 'stages')}[0]",
                  "the first stage must start at step 0")


@dataclasses.dataclass
class StreamConfig:
    data: str
    """A built stream directory (data/built/<name>/<stream>) made by scripts/prepare_data.py."""
    objectives: ObjectivesConfig
    """What this stream's micro-batches are trained on."""
    share: float | ShareScheduleConfig = 1.0
    """Token share of each optimiser step (relative to the other streams), or a schedule over steps."""
    micro_batch: int = 1
    """Rows per micro-batch."""
    positions: Literal["native", "cream", "uniform"] = "native"
    """native: 0..T-1 per document; cream / uniform: skipped positions reaching rope.target_length (s2l)."""
    seq_len: int | None = None
    """The row length of the built data, for planning before it is built (scripts/plan.py); when both exist
    they must agree."""

    def validate(self, path: str) -> None:
        check(self.micro_batch > 0, join(path, "micro_batch"), f"must be positive, got {self.micro_batch}")
        check(self.seq_len is None or self.seq_len > 0, join(path, "seq_len"),
              f"must be positive, got {self.seq_len}")
        if isinstance(self.share, float):
            check(self.share >= 0, join(path, "share"), f"must be >= 0, got {self.share}")


@dataclasses.dataclass
class MixConfig:
    tokens_per_step: int = 65536
    """Token slots per optimiser step over all streams and processes (the global batch)."""

    def validate(self, path: str) -> None:
        check(self.tokens_per_step > 0, join(path, "tokens_per_step"), "must be positive")


@dataclasses.dataclass
class ScheduleConfig:
    name: Literal["constant", "cosine", "wsd", "infinite"] = "constant"
    """LR schedule; every one is a pure function of the step."""
    warmup_steps: int = 0
    """Linear warm-up from 0 (all schedules)."""
    min_lr_ratio: float = 0.0
    """cosine / wsd: final LR as a fraction of optim.lr; infinite: η_min / η_max."""
    total_steps: int | None = None
    """cosine / wsd horizon (default: train.max_steps)."""
    num_cycles: float = 0.5
    """cosine: as in transformers' get_cosine_schedule_with_warmup."""
    decay_steps: int | None = None
    """wsd: length of the final decay (default: 20% of total_steps)."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    """wsd cooldown shape."""
    cooldown_steps: int = 0
    """infinite: cosine cooldown N_c from η_max to η_const after warm-up."""
    const_lr_ratio: float = 0.1
    """infinite: η_const / η_max on the plateau."""
    anneal_start: int | None = None
    """infinite: step N_d where exponential annealing starts (null: never)."""
    anneal_steps: int = 1
    """infinite: t_a, steps over which LR goes from η_const to η_min."""

    def validate(self, path: str) -> None:
        check(self.warmup_steps >= 0, join(path, "warmup_steps"), "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, join(path, "min_lr_ratio"), "must be in [0, 1]")
        check(0 < self.const_lr_ratio <= 1, join(path, "const_lr_ratio"), "must be in (0, 1]")
        check(self.anneal_steps > 0, join(path, "anneal_steps"), "must be positive")
        if self.name == "infinite" and self.anneal_start is not None:
            check(self.min_lr_ratio > 0, join(path, "min_lr_ratio"),
                  "infinite annealing needs min_lr_ratio > 0")


@dataclasses.dataclass
class LayersConfig:
    mode: Literal["all", "traced"] = "all"
    """all: every trainable parameter at optim.lr. traced: gradient localisation (Fernandez et al. 2024):
    each decoder layer's gradient norm on a diagnostic batch, relative to the mean over layers, decides."""
    select: Literal["above_mean", "lr_scale"] = "above_mean"
    """traced: train only the layers whose relative norm is above the mean (the others frozen, with no
    optimiser state), or train all of them with each layer's LR scaled by its relative norm."""
    stream: str | None = None
    """The stream whose rows form the diagnostic batch (LM loss); null: the first stream with an LM loss."""
    rows: int = 8
    """Rows of the diagnostic batch."""
    every: int = 0
    """lr_scale: measure again every N steps (0: at start-up only)."""
    max_scale: float = 4.0
    """lr_scale: the largest factor a layer's LR may get."""

    def validate(self, path: str) -> None:
        check(self.rows > 0, join(path, "rows"), "must be positive")
        check(self.every >= 0, join(path, "every"), "must be >= 0")
        check(self.max_scale > 0, join(path, "max_scale"), "must be positive")
        check(not (self.every and self.select == "above_mean"), join(path, "every"),
              "re-measuring is for select: lr_scale; above_mean freezes layers once, at start-up (a layer "
              "frozen later would keep optimiser state)")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 2.0e-5
    """Peak learning rate of AdamW."""
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms and biases)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm; 0 disables clipping."""
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """AdamW's kernel: auto = fused (one kernel over all parameters, ~4x faster than the loop on the CPU)
    for unsharded runs, torch's default under FSDP2 / ZeRO-3."""
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    layers: LayersConfig = dataclasses.field(default_factory=LayersConfig)
    """Which decoder layers train, and at what LR (gradient localisation)."""

    def validate(self, path: str) -> None:
        check(self.lr > 0, join(path, "lr"), f"must be positive, got {self.lr}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), join(path, "betas"),
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.eps > 0, join(path, "eps"), "must be positive")
        check(self.weight_decay >= 0, join(path, "weight_decay"), "must be >= 0")
        check(self.max_grad_norm >= 0, join(path, "max_grad_norm"), "must be >= 0")


@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimiser steps."""
    log_every: int = 1
    eval_every: int = 0
    """Run the evaluation suite every N steps (0: never)."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end and on preemption)."""
    keep_last: int = 2
    """Complete checkpoints to keep (older ones are deleted only after a new one is complete)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    resume: str = "auto"
    """auto: newest complete checkpoint in output_dir; never; or a checkpoint path."""
    init_from: str | None = None
    """Start a new stage from this checkpoint's weights, with fresh optimiser and data state."""
    max_nonfinite_steps: int = 3
    """Stop after this many non-finite steps in a row (each one is skipped)."""
    bad_rows: Literal["stop", "skip"] = "stop"
    """A row with a token id outside the model's vocabulary (damaged data): stop with a checkpoint and one
    line naming the stream, the row and the file; or skip the row (its tokens carry no loss) and count it
    (`skipped_rows` in metrics.jsonl)."""
    export: bool = True
    """Write final/ in Hugging Face format at the end."""

    def validate(self, path: str) -> None:
        check(self.max_steps > 0, join(path, "max_steps"), f"must be positive, got {self.max_steps}")
        for key in ("log_every", "eval_every", "save_every", "keep_every"):
            check(getattr(self, key) >= 0, join(path, key), "must be >= 0")
        check(self.log_every > 0, join(path, "log_every"), "must be positive")
        check(self.keep_last > 0, join(path, "keep_last"), "must be positive")
        check(self.max_nonfinite_steps > 0, join(path, "max_nonfinite_steps"), "must be positive")


@dataclasses.dataclass
class ParallelConfig:
    gradient_sync: Literal["micro_batch", "step"] = "micro_batch"
    """FSDP2: reduce-scatter gradients after every micro-batch's backward (least memory), or once after
    the step's last one (fewer collectives; unsharded gradients are held meanwhile). The parallel mode
    itself comes from the launcher (`accelerate launch --config_file recipes/accelerate/<mode>.yaml`)."""
    sequence_parallel: int = 1
    """S > 1 splits each micro-batch of the longest stream (native positions, LM loss) along the sequence over
    groups of S ranks; needs the FSDP2 launch, S dividing the number of processes, and rows whose micro-batch
    tokens divide by S (2·S for ring). Ulysses also needs S to divide the attention heads."""
    sequence_parallel_mode: Literal["ulysses", "ring", "hybrid"] = "ulysses"
    """How a split row's attention communicates. ulysses: an all-to-all trades the sequence split for a head
    split around the model's own kernel (S divides the heads; fastest within a node). ring: key/value blocks
    travel round the group over zigzag slices (distill.parallel.ring): any S, more ranks than heads, groups
    across
    nodes. hybrid: Ulysses inside subgroups of S / ring_degree consecutive ranks, a ring across them."""
    ring_degree: int = 1
    """hybrid only: R, the ranks of each ring; S / R (the Ulysses degree) must divide the attention heads."""
    replicate: int = 1
    """FSDP2 hybrid sharding (HSDP): R replicas of the sharded state. The ranks form an R x (world / R) mesh
    (`dp_replicate`, `dp_shard`): parameters, gradients and optimiser states shard within each group of
    world / R consecutive ranks (a node, where R is the number of nodes) and replicate across groups, so a
    layer's all-gathers stay inside a node and only the gradient all-reduce crosses the network. The frozen
    teacher shards within the group too; sequence-parallel groups must fit inside one. 1: one flat mesh."""
    skip_memory_check: bool = False
    """At start-up, before any model is loaded, the trainer estimates the peak memory per GPU (on a GPU) and
    the host memory per node (the node's RAM against LOCAL_WORLD_SIZE ranks; distill.plan, as scripts/plan.py
    prints them) and stops with one line when either will not fit; true goes on anyway (for experts)."""
    collective_timeout_s: float | None = None
    """Seconds a rank waits in a collective before the process group fails the run: how long a dead or hung
    node (a rank that never joins) keeps the others waiting. null: 3 x the longer of the planner's step time
    (at MFU 0.4 of this device's peak; not counted when the peak is unknown) and one rank's share of a
    checkpoint (12 bytes per parameter over the ranks that write it) at `checkpoint_write_gb_per_s`, at
    least 10 minutes (scripts/plan.py prints it and why)."""
    checkpoint_write_gb_per_s: float = 0.2
    """One rank's write speed to the checkpoint filesystem (GB/s; 0.2: a busy shared filesystem). Sharded
    checkpoints (FSDP2, ZeRO-3) are written by every rank at once, each its part, so scripts/plan.py's
    checkpoint time and the default collective timeout take one rank's share at this speed (the filesystem
    sustaining ranks x this); one process or data parallel writes from rank 0 alone."""
    offload_activations: bool = False
    """Long stream: each decoder layer's checkpointed input (what gradient checkpointing keeps per layer,
    tokens x hidden) is copied to pinned host memory on a side CUDA stream during the forward and brought
    back for the layer's recompute in backward (`distill.parallel.memory`). Needs
    model.gradient_checkpointing; costs
    host memory (scripts/plan.py prints it) and PCIe traffic; saves layers x tokens x hidden x 2-4 bytes per
    GPU."""
    tiled_mlp: int | Literal["auto"] = 1
    """Long stream: each decoder layer's MLP runs over this many sequence chunks in forward and backward
    (recomputing each chunk), so the (tokens, intermediate) tensors never exist whole; 1: off. auto: the
    number of chunks that brings the chunk's intermediate down to the residual's size (scripts/plan.py)."""

    def validate(self, path: str) -> None:
        check(self.sequence_parallel >= 1, join(path, "sequence_parallel"),
              f"must be a positive number of ranks, got {self.sequence_parallel}")
        if self.sequence_parallel_mode == "hybrid":
            size, ring = self.sequence_parallel, self.ring_degree
            check(1 < ring < size and size % ring == 0, join(path, "ring_degree"),
                  f"hybrid needs 1 < ring_degree < sequence_parallel "
                  f"({self.sequence_parallel}) and dividing it, got {self.ring_degree}")
        else:
            check(self.ring_degree == 1, join(path, "ring_degree"),
                  f"only with sequence_parallel_mode: hybrid, got {self.ring_degree}")
        check(self.replicate >= 1, join(path, "replicate"),
              f"must be a positive number of replicas, got {self.replicate}")
        check(self.collective_timeout_s is None or self.collective_timeout_s > 0,
              join(path, "collective_timeout_s"),
              f"must be positive seconds, got {self.collective_timeout_s}")
        check(self.checkpoint_write_gb_per_s > 0, join(path, "checkpoint_write_gb_per_s"),
              f"must be positive, got {self.checkpoint_write_gb_per_s}")
        check(self.tiled_mlp == "auto" or self.tiled_mlp >= 1, join(path, "tiled_mlp"),
              f"must be a positive number of chunks or auto, got {self.tiled_mlp}")


@dataclasses.dataclass
class WandbConfig:
    project: str = "longred"
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online with an API key (WANDB_API_KEY or netrc), else offline."""
    entity: str | None = None


@dataclasses.dataclass
class LogConfig:
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
    progress_bar: bool = True
    peak_tflops: float | None = None
    """Per-device peak TFLOP/s for the logged MFU; None looks it up from the GPU's name (dense bf16:
    H100/H200 989, A100 312, ...; see distill.model.flops.PEAK_TFLOPS). No MFU on a CPU unless set."""
    layer_grad_every: int = 0
    """Every N steps, log each decoder layer's attention and MLP gradient norm (plus embeddings and head),
    for the step and per stream (`grad_norm/layers.<i>.attn`, `grad_norm/<stream>/layers.<i>.mlp`), and
    draw layer_grad_norms.png in the run directory; 0: never."""

    def validate(self, path: str) -> None:
        check(self.peak_tflops is None or self.peak_tflops > 0, join(path, "peak_tflops"),
              f"must be positive, got {self.peak_tflops}")
        check(self.layer_grad_every >= 0, join(path, "layer_grad_every"), "must be >= 0")


@dataclasses.dataclass
class EvalConfig:
    short_data: str | None = None
    """Held-out short stream (default: the holdout of the first stream with positions native and a teacher
    objective)."""
    long_data: str | None = None
    """Held-out long stream for NLL by position."""
    max_rows: int = 8
    """Rows per evaluation set (keep the in-training evaluation cheap)."""
    passkey_samples: int = 0
    """Passkey prompts per length (0: skip passkey in training evaluations)."""


@dataclasses.dataclass
class RecipeConfig:
    model: ModelConfig
    rope: RopeConfig
    streams: dict[str, StreamConfig]
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    mix: MixConfig = dataclasses.field(default_factory=MixConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self, path: str) -> None:
        check(len(self.streams) > 0, "streams", "a recipe needs at least one stream")
        fixed = [s.share for s in self.streams.values() if isinstance(s.share, float)]
        if len(fixed) == len(self.streams):
            check(sum(fixed) > 0, "streams", "stream shares sum to 0; at least one share must be positive")

        problem = check_lr_schedule(self.optim.schedule, self.train.max_steps)
        if problem is not None:
            raise ConfigError(problem)
        check(not self.parallel.offload_activations or self.model.gradient_checkpointing,
              "parallel.offload_activations", "true needs model.gradient_checkpointing: true (what it moves "
              "to the host is the checkpointed layer inputs)")
        traced = self.optim.layers
        if traced.mode == "traced" and traced.stream is not None:
            check(traced.stream in self.streams, "optim.layers.stream",
                  f"{traced.stream!r} is not a stream; streams: {', '.join(self.streams)}")
        if traced.mode == "traced" and traced.stream is None:
            check(any(s.objectives.lm is not None for s in self.streams.values()), "optim.layers.stream",
                  "traced needs a stream with an LM loss for its diagnostic batch")

    @property
    def needs_teacher(self) -> bool:
        return any(s.objectives.needs_teacher for s in self.streams.values())


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    return load(RecipeConfig, path, overrides)


def save_yaml(obj: Any, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(obj), f, sort_keys=False)


def check_lr_schedule(cfg: ScheduleConfig, max_steps: int) -> str | None:
    """Why a WSD schedule cannot reach its floor by the end of its horizon (a one-line reason naming the
    key), or None: it needs steps after the warm-up, and its decay must fit in them."""
    total = cfg.total_steps if cfg.total_steps is not None else max_steps
    horizon = "optim.schedule.total_steps" if cfg.total_steps is not None else "train.max_steps"
    if cfg.name == "wsd" and cfg.warmup_steps >= total:
        return (f"optim.schedule.warmup_steps: {cfg.warmup_steps} leaves no step to decay in ({horizon} is "
                f"{total}); allowed: fewer than {total}")
    if cfg.name == "wsd" and cfg.decay_steps is not None and cfg.decay_steps > total - cfg.warmup_steps:
        return (f"optim.schedule.decay_steps: {cfg.decay_steps} does not fit after the warm-up "
                f"({horizon} {total} − warmup_steps {cfg.warmup_steps} = {total - cfg.warmup_steps}); the LR "
                f"would not reach its floor; allowed: 1..{total - cfg.warmup_steps}")
    return None
