"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the student and the frozen teacher.

The data-parallel loop replicates the student and sums gradients after a step. Sharded, every forward and
backward issues collectives (all-gathers of each layer's parameters, reduce-scatters of its gradients, and
the teacher's all-gathers too), so every rank must run the SAME sequence of micro-batch kinds in a step:
`distill.data.mixture.shard_aligned` deals each stream's micro-batches round-robin and pads with dummies.

Gradient semantics match the DDP loop: losses are already divided by GLOBAL token counts, so gradients are
SUMMED over ranks (FSDP2 averages by default; `shard_student` sets a divide factor of 1 with sum-only
reductions). Gradients are reduce-scattered after every backward and accumulated into the sharded `.grad`
(exact accumulation; `parallel.gradient_sync: step` defers the reduction to the step's last micro-batch,
trading memory (unsharded gradients) for fewer collectives).

Loading and checkpoints are sharded as the engine means them to be (torch.distributed.checkpoint, DCP):
- the models are built on the meta device, sharded there, and `to_empty` allocates only this rank's shards;
  each rank then reads only its rows of the safetensors files (`load_model_files`, DCP's Hugging Face
  reader) or of a checkpoint (`load_checkpoint`), so no rank ever holds a whole model;
- a checkpoint is `model/` and `optimizer/`, each a DCP directory (`.metadata` + one `__<rank>_0.distcp` a
  rank, written in parallel); resuming on another number of processes reshards as it reads.
The full state dicts (`full_model_state_dict`, `full_optimizer_state_dict`) remain for the export and for
reading the checkpoints of the other modes. `FSDP2` is the strategy (distill.parallel.base) built from these
pieces.

HSDP (`parallel.replicate: R`): the mesh is 2-D, R replicas x world/R shards (`make_mesh`): the student's
state is sharded within each group of world/R consecutive ranks and replicated across groups (FSDP2 then
reduce-scatters inside a group and all-reduces across them); the teacher shards within the group alone.

Layout of the sharding (Llama / Mistral / Qwen2: `model.model.layers`):
- student: each decoder layer is one FSDP unit, the root (embeddings, final norm, lm_head) another. The
  loop must call the ROOT's forward (`student(..., logits_to_keep=1)`), not `student.get_decoder()(...)`:
  only the root's hooks gather the embeddings and lm_head, and the root keeps them gathered after forward,
  so `student.get_output_embeddings().weight` is the full weight for the chunked losses until backward ends.
- teacher: each decoder layer is one FSDP unit, resharded after its forward; embeddings, final norm and
  lm_head stay replicated, so `TruncatedTeacher` (a shallow copy of the decoder) works unchanged.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from distill.model.decoder import decoder_layers
from distill.optim.optimizer import keep_kernel, make_optimizer
from distill.parallel import ring, ulysses
from distill.parallel.base import Strategy, global_rank, move_plain_tensors
from distill.parallel.state import (
    is_sharded_checkpoint,
    load_checkpoint,
    load_model_files,
    refill_buffers,
    resharded,
    tied_aliases,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------------
def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (accelerate exports ACCELERATE_USE_FSDP=true from a config with
    `distributed_type: FSDP`, e.g. recipes/accelerate/fsdp2.yaml).

    Raises:
        ValueError: FSDP was asked for with `fsdp_version` other than 2 (FSDP_VERSION).
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true", "yes"):
        return False
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise ValueError(f"fsdp_config.fsdp_version: {version} is not supported; allowed: 2 "
                         f"(see recipes/accelerate/fsdp2.yaml)")
    return True


def reshard_after_forward_requested() -> bool:
    """The launcher's `fsdp_reshard_after_forward` (FSDP_RESHARD_AFTER_FORWARD; default true)."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("0", "false", "no")


def make_mesh(device: torch.device | str | None = None, replicate: int = 1):
    """The device mesh of the sharded state: 1-D over all ranks, or with `replicate` R > 1 the 2-D HSDP mesh
    (`dp_replicate` R, `dp_shard` world/R; a shard group is world/R consecutive ranks, one node when R is
    the number of nodes). gloo on CPU, NCCL on CUDA; the default process group must exist.

    Raises:
        ValueError: R does not divide the number of processes (parallel.replicate).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("FSDP2 needs an initialised process group (launch with accelerate or torchrun)")
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    world = dist.get_world_size()
    if replicate == 1:
        return init_device_mesh(device.type, (world,))
    if world % replicate:
        raise ValueError(f"parallel.replicate: {replicate} does not divide the {world} processes")
    return init_device_mesh(device.type, (replicate, world // replicate),
                            mesh_dim_names=("dp_replicate", "dp_shard"))


def shard_group(mesh):
    """The part of `mesh` the sharded state is split over: the `dp_shard` dimension of an HSDP mesh, else the
    mesh itself (the teacher, frozen, needs no replicas of its shards)."""
    return mesh["dp_shard"] if mesh.ndim == 2 else mesh


def _mesh_for(model: nn.Module, mesh):
    return mesh if mesh is not None else make_mesh(next(model.parameters()).device)


def shard_student(model: nn.Module, mesh=None, reshard_after_forward: bool = True,
                  mp_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard the trainable student in place with FSDP2: one unit per decoder layer, then the root.

    Gradients are summed over ranks (divide factor 1, sum-only reductions): the loop's losses are already
    divided by global token counts. The root is not resharded after forward (its lm_head weight feeds the
    chunked losses outside any module call); it is resharded at the end of backward.

    Args:
        mesh: a 1-D DeviceMesh, or a 2-D one for HSDP (`make_mesh`); None builds a 1-D one over all ranks.
        reshard_after_forward: free each layer's gathered parameters after forward (re-gathered in backward).
        mp_dtype: GPU mixed precision (e.g. torch.bfloat16): parameters gathered in that dtype, gradients
            reduced in fp32; None keeps the parameters' dtype (use autocast for compute, as on CPU).

    Returns:
        The same module, now an FSDPModule whose parameters are DTensors sharded on dim 0. Build the
        optimiser AFTER this call (over the sharded parameters).
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = _mesh_for(model, mesh)
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else \
        MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not mean: FSDP2 divides reduced gradients by the world size unless told otherwise.
            # set_gradient_divide_factor acts on that module's own groups only, hence the loop; sum-only
            # reductions because the PREMUL_SUM that factor 1 would otherwise use does not exist on gloo.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def shard_teacher(teacher: nn.Module, mesh=None, mp_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard the frozen teacher in place: one FSDP unit per decoder layer; no optimiser, no backward.

    Each layer gathers its parameters in its forward and frees them right after (reshard_after_forward
    True, explicitly: each layer is its own FSDP root, and a root left on the default would keep its
    parameters gathered). The decoder shell (embeddings, final norm) and the lm_head stay replicated plain
    tensors, so `distill.model.decoder.TruncatedTeacher` works unchanged: its shallow copy of the decoder
    keeps
    the sharded layers it needs, and the layers past the cut are never gathered. (Sharding the decoder
    itself would make it an FSDPModule, whose class cannot be shallow-copied; the replicated embedding and
    lm_head cost 2·V·H values per rank, e.g. 2 GB in bf16 for Llama-3-8B.)
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if any(p.requires_grad for p in teacher.parameters()) or teacher.training:
        raise ValueError("shard_teacher: the teacher must be frozen (eval(), requires_grad_(False)) first")
    mesh = _mesh_for(teacher, mesh)
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype) if mp_dtype else MixedPrecisionPolicy()
    for layer in decoder_layers(teacher):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    return teacher


def move_unsharded(model: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers that no FSDP unit holds (plain tensors) to `device`, in place."""
    from torch.distributed.tensor import DTensor

    move_plain_tensors(model, device, lambda param: isinstance(param, DTensor))


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Reduce-scatter gradients after the next backward (True) or keep accumulating unsharded ones (False).

    Optional: by default every backward reduce-scatters and the sharded gradients accumulate (least memory).
    Setting False for all but the step's last micro-batch trades memory (full unsharded gradients) for
    fewer collectives. Every rank must make the same choice for the same slot.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled, recurse=True)


# ---------------------------------------------------------------------------------------------------
# full state dicts (the checkpoint format of the unsharded run)
# ---------------------------------------------------------------------------------------------------
def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict as CPU tensors on rank 0 ({} on other ranks); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` as the unsharded optimiser would give it, on rank 0 ({} on other ranks).

    The optimiser's own state_dict numbers parameters 0.. in param_groups order; sharding keeps the
    parameters' order, so the ids are those of `AdamW(param_groups(unsharded model))`. Only the DTensor
    shards are gathered (one all-gather per tensor, in the same order on every rank).
    """
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    rank0 = global_rank() == 0
    state = {}
    for pid in sorted(sd["state"]):
        entry = {}
        for key, value in sd["state"][pid].items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if rank0:
                entry[key] = value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
        state[pid] = entry
    if not rank0:
        return {}
    return {"state": state, "param_groups": [dict(g) for g in sd["param_groups"]]}


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, sd: dict | None) -> None:
    """Load a full (unsharded-format) optimiser state dict held by rank 0 into the sharded optimiser.

    Rank 0 broadcasts the layout, then each tensor; every rank keeps its own shard of each tensor whose
    parameter is a DTensor (the same dim-0 split FSDP2 uses for the parameter).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        optimizer.load_state_dict(sd)
        return
    rank0 = global_rank() == 0
    layout = [None]
    if rank0:
        # Small values (AdamW's 0-dim `step`) travel with the layout; large tensors are broadcast one by one.
        def spec(v):
            return ("big", tuple(v.shape), v.dtype) if torch.is_tensor(v) and v.numel() > 1 else ("value", v)

        state = {pid: {k: spec(v) for k, v in entry.items()} for pid, entry in sd["state"].items()}
        layout = [{"groups": sd["param_groups"], "state": state}]
    dist.broadcast_object_list(layout, src=0)
    layout = layout[0]
    if layout["state"] and max(layout["state"]) >= len(params):
        raise ValueError(f"optimizer state has parameter id {max(layout['state'])} but the optimiser holds "
                         f"{len(params)} parameters")
    state = {}
    for pid in sorted(layout["state"]):
        param = params[pid]
        entry = {}
        for key, spec in layout["state"][pid].items():
            if spec[0] == "value":
                entry[key] = spec[1]
                continue
            _, shape, dtype = spec
            is_dtensor = isinstance(param, DTensor)
            device = torch.device(param.device_mesh.device_type) if is_dtensor else param.device
            full = sd["state"][pid][key].to(device) if rank0 else \
                torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(full, src=0)
            if is_dtensor and tuple(shape) == tuple(param.shape):
                # Every rank now holds the full tensor: keep the local piece, no further communication.
                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            entry[key] = full
        state[pid] = entry
    optimizer.load_state_dict({"state": state, "param_groups": layout["groups"]})


# ---------------------------------------------------------------------------------------------------
# the strategy
# ---------------------------------------------------------------------------------------------------
class FSDP2(Strategy):
    """The student and the teacher sharded with FSDP2 over all ranks (aligned plans, summed gradients)."""

    name = "fsdp2"
    aligned = True
    sharded = True

    loads_sharded = True
    checkpoint_format = "sharded"

    def setup(self, student, teacher, optim_cfg, dtype) -> None:
        """The models arrive built on the meta device (the sharded load: `load_weights` fills them next) or
        whole on the host with their weights; either way each rank keeps only its shards, one unit at a
        time, so no whole model is ever on a GPU."""
        if self.sequence_parallel > 1:  # Ulysses around the student's own attention kernel, or ring
            ulysses.check_heads(student.config, self.sequence_parallel, self.sequence_mode, self.ring_degree)
            args = (self.sequence_parallel, self.procs.rank, self.procs.world)
            if self.sequence_mode == "ulysses":
                self.sequence, module = ulysses.SequenceParallel(*args), ulysses
            elif self.sequence_mode == "ring":
                self.sequence, module = ring.RingParallel(*args), ring
            else:  # hybrid: Ulysses inside subgroups, a ring across them
                self.sequence, module = ring.HybridParallel(*args, ring_degree=self.ring_degree), ring
            student.set_attn_implementation(module.register(student.config._attn_implementation))
        device = self.procs.device
        self.mesh = mesh = make_mesh(device, self.replicate)
        mp = dtype if device.type == "cuda" and dtype != torch.float32 else None
        shard_student(student, mesh, reshard_after_forward_requested(), mp_dtype=mp)
        self._place(student)
        if teacher is not None:
            shard_teacher(teacher, shard_group(mesh))
            self._place(teacher)  # its replicated shell: embeddings, norm, lm_head
        self.student, self.teacher = student, teacher
        # Over the sharded parameters.
        self.optimizer = make_optimizer(student, optim_cfg, sharded=True,
                                        lr_scales=self.param_scales(student))
        self.params = [p for p in student.parameters() if p.requires_grad]

    def _place(self, model: nn.Module) -> None:
        """This rank's shards and the plain tensors on the device: allocated (uninitialised, the sharded
        load) when the model was built on the meta device, else moved there."""
        if any(p.device.type == "meta" for p in model.parameters()):
            model.to_empty(device=self.procs.device)
        else:
            move_unsharded(model, self.procs.device)

    def load_weights(self, student_source: str, teacher_source: str | None) -> None:
        """Fill the models `setup` built on the meta device: the student from a sharded checkpoint or a
        directory of safetensors (a model, or a checkpoint of another mode), the teacher from its model
        directory; then rebuild the buffers no file holds (RoPE's inv_freq, from the recipe's RoPE)."""
        for model, source in ((self.student, student_source), (self.teacher, teacher_source)):
            if model is None:
                continue
            if is_sharded_checkpoint(source):
                load_checkpoint(model, source)
            else:
                load_model_files(model, source)
            refill_buffers(model)

    streams_export = True

    def export_tensors(self) -> tuple[dict, object]:
        """({name: (shape, dtype)}, an iterator of (name, full tensor)) over the student's state, a tied head
        left out: each tensor all-gathered when the iterator reaches it (every rank must run it through)."""
        from torch.distributed.tensor import DTensor

        resharded(self.student)
        aliases = tied_aliases(self.student)
        state = {k: v for k, v in self.student.state_dict().items() if k not in aliases}
        shapes = {k: (v.shape, v.dtype) for k, v in state.items()}

        def gather():
            for name, value in state.items():
                yield name, value.full_tensor() if isinstance(value, DTensor) else value

        return shapes, gather()

    def describe(self) -> str:
        size = self.sequence_parallel
        sp = f", sequence parallel ({self.sequence_mode}) over groups of {size}" if size > 1 else ""
        world, replicas = self.procs.world, self.replicate
        if replicas > 1:
            return (f"FSDP2 hybrid (HSDP): student sharded over groups of {world // replicas} processes and "
                    f"replicated {replicas} times, teacher sharded within each group{sp}")
        return f"FSDP2: student and teacher sharded over {world} processes{sp}"

    def backward(self, loss, last: bool) -> None:
        if self.gradient_sync == "step":  # reduce-scatter once, after the step's last micro-batch
            set_gradient_sync(self.student, last)
        loss.backward()

    def reduce_gradients(self) -> None:
        """Nothing left to do: gradients were reduce-scattered (summed) in backward."""

    def model_state_dict(self):
        return full_model_state_dict(self.student)

    def optimizer_state_dict(self):
        return full_optimizer_state_dict(self.optimizer)

    def load_optimizer_state(self, read) -> None:
        load_full_optimizer_state_dict(self.optimizer, read() if self.procs.is_main else None)
        keep_kernel(self.optimizer)
