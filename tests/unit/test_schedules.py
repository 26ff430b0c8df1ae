"""LR and share schedules: shapes at key steps, transformers' cosine as reference, phases of the infinite
one."""

import math
from itertools import pairwise

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from distill.config import ConfigError, ScheduleConfig, ShareScheduleConfig, check_lr_schedule, from_dict
from distill.schedules import lr_at, share_at, wsd_decay_steps

BASE = 1e-3


def _cfg(**kw):
    return from_dict(ScheduleConfig, kw)


def _lrs(cfg, steps, max_steps=100):
    return [lr_at(s, BASE, cfg, max_steps) for s in range(steps)]


def test_constant_without_and_with_warmup():
    assert _lrs(_cfg(), 5) == [BASE] * 5
    cfg = _cfg(warmup_steps=4)
    lrs = _lrs(cfg, 8)
    assert lrs[0] == 0.0
    assert lrs[1] == pytest.approx(BASE / 4) and lrs[2] == pytest.approx(BASE / 2)
    assert lrs[4:] == [BASE] * 4
    assert all(a < b for a, b in pairwise(lrs[:5]))


@pytest.mark.parametrize("warmup,total,num_cycles",
                         [(0, 50, 0.5), (10, 100, 0.5), (5, 40, 1.5), (7, 33, 0.25)])
def test_cosine_matches_transformers(warmup, total, num_cycles):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE)
    ref = get_cosine_schedule_with_warmup(opt, warmup, total, num_cycles=num_cycles)
    cfg = _cfg(name="cosine", warmup_steps=warmup, num_cycles=num_cycles)
    for step in range(total):
        assert lr_at(step, BASE, cfg, total) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        ref.step()


def test_cosine_total_steps_overrides_max_steps_and_min_lr_floor():
    cfg = _cfg(name="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(10, BASE, cfg, 5) == pytest.approx(BASE)  # peak right after warm-up, horizon 110 not 5
    assert lr_at(60, BASE, cfg, 5) == pytest.approx(BASE * (0.1 + 0.9 * 0.5))  # half way
    assert lr_at(110, BASE, cfg, 5) == pytest.approx(0.1 * BASE)
    assert lr_at(500, BASE, cfg, 5) == pytest.approx(0.1 * BASE)  # holds, does not climb back
    decay = _lrs(cfg, 111)[10:]
    assert all(a >= b for a, b in pairwise(decay))
    assert min(_lrs(cfg, 300)[10:]) >= 0.1 * BASE - 1e-15


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_phases_and_shapes(shape):
    cfg = _cfg(name="wsd", warmup_steps=10, decay_shape=shape, min_lr_ratio=0.05)
    total = 100
    assert wsd_decay_steps(cfg, total) == 20
    lrs = _lrs(cfg, total + 5, total)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(BASE / 2)
    assert lrs[10:81] == [pytest.approx(BASE)] * 71  # stable until the decay starts at 80
    decay = lrs[80:]
    assert all(a > b for a, b in pairwise(decay[:21]))  # strictly decreasing over the cooldown
    assert lrs[100] == pytest.approx(0.05 * BASE) and lrs[104] == pytest.approx(0.05 * BASE)
    expected_mid = {"linear": 0.5, "cosine": 0.5, "1-sqrt": 1 - math.sqrt(0.5)}[shape]
    assert lrs[90] == pytest.approx(BASE * (0.05 + 0.95 * expected_mid))


def test_wsd_shapes_order_and_explicit_decay_steps():
    # At a quarter of the cooldown: 1-sqrt drops fastest, cosine slowest.
    at = {s: lr_at(85, BASE, _cfg(name="wsd", decay_shape=s), 100) for s in ("linear", "cosine", "1-sqrt")}
    assert at["1-sqrt"] < at["linear"] < at["cosine"]
    cfg = _cfg(name="wsd", decay_steps=30, decay_shape="linear", total_steps=60)
    assert lr_at(30, BASE, cfg, 1000) == pytest.approx(BASE)
    assert lr_at(45, BASE, cfg, 1000) == pytest.approx(BASE / 2)
    assert lr_at(60, BASE, cfg, 1000) == 0.0


@pytest.mark.parametrize("warmup,total", [(0, 10), (10, 100), (90, 100), (99, 100), (0, 1), (3, 4)])
@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_reaches_its_floor_at_the_end_whatever_the_warmup(warmup, total, shape):
    """The default decay (20% of the horizon) is cut to the steps after warm-up: with warm-up 90 of 100 it
    used to start at 90 and last 20 steps, ending half-way at step 100."""
    cfg = _cfg(name="wsd", warmup_steps=warmup, decay_shape=shape, min_lr_ratio=0.1)
    assert check_lr_schedule(cfg, total) is None
    assert lr_at(total, BASE, cfg, total) == pytest.approx(0.1 * BASE)
    assert lr_at(total - 1, BASE, cfg, total) > 0.1 * BASE


def test_schedules_that_cannot_reach_their_floor_are_refused(tmp_path):
    from distill.config import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {path: m}\nrope: {method: abf, theta: 1.0e6, target_length: 1024}\n"
                      "streams: {long: {data: d, objectives: {lm: 1.0}}}\ntrain: {max_steps: 100}\n")
    with pytest.raises(ConfigError, match=r"optim.schedule.decay_steps: 95 does not fit after the warm-up "
                                          r"\(train.max_steps 100 − warmup_steps 10 = 90\)"):
        load_recipe(str(recipe), ["optim.schedule.name=wsd", "optim.schedule.warmup_steps=10",
                                  "optim.schedule.decay_steps=95"])
    with pytest.raises(ConfigError, match="optim.schedule.warmup_steps: 100 leaves no step to decay"):
        load_recipe(str(recipe), ["optim.schedule.name=wsd", "optim.schedule.warmup_steps=100"])
    cfg = load_recipe(str(recipe), ["optim.schedule.name=wsd", "optim.schedule.warmup_steps=10",
                                    "optim.schedule.decay_steps=90"])
    assert lr_at(100, BASE, cfg.optim.schedule, 100) == 0.0


def test_infinite_schedule_phases():
    cfg = _cfg(name="infinite", warmup_steps=10, cooldown_steps=20, const_lr_ratio=0.25, anneal_start=100,
               anneal_steps=50, min_lr_ratio=0.01)
    eta_const, eta_min = 0.25 * BASE, 0.01 * BASE
    lrs = _lrs(cfg, 200)
    # Warm-up to η_max.
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(BASE / 2) and lrs[10] == pytest.approx(BASE)
    # Cosine cooldown η_max → η_const.
    assert lrs[20] == pytest.approx(eta_const + (BASE - eta_const) * 0.5)
    assert all(a > b for a, b in pairwise(lrs[10:31]))
    # Plateau.
    assert lrs[30:101] == [pytest.approx(eta_const)] * 71
    # Exponential annealing: geometric interpolation η_const → η_min over t_a steps, then η_min.
    assert lrs[125] == pytest.approx(math.sqrt(eta_const * eta_min))
    assert lrs[150] == pytest.approx(eta_min) and lrs[199] == pytest.approx(eta_min)
    ratios = [b / a for a, b in pairwise(lrs[100:151])]
    assert max(ratios) == pytest.approx(min(ratios))  # constant per-step factor
    assert min(lrs[100:]) >= eta_min * (1 - 1e-12)


def test_infinite_without_annealing_stays_on_plateau():
    cfg = _cfg(name="infinite", warmup_steps=0, cooldown_steps=10, const_lr_ratio=0.5)
    assert lr_at(0, BASE, cfg, 10) == pytest.approx(BASE)
    assert lr_at(10, BASE, cfg, 10) == pytest.approx(BASE / 2)
    assert lr_at(10**6, BASE, cfg, 10) == pytest.approx(BASE / 2)


def test_infinite_early_anneal_start_does_not_jump():
    cfg = _cfg(name="infinite", warmup_steps=0, cooldown_steps=100, const_lr_ratio=0.1, anneal_start=50,
               anneal_steps=10, min_lr_ratio=0.01)
    before, at = lr_at(49, BASE, cfg, 1), lr_at(50, BASE, cfg, 1)
    assert at < before and at / before > 0.95
    assert lr_at(60, BASE, cfg, 1) == pytest.approx(0.01 * BASE)


def test_infinite_annealing_needs_min_lr():
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        _cfg(name="infinite", anneal_start=10)


def test_negative_step_is_an_error():
    with pytest.raises(ValueError):
        lr_at(-1, BASE, _cfg(), 10)
    with pytest.raises(ValueError):
        share_at(-1, 0.5)


def _share(**kw):
    return from_dict(ShareScheduleConfig, kw)


def test_share_fixed_and_constant():
    assert share_at(0, 3.0) == 3.0 and share_at(1000, 0.25) == 0.25
    assert share_at(7, _share(name="constant", start=0.4, end=0.9)) == 0.4


def test_share_linear_and_cosine():
    lin = _share(name="linear", start=1.0, end=0.0, steps=10)
    assert [share_at(s, lin) for s in (0, 5, 10, 50)] == [pytest.approx(v) for v in (1.0, 0.5, 0.0, 0.0)]
    cos = _share(name="cosine", start=0.2, end=1.0, steps=100)
    assert share_at(0, cos) == pytest.approx(0.2)
    assert share_at(50, cos) == pytest.approx(0.6)
    assert share_at(25, cos) == pytest.approx(0.2 + 0.8 * (1 - math.cos(math.pi / 4)) / 2)
    assert share_at(100, cos) == pytest.approx(1.0) and share_at(1000, cos) == pytest.approx(1.0)
    values = [share_at(s, cos) for s in range(101)]
    assert all(a <= b for a, b in pairwise(values))


def test_share_stages():
    stages = _share(name="stages", stages=[[0, 0.5], [10, 0.1], [30, 0.0]])
    assert [share_at(s, stages) for s in (0, 9, 10, 29, 30, 10**6)] == [0.5, 0.5, 0.1, 0.1, 0.0, 0.0]
