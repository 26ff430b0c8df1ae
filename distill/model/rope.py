"""RoPE extension methods as Hugging Face `rope_parameters`, our own inverse-frequency math, and the skipped
positions of short-to-long distillation.

Transformers 5.x keeps all RoPE settings in `config.rope_parameters` (a flat dict for the models we train:
{"rope_type", "rope_theta", "factor", ...}); the rotary module computes `inv_freq` from it once at build time
as a non-persistent fp32 buffer. We never patch modules: the student is the same checkpoint loaded with a
different `rope_parameters`, so the exported model reloads with plain `from_pretrained`.

An already-scaled checkpoint (e.g. Llama-3.1 with `rope_type: llama3`, factor 8 over an 8K pre-training
window) is handled as follows:
- abf keeps the checkpoint's whole dict (its scaling included) and replaces `rope_theta` only;
- pi / yarn / llama3 build a fresh dict from the checkpoint's `rope_theta`, i.e. the new scaling replaces the
  old one, and the default factor is target_length / original window, where the original window is the
  un-scaled pre-training length (`original_max_position_embeddings` when the checkpoint has it);
- none keeps the checkpoint's dict unchanged.
"""

from __future__ import annotations

import copy
import math

import torch

from distill.config import ConfigError, RopeConfig

METHODS = ("abf", "pi", "yarn", "llama3", "none")


# ----------------------------------------------------------------------------------------------------------
# Recipe → Hugging Face config
# ----------------------------------------------------------------------------------------------------------


def _rope_parameters(hf_config) -> dict:
    """The checkpoint's flat rope_parameters dict (a copy), standardised to carry rope_type and rope_theta."""
    params = getattr(hf_config, "rope_parameters", None)
    if not params:
        raise ConfigError("model.path: the checkpoint's config has no rope_parameters (not a RoPE model?)")
    params = dict(params)
    if "rope_type" not in params and "type" in params:  # legacy key
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if "rope_theta" not in params:
        raise ConfigError(
            "model.path: the checkpoint's rope_parameters have no rope_theta "
            "(per-layer RoPE is not supported)"
        )
    return params


def original_length(hf_config, rope_cfg: RopeConfig) -> int:
    """The original context window T0: the recipe's `rope.original_length`, else the checkpoint's pre-training
    window (`original_max_position_embeddings` of an already-scaled RoPE, else `max_position_embeddings`)."""
    if rope_cfg.original_length is not None:
        return int(rope_cfg.original_length)
    params = getattr(hf_config, "rope_parameters", None) or {}
    if params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    return int(hf_config.max_position_embeddings)


def extension_factor(hf_config, rope_cfg: RopeConfig) -> float:
    """The scaling factor f of pi / yarn / llama3: the recipe's `rope.factor`, else target_length / T0."""
    if rope_cfg.factor is not None:
        return float(rope_cfg.factor)
    return rope_cfg.target_length / original_length(hf_config, rope_cfg)


def extended_rope_parameters(hf_config, rope_cfg: RopeConfig) -> dict:
    """The student's new `rope_parameters` for the recipe's extension method (see the module docstring for
    checkpoints that already scale their RoPE).

    Raises:
        ConfigError: `rope.target_length` not above the original window (any method but none), or a missing
            theta for abf.
    """
    base = _rope_parameters(hf_config)
    method = rope_cfg.method
    if method not in METHODS:
        raise ConfigError(f"rope.method: {method!r} is not allowed; allowed: {', '.join(METHODS)}")
    if method == "none":
        return base
    t0 = original_length(hf_config, rope_cfg)
    if rope_cfg.target_length <= t0:
        raise ConfigError(
            f"rope.target_length: {rope_cfg.target_length} must be greater than the original "
            f"context window {t0} to extend it (or use rope.method: none)"
        )
    theta = float(base["rope_theta"])
    if method == "abf":
        if rope_cfg.theta is None or rope_cfg.theta <= 0:
            raise ConfigError("rope.theta: abf needs a positive rope theta (e.g. 2.0e7)")
        base["rope_theta"] = float(rope_cfg.theta)
        return base
    factor = extension_factor(hf_config, rope_cfg)
    if method == "pi":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if method == "yarn":
        return {
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": factor,
            "original_max_position_embeddings": t0,
            "beta_fast": float(rope_cfg.beta_fast),
            "beta_slow": float(rope_cfg.beta_slow),
        }
    # llama3
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": float(rope_cfg.low_freq_factor),
        "high_freq_factor": float(rope_cfg.high_freq_factor),
        "original_max_position_embeddings": t0,
    }


def apply_extension(hf_config, rope_cfg: RopeConfig):
    """A copy of `hf_config` with the extended rope_parameters, max_position_embeddings = target_length (for
    method none: unchanged) and use_cache False (packed rows isolate documents only without a cache)."""
    new = copy.deepcopy(hf_config)
    new.rope_parameters = extended_rope_parameters(hf_config, rope_cfg)
    if rope_cfg.method != "none":
        new.max_position_embeddings = int(rope_cfg.target_length)
    new.use_cache = False
    # A config attribute `original_max_position_embeddings` (Phi-3 style) overrides the dict's value when
    # transformers standardises yarn/llama3 parameters: keep the two consistent.
    if (
        hasattr(new, "original_max_position_embeddings")
        and "original_max_position_embeddings" in new.rope_parameters
    ):
        new.original_max_position_embeddings = new.rope_parameters["original_max_position_embeddings"]
    new.validate_rope()
    return new


def head_dim(hf_config) -> int:
    """Rotary dimension per head (partial rotary factor applied)."""
    dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    partial = (getattr(hf_config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(dim * partial)


def inv_freq(hf_config) -> tuple[torch.Tensor, float]:
    """Transformers' own (inv_freq, attention_scaling) for a config, as its rotary module computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = copy.deepcopy(hf_config)
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        # Transformers 5 has no "default" entry in ROPE_INIT_FUNCTIONS: each model's rotary class computes it.
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------
# Our own RoPE math (written from the papers; tests compare it with transformers)
# ----------------------------------------------------------------------------------------------------------


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """θ_i = θ^(−2i/d) for i = 0..d/2−1 (Su et al. 2021), fp32.  # (d/2,)"""
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    return 1.0 / (theta**exponents)


def yarn_mscale(factor: float) -> float:
    """YaRN attention temperature √(1/t) = 0.1·ln(s) + 1 (Peng et al. 2023, Eq. 22); 1 for s ≤ 1."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def our_inv_freq(rope_parameters: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for a `rope_parameters` dict.

    Args:
        rope_parameters: {"rope_type": default | linear | yarn | llama3, "rope_theta", ...}.
        head_dim: rotary dimension d (even).

    Returns:
        (inv_freq (d/2,) fp32, attention_scaling float): cos/sin are multiplied by attention_scaling.
    """
    rope_type = rope_parameters.get("rope_type", "default")
    theta = float(rope_parameters["rope_theta"])
    dim = head_dim
    freqs = base_inv_freq(theta, dim)
    if rope_type == "default":  # ABF only changes θ
        return freqs, 1.0
    factor = float(rope_parameters["factor"])
    if rope_type == "linear":  # PI (Chen et al. 2023): positions m/s ⇔ frequencies θ_i/s
        return freqs / factor, 1.0
    if rope_type == "yarn":
        # "NTK-by-parts" (Peng et al. 2023, Sec. 3.2): over the original window L a dimension pair turns
        # r_i = L / λ_i = L·θ_i / 2π times. Pairs with r > β_fast keep their frequency (extrapolate), pairs
        # with r < β_slow are divided by s (interpolate), a linear ramp over the pair index lies in between.
        # The pair index where r = b solves L·θ^(−2i/d) / 2π = b: i(b) = d·ln(L / (2πb)) / (2·ln θ), rounded
        # outwards.
        length = float(rope_parameters["original_max_position_embeddings"])
        beta_fast = float(rope_parameters.get("beta_fast") or 32.0)
        beta_slow = float(rope_parameters.get("beta_slow") or 1.0)

        def pair_index(rotations: float) -> float:
            return dim * math.log(length / (2 * math.pi * rotations)) / (2 * math.log(theta))

        low = pair_index(beta_fast)
        high = pair_index(beta_slow)
        if rope_parameters.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(
            0, 1
        )  # 0: keep, 1: /s
        inv = freqs / factor * ramp + freqs * (1 - ramp)
        scaling = rope_parameters.get("attention_factor")
        if scaling is None:
            mscale, mscale_all = rope_parameters.get("mscale"), rope_parameters.get("mscale_all_dim")
            if mscale and mscale_all:  # DeepSeek-style ratio
                scaling = (
                    (0.1 * mscale * math.log(factor) + 1) / (0.1 * mscale_all * math.log(factor) + 1)
                    if factor > 1
                    else 1.0
                )
            else:
                scaling = yarn_mscale(factor)
        return inv, float(scaling)
    if rope_type == "llama3":
        # Meta's Llama-3.1 rule on wavelengths λ = 2π/θ_i over the original window L: λ < L/high_freq_factor
        # keeps θ_i, λ > L/low_freq_factor divides by s, in between interpolate smoothly with
        # w = (L/λ − low) / (high − low): θ_i' = (1 − w)·θ_i/s + w·θ_i.
        length = float(rope_parameters["original_max_position_embeddings"])
        low_ff = float(rope_parameters["low_freq_factor"])
        high_ff = float(rope_parameters["high_freq_factor"])
        wavelen = 2 * math.pi / freqs
        smooth = (length / wavelen - low_ff) / (high_ff - low_ff)
        mid = (1 - smooth) * freqs / factor + smooth * freqs
        inv = torch.where(
            wavelen < length / high_ff, freqs, torch.where(wavelen > length / low_ff, freqs / factor, mid)
        )
        return inv, 1.0
    raise ValueError(f"rope_type {rope_type!r} is not supported by our_inv_freq")


# ----------------------------------------------------------------------------------------------------------
# Skipped positions for short-to-long distillation (LongReD L_s2l; CREAM, Wu et al. 2024)
# ----------------------------------------------------------------------------------------------------------

CREAM_STD = 5.0
"""Standard deviation of the normal CREAM draws the middle's stretch r from (mean 1 + f)."""


def _uniform_int(low: int, high: int, generator: torch.Generator) -> int:
    """An integer uniform on [low, high] (both inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _uniform_float(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64).item())


def _normal_quantile(p: float) -> float:
    """Φ⁻¹(p) of the standard normal, p in (0, 1)."""
    p = min(max(p, 1e-12), 1 - 1e-12)
    return torch.special.erfinv(torch.tensor(2.0 * p - 1.0, dtype=torch.float64)).item() * math.sqrt(2.0)


def cream_stretch(factor: float, generator: torch.Generator) -> int:
    """CREAM's stretch r of the middle block, drawn as the reference code draws it.

    The reference (CREAM's and LongReD's training scripts) maps u ~ U[0, 1) through an UNNORMALISED normal
    CDF tabulated on [2, 2f] (`np.interp(u, Φ((x − μ)/σ), x)`, μ = 1 + f, σ = 5) and casts to int. np.interp
    clamps outside the table, so the draw is a normal CLAMPED to [2, 2f], not a truncated one: at f = 4
    about 35% of draws give r = 2 and 27% give r = 2f, the only stretch whose middle block can reach the end
    of the target window. We compute the same quantile exactly: r = int(clamp(μ + σ·Φ⁻¹(u), 2, 2f)).

    Args:
        factor: f = target / original.

    Returns:
        r, an integer in [2, int(2f)].
    """
    x = 1.0 + factor + CREAM_STD * _normal_quantile(_uniform_float(generator))
    return int(min(max(x, 2.0), 2.0 * factor))


def skipped_positions(
    original: int, target: int, method: str = "cream", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Position ids that spread `original` (T0) tokens over a `target`-long window (LongReD Sec. 3.3).

    The T0 tokens are split into head, middle and tail with head = tail = T0 // 3 or 4·f (probability ½ each,
    f = target / T0). The head keeps positions 0..head−1, the tail ends at target−1, the middle is one
    contiguous block ending at end_id:
    - uniform: end_id ~ U[T0 − tail, target − tail − 1];
    - cream: r ~ N(1 + f, 5²) clamped to [2, 2f] and cast to int, as the reference draws it
      (`cream_stretch`), end_id ~ U[head + (len_middle−1)·r/2, r/2·T0 − tail − 1], clamped to the valid range.

    Args:
        original: T0, the number of tokens (the teacher's window).
        target: the extended length; positions lie in [0, target).
        method: "cream" or "uniform".
        generator: torch RNG; the result is a deterministic function of its state.

    Returns:
        LongTensor (T0,) strictly increasing, first 0, last target − 1.
    """
    if method not in ("cream", "uniform"):
        raise ValueError(f"skipped positions method {method!r}; allowed: 'cream', 'uniform'")
    if target <= original:
        raise ValueError(f"target {target} must exceed the original length {original}")
    if original < 3:
        raise ValueError(f"original length {original} is too short to split into head, middle and tail")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    f = target / original
    max_edge = (original - 1) // 2  # leave at least one middle token
    if _uniform_float(generator) < 0.5:
        edge = original // 3
    else:
        edge = round(4 * f)
    head = tail = max(1, min(edge, max_edge))
    middle = original - head - tail
    # Valid end ids: the middle starts at or after `head` and ends before the tail starts.
    lowest, highest = head + middle - 1, target - tail - 1
    if method == "uniform":
        end_id = _uniform_int(original - tail, highest, generator)  # original − tail ≤ highest as target > T0
    else:
        r = cream_stretch(f, generator)
        low = math.ceil(head + (middle - 1) * r / 2)
        high = math.floor(r / 2 * original - tail - 1)
        low = min(max(low, lowest), highest)
        high = min(max(high, low), highest)
        end_id = _uniform_int(low, high, generator)
    head_ids = torch.arange(0, head)
    middle_ids = torch.arange(end_id - middle + 1, end_id + 1)
    tail_ids = torch.arange(target - tail, target)
    return torch.cat([head_ids, middle_ids, tail_ids]).long()
