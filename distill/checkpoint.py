"""Atomic checkpoints, retention, automatic resume and preemption signals.

Layout: `<output_dir>/checkpoints/step-N/` with
    model.safetensors   the student's weights
    optimizer.pt        the optimiser state (tensors only; loaded with weights_only=True)
    state.json          step, tokens, mixture cursors, LR-schedule position, wandb id, counters
    rng-<rank>.pt       torch / numpy / python RNG states of each rank
    COMPLETE            written last: the sizes of every file above (a checkpoint without it is incomplete)
A checkpoint is written into `step-N.tmp-<pid>` and renamed once complete, so a kill at any moment leaves
either the previous checkpoints or a complete new one; older ones are deleted only after that.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal

import numpy as np
import torch
from safetensors.torch import load_model, save_file, save_model

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on a signal after a checkpoint; run the same command again"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (one line for the user)."""


def step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, path) of every finished-looking step-N directory, newest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


def verify(path: str) -> str | None:
    """None if the checkpoint is complete and undamaged, else the reason it is not."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return "no completion marker"
    try:
        with open(marker, encoding="utf-8") as f:
            sizes = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return "unreadable completion marker"
    for name, size in sizes.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"missing {name}"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, expected {size} (truncated?)"
    return None


def latest(root: str) -> str | None:
    """The newest complete checkpoint under root, passing over incomplete or damaged ones with a warning."""
    for _, path in step_dirs(root):
        reason = verify(path)
        if reason is None:
            return path
        logger.warning("passing over checkpoint %s: %s", path, reason)
    return None


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Tensors and plain tuples only, so the file loads with weights_only=True.
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def save(root: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
         rank: int, world: int, barrier, model_state: dict | None = None, optim_state: dict | None = None) -> str:
    """Write checkpoint step-`step` atomically; every rank calls this (each saves its own RNG state).

    `model_state` / `optim_state`: full state dicts gathered from a sharded model (FSDP2), written by rank 0
    instead of the model's and optimiser's own; the format is the same either way.
    """
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f"step-{step}.tmp")
    error = None
    try:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
    except OSError as err:
        error = err
    barrier()
    try:
        if error is None:
            torch.save(_rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
            if rank == 0:
                if model_state is not None:
                    save_file({k: v.contiguous() for k, v in model_state.items()},
                              os.path.join(tmp, "model.safetensors"))
                else:
                    save_model(_unwrap(model), os.path.join(tmp, "model.safetensors"))
                torch.save(optim_state if optim_state is not None else optimizer.state_dict(),
                           os.path.join(tmp, "optimizer.pt"))
                with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
                    json.dump({**state, "step": step, "world_size": world}, f, indent=1)
    except OSError as err:
        error = err
    barrier()
    if rank == 0 and error is None:
        try:
            files = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
                json.dump({"files": files}, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # a stale copy of the same step (e.g. a replayed save)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as err:
            error = err
    if error is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {error.strerror or error} "
                              f"(existing checkpoints are untouched)")
    barrier()
    return final


def prune(root: str, keep_last: int, keep_every: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, keeping multiples of `keep_every`."""
    complete = [(s, p) for s, p in step_dirs(root) if verify(p) is None]
    for i, (step, path) in enumerate(complete):
        if i < keep_last or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.endswith(".tmp"):  # left by a killed save
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, rank: int) -> dict:
    """Restore weights (and optimiser, RNG) from a complete checkpoint; returns its state.json."""
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"{path}: not a usable checkpoint ({reason})")
    load_model(_unwrap(model), os.path.join(path, "model.safetensors"))
    state = read_state(path)
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer(path))
        load_rng(path, rank)
    return state


def read_state(path: str) -> dict:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def read_optimizer(path: str) -> dict:
    return torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)


def load_rng(path: str, rank: int) -> None:
    """Restore this rank's RNG states (a rank the checkpoint did not have keeps its own)."""
    rng_file = os.path.join(path, f"rng-{rank}.pt")
    if os.path.isfile(rng_file):
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(rng["python"])


def _unwrap(model):
    return getattr(model, "module", model)


class PreemptionFlag:
    """SIGUSR1 / SIGTERM set a flag; the loop checks it (agreed across ranks) at each step boundary."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.signum = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None
