"""Reading a ZeRO-3 training checkpoint in one process: the engine's own per-rank files converted to the
full formats the other modes use (a state dict of fp32 weights, an unsharded AdamW state dict).

A ZeRO-3 checkpoint holds, beside the files every checkpoint has (config.json, state.json, rng-<rank>.pt):
    zero/state/         `engine.save_checkpoint(zero/, tag="state")`, every rank writing its own part at once:
                        `zero_pp_rank_<r>_mp_rank_00_model_states.pt` (the parameter shapes, buffers, frozen
                        fragments) and `zero_pp_rank_<r>_mp_rank_00_optim_states.pt` (its flat fp32 partition
                        and AdamW's moments of that partition)
    zero/layout.json    the client AdamW's parameter order and group sizes (the ids of the unsharded format)
The same number of processes resumes through `engine.load_checkpoint`; anything else (another world size,
FSDP2, one process, scripts/evaluate.py) reads it converted here. The weights come from DeepSpeed's own
`zero_to_fp32` utilities; the moments are merged the same way (each rank's flat partition holds, per
parameter in turn, ceil(numel / world) elements, the last rank's padded), since DeepSpeed converts only the
weights.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os

import torch

from distill.files import CheckpointError

ZERO_DIR, TAG, LAYOUT = "zero", "state", "layout.json"
"""The subdirectory of a ZeRO-3 checkpoint, the engine's tag inside it, and our layout file beside the tag."""


def is_zero_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint in the ZeRO-3 format (the engine's files under zero/state/)."""
    return bool(glob.glob(os.path.join(path, ZERO_DIR, TAG, "*_optim_states.pt")))


def _optim_files(path: str) -> list[str]:
    files = glob.glob(os.path.join(path, ZERO_DIR, TAG, "*_optim_states.pt"))
    return sorted(files, key=lambda f: int(os.path.basename(f).split("_pp_rank_")[1].split("_")[0]))


def _model_files(path: str) -> list[str]:
    files = glob.glob(os.path.join(path, ZERO_DIR, TAG, "*_model_states.pt"))
    return sorted(files, key=lambda f: int(os.path.basename(f).split("_pp_rank_")[1].split("_")[0]))


def zero_world_size(path: str) -> int:
    """The number of processes that wrote the ZeRO-3 checkpoint `path` (one optimiser file each)."""
    return len(_optim_files(path))


def _torch_load(file: str) -> dict:
    """One of the engine's files, with weights_only=True: beside the tensors they hold two DeepSpeed
    objects, its ZeRO stage enum and its loss scaler (plain attributes), allowed by name and nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # optional: only ZeRO-3 checkpoints need it
    from deepspeed.runtime.zero.config import ZeroStageEnum

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)


def zero_weights(path: str, lazy: bool = False) -> dict:
    """The full fp32 state dict (parameters as trained, persistent buffers) of a ZeRO-3 checkpoint, through
    DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`; no process group needed. `lazy`: each parameter
    a DeepSpeed `GatheredTensor` (its `.shape`, `.dtype`; `.contiguous()` merges the ranks' pieces then), so
    a consolidation holds one output shard at a time.

    Raises:
        CheckpointError: files are missing or unreadable.
    """
    # optional: only ZeRO-3 checkpoints need DeepSpeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            return dict(get_fp32_state_dict_from_zero_checkpoint(os.path.join(path, ZERO_DIR), tag=TAG,
                                                                 lazy_mode=lazy))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read its ZeRO-3 weights: {str(err).splitlines()[0][:200]}") \
            from None


def zero_optimizer(path: str) -> dict:
    """The `state_dict()` an unsharded AdamW(param_groups(model)) would give for a ZeRO-3 checkpoint: each
    parameter's exp_avg / exp_avg_sq merged from every rank's flat partition (the layout
    `_zero3_merge_trainable_params` reads the fp32 weights with), ids in the client optimiser's order.

    Raises:
        CheckpointError: files are missing, or the partitions do not add up to the parameters.
    """
    layout_file = os.path.join(path, ZERO_DIR, LAYOUT)
    try:
        with open(layout_file, encoding="utf-8") as f:
            layout = json.load(f)
        ranks = [_torch_load(f)["optimizer_state_dict"] for f in _optim_files(path)]
        shapes = _torch_load(_model_files(path)[0])["param_shapes"]  # one {name: shape} per sub-group
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"{path}: cannot read its ZeRO-3 optimiser state: "
                              f"{str(err).splitlines()[0][:200]}") from None
    world = len(ranks)
    inner = [r["optimizer_state_dict"] for r in ranks]  # the client AdamW's state_dict, one per rank
    groups, first = [], 0
    for group, size in zip(inner[0]["param_groups"], layout["group_sizes"]):
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": list(range(first, first + size))})
        first += size
    if not inner[0]["state"]:  # never stepped (every step so far skipped): no state, as unsharded
        return {"state": {}, "param_groups": groups}
    steps = {float(s["step"]) for r in inner for s in r["state"].values()}
    if len(steps) != 1:
        raise CheckpointError(f"{path}: its ZeRO-3 partitions disagree on the AdamW step: {sorted(steps)}")
    full: dict[str, dict[str, torch.Tensor]] = {}
    for sub, names in enumerate(shapes):  # sub-group `sub` is the client optimiser's flat tensor `sub`
        offset = 0
        for name, shape in names.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            full[name] = {key: torch.cat([r["state"][sub][key][offset:offset + part] for r in inner])[:numel]
                          .reshape(shape).clone() for key in ("exp_avg", "exp_avg_sq")}
            offset += part
        if offset * world != sum(r["state"][sub]["exp_avg"].numel() for r in inner):
            raise CheckpointError(f"{path}: its ZeRO-3 optimiser partitions do not match its parameter "
                                  f"shapes")
    step = torch.tensor(steps.pop(), dtype=torch.float32)
    missing = [n for n in layout["order"] if n not in full]
    if missing:
        raise CheckpointError(f"{path}: its ZeRO-3 optimiser state has no moments for {missing[0]}")
    state = {pid: {"step": step.clone(), **full[name]} for pid, name in enumerate(layout["order"])}
    return {"state": state, "param_groups": groups}
