"""Atomic checkpoints, the training state, retention, automatic resume, the run lock and preemption signals.

Layout: `<output_dir>/checkpoints/step-N/` with, in the sharded modes (FSDP2, HSDP):
    model/, optimizer/  the student's weights and AdamW state, each a torch.distributed.checkpoint directory:
                        `.metadata` and one `__<rank>_0.distcp` a rank, every rank writing its part at once
                        (`distill.parallel.state`); a resume on another number of processes reshards
in ZeRO-3, the engine's own checkpoint (`distill.model.zero_checkpoint`), every rank writing its part at once:
    zero/state/, zero/layout.json   each rank's partition of the weights and AdamW's moments; the
                        same number of processes resumes through the engine, another number (or another
                        mode) reads it converted to the full formats on rank 0
and in the other modes (one process, data parallel), written by rank 0:
    model.safetensors   the student's full weights
    optimizer.pt        the optimiser state of an unsharded AdamW (tensors only; weights_only=True loads it)
and in both:
    config.json, tokenizer files   the student's config (extended RoPE, fp32) and tokenizer: the directory
                        loads with from_pretrained and scripts/evaluate.py --model like an export (a sharded
                        one is first consolidated into model.safetensors beside it, once:
                        `distill.model.export.consolidate`, a ZeRO-3 one too)
    state.json          `TrainState`: step, tokens, mixture cursors, LR, wandb id, counters
    rng-<rank>.pt       torch / numpy / python RNG states of each rank
    COMPLETE            written last: the sizes of every file above, the DCP files included (a checkpoint
                        without it is incomplete)
A checkpoint is written into `step-N.tmp` and renamed once complete (`distill.files.replace_dir`), so a kill
at any moment leaves either the previous checkpoints or a complete new one; older ones are deleted only
after that.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.config import ConfigError
from distill.files import CheckpointError, file_sizes, replace_dir
from distill.model.zero_checkpoint import is_zero_checkpoint, zero_optimizer, zero_weights
from distill.parallel.state import is_sharded_checkpoint, load_checkpoint

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on a signal after a checkpoint; run the same command again"
_STEP_DIR = re.compile(r"^step-(\d+)$")


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


@dataclasses.dataclass
class TrainState:
    """Everything besides the weights and the optimiser that a resumed run needs, saved and loaded as one
    object (state.json): the step reached, tokens trained on, counters, the LR of the last step, the wandb
    run id and the data plan's cursors (`mixture`, a distill.data.mixture.Mixture)."""

    mixture: object
    step: int = 0
    tokens: int = 0
    nonfinite_total: int = 0
    skipped_rows: int = 0
    wandb_id: str | None = None
    lr: float = 0.0
    layer_trace: dict | None = None
    """optim.layers: traced: the last measurement (`distill.optim.localise.layer_plan`), reused on resume."""

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "nonfinite_total": self.nonfinite_total,
                "skipped_rows": self.skipped_rows, "wandb_id": self.wandb_id, "lr": self.lr,
                "mixture": self.mixture.state_dict(), "layer_trace": self.layer_trace}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.skipped_rows = int(state.get("skipped_rows", 0))
        self.wandb_id, self.lr = state.get("wandb_id"), float(state.get("lr", 0.0))
        self.layer_trace = state.get("layer_trace")
        self.mixture.load_state_dict(state["mixture"])


def _untied(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with a private copy of any tensor another key already holds (tied embeddings):
    safetensors refuses tensors that share memory."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().to("cpu").contiguous()
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        if ptr is not None and ptr in seen:
            value = value.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = value
    return out


def save(root: str, step: int, strategy, state: TrainState, procs,
         model_files: Callable[[str], None] | None = None) -> str:
    """Write checkpoint step-`step` atomically; every rank calls this (the strategy gathers full state dicts
    with collectives; each rank saves its own RNG state; rank 0 writes the rest). After each phase the ranks
    agree on whether any of them failed (`procs.any`), so a failure anywhere stops every rank with one line
    and none waits for the others forever.

    Args:
        model_files: called on rank 0 with the checkpoint's directory to write what makes model.safetensors
            a Hugging Face model directory (config.json, tokenizer:
            `distill.model.export.write_model_files`)."""
    rank = procs.rank
    sharded = strategy.checkpoint_format == "sharded"
    model_state = optim_state = None
    if not sharded:
        model_state = strategy.model_state_dict()  # full, on rank 0 ({} elsewhere)
        optim_state = strategy.optimizer_state_dict()
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f"step-{step}.tmp")
    error: OSError | None = None

    def stop_if_any_failed() -> None:
        if procs.any(error is not None):
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = (error.strerror or str(error)) if error is not None else "a write failed on another rank"
            raise CheckpointError(f"cannot write checkpoint {final}: {reason} (existing checkpoints are "
                                  f"untouched)")

    try:
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
    except OSError as err:
        error = err
    stop_if_any_failed()
    if sharded:  # every rank writes its own part, at once (collectives: a failure raises on every rank)
        try:
            strategy.save_state(tmp)
        except Exception as err:  # noqa: BLE001 - DCP wraps a rank's OSError in a CheckpointException
            error = err if isinstance(err, OSError) else OSError(str(err).strip().splitlines()[-1][:200])
    stop_if_any_failed()
    try:
        torch.save(_rng_state(), os.path.join(tmp, f"rng-{rank}.pt"))
        if rank == 0:
            if not sharded:
                save_file(_untied(model_state), os.path.join(tmp, "model.safetensors"),
                          metadata={"format": "pt"})
                torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
            if model_files is not None:
                model_files(tmp)
            with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
                json.dump({**state.state_dict(), "step": step, "world_size": procs.world}, f, indent=1)
    except OSError as err:
        error = err
    stop_if_any_failed()
    if rank == 0:
        try:
            files = file_sizes(tmp)
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
                json.dump({"files": files}, f)
                f.flush()
                os.fsync(f.fileno())
            replace_dir(tmp, final)  # the same step saved again (e.g. replayed) is kept until replaced
        except OSError as err:
            error = err
    stop_if_any_failed()
    return final


def prune(root: str, keep_last: int, keep_every: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, keeping multiples of `keep_every`."""
    complete = [(s, p) for s, p in step_dirs(root) if verify(p) is None]
    for i, (step, path) in enumerate(complete):
        if i < keep_last or (keep_every and step % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.endswith((".tmp", ".old")):  # left by a killed save
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_weights(path: str, model: torch.nn.Module) -> dict:
    """Load a complete checkpoint's weights into a whole (unsharded) model; returns its state.json. Every
    rank calls it (a sharded checkpoint is read through DCP: each rank reads the whole model here)."""
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"{path}: not a usable checkpoint ({reason})")
    if is_sharded_checkpoint(path):
        load_checkpoint(model, path)
        return read_state(path)
    try:
        weights = zero_weights(path) if is_zero_checkpoint(path) else \
            load_file(os.path.join(path, "model.safetensors"))
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:  # missing / unexpected keys or other shapes: another model's checkpoint
        lines = str(err).strip().splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(err)
        raise CheckpointError(f"{path}: the weights of another model ({first[:160]}); check train.resume / "
                              f"train.init_from and model.path") from None
    return read_state(path)


def restore(path: str, strategy, state: TrainState, rank: int) -> None:
    """Resume from `path` once the weights are in and the strategy is set up: the optimiser (through the
    strategy: each rank its part of a sharded checkpoint), this rank's RNG states and the training state.
    Every rank calls it."""
    if is_sharded_checkpoint(path) or (is_zero_checkpoint(path) and strategy.name == "zero3"):
        strategy.load_state(path)
    else:  # a full checkpoint, or a ZeRO-3 one resumed in another mode (its optimiser converted)
        strategy.load_optimizer_state(lambda: read_optimizer(path))
    load_rng(path, rank)
    state.load_state_dict(read_state(path))


def resume_point(mode: str, output_dir: str) -> str | None:
    """The checkpoint a run resumes from (`train.resume`): auto = the newest complete one in output_dir,
    never = none, else the given path (which must be a complete checkpoint)."""
    if mode == "never":
        return None
    if mode == "auto":
        return latest(os.path.join(output_dir, "checkpoints"))
    reason = verify(mode) if os.path.isdir(mode) else "not a directory"
    if reason is not None:
        raise ConfigError(f"train.resume: '{mode}' is not a usable checkpoint ({reason})")
    return mode


def read_state(path: str) -> dict:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def read_optimizer(path: str) -> dict:
    """The unsharded-format optimiser state of a full checkpoint, or of a ZeRO-3 one (converted)."""
    if is_zero_checkpoint(path):
        return zero_optimizer(path)
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


# ---------------------------------------------------------------------------------------------------
# one run per output directory
# ---------------------------------------------------------------------------------------------------
class RunLockError(RuntimeError):
    """Another live run holds the output directory (one line: who, where, since when)."""


class RunLock:
    """`<output_dir>/.lock`: one run per output directory.

    The lock file holds the holder's host, pid, start time and SLURM job id; a daemon thread refreshes its
    mtime every `HEARTBEAT_S` seconds while the run lives. A lock is stale (taken over, with a warning) when
    its holder is provably gone: the same host and the pid is not running; the same SLURM job id (a requeued
    job is a new incarnation of the one that held it); or no heartbeat for `STALE_AFTER_S` seconds (a killed
    run on another host).
    """

    NAME = ".lock"
    HEARTBEAT_S = 30.0
    STALE_AFTER_S = 300.0

    def __init__(self, output_dir: str):
        import secrets

        self.path = os.path.join(output_dir, self.NAME)
        self.token = secrets.token_hex(8)  # this holder, whatever the host and pid
        self._stop = threading.Event()
        self._thread = None
        self.held = False

    def _me(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}

    def _stale_reason(self, holder: dict) -> str | None:
        if holder.get("host") == socket.gethostname():
            if holder.get("pid") == os.getpid():
                return "held by this process"
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return f"its process {holder['pid']} is gone"
            except (PermissionError, KeyError, TypeError, ValueError):
                pass
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job and \
                holder.get("slurm_restart_count") != os.environ.get("SLURM_RESTART_COUNT", "0"):
            return f"it was held by an earlier run of SLURM job {job} (requeued)"
        try:
            age = time.time() - os.path.getmtime(self.path)
        except OSError:
            return "it vanished"
        if age > self.STALE_AFTER_S:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self) -> None:
        """Take the lock or raise RunLockError naming the holder; a stale lock is taken over."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(self.path, encoding="utf-8") as f:
                        holder = json.load(f)
                except (OSError, ValueError):
                    holder = {}
                reason = self._stale_reason(holder)
                if reason is None:
                    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
                    raise RunLockError(
                        f"run.output_dir: {os.path.dirname(self.path)} is in use by another run (host "
                        f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
                        f"{holder.get('since', '?')}{job}); wait for it, or use another output_dir (if that "
                        f"run is dead, delete {self.path})") from None
                self._take_over(holder, reason)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._me(), f)
            self.held = True
            self._thread = threading.Thread(target=self._beat, name="distill-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunLockError(f"run.output_dir: cannot take the lock {self.path} (another run keeps taking it)")

    def _take_over(self, holder: dict, reason: str) -> None:
        """Move the stale lock aside (a rename: of two runs taking over at once, one moves it) and make sure
        what was moved is the holder judged stale; a fresh lock moved by mistake goes back."""
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run moved it first: race for the fresh lock
        try:
            with open(aside, encoding="utf-8") as f:
                moved = json.load(f)
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") != holder.get("token") or moved.get("pid") != holder.get("pid"):
            try:  # a live run's fresh lock: put it back where it was
                os.link(aside, self.path)
            except OSError:
                pass
            os.remove(aside)
            return
        logger.warning("taking over the lock %s: %s", self.path, reason)
        os.remove(aside)

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with open(self.path, encoding="utf-8") as f:
                mine = json.load(f).get("token") == self.token  # not the pid: pids repeat across hosts
        except (OSError, ValueError):
            mine = False
        if mine:
            os.remove(self.path)
        self.held = False
