"""Learning-rate and stream-share schedules: pure functions of the optimiser step.

Conventions shared by every LR schedule:
- `step` counts optimiser steps from 0; the LR returned is the one used *for* that step.
- Warm-up is linear from 0, as in transformers' `get_*_schedule_with_warmup`: lr = base · step / N_w for
  step < N_w, so step 0 runs at LR 0 (it only fills AdamW's moment estimates) and step N_w is the first
  at the peak. With warmup_steps = 0 there is no warm-up.
- Decays are written so that the final value is reached at step == total (like transformers' cosine);
  the last trained step, total − 1, is one decay increment above it. After total the LR stays there.
"""

from __future__ import annotations

import math

from distill.config import ScheduleConfig, ShareScheduleConfig


def _warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 0: step / N_w before N_w, then 1."""
    if step < warmup_steps:
        return step / warmup_steps
    return 1.0


def _cosine(progress: float) -> float:
    """Half cosine from 1 (progress 0) to 0 (progress 1)."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _cosine_lr(step: int, base_lr: float, cfg: ScheduleConfig, total: int) -> float:
    # transformers' get_cosine_schedule_with_warmup, floored by rescaling into [min_lr_ratio, 1] (as its
    # get_cosine_with_min_lr_schedule_with_warmup does); progress is clamped at 1 so the LR holds its final
    # value past `total` instead of climbing the next half-cycle.
    if step < cfg.warmup_steps:
        return base_lr * _warmup_factor(step, cfg.warmup_steps)
    progress = _clamp01((step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    factor = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * cfg.num_cycles * progress)))
    return base_lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


def wsd_decay_steps(cfg: ScheduleConfig, total: int) -> int:
    """Length of the WSD cooldown: cfg.decay_steps, or 20% of the horizon, at most the steps after warm-up
    (so the LR reaches its floor at `total`; an explicit decay_steps longer than that is refused when the
    recipe loads, see `check_lr_schedule`), and at least one step."""
    if cfg.decay_steps is not None:
        return max(1, cfg.decay_steps)
    return max(1, min(round(0.2 * total), total - cfg.warmup_steps))


def _wsd_lr(step: int, base_lr: float, cfg: ScheduleConfig, total: int) -> float:
    # Warm-up, stable at the peak, then a cooldown over the last `decay_steps` steps of the horizon
    # (Hu et al. 2024, MiniCPM; cooldown shapes as in Hägele et al. 2024 / Dremov et al. 2025).
    if step < cfg.warmup_steps:
        return base_lr * _warmup_factor(step, cfg.warmup_steps)
    decay = wsd_decay_steps(cfg, total)
    decay_start = max(cfg.warmup_steps, total - decay)
    progress = _clamp01((step - decay_start) / decay)
    if cfg.decay_shape == "linear":
        factor = 1.0 - progress
    elif cfg.decay_shape == "cosine":
        factor = _cosine(progress)
    else:  # 1-sqrt
        factor = 1.0 - math.sqrt(progress)
    return base_lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


def _infinite_lr(step: int, base_lr: float, cfg: ScheduleConfig) -> float:
    # Singh et al. 2025 (arXiv 2503.02844): linear warm-up to η_max over N_w; cosine cooldown from η_max to
    # η_const over N_c; plateau at η_const; from N_d, η = η_const · (η_min / η_const)^((n − N_d) / t_a),
    # reaching η_min at N_d + t_a and staying there.
    if cfg.anneal_start is not None and step >= cfg.anneal_start:
        # Anneal from the LR the schedule has at N_d: η_const when N_d is on the plateau (the paper's
        # setting); an earlier N_d anneals from wherever warm-up / cooldown had got to, without a jump.
        eta_start = _pre_anneal_lr(cfg.anneal_start, base_lr, cfg)
        eta_min = cfg.min_lr_ratio * base_lr
        if eta_start <= 0.0:  # N_d = 0 with warm-up: nothing to anneal from
            return eta_min
        fraction = min(1.0, (step - cfg.anneal_start) / cfg.anneal_steps)
        return eta_start * (eta_min / eta_start) ** fraction
    return _pre_anneal_lr(step, base_lr, cfg)


def _pre_anneal_lr(step: int, base_lr: float, cfg: ScheduleConfig) -> float:
    """Warm-up, cosine cooldown and plateau of the infinite schedule (no annealing)."""
    if step < cfg.warmup_steps:
        return base_lr * _warmup_factor(step, cfg.warmup_steps)
    eta_const = cfg.const_lr_ratio * base_lr
    since = step - cfg.warmup_steps
    if since < cfg.cooldown_steps:
        return eta_const + (base_lr - eta_const) * _cosine(since / cfg.cooldown_steps)
    return eta_const


def lr_at(step: int, base_lr: float, cfg: ScheduleConfig, max_steps: int) -> float:
    """The learning rate of optimiser step `step` (0-based).

    Args:
        step: optimiser step, >= 0.
        base_lr: the peak LR (optim.lr), η_max.
        cfg: the schedule (name constant, cosine, wsd or infinite) and its parameters.
        max_steps: train.max_steps, the horizon of cosine / wsd when cfg.total_steps is null.

    Returns:
        The LR as a float.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    total = cfg.total_steps if cfg.total_steps is not None else max_steps
    if cfg.name == "constant":
        return base_lr * _warmup_factor(step, cfg.warmup_steps)
    if cfg.name == "cosine":
        return _cosine_lr(step, base_lr, cfg, total)
    if cfg.name == "wsd":
        return _wsd_lr(step, base_lr, cfg, total)
    if cfg.name == "infinite":
        return _infinite_lr(step, base_lr, cfg)
    raise ValueError(f"unknown LR schedule {cfg.name!r}; allowed: constant, cosine, wsd, infinite")


def share_at(step: int, share: float | ShareScheduleConfig) -> float:
    """A stream's token share at optimiser step `step`.

    Args:
        step: optimiser step, >= 0.
        share: a fixed share, or a schedule: constant (start); linear start → end over `steps`, then end;
            cosine start → end over `steps` (half cosine), then end; stages [[from_step, share], ...]
            piecewise constant.

    Returns:
        The (relative, unnormalised) share as a float.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not isinstance(share, ShareScheduleConfig):
        return float(share)
    if share.name == "constant":
        return float(share.start)
    if share.name in ("linear", "cosine"):
        progress = _clamp01(step / share.steps)
        weight = progress if share.name == "linear" else 1.0 - _cosine(progress)
        return float(share.start + (share.end - share.start) * weight)
    if share.name == "stages":
        value = share.stages[0][1]
        for from_step, stage_share in share.stages:
            if step >= from_step:
                value = stage_share
            else:
                break
        return float(value)
    raise ValueError(f"unknown share schedule {share.name!r}; allowed: constant, linear, cosine, stages")
