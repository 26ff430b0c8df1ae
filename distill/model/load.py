"""Student and teacher models: loading, the attention backend, RoPE and packing checks, checkpointing.

The student is the checkpoint loaded with the extended `rope_parameters` (trainable); the teacher is the same
(or the recipe's teacher) checkpoint with its native RoPE, frozen by construction and never attached to the
student. Both run with `use_cache=False`: transformers isolates packed documents only when `attention_mask`
is None and there is no KV cache (see `check_packing_isolation`).

Attention masks (transformers 5.x reads any jump in `position_ids` as a packed-document boundary when the
attention mask is None):
- packed rows (long / short streams): positions restart at 0 per document, `attention_mask=None`;
- short-to-long rows (one document with skipped positions): an explicit all-ones `attention_mask`, which turns
  packed detection off so attention stays causal across the jumps (`decoder.causal_mask_kwargs`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os

import torch
from torch import nn

from distill.config import ConfigError, ModelConfig, RopeConfig
from distill.hub import hub_reason, looks_local, short_reason
from distill.model import attention
from distill.model.rope import (
    apply_extension,
    base_inv_freq,
    extended_rope_parameters,
    head_dim,
    our_inv_freq,
)

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# Backend and dtype
# ----------------------------------------------------------------------------------------------------------


def resolve_attention(name: str, device: str | torch.device = "cpu", model_type: str | None = None) -> str:
    """The attention implementation to load: auto → flash_attention_2 on CUDA with flash-attn, else
    sdpa_varlen (per-document SDPA for packed rows, registered with transformers here) for the model
    types it supports (`distill.model.attention.SUPPORTED`; any when `model_type` is None), else sdpa."""
    supported = model_type is None or model_type in attention.SUPPORTED
    if name == "auto":
        is_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        if is_cuda and importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        name = attention.NAME if supported else "sdpa"
    if name == attention.NAME:
        if not supported:
            raise ConfigError(f"model.attention: '{attention.NAME}' supports model types "
                              f"{', '.join(attention.SUPPORTED)}, not '{model_type}'; use auto or sdpa")
        attention.register()
    return name


def resolve_dtype(name: str) -> torch.dtype:
    """torch dtype for a recipe dtype name (float32 | bfloat16 | float16)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"model.dtype: {name!r} is not allowed; allowed: {', '.join(DTYPES)}") from None


def load_config(path: str, trust_remote_code: bool):
    """The checkpoint's config, or a one-line ConfigError naming model.path."""
    from transformers import AutoConfig

    if looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"model.path: cannot load '{path}': no such directory")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 -- OSError, ValueError (bad repo id), hub errors: all "cannot load"
        raise ConfigError(f"model.path: cannot load '{path}': {hub_reason(err)}") from None


def _from_pretrained(path: str, config, model_cfg: ModelConfig, device, key: str, meta: bool = False):
    """`path` with `config`, in the recipe's dtype and attention (resolved for `device` and the model
    type). `meta`: built from the config on the meta device, no weights read (the sharded load fills each
    rank's part after sharding: `distill.parallel.state.load_model_files`)."""
    from transformers import AutoModelForCausalLM

    implementation = resolve_attention(model_cfg.attention, device, getattr(config, "model_type", None))
    kwargs = {"dtype": resolve_dtype(model_cfg.dtype), "attn_implementation": implementation,
              "trust_remote_code": model_cfg.trust_remote_code}
    try:
        if meta:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, **kwargs)
        return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except ConfigError:
        raise
    except ImportError as err:  # e.g. flash_attention_2 without the package
        raise ConfigError(f"model.attention: cannot use '{implementation}': {short_reason(err)}") from None
    except Exception as err:  # noqa: BLE001 -- any load failure is a one-line user error
        raise ConfigError(f"{key}: cannot load '{path}': {hub_reason(err)}") from None


# ----------------------------------------------------------------------------------------------------------
# Rotary buffers
# ----------------------------------------------------------------------------------------------------------


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The rotary-embedding modules of a model (those holding an `inv_freq` buffer)."""
    return [m for m in model.modules() if "inv_freq" in getattr(m, "_buffers", {})]


def rotary_embedding(model: nn.Module) -> nn.Module:
    """The (first) rotary-embedding module of a model."""
    modules = rotary_modules(model)
    if not modules:
        raise RuntimeError(f"{type(model).__name__} has no rotary embedding (no inv_freq buffer)")
    return modules[0]


def refresh_inv_freq(model: nn.Module) -> list[str]:
    """Recompute every rotary module's `inv_freq` from its config in fp32.

    `inv_freq` is a non-persistent buffer: it is not in the checkpoint, so after meta-device or sharded init,
    or a blanket `.to(bfloat16)`, it may be garbage or rounded. Returns log lines of what changed.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    lines = []
    for module in rotary_modules(model):
        config = getattr(module, "config", None)
        if config is None:
            continue
        rope_type = getattr(module, "rope_type", None) or config.rope_parameters.get("rope_type", "default")
        if not isinstance(rope_type, str):  # per-layer-type RoPE (not used by the architectures we train)
            continue
        if rope_type == "default":
            fn = module.compute_default_rope_parameters
        else:
            fn = ROPE_INIT_FUNCTIONS[rope_type]
        old = module.inv_freq
        device = old.device if old.device.type != "meta" else torch.device("cpu")
        inv, scaling = fn(config, device=device)
        inv = inv.to(device=device, dtype=torch.float32)
        if old.device.type == "meta" or old.dtype != torch.float32 or not torch.equal(old.float(), inv):
            lines.append(
                f"rope: recomputed {type(module).__name__}.inv_freq in fp32 (was {old.dtype} on {old.device})"
            )
        module.inv_freq = inv
        if "original_inv_freq" in module._buffers:
            module.original_inv_freq = inv.clone()
        module.attention_scaling = scaling
    return lines


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing under either of transformers' names:
    `activation_checkpointing_enable` (5.2x on, where the old name is a deprecated alias) or
    `gradient_checkpointing_enable` (5.0 to 5.1x, what the GPU images ship). Every caller goes through here,
    so the whole range pyproject.toml allows runs."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _partitioned(model: nn.Module) -> bool:
    """Whether from_pretrained built the model inside DeepSpeed's zero.Init (each parameter this rank's
    partition, already on its device)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def load_student(model_cfg: ModelConfig, rope_cfg: RopeConfig, device: str | torch.device = "cpu",
                 meta: bool = False):
    """The trainable student: `model_cfg.path` with the recipe's extended RoPE (`meta`: its structure alone,
    on the meta device, for the sharded load; `device` then only picks the attention).

    Raises:
        ConfigError: `model.path` cannot be loaded, or the RoPE recipe does not fit the checkpoint.
    """
    config = load_config(model_cfg.path, model_cfg.trust_remote_code)
    extended = apply_extension(config, rope_cfg)
    model = _from_pretrained(model_cfg.path, extended, model_cfg, device, "model.path", meta)
    if not meta and not _partitioned(model):
        model.to(device)
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        enable_checkpointing(model)
    for line in [] if meta else refresh_inv_freq(model):
        logger.info(line)
    model.train()
    return model


def load_teacher(path: str | None, model_cfg: ModelConfig, device: str | torch.device = "cpu",
                 meta: bool = False):
    """The frozen teacher with its native RoPE: eval(), every parameter requires_grad False, no cache.

    Args:
        path: the teacher checkpoint; None means `model_cfg.path`.
        model_cfg: dtype, attention and trust_remote_code are shared with the student.
        meta: its structure alone, on the meta device (the sharded load).
    """
    path = path or model_cfg.path
    key = "teacher.path" if path != model_cfg.path else "model.path"
    try:
        config = load_config(path, model_cfg.trust_remote_code)
    except ConfigError as err:
        raise ConfigError(str(err).replace("model.path:", f"{key}:", 1)) from None
    config.use_cache = False
    model = _from_pretrained(path, config, model_cfg, device, key, meta)
    if not meta and not _partitioned(model):
        model.to(device)
    model.config.use_cache = False
    for line in [] if meta else refresh_inv_freq(model):
        logger.info(line)
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------
# Checks at start-up
# ----------------------------------------------------------------------------------------------------------


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=rtol, atol=0.0)


def check_extension(student, teacher, rope_cfg: RopeConfig) -> list[str]:
    """Verify the student's and teacher's RoPE differ exactly as the recipe says.

    Checks the student's rope_parameters against the recipe, each model's live `inv_freq` buffer against our
    independent RoPE math (`distill.model.rope.our_inv_freq`), the relation between the two (abf:
    θ_new^(−2i/d);
    pi: teacher / factor; yarn / llama3: each frequency between teacher / factor and teacher's; none:
    identical), and max_position_embeddings.

    Returns:
        Human-readable log lines.

    Raises:
        RuntimeError: on any mismatch.
    """
    problems, lines = [], []
    s_cfg, t_cfg = student.config, teacher.config
    dim = head_dim(t_cfg)
    s_rot, t_rot = rotary_embedding(student), rotary_embedding(teacher)
    s_inv = s_rot.inv_freq.detach().cpu()
    t_inv = t_rot.inv_freq.detach().cpu()
    for name, inv in (("student", s_inv), ("teacher", t_inv)):
        if inv.dtype != torch.float32:
            problems.append(f"{name} inv_freq is {inv.dtype}, expected float32")

    want = extended_rope_parameters(t_cfg, rope_cfg)
    have = dict(s_cfg.rope_parameters)
    for key, value in want.items():
        got = have.get(key)
        same = (
            math.isclose(float(got), float(value), rel_tol=1e-9)
            if isinstance(value, (int, float)) and isinstance(got, (int, float))
            else got == value
        )
        if not same:
            problems.append(f"student rope_parameters[{key!r}] = {got!r}, recipe wants {value!r}")

    s_expect, s_scale = our_inv_freq(dict(s_cfg.rope_parameters), dim)
    t_expect, t_scale = our_inv_freq(dict(t_cfg.rope_parameters), dim)
    if not _close(s_inv, s_expect):
        problems.append(
            f"student inv_freq differs from the {have.get('rope_type')} formula "
            f"(max rel err {((s_inv - s_expect).abs() / s_expect).max().item():.2e})"
        )
    if not math.isclose(float(s_rot.attention_scaling), s_scale, rel_tol=1e-6):
        problems.append(f"student attention scaling {s_rot.attention_scaling} != {s_scale}")
    if not _close(t_inv, t_expect):
        problems.append("teacher inv_freq differs from its native RoPE formula")
    if not math.isclose(float(t_rot.attention_scaling), t_scale, rel_tol=1e-6):
        problems.append(f"teacher attention scaling {t_rot.attention_scaling} != {t_scale}")

    method = rope_cfg.method
    native_default = t_cfg.rope_parameters.get("rope_type", "default") == "default"
    if method == "none":
        if not torch.equal(s_inv, t_inv):
            problems.append("rope.method none but student and teacher inv_freq differ")
    elif method == "abf" and native_default:
        if not _close(s_inv, base_inv_freq(float(rope_cfg.theta), dim)):
            problems.append(f"student inv_freq is not {rope_cfg.theta:g}^(-2i/d)")
    elif method == "pi" and native_default:
        if not _close(s_inv, t_inv / float(want["factor"])):
            problems.append("student inv_freq is not teacher inv_freq / factor")
    elif method in ("yarn", "llama3") and native_default:
        factor = float(want["factor"])
        if not bool((s_inv <= t_inv * (1 + 1e-6)).all() and (s_inv >= t_inv / factor * (1 - 1e-6)).all()):
            problems.append(f"student {method} frequencies are not between teacher/factor and teacher's")
    if method != "none" and torch.equal(s_inv, t_inv) and s_scale == t_scale:
        problems.append(f"rope.method {method} but the student's RoPE equals the teacher's")

    target = rope_cfg.target_length if method != "none" else t_cfg.max_position_embeddings
    if s_cfg.max_position_embeddings != target:
        problems.append(f"student max_position_embeddings {s_cfg.max_position_embeddings} != {target}")
    if problems:
        raise RuntimeError("RoPE extension check failed: " + "; ".join(problems))

    ratio = t_inv / s_inv
    lines.append(
        f"rope: teacher {dict(t_cfg.rope_parameters)} max_position_embeddings {t_cfg.max_position_embeddings}"
    )
    lines.append(f"rope: student {have} max_position_embeddings {s_cfg.max_position_embeddings}")
    lines.append(
        f"rope: inv_freq matches our formulas (d={dim}); teacher/student frequency ratio "
        f"{ratio.min().item():.4g}..{ratio.max().item():.4g}, attention scaling {s_scale:.4g}"
    )
    return lines


def native_rope_reference(student, model_cfg: ModelConfig) -> nn.Module:
    """A stand-in for the teacher in RoPE checks when there is none (Long CPT): the checkpoint's own config
    and its native rotary module, built without loading any weights."""
    config = load_config(model_cfg.path, model_cfg.trust_remote_code)
    reference = nn.Module()
    reference.config = config
    reference.rotary_emb = type(rotary_embedding(student))(config=config)
    return reference


def check_teacher_frozen(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Verify the teacher is frozen and shares no module or parameter with the student; raise RuntimeError."""
    trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
    if trainable:
        raise RuntimeError(f"teacher has trainable parameters: {trainable[:3]}")
    if teacher.training:
        raise RuntimeError("teacher is in training mode (expected eval())")
    student_modules = {id(m) for m in student.modules()}
    if id(teacher) in student_modules:
        raise RuntimeError("teacher is a submodule of the student")
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise RuntimeError(f"student and teacher share {len(shared)} parameter tensors")
    n = sum(p.numel() for p in teacher.parameters())
    return [f"teacher: frozen ({n:,} parameters, eval, no grad), separate from the student"]


@contextlib.contextmanager
def attention_override(model, name: str | None):
    """Run `model` with attention implementation `name` inside the block (None: unchanged)."""
    previous = model.config._attn_implementation
    if name is None or name == previous:
        yield model
        return
    if name == attention.NAME:
        attention.register()
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


ISOLATION_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.05, "float16": 0.02}
"""The largest |logit difference| between a packed document and the same document alone that is still
rounding, relative to the logits' scale (at least 1), per compute dtype. A document that sees its neighbour
moves its logits by their own order of magnitude."""


def isolation_tolerance(dtype: str) -> float:
    return ISOLATION_TOLERANCE[dtype]


@torch.no_grad()
def packing_isolation(forward, model, autocast=contextlib.nullcontext, lengths: tuple[int, int] = (7, 11),
                      seed: int = 0) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) between two random documents packed in one row and each run
    alone, through `forward` (the model's own call, or a strategy's: a collective when sharded, so every rank
    calls it with the same inputs) under `autocast` (the step's precision).

    The packed row has position_ids restarting at 0 at the second document, attention_mask None and no cache:
    the only setting in which transformers isolates packed documents.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device  # a DTensor's or a ZeRO-3 partition's device too
        gen = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        docs = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
        ids = torch.cat(docs)[None].to(device)  # (1, T)
        pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)  # (1, T)
        with autocast():
            packed = forward(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).logits
        packed = packed.float()
        worst, scale, start = 0.0, 0.0, 0
        for doc in docs:
            n = doc.numel()
            with autocast():
                alone = forward(input_ids=doc[None].to(device), position_ids=torch.arange(n)[None].to(device),
                                attention_mask=None, use_cache=False).logits
            alone = alone.float()
            worst = max(worst, (packed[:, start: start + n] - alone).abs().max().item())
            scale = max(scale, alone.abs().max().item())
            start += n
        return worst, scale
    finally:
        model.train(was_training)


@torch.no_grad()
def check_packing_isolation(
    model, attention: str | None = None, lengths: tuple[int, int] = (7, 11), seed: int = 0
) -> float:
    """Max |logit difference| between two random documents packed in one row and each run alone.

    The packed row has position_ids restarting at 0 at the second document, attention_mask None and no cache:
    the only setting in which transformers isolates packed documents. The trainer asserts the result is
    < 1e-4 in fp32.

    Args:
        model: a causal LM.
        attention: run with this attention implementation (restored afterwards); None keeps the model's.
    """
    with attention_override(model, attention):
        return packing_isolation(model, model, lengths=lengths, seed=seed)[0]
