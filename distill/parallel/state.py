"""Sharded state through torch.distributed.checkpoint (DCP): each rank reads and writes only its part.

- `load_model_files`: a model built on the meta device, sharded and materialised (`to_empty`), filled from a
  Hugging Face directory's safetensors, each rank reading only the rows of its shards.
- `save_checkpoint` / `load_checkpoint`: a checkpoint's `model/` and `optimizer/` DCP directories (`.metadata`
  plus one `__<rank>_0.distcp` a rank, written in parallel). They take FSDP2 models (DTensor shards) and
  whole ones alike (one process, data parallel: replicated tensors are written once); reading on another
  number of processes reshards.
- `checkpoint_keys`: the tensor names a sharded checkpoint holds, read from its metadata alone.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from distill.files import CheckpointError
from distill.model.load import refresh_inv_freq

logger = logging.getLogger(__name__)

MODEL_DIR, OPTIMIZER_DIR = "model", "optimizer"
"""The two DCP directories of a sharded checkpoint."""


def is_sharded_checkpoint(path: str) -> bool:
    """Whether `path` is a checkpoint in the sharded format (a DCP `model/` directory)."""
    return os.path.isfile(os.path.join(path, MODEL_DIR, ".metadata"))


def tied_aliases(model: nn.Module) -> set[str]:
    """State-dict keys whose tensor another key already holds (a tied lm_head): the files hold it once."""
    seen, aliases = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def _dcp_load(state: dict, what: str, **kwargs) -> None:
    """`dcp.load` in place, its failures (a missing tensor, another shape, a damaged file) one CheckpointError
    line. (DCP raises CheckpointException, a BaseException, carrying every rank's failure.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, **kwargs)
    except (CheckpointException, RuntimeError, ValueError, KeyError, FileNotFoundError) as err:
        failures = getattr(err, "failures", None)
        first = next(iter(failures.values())) if failures else err
        lines = [line for line in str(first).strip().splitlines() if line.strip()]
        raise CheckpointError(f"{what}: {(lines[-1] if lines else type(first).__name__)[:200]}") from None


def load_model_files(model: nn.Module, directory: str) -> None:
    """Fill a (sharded, materialised) model from a Hugging Face directory's safetensors files. Each rank reads
    only the rows of its own shards (DCP's HuggingFaceStorageReader slices the memory-mapped files), plain
    tensors (the teacher's replicated shell) whole; bf16 files fill fp32 masters (the copy casts). A tied
    lm_head is read once, as the embedding it is.

    Raises:
        CheckpointError: a tensor the model holds is missing from the files, or has another shape.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    aliases = tied_aliases(model)
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    _dcp_load(state, f"{directory}: cannot load its safetensors into the model",
              storage_reader=HuggingFaceStorageReader(directory))


def resharded(model: nn.Module) -> None:
    """Every FSDP2 unit back to its shards. A unit kept gathered after a forward (the student's root, until
    its backward) exposes its full unsharded tensors as its parameters meanwhile, which are neither what a
    checkpoint holds nor the tensors the optimiser steps."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Write the sharded model and optimiser states into `directory`/model and `directory`/optimizer, every
    rank its own part at once (DCP; one file a rank, replicated pieces written once). Every rank calls it.

    An optimiser that has not stepped yet (every step so far skipped) has no state, and no `optimizer/` is
    written: torch's state-dict helpers would first create its state with a zero-LR step, which counts as
    a step in AdamW's bias correction."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    resharded(model)
    dcp.save(get_model_state_dict(model), checkpoint_id=os.path.join(directory, MODEL_DIR))
    if optimizer.state:
        optim_state = get_optimizer_state_dict(model, optimizer)
        dcp.save(optim_state, checkpoint_id=os.path.join(directory, OPTIMIZER_DIR))


def _saved_state_names(directory: str) -> set[str]:
    """The flattened keys of a DCP directory (`state.<fqn>.exp_avg`, ...; from `.metadata` alone)."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(directory).read_metadata().state_dict_metadata)


def load_checkpoint(model: nn.Module, directory: str, optimizer: torch.optim.Optimizer | None = None,
                    weights: bool = True) -> None:
    """Read a sharded checkpoint into the (sharded or whole) model (`weights`) and, if given, its optimiser;
    each rank reads what it holds, resharding when the checkpoint was written by another number of
    processes. Parameters the saved optimiser had no state for (never reached by a loss) get none here
    either. Every rank calls it.

    Raises:
        CheckpointError: the checkpoint is another model's (a missing key, another shape) or damaged.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    resharded(model)
    if weights:
        # In place, into the tensors the model holds (its own shards): the optimiser keeps pointing at them.
        # (set_model_state_dict would swap FSDP2's parameters for new ones.)
        state = get_model_state_dict(model)
        _dcp_load(state, f"{directory}: not this model's checkpoint (check train.resume / train.init_from "
                         f"and model.path)", checkpoint_id=os.path.join(directory, MODEL_DIR))
    optim_dir = os.path.join(directory, OPTIMIZER_DIR)
    if optimizer is None or not os.path.isdir(optim_dir):  # none saved: the optimiser had not stepped
        return
    saved = _saved_state_names(optim_dir)
    # A template to read into: torch creates every parameter's state (a zero-LR step, weights unchanged);
    # the state of a parameter the checkpoint has none for is dropped again.
    state = get_optimizer_state_dict(model, optimizer)
    state["state"] = {fqn: entry for fqn, entry in state["state"].items()
                      if all(f"state.{fqn}.{key}" in saved for key in entry)}
    _dcp_load(state, f"{directory}: cannot read its optimiser state", checkpoint_id=optim_dir)
    set_optimizer_state_dict(model, optimizer, state)


def refill_buffers(model: nn.Module) -> None:
    """After `to_empty`, the buffers no file holds (RoPE's inv_freq, non-persistent) are garbage: recompute
    them from the config (the recipe's RoPE for the student).

    Raises:
        RuntimeError: the model has a non-persistent buffer we do not know how to rebuild.
    """
    known = {"inv_freq", "original_inv_freq"}
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            if name not in known and module._buffers.get(name) is not None:
                raise RuntimeError(f"{type(module).__name__}.{name}: a non-persistent buffer the sharded "
                                   f"load cannot rebuild after to_empty")
    for line in refresh_inv_freq(model):
        logger.debug(line)


def checkpoint_keys(directory: str) -> list[str]:
    """The model tensor names a sharded checkpoint holds (from `model/.metadata`; no tensor is read)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(os.path.join(directory, MODEL_DIR)).read_metadata()
    return sorted(metadata.state_dict_metadata)
