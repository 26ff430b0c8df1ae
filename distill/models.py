"""Student and teacher models: loading, attention backend, RoPE checks, hidden-state forwards, export.

The student is the checkpoint loaded with the extended `rope_parameters` (trainable); the teacher is the same
(or the recipe's teacher) checkpoint with its native RoPE, frozen by construction and never attached to the
student. Both run with `use_cache=False`: transformers isolates packed documents only when `attention_mask`
is None and there is no KV cache (see `check_packing_isolation`).

Attention masks (transformers 5.x reads any jump in `position_ids` as a packed-document boundary when the
attention mask is None):
- packed rows (long / short streams): positions restart at 0 per document, `attention_mask=None`;
- short-to-long rows (one document with skipped positions): an explicit all-ones `attention_mask`, which turns
  packed detection off so attention stays causal across the jumps (`causal_mask_kwargs`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os

import torch
from torch import nn

from distill import attention
from distill.config import ConfigError, ModelConfig, RopeConfig
from distill.hub import hub_reason, looks_local, short_reason
from distill.rope import apply_extension, base_inv_freq, extended_rope_parameters, head_dim, our_inv_freq

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------------
# Backend and dtype
# ----------------------------------------------------------------------------------------------------------


def resolve_attention(name: str, device: str | torch.device = "cpu", model_type: str | None = None) -> str:
    """The attention implementation to load: auto → flash_attention_2 on CUDA with flash-attn, else
    sdpa_varlen (per-document SDPA for packed rows, registered with transformers here) for the model
    types it supports (`distill.attention.SUPPORTED`; any when `model_type` is None), else sdpa."""
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


def _load_config(path: str, trust_remote_code: bool):
    """The checkpoint's config, or a one-line ConfigError naming model.path."""
    from transformers import AutoConfig

    if looks_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"model.path: cannot load '{path}': no such directory")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 -- OSError, ValueError (bad repo id), hub errors: all "cannot load"
        raise ConfigError(f"model.path: cannot load '{path}': {hub_reason(err)}") from None


def _from_pretrained(path: str, config, model_cfg: ModelConfig, device, key: str):
    """`path` with `config`, in the recipe's dtype and attention (resolved for `device` and the model
    type)."""
    from transformers import AutoModelForCausalLM

    implementation = resolve_attention(model_cfg.attention, device, getattr(config, "model_type", None))
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=resolve_dtype(model_cfg.dtype),
            attn_implementation=implementation,
            trust_remote_code=model_cfg.trust_remote_code,
        )
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


def load_student(model_cfg: ModelConfig, rope_cfg: RopeConfig, device: str | torch.device = "cpu"):
    """The trainable student: `model_cfg.path` with the recipe's extended RoPE.

    Raises:
        ConfigError: `model.path` cannot be loaded, or the RoPE recipe does not fit the checkpoint.
    """
    config = _load_config(model_cfg.path, model_cfg.trust_remote_code)
    extended = apply_extension(config, rope_cfg)
    model = _from_pretrained(model_cfg.path, extended, model_cfg, device, "model.path")
    model.to(device)
    model.config.use_cache = False
    if model_cfg.gradient_checkpointing:
        enable_checkpointing(model)
    for line in refresh_inv_freq(model):
        logger.info(line)
    model.train()
    return model


def load_teacher(path: str | None, model_cfg: ModelConfig, device: str | torch.device = "cpu"):
    """The frozen teacher with its native RoPE: eval(), every parameter requires_grad False, no cache.

    Args:
        path: the teacher checkpoint; None means `model_cfg.path`.
        model_cfg: dtype, attention and trust_remote_code are shared with the student.
    """
    path = path or model_cfg.path
    key = "teacher.path" if path != model_cfg.path else "model.path"
    try:
        config = _load_config(path, model_cfg.trust_remote_code)
    except ConfigError as err:
        raise ConfigError(str(err).replace("model.path:", f"{key}:", 1)) from None
    config.use_cache = False
    model = _from_pretrained(path, config, model_cfg, device, key)
    model.to(device)
    model.config.use_cache = False
    for line in refresh_inv_freq(model):
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
    independent RoPE math (`distill.rope.our_inv_freq`), the relation between the two (abf: θ_new^(−2i/d);
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
    config = _load_config(model_cfg.path, model_cfg.trust_remote_code)
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


# ----------------------------------------------------------------------------------------------------------
# Forwards that return hidden states (no lm_head)
# ----------------------------------------------------------------------------------------------------------


def causal_mask_kwargs(position_ids: torch.Tensor, packed: bool = False) -> dict:
    """The `attention_mask` argument for a batch of rows.

    Args:
        position_ids: (B, T).
        packed: True for rows of several documents whose positions restart at 0: transformers builds the
            per-document causal mask itself when attention_mask is None (and there is no cache).
            False for rows that are ONE document, possibly with skipped positions (short-to-long rows):
            an explicit all-ones mask disables packed detection, which would otherwise read every jump
            in `position_ids` as a document boundary and cut attention into blocks.

    Returns:
        {"attention_mask": None} or {"attention_mask": ones (B, T) long}.
    """
    if packed:
        return {"attention_mask": None}
    return {"attention_mask": torch.ones(position_ids.shape, dtype=torch.long, device=position_ids.device)}


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm; no lm_head) of a causal LM."""
    if hasattr(model, "get_decoder"):
        decoder = model.get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    if hasattr(model, "model"):
        return model.model
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (Llama / Mistral / Qwen2: `model.model.layers`): what FSDP2 wraps
    one by one, what the FLOP count sums, what a truncated teacher cuts."""
    layers = getattr(decoder_of(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder with a `layers` list")
    return layers


def _num_layers(decoder: nn.Module) -> int:
    return int(decoder.config.num_hidden_layers)


def _resolve_indices(layers, n_layers: int) -> list[int]:
    out = []
    for i in layers:
        if i == "last":
            i = n_layers
        i = int(i)
        if i < 0:
            i += n_layers + 1
        if not 0 <= i <= n_layers:
            raise ValueError(f"hidden-state index {i} out of range 0..{n_layers}")
        out.append(i)
    return out


def _decoder_states(decoder, input_ids, position_ids, attention_mask, depth: int, **attention_kwargs):
    """The decoder's forward with every hidden state (no cache, no lm_head): `depth` + 1 entries checked."""
    out = decoder(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        use_cache=False,
        output_hidden_states=True,
        **attention_kwargs,
    )
    if len(out.hidden_states) != depth + 1:
        raise RuntimeError(f"expected {depth + 1} hidden states, got {len(out.hidden_states)}")
    return out


def forward_hidden(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layers=None,
):
    """Run the decoder (no lm_head) and return hidden states.

    Args:
        input_ids: (B, T).
        position_ids: (B, T).
        attention_mask: None for packed rows; all ones for single-document rows (see `causal_mask_kwargs`).
        layers: None for the whole `hidden_states` tuple, else indices into it (0 = embeddings, L = after the
            final norm; negative and "last" allowed).

    Returns:
        (hidden_states, last_hidden): the tuple of L+1 tensors (B, T, H) ([-1] after the final norm) or the
        list of selected ones, and the final-norm output (B, T, H) (feed it to lm_head for the LM loss).
    """
    decoder = decoder_of(model)
    n_layers = _num_layers(decoder)
    wanted = None if layers is None else _resolve_indices(layers, n_layers)
    ids, pos, extra, unflatten = packed_layout(model, input_ids, position_ids, attention_mask)
    out = _decoder_states(decoder, ids, pos, attention_mask, n_layers, **extra)
    hidden = tuple(unflatten(h) for h in out.hidden_states)
    if wanted is None:
        return hidden, unflatten(out.last_hidden_state)
    return [hidden[i] for i in wanted], unflatten(out.last_hidden_state)


def packed_layout(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask=None,
                  flatten: bool | None = None):
    """Packed rows (B, T) laid out for the model's attention, as the trainer's step lays them out: flattened
    to (1, B·T) with the documents' offsets for flash_attention_2 (which separates packed documents only in a
    one-row batch), else unchanged. `flatten` overrides what the model's attention name says (a
    sequence-parallel wrapper's name hides the flash implementation under it).

    Returns:
        (input_ids, position_ids, attention kwargs, unflatten: (1, B·T, H) → (B, T, H)).
    """
    from distill.attention import document_offsets, flattens

    B, T = input_ids.shape
    if flatten is None:
        flatten = flattens(model.config._attn_implementation)
    if attention_mask is not None or B == 1 or not flatten:
        return input_ids, position_ids, {}, lambda h: h
    offsets = {k: v.to(input_ids.device) if torch.is_tensor(v) else v
               for k, v in document_offsets(position_ids.cpu()).items()}
    return (input_ids.reshape(1, B * T), position_ids.reshape(1, B * T), offsets,
            lambda h: h.view(B, T, *h.shape[2:]))


def truncated_decoder(decoder: nn.Module, depth: int) -> nn.Module:
    """A shallow copy of `decoder` that runs only its first `depth` layers (weights shared) and returns the
    raw output of layer `depth` (final norm swapped for identity). depth == L returns `decoder` itself.

    `LlamaModel.forward` (and Mistral's, Qwen2's) runs `layers[:config.num_hidden_layers]`, so a shorter list
    with a config copy stops early; its hidden_states[k] equals the full model's hidden_states[k], k ≤ depth.
    """
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    n_layers = _num_layers(decoder)
    if not 0 <= depth <= n_layers:
        raise ValueError(f"depth {depth} out of range 0..{n_layers}")
    if depth == n_layers:
        return decoder
    # Hidden-state capture hooks live on the (shared) layers: install them once on the full decoder, so the
    # copy # (which inherits the "installed" flag) does not install a second set on the same layers.
    maybe_install_capturing_hooks(decoder)
    sub = copy.copy(decoder)
    sub._modules = dict(decoder._modules)  # own module table: assignments below must not touch the original
    sub.config = copy.copy(decoder.config)
    sub.config.num_hidden_layers = depth
    if isinstance(getattr(sub.config, "layer_types", None), list):
        sub.config.layer_types = sub.config.layer_types[:depth]
    sub.layers = nn.ModuleList(list(decoder.layers[:depth]))
    sub.norm = nn.Identity()
    return sub


class TruncatedTeacher:
    """The frozen teacher run only as deep as the deepest hidden state a loss needs.

    Holds shallow copies of the teacher's decoder per depth (weights shared, nothing copied), so half the
    layers cost about half the time. Not an nn.Module: it never enters a module tree or an optimiser.
    """

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        self.decoder = decoder_of(teacher)
        self.n_layers = _num_layers(self.decoder)
        self._by_depth: dict[int, nn.Module] = {}

    def _decoder(self, depth: int) -> nn.Module:
        if depth not in self._by_depth:
            self._by_depth[depth] = truncated_decoder(self.decoder, depth)
        return self._by_depth[depth]

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layers,
        need_final: bool = False,
        **attention_kwargs,
    ) -> dict[int, torch.Tensor]:
        """Teacher hidden states {index: (B, T, H)} for indices into the full `hidden_states` tuple; only
        those are kept during the forward.

        Args:
            layers: indices (0..L, negative or "last" allowed); index L is the final-norm output.
            need_final: also return index L (e.g. for a logits KL), which runs the full depth.
            attention_kwargs: passed to every attention layer (the step's document offsets of a flattened
                row: cu_seq_lens_q/k, max_length_q/k).
        """
        wanted = _resolve_indices(layers, self.n_layers)
        if need_final:
            wanted.append(self.n_layers)
        wanted = sorted(set(wanted))
        if not wanted:
            return {}
        depth = max(wanted)
        if depth == 0:  # only the embeddings
            return {0: self.decoder.embed_tokens(input_ids)}
        return _selected_states(self._decoder(depth), input_ids, position_ids, attention_mask, wanted,
                                **attention_kwargs)


def _selected_states(decoder, input_ids, position_ids, attention_mask, wanted: list[int],
                     **attention_kwargs) -> dict[int, torch.Tensor]:
    """hidden_states[i] for i in `wanted` (sorted, the last one the decoder's depth), keeping only those:
    output_hidden_states would hold every layer's state until the forward ends (depth + 1 of them, where a
    recipe reads 3 or 4). hidden_states[i] < depth is the input of layer i (what transformers records),
    taken by a pre-hook; the last one is the decoder's own output."""
    depth = wanted[-1]
    kept: dict[int, torch.Tensor] = {}
    handles = []
    for i in wanted[:-1]:
        def grab(module, args, kwargs, i=i):
            kept[i] = args[0] if args else kwargs["hidden_states"]
        handles.append(decoder.layers[i].register_forward_pre_hook(grab, with_kwargs=True))
    try:
        out = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=False, **attention_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if len(decoder.layers[: decoder.config.num_hidden_layers]) != depth:
        raise RuntimeError(f"expected a decoder of {depth} layers, got {len(decoder.layers)}")
    kept[depth] = out.last_hidden_state
    return kept


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def legacy_rope_fields(rope_parameters: dict) -> dict:
    """The pre-5.0 spelling of a `rope_parameters` dict: {"rope_theta", "rope_scaling"}.

    transformers 4.x (and the serving and conversion tools pinned to it) read only `rope_theta` and
    `rope_scaling`; without them an exported model loads SILENTLY with the architecture's default θ and no
    scaling. `rope_scaling` is None for a plain (ABF) RoPE, else every key but rope_theta ("rope_type"
    included, which 4.x reads before its older name "type"; transformers 5 merges rope_scaling into
    rope_parameters on load, so an extra "type" key would change the reloaded dict)."""
    params = dict(rope_parameters)
    theta = params.pop("rope_theta")
    kind = params.get("rope_type", "default")
    scaling = None if kind == "default" and len(params) <= 1 else params
    return {"rope_theta": theta, "rope_scaling": scaling}


def _cast_state(model, state: dict, dtype: torch.dtype) -> dict:
    """`state` in `dtype`, tensors that shared storage still shared (a tied lm_head stays the embedding's
    tensor, so save_pretrained writes it once), and a tied model's head tied even when a gathered (sharded)
    state dict holds two copies."""
    out, cast = {}, {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        ident = (value.data_ptr(), value.storage_offset(), tuple(value.shape), value.device)
        if ident not in cast:
            cast[ident] = value.detach().to(dtype)
        out[key] = cast[ident]
    if getattr(model.config, "tie_word_embeddings", False):
        names = {id(m): n for n, m in model.named_modules()}
        embed = names.get(id(model.get_input_embeddings()))
        head = names.get(id(model.get_output_embeddings()))
        if embed is not None and head is not None and f"{embed}.weight" in out and f"{head}.weight" in out:
            out[f"{head}.weight"] = out[f"{embed}.weight"]
    return out


def export(model, tokenizer, out_dir: str, state_dict: dict | None = None,
           dtype: torch.dtype | None = None, original_length: int | None = None) -> str:
    """Save a Hugging Face model directory (safetensors, config with the extended RoPE, tokenizer).

    The exported config has use_cache True (for generation); training code loads it with use_cache False.
    It records the weights' dtype (a bf16 export loads as bf16 by default, not as fp32 at twice the memory)
    and carries the legacy `rope_theta` / `rope_scaling` fields beside `rope_parameters`
    (`legacy_rope_fields`), so readers that predate `rope_parameters` get the extended RoPE too.

    Args:
        state_dict: a full state dict gathered from a sharded model (FSDP2/ZeRO-3); None uses `model`'s own.
        dtype: the dtype the weights are written in (cast here, tied weights kept one tensor); None keeps the
            tensors' own.
        original_length: the window the model was extended from, written as the config's top-level
            `original_max_position_embeddings` (an abf extension's `rope_parameters` cannot say it), read by
            scripts/evaluate.py.
    """
    os.makedirs(out_dir, exist_ok=True)
    source = state_dict if state_dict is not None else model.state_dict()
    if dtype is not None:
        source = _cast_state(model, source, dtype)
    floating = [v.dtype for v in source.values() if v.is_floating_point()]
    saved_dtype = floating[0] if floating else torch.float32
    previous = model.config.use_cache, model.config.dtype
    model.config.use_cache = True
    model.config.dtype = saved_dtype
    try:
        model.save_pretrained(out_dir, state_dict=source)
    finally:
        model.config.use_cache, model.config.dtype = previous
    _complete_config(os.path.join(out_dir, "config.json"), saved_dtype, original_length)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _complete_config(config_path: str, dtype: torch.dtype, original_length: int | None) -> None:
    """Add to a saved config.json what `export` promises: legacy RoPE fields, the weights' dtype (under both
    names), the original length."""
    import json

    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("rope_parameters"):
        config.update(legacy_rope_fields(config["rope_parameters"]))
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")  # 4.x read torch_dtype
    if original_length is not None:
        config["original_max_position_embeddings"] = int(original_length)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def write_model_files(model, tokenizer, out_dir: str, dtype: torch.dtype = torch.float32,
                      original_length: int | None = None) -> None:
    """The config.json (as `export` writes it) and the tokenizer files beside weights saved elsewhere (a
    training checkpoint's model.safetensors), so the directory loads with `from_pretrained` and
    scripts/evaluate.py like an export."""
    previous = model.config.use_cache, model.config.dtype
    model.config.use_cache, model.config.dtype = True, dtype
    try:
        model.config.save_pretrained(out_dir)
    finally:
        model.config.use_cache, model.config.dtype = previous
    _complete_config(os.path.join(out_dir, "config.json"), dtype, original_length)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
