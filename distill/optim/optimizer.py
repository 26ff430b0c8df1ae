"""The optimiser: AdamW over decayed and undecayed parameter groups, with the kernel the recipe asks for."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float,
                 lr_scales: dict[int, tuple[int, float]] | None = None) -> list[dict]:
    """Decay matrices; leave norms, biases and other 1-D parameters undecayed. Frozen parameters are left
    out: they hold no optimiser state.

    The order of the parameters (groups, then `named_parameters` order) is the numbering of the optimiser's
    state_dict, which every parallel mode keeps so checkpoints move between them.

    Args:
        lr_scales: {id(parameter): (decoder layer, LR factor)} (optim.layers: traced, lr_scale): each of the
            two groups is cut into runs of consecutive parameters of one layer, each run a group with
            `layer` and `lr_scale` (`Strategy.set_lr` multiplies by it; a new measurement rewrites it); the
            parameters outside `lr_scales` get layer None and factor 1. The parameters keep their order,
            hence their numbering.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # A ZeRO-3 partitioned parameter is a flat empty tensor: its shape is ds_shape.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    if lr_scales is None:
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = []
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        start = len(groups)
        for p in params:
            layer, scale = lr_scales.get(id(p), (None, 1.0))
            if len(groups) > start and groups[-1]["layer"] == layer:
                groups[-1]["params"].append(p)
            else:
                groups.append({"params": [p], "weight_decay": wd, "layer": layer, "lr_scale": float(scale)})
    return groups


def rescale(optimizer: torch.optim.Optimizer, scales: dict) -> None:
    """Set each layer group's `lr_scale` from {layer: factor} (a new traced measurement)."""
    by_layer = {int(k): float(v) for k, v in scales.items()}
    for group in optimizer.param_groups:
        if group.get("layer") is not None:
            group["lr_scale"] = by_layer.get(group["layer"], 1.0)


def make_optimizer(model: torch.nn.Module, optim_cfg, sharded: bool,
                   lr_scales: dict[int, tuple[int, float]] | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the kernel `optim.implementation` asks for (see OptimConfig): auto is
    fused for a whole model, torch's default over sharded (DTensor / partitioned) parameters."""
    kind = optim_cfg.implementation
    if kind == "auto":
        kind = "default" if sharded else "fused"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False},
             "default": {}}[kind]
    return torch.optim.AdamW(param_groups(model, optim_cfg.weight_decay, lr_scales), lr=optim_cfg.lr,
                             betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, **flags)


def keep_kernel(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict`: keep the kernel this run chose (`optim.implementation`), not the one saved in
    the checkpoint's param groups (load_state_dict copies their fused / foreach flags); a fused kernel
    wants fp32 `step` tensors on the parameters' device."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = optimizer.defaults["fused"], optimizer.defaults["foreach"]
        if group.get("fused"):
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip in place like `torch.nn.utils.clip_grad_norm_` (`max_norm` 0: no clipping); returns the global
    total norm before clipping, as a float.

    Under FSDP2 the gradients are DTensor shards: torch's clip computes their norm as a DTensor with a pending
    reduction, which `full_tensor()` finishes (a collective: every rank calls this). Plain gradients give
    exactly torch's result.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    total = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return float(total)  # a sync point
