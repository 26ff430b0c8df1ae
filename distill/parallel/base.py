"""The processes of a run and the interface every parallel mode implements.

A `Strategy` owns the student, the teacher and the optimiser once they are set up, and is the only place
that knows how a mode moves tensors between ranks. The step (distill.train.step) and the run (distill.train)
call
it the same way in every mode:

    strategy.setup(student, teacher, optim_cfg, dtype)        # shard / wrap, build the optimiser
    slots = strategy.assign(plan, cost)                        # this rank's micro-batches of the step
    out = strategy.forward(input_ids=..., ...)                 # the student's forward
    weight = strategy.output_weight()                          # lm_head weight for the chunked losses
    strategy.backward(loss, last=...)                          # per micro-batch
    strategy.reduce_gradients()                                # once: gradients SUMMED over ranks
    norm = strategy.clip(max_norm)                             # global norm before clipping (all ranks)
    strategy.step() or strategy.skip_step(); strategy.zero_grad()
    strategy.model_state_dict() / optimizer_state_dict()       # full state dicts on rank 0 (all ranks call)
    strategy.load_optimizer_state(read)                        # read() on the ranks that need the file
    strategy.save_state(dir) / load_state(dir)                 # sharded checkpoints: each rank its part

A mode with `loads_sharded` takes models built on the meta device in `setup` and fills them with
`load_weights(student_source, teacher_source)`, each rank reading only what it holds.

Loss semantics are the same everywhere: every micro-batch's loss sums are divided by GLOBAL token counts
(over micro-batches and ranks), so gradients are summed, never averaged, over ranks.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from distill.data.mixture import MicroBatch, Slot, shard, shard_aligned
from distill.optim.localise import lr_scales_by_param
from distill.optim.optimizer import clip_grad_norm, keep_kernel
from distill.parallel.state import load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


class Processes:
    """Rank, world and the few collectives the loop needs (sums over ranks; no-ops on one process)."""

    def __init__(self, timeout_s: float | None = None):
        """Args: timeout_s: the process group's collective timeout (parallel.collective_timeout_s); None:
        torch's default."""
        import datetime

        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        handlers = [] if timeout_s is None else [InitProcessGroupKwargs(
            timeout=datetime.timedelta(seconds=float(timeout_s)))]
        self.timeout_s = timeout_s
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether any rank passed True (a collective: every rank calls it)."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return self.all_reduce(value, op="max").item() > 0

    def gather_objects(self, obj) -> list:
        """`obj` of every rank, in rank order (a collective)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()


def move_plain_tensors(model: nn.Module, device: torch.device,
                       sharded: Callable[[nn.Parameter], bool]) -> None:
    """Move, in place, the parameters a sharding left as plain tensors (those `sharded` says it does not hold)
    and every buffer to `device`: what stays replicated after a strategy moved its own shards there."""
    with torch.no_grad():
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None and not sharded(param) and param.device != device:
                    param.data = param.data.to(device)
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)


def global_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class Strategy(abc.ABC):
    """The interface of a parallel mode; the defaults are those of a whole (unsharded) student. The abstract
    methods are what a mode must define: how it lays the models out and how its gradients and state move."""

    name = "base"
    aligned = False
    """Whether every rank must run the same sequence of stream kinds in a step (sharded modes: each forward
    and backward issues collectives), padded with dummy micro-batches."""
    sharded = False
    """Whether the student's parameters are split over ranks (no whole model on any one process)."""
    loads_sharded = False
    """Whether `setup` takes models built on the meta device and `load_weights` then fills each rank's part
    (else the models arrive whole, with their weights)."""
    checkpoint_format = "full"
    """full: rank 0 writes the gathered state (model.safetensors, optimizer.pt); sharded: every rank writes
    its own part in parallel (`save_state`, DCP)."""
    replicate = 1
    """parallel.replicate: replicas of the sharded state (HSDP; FSDP2 only)."""

    def __init__(self, procs: Processes, gradient_sync: str = "micro_batch", sequence_parallel: int = 1):
        self.procs = procs
        self.gradient_sync = gradient_sync
        self.sequence_parallel = sequence_parallel
        self.sequence = None  # a distill.parallel.ulysses.SequenceParallel once set up with S > 1
        self.sequence_mode = "ulysses"  # parallel.sequence_parallel_mode: ulysses | ring | hybrid
        self.ring_degree = 1  # parallel.ring_degree (hybrid)
        self.split: dict[str, int] = {}  # {stream: S} for the streams split along the sequence
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []
        self.layer_scales: dict | None = None
        """optim.layers: traced with lr_scale: {decoder layer: LR factor}, set before `setup`."""

    def param_scales(self, student: nn.Module) -> dict[int, float] | None:
        """{id(parameter): LR factor} of `layer_scales` over the student's parameters as they are now (after
        sharding, which replaces the parameter objects but keeps their names)."""
        if self.layer_scales is None:
            return None

        return lr_scales_by_param(student, self.layer_scales)

    # -- set-up ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, student: nn.Module, teacher: nn.Module | None, optim_cfg, dtype: torch.dtype) -> None:
        """Take the whole student (weights loaded) and teacher, shard them as the mode does, build AdamW."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One log line: the mode and how the models are laid out."""

    # -- the plan --------------------------------------------------------------------------------------
    def assign(self, plan: list[MicroBatch], cost: dict[str, int]) -> list[Slot]:
        """This rank's micro-batches of the step's global plan."""
        if self.aligned:
            return shard_aligned(plan, self.procs.rank, self.procs.world, self.split)
        return shard(plan, self.procs.rank, self.procs.world, cost)

    # -- one micro-batch -------------------------------------------------------------------------------
    def forward(self, **inputs):
        """The student's forward through its root module (sharded modes gather embeddings and lm_head
        there)."""
        return self.student(**inputs)

    def output_weight(self) -> torch.Tensor:
        """The student's full lm_head weight for the chunked losses (valid after this micro-batch's
        forward)."""
        return self.student.get_output_embeddings().weight

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Back-propagate one micro-batch's loss (`last`: the step's last micro-batch on this rank)."""
        del last
        loss.backward()

    # -- the end of a step -----------------------------------------------------------------------------
    @abc.abstractmethod
    def reduce_gradients(self) -> None:
        """Once per step, after the last backward: leave every rank with gradients summed over ranks."""

    def clip(self, max_norm: float) -> float:
        """Clip the summed gradients to `max_norm` (0: no clipping); returns the global norm before clipping
        (a collective in sharded modes: every rank calls it)."""
        return clip_grad_norm(self.params, max_norm)

    def set_lr(self, lr: float) -> None:
        """Every group's LR: `lr` times the group's `lr_scale` (optim.layers: traced, lr_scale), else 1."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # -- per-part gradient norms (log.layer_grad_every) ------------------------------------------------
    can_stash = True
    """Whether the summed gradients can be set aside and added back (`stash_gradients`), as plain or DTensor
    `.grad`s can; ZeRO-3 keeps its gradients inside DeepSpeed's partitions."""

    def _local_grad(self, param: nn.Parameter) -> torch.Tensor | None:
        """This rank's piece of the parameter's summed gradient (the whole gradient when not sharded)."""
        g = param.grad
        return g.to_local() if g is not None and hasattr(g, "to_local") else g

    def grad_norms(self, groups: dict[str, list[nn.Parameter]]) -> dict[str, float]:
        """The 2-norm of each group's summed gradients, after `reduce_gradients`: sums of squares over this
        rank's pieces, reduced over ranks when sharded (a collective then: every rank calls it)."""
        sums = torch.zeros(len(groups), dtype=torch.float64, device=self.procs.device)
        for k, params in enumerate(groups.values()):
            for p in params:
                g = self._local_grad(p)
                if g is not None and g.numel():
                    sums[k] += g.detach().double().pow(2).sum()
        if self.sharded:
            sums = self.procs.all_reduce(sums)
        return {name: float(v) ** 0.5 for name, v in zip(groups, sums.cpu().tolist())}

    def stash_gradients(self, stash: dict | None) -> dict:
        """Set the gradients so far aside (added to `stash`), leaving none: the next backward starts
        afresh."""
        stash = {} if stash is None else stash
        for p in self.params:
            if p.grad is not None:
                stash[id(p)] = (p, p.grad if id(p) not in stash else stash[id(p)][1].add_(p.grad))
                p.grad = None
        return stash

    def restore_gradients(self, stash: dict | None) -> None:
        """Add the stashed gradients back."""
        for p, g in (stash or {}).values():
            p.grad = g if p.grad is None else p.grad.add_(g)

    def step(self) -> None:
        self.optimizer.step()

    def skip_step(self) -> None:
        """Discard this step's gradients (non-finite loss or norm) without touching weights or moments."""

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # -- state -----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's full state dict, CPU tensors on rank 0 ({} elsewhere). Every rank calls it."""

    @abc.abstractmethod
    def optimizer_state_dict(self) -> dict:
        """The optimiser state as an unsharded AdamW(param_groups(student)) gives it, on rank 0 ({}
        elsewhere). Every rank calls it."""

    builds_on_meta = True
    """With `loads_sharded`: whether the models arrive built on the meta device (FSDP2), or built already
    partitioned inside `building` (ZeRO-3, which needs the weights of model.path read as it builds)."""

    def building(self, trainable: bool, dtype: torch.dtype):
        """The context the sharded load builds a model in (`trainable`: the student; `dtype`: its parameters'
        dtype); nothing by default."""
        del trainable, dtype
        return contextlib.nullcontext()

    # A mode with `loads_sharded` also defines `load_weights(student_source, teacher_source)`, which fills
    # the models `setup` laid out; one with `streams_export` defines `export_tensors()` ({name: (shape,
    # dtype)}, an iterator of (name, full tensor)). The loop calls them only under those flags.
    streams_export = False
    """Whether `export_tensors` gathers the student one tensor at a time for a streamed export."""

    def save_state(self, directory: str) -> None:
        """Write the student and optimiser states as a sharded checkpoint's DCP directories (every rank)."""
        save_checkpoint(self.student, self.optimizer, directory)

    def load_state(self, directory: str) -> None:
        """Read the optimiser state of a sharded checkpoint (the weights are already loaded); every rank."""
        load_checkpoint(self.student, directory, self.optimizer, weights=False)
        keep_kernel(self.optimizer)

    @abc.abstractmethod
    def load_optimizer_state(self, read: Callable[[], dict]) -> None:
        """Load an unsharded-format optimiser state; `read()` returns it (called on the ranks that need the
        file: all of them when replicated, rank 0 when sharded). Every rank calls this."""
