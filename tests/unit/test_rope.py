"""RoPE extension: our inverse-frequency math against transformers' (litgpt tests/test_rope.py style), the
recipe → rope_parameters mapping, and the skipped positions of short-to-long distillation."""

import math

import pytest
import torch

from distill.config import ConfigError, RopeConfig
from distill.model.rope import (
    apply_extension,
    cream_stretch,
    extended_rope_parameters,
    head_dim,
    inv_freq,
    original_length,
    our_inv_freq,
    skipped_positions,
)
from distill.testing import tiny_config

# (arch, hidden, heads, window, theta): the tiny test shape and a Llama-3-8B-like head (d=128, θ 5e5, 8K).
SHAPES = [("llama", 64, 4, 256, 1.0e4), ("llama", 512, 4, 8192, 5.0e5), ("qwen2", 96, 2, 1024, 1.0e6)]

RECIPES = [
    {"method": "abf", "theta": 2.0e7},
    {"method": "pi"},
    {"method": "pi", "factor": 3.0},
    {"method": "yarn"},
    {"method": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0},
    {"method": "llama3"},
    {"method": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0},
    {"method": "none"},
]


def _config(arch, hidden, heads, window, theta):
    return tiny_config(
        arch,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        max_position_embeddings=window,
        rope_theta=theta,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-d{s[1] // s[2]}-{s[3]}")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: "-".join(f"{v}" for v in r.values()))
def test_our_inv_freq_matches_transformers(shape, recipe):
    config = _config(*shape)
    rope_cfg = RopeConfig(target_length=4 * shape[3], **recipe)
    extended = apply_extension(config, rope_cfg)
    ours, our_scale = our_inv_freq(dict(extended.rope_parameters), head_dim(extended))
    theirs, their_scale = inv_freq(extended)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.shape == (head_dim(extended) // 2,)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0.0)
    assert our_scale == pytest.approx(their_scale, rel=1e-9)


def test_method_formulas_from_first_principles():
    config = _config("llama", 512, 4, 8192, 5.0e5)
    d = 128
    base = 5.0e5 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    abf, _ = our_inv_freq(
        extended_rope_parameters(config, RopeConfig(method="abf", theta=2e7, target_length=32768)), d
    )
    torch.testing.assert_close(
        abf.double(), 2e7 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d), rtol=1e-6, atol=0
    )
    pi, _ = our_inv_freq(extended_rope_parameters(config, RopeConfig(method="pi", target_length=32768)), d)
    torch.testing.assert_close(pi.double(), base / 4, rtol=1e-6, atol=0)
    # YaRN: the fastest pair keeps its frequency, the slowest is interpolated, mscale = 0.1 ln 4 + 1.
    yarn, scale = our_inv_freq(
        extended_rope_parameters(config, RopeConfig(method="yarn", target_length=32768)), d
    )
    assert yarn[0].item() == pytest.approx(base[0].item(), rel=1e-6)
    assert yarn[-1].item() == pytest.approx(base[-1].item() / 4, rel=1e-6)
    assert scale == pytest.approx(0.1 * math.log(4) + 1)
    # Llama 3: wavelengths below 8192/4 untouched, above 8192/1 divided by the factor.
    l3, scale = our_inv_freq(
        extended_rope_parameters(config, RopeConfig(method="llama3", target_length=32768)), d
    )
    wavelen = 2 * math.pi / base
    torch.testing.assert_close(l3.double()[wavelen < 2048], base[wavelen < 2048], rtol=1e-6, atol=0)
    torch.testing.assert_close(l3.double()[wavelen > 8192], base[wavelen > 8192] / 4, rtol=1e-6, atol=0)
    assert scale == 1.0


def test_extended_rope_parameters_shapes():
    config = _config("llama", 64, 4, 256, 1.0e4)
    assert extended_rope_parameters(config, RopeConfig(method="abf", theta=1e6, target_length=1024)) == {
        "rope_type": "default",
        "rope_theta": 1e6,
    }
    assert extended_rope_parameters(config, RopeConfig(method="pi", target_length=1024)) == {
        "rope_type": "linear",
        "rope_theta": 1e4,
        "factor": 4.0,
    }
    yarn = extended_rope_parameters(config, RopeConfig(method="yarn", target_length=2048))
    assert yarn == {
        "rope_type": "yarn",
        "rope_theta": 1e4,
        "factor": 8.0,
        "original_max_position_embeddings": 256,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    l3 = extended_rope_parameters(
        config, RopeConfig(method="llama3", target_length=1024, original_length=128)
    )
    assert l3["factor"] == 8.0 and l3["original_max_position_embeddings"] == 128
    assert l3["low_freq_factor"] == 1.0 and l3["high_freq_factor"] == 4.0
    assert extended_rope_parameters(config, RopeConfig(method="none", target_length=16)) == dict(
        config.rope_parameters
    )


def test_apply_extension_copies_and_sets_length():
    config = _config("mistral", 64, 4, 256, 1.0e4)
    config.use_cache = True
    new = apply_extension(config, RopeConfig(method="yarn", target_length=1024))
    assert new.max_position_embeddings == 1024 and new.use_cache is False
    assert new.rope_parameters["rope_type"] == "yarn"
    assert config.rope_parameters == {"rope_theta": 1e4, "rope_type": "default"}  # the original is untouched
    assert config.max_position_embeddings == 256 and config.use_cache is True
    same = apply_extension(config, RopeConfig(method="none", target_length=16))
    assert same.max_position_embeddings == 256 and same.rope_parameters == config.rope_parameters


@pytest.mark.parametrize("method", ["abf", "pi", "yarn", "llama3"])
@pytest.mark.parametrize("target", [128, 256])
def test_target_not_above_original_is_a_config_error(method, target):
    config = _config("llama", 64, 4, 256, 1.0e4)
    with pytest.raises(ConfigError, match=r"^rope\.target_length: "):
        extended_rope_parameters(config, RopeConfig(method=method, theta=1e6, target_length=target))


def test_already_scaled_checkpoint():
    """Llama-3.1 style: llama3 scaling over an 8K pre-training window; abf replaces theta only."""
    config = _config("llama", 512, 4, 131072, 5.0e5)
    config.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    rope_cfg = RopeConfig(method="abf", theta=2e7, target_length=262144)
    assert original_length(config, rope_cfg) == 8192
    params = extended_rope_parameters(config, rope_cfg)
    assert params == {**config.rope_parameters, "rope_theta": 2e7}
    ours, _ = our_inv_freq(params, 128)
    theirs, _ = inv_freq(apply_extension(config, rope_cfg))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    pi = extended_rope_parameters(config, RopeConfig(method="pi", target_length=65536))
    assert pi == {"rope_type": "linear", "rope_theta": 5e5, "factor": 8.0}


# ------------------------------------------------------------------------------------------ skipped positions

CASES = [(64, 256), (100, 1600), (1024, 4096), (8192, 32768), (30, 31)]


@pytest.mark.parametrize("method", ["cream", "uniform"])
@pytest.mark.parametrize("original,target", CASES)
def test_skipped_positions_invariants(method, original, target):
    gen = torch.Generator().manual_seed(123)
    for _ in range(200):
        pos = skipped_positions(original, target, method, gen)
        assert pos.dtype == torch.long and pos.shape == (original,)
        assert pos[0].item() == 0 and pos[-1].item() == target - 1
        assert bool((pos.diff() > 0).all()) and pos.min() >= 0 and pos.max() < target
        jumps = (pos.diff() != 1).nonzero().flatten().tolist()
        assert len(jumps) <= 2  # head | middle | tail: contiguous blocks
        head = jumps[0] + 1 if jumps else original
        assert torch.equal(pos[:head], torch.arange(head))
        tail = original - (jumps[-1] + 1) if jumps else original
        assert torch.equal(pos[-tail:], torch.arange(target - tail, target))


def test_skipped_positions_deterministic():
    a = [skipped_positions(256, 1024, "cream", torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    gen = torch.Generator().manual_seed(7)
    draws = {tuple(skipped_positions(256, 1024, "cream", gen).tolist()) for _ in range(20)}
    assert len(draws) > 5


def _split(pos, original, target):
    """(head, end_id) of a skipped-positions draw (head = tail is T0 // 3 or round(4f))."""
    for h in sorted({original // 3, round(4 * target / original)}, reverse=True):
        if torch.equal(pos[:h], torch.arange(h)) and torch.equal(pos[-h:], torch.arange(target - h, target)):
            return h, int(pos[original - h - 1])
    raise AssertionError(f"no head/tail split fits {pos.tolist()}")


def test_skipped_positions_distribution_uniform():
    original, target = 300, 1200  # f = 4: head is 100 (T0 // 3) or 16 (4f)
    gen = torch.Generator().manual_seed(0)
    heads, ends = [], []
    for _ in range(2000):
        head, end = _split(skipped_positions(original, target, "uniform", gen), original, target)
        heads.append(head)
        ends.append((end, head))
    assert set(heads) == {100, 16}
    assert 0.45 < heads.count(100) / len(heads) < 0.55
    for h in (100, 16):
        e = torch.tensor([end for end, head in ends if head == h], dtype=torch.float64)
        low, high = original - h, target - h - 1
        assert e.min() >= low and e.max() <= high
        assert e.mean().item() == pytest.approx((low + high) / 2, rel=0.03)  # U[low, high]
        assert e.std().item() == pytest.approx((high - low) / math.sqrt(12), rel=0.08)


def test_cream_stretch_is_clamped_like_the_reference():
    """r = int(clamp(N(1+f, 5), 2, 2f)), as the reference's np.interp over an unnormalised CDF gives: at f = 4
    Φ(-0.4) ≈ 34.5% of draws at r = 2 and 1 − Φ(0.6) ≈ 27.4% at r = 2f (a truncated normal gives ~0 there)."""
    gen = torch.Generator().manual_seed(0)
    n = 20000
    r = [cream_stretch(4.0, gen) for _ in range(n)]
    assert set(r) <= set(range(2, 9))
    assert r.count(2) / n == pytest.approx(0.3446, abs=0.015)
    assert r.count(8) / n == pytest.approx(0.2743, abs=0.015)
    # The interior follows the normal's quantiles: P(r = 5) = Φ(0.2) − Φ(0).
    assert r.count(5) / n == pytest.approx(0.0793, abs=0.01)


def test_cream_middle_reaches_the_end_of_a_32k_target():
    """At 8K → 32K the middle block of about 27% × ½ of rows (r = 2f, head = 4f) ends in the last 5%."""
    original, target = 8192, 32768
    gen = torch.Generator().manual_seed(3)
    ends = []
    for _ in range(400):
        head, end = _split(skipped_positions(original, target, "cream", gen), original, target)
        ends.append(end)
    late = sum(end >= 0.95 * target for end in ends) / len(ends)
    assert 0.07 < late < 0.21, late


def test_skipped_positions_distribution_cream():
    """CREAM puts the middle nearer the start than uniform does (r ~ N(1+f, 5) clamped to [2, 2f])."""
    original, target = 300, 1200
    gen = torch.Generator().manual_seed(1)
    cream, uniform = [], []
    for _ in range(1500):
        cream.append(_split(skipped_positions(original, target, "cream", gen), original, target)[1])
        uniform.append(_split(skipped_positions(original, target, "uniform", gen), original, target)[1])
    cream_t, uniform_t = torch.tensor(cream, dtype=torch.float64), torch.tensor(uniform, dtype=torch.float64)
    assert cream_t.min() >= original - 101 and cream_t.max() <= target - 17
    assert cream_t.mean() < uniform_t.mean()
    assert len(set(cream)) > 100  # a spread, not a constant


def test_skipped_positions_rejects_bad_arguments():
    with pytest.raises(ValueError):
        skipped_positions(256, 256, "cream", torch.Generator())
    with pytest.raises(ValueError):
        skipped_positions(256, 1024, "random", torch.Generator())
