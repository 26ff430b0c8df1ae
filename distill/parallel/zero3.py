"""DeepSpeed ZeRO-3 for the student (with our torch AdamW) and the frozen teacher (inference only).

    accelerate launch --config_file recipes/accelerate/zero3.yaml -m distill.train RECIPE.yaml

accelerate exports ACCELERATE_USE_DEEPSPEED=true and ACCELERATE_DEEPSPEED_ZERO_STAGE from the config; the
trainer never calls `accelerator.prepare`: it builds the DeepSpeed config itself (`ds_config`), so the
recipe stays the one source of hyper-parameters. `ZeRO3` is the strategy (distill.parallel.base). Like
FSDP2, ZeRO-3 all-gathers each module's parameters in every forward/backward and reduce-scatters gradients
in every backward, so every rank must run the same sequence of micro-batch kinds (`shard_aligned`, with
dummies whose losses are multiplied by 0).

Semantics kept identical to the one-process loop:
- The optimiser is the recipe's torch AdamW over `param_groups(model)` handed to `deepspeed.initialize`
  (ZeRO-3 replaces its parameters with flat fp32 partitions; AdamW is elementwise, so the update is the
  same; weight decay per group is kept). Not DeepSpeed's own FusedAdam/CPUAdam: those need compiled ops
  (installed here with DS_BUILD_OPS=0) and their epsilon/weight-decay arithmetic differs in rounding.
- Gradients are SUMMED over ranks (losses are already divided by global token counts): DeepSpeed averages
  the reduce-scatter by the world size, so `backward` multiplies the loss by the world size; the config has
  gradient_accumulation_steps 1 and `backward` passes scale_wrt_gas=False (no 1/GAS). ZeRO-3 reduce-scatters
  after every backward and adds the partitions (copy on the first micro-batch after a step/zero_grad,
  accumulate after), so any number of micro-batches per step works; `step` is called once per step.
- Clipping: DeepSpeed clips inside `engine.step()` with `gradient_clipping` = optim.max_grad_norm, by
  max_norm / (norm + 1e-6) when that is < 1 (torch's formula). The loop needs the norm BEFORE stepping (to
  skip non-finite steps): `grad_norm(engine)` computes it from the local fp32 gradient partitions
  (`deepspeed.utils.safe_get_local_grad`, one all-reduce of a scalar; a collective). DeepSpeed itself also
  refuses to step on a non-finite norm (it zeroes the gradients and `engine.get_global_grad_norm()`
  reads inf), and `skip_step(engine)` discards the gradients when the loop decides to skip.
- The output embedding (lm_head) weight is partitioned (an empty tensor outside its module's forward). The
  loop's chunked losses use it outside any module call, so `wrap_student` installs a forward hook on the
  output-embedding module, before DeepSpeed's own hooks: during the student's forward (logits_to_keep=1
  calls lm_head on the last token) it keeps a full copy with an autograd edge to the parameter whose
  backward re-gathers the parameter (`_FullWeight`), so its gradient flows into ZeRO-3's reduce-scatter.
  `output_weight(model)` returns it (valid until the next forward; one full lm_head per rank, like FSDP2's
  root kept gathered).
- The teacher's decoder is partitioned by a second, optimiser-less ZeRO-3 engine (`shard_teacher`);
  its lm_head stays a plain replicated tensor (for a logits KL). `distill.model.decoder.TruncatedTeacher`
  works on
  it unchanged: the shallow decoder copy shares the decoder's hooks and the layers' hooks, and the layers past
  the cut are never gathered (tests/integration/test_zero3.py checks the hidden states exactly).

Loading and checkpoints are sharded: `ZeRO3.building` keeps an HfDeepSpeedConfig alive while
from_pretrained runs, so transformers builds each model inside `deepspeed.zero.Init` and scatters its
weights from rank 0 (the teacher in the recipe's dtype, `build_config`); a resume or train.init_from is read
into the partitions from rank 0 (`fill_partitioned`). A checkpoint is the engine's own (`save_state`: every
rank its files under zero/, `distill.model.zero_checkpoint`), resumed exactly by the engine on as many
processes, converted to the unsharded formats on any other number or mode.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os

import torch
from torch import nn

from distill.files import CheckpointError
from distill.hub import model_directory
from distill.model.decoder import decoder_of
from distill.model.zero_checkpoint import (
    LAYOUT,
    TAG,
    ZERO_DIR,
    is_zero_checkpoint,
    zero_optimizer,
    zero_weights,
    zero_world_size,
)
from distill.optim.optimizer import make_optimizer
from distill.parallel.base import Strategy, global_rank, move_plain_tensors
from distill.parallel.state import is_sharded_checkpoint

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------------
# the launcher's request
# ---------------------------------------------------------------------------------------------------
def zero3_requested() -> bool:
    """Whether the launcher asked for DeepSpeed (accelerate exports ACCELERATE_USE_DEEPSPEED=true from a
    config with `distributed_type: DEEPSPEED`, e.g. recipes/accelerate/zero3.yaml).

    Raises:
        ValueError: DeepSpeed was asked for with a ZeRO stage other than 3 (ACCELERATE_DEEPSPEED_ZERO_STAGE),
            or with a `deepspeed_config_file` (ACCELERATE_DEEPSPEED_CONFIG_FILE: the recipe owns the
            optimiser, clipping and batch sizes; the trainer builds the DeepSpeed config itself), or with
            offloading.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() not in _TRUE:
        return False
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    if stage != "3":
        raise ValueError(f"deepspeed_config.zero_stage: {stage} is not supported; allowed: 3 "
                         f"(see recipes/accelerate/zero3.yaml)")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and config_file.lower() != "none":
        raise ValueError(f"deepspeed_config.deepspeed_config_file: '{config_file}' is not supported; the "
                         f"trainer builds the DeepSpeed config from the recipe (see "
                         f"recipes/accelerate/zero3.yaml)")
    for key in ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        value = os.environ.get(key, "none").lower()
        if value not in ("none", ""):
            name = key[len("ACCELERATE_DEEPSPEED_"):].lower()
            raise ValueError(f"deepspeed_config.{name}: '{value}' is not supported; allowed: none")
    return True


def ds_config(max_grad_norm: float = 0.0, persistence_threshold: int = 100_000,
              bucket_size: int = 50_000_000, train: bool = True, autocast: torch.dtype | None = None) -> dict:
    """The DeepSpeed config: ZeRO-3, fp32 parameters (the loop's autocast does mixed precision), GAS 1.

    Args:
        max_grad_norm: DeepSpeed's `gradient_clipping` (0 = off); pass optim.max_grad_norm.
        persistence_threshold: parameters with fewer elements stay gathered on every rank (norm weights);
            0 partitions everything.
        bucket_size: elements per reduce/prefetch bucket.
        train: False for the teacher (no optimiser).
        autocast: the recipe's compute dtype (bf16 / fp16) when it is not fp32. The engine's forward
            SWITCHES OFF an outer CUDA autocast unless its config has a `torch_autocast` section
            (deepspeed/runtime/torch_autocast.py, `autocast_if_enabled`): without one the student ran in fp32
            on a GPU (and flash-attn refuses fp32). The section re-enables autocast in that dtype inside the
            engine, with no lower-precision communication (`lower_precision_safe_modules: []`): gradients
            are still reduced in fp32.
    """
    zero = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": bucket_size, "stage3_prefetch_bucket_size": bucket_size,
            "stage3_param_persistence_threshold": persistence_threshold,
            "stage3_max_live_parameters": 10 * bucket_size, "stage3_max_reuse_distance": 10 * bucket_size}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": zero, "fp16": {"enabled": False}, "bf16": {"enabled": False},
           "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    if train:
        cfg["gradient_clipping"] = float(max_grad_norm) if max_grad_norm and max_grad_norm > 0 else 0.0
        cfg["zero_allow_untested_optimizer"] = True  # a client torch optimiser
    if autocast is not None and autocast != torch.float32:
        cfg["torch_autocast"] = {"enabled": True, "dtype": str(autocast).removeprefix("torch."),
                                 "lower_precision_safe_modules": []}
    return cfg


def _init_distributed() -> None:
    """Use the launcher's process group (gloo on CPU, NCCL on CUDA); DeepSpeed wraps the existing one."""
    import deepspeed  # optional: only ZeRO-3 runs need DeepSpeed
    import torch.distributed as tdist

    if not tdist.is_initialized():
        raise RuntimeError("ZeRO-3 needs an initialised process group (launch with accelerate or torchrun)")
    deepspeed.init_distributed(dist_backend=tdist.get_backend(), auto_mpi_discovery=False)


def partition_in_place(module: nn.Module, config: dict) -> None:
    """Partition an instantiated module's parameters with `deepspeed.zero.Init(module=...)`: each parameter in
    turn goes to the device and keeps only this rank's partition. Without it `deepspeed.initialize` moves the
    WHOLE module to the device first (its `module.to(device)`), a full model per GPU before partitioning."""
    import deepspeed  # optional: only ZeRO-3 runs need DeepSpeed

    if all(hasattr(p, "ds_id") for p in module.parameters()):
        return  # built inside zero.Init (the sharded load): partitioned already
    with torch.no_grad():
        deepspeed.zero.Init(module=module, config_dict_or_path=config)


# ---------------------------------------------------------------------------------------------------
# the student
# ---------------------------------------------------------------------------------------------------
class _FullWeight(torch.autograd.Function):
    """A full copy of a gathered ZeRO-3 parameter whose backward re-gathers the parameter before its gradient
    reaches it (AccumulateGrad and ZeRO-3's reduce-scatter hook need the full shape; nothing else gathers it,
    as the copy bypasses the module's own backward hooks). The parameter stays gathered until ZeRO-3
    releases it (its module's next forward, or `engine.step()`, which partitions every parameter)."""

    @staticmethod
    def forward(ctx, param):
        ctx.param = param
        return param.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        # optional: only ZeRO-3 runs need DeepSpeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        param = ctx.param
        if getattr(param, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE:
            param.all_gather()  # a collective: every rank reaches it in the same order (aligned plans)
        return grad


def _keep_full_weight(module: nn.Module, args, output) -> None:
    # Runs after the module's forward and before DeepSpeed's release hook (registered earlier): the weight is
    # gathered here.
    module._distill_full_weight = _FullWeight.apply(module.weight) if torch.is_grad_enabled() else \
        module.weight.detach().clone()


def wrap_student(model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0,
                 persistence_threshold: int = 100_000, bucket_size: int = 50_000_000,
                 autocast: torch.dtype | None = None):
    """Partition the student and its optimiser with ZeRO-3; returns the DeepSpeed engine.

    Args:
        model: the whole student, with its weights already loaded (checkpoint or init_from), on its device.
        optimizer: torch AdamW over `distill.optim.optimizer.param_groups(model, wd)`, built BEFORE this call
        and not
            stepped yet. Keep the reference: its `param_groups` stay the place to set the learning rate
            (ZeRO-3 swaps their "params" for flat partitions, nothing else). Never call its step() or
            zero_grad().
        max_grad_norm: clip inside `engine.step()` (0 = off).
        autocast: the compute dtype of the recipe (see `ds_config`); None or fp32 for none.

    Returns:
        The engine. Call `engine(...)` (or `model(...)`: the hooks live on the modules) for forwards,
        `backward(engine, loss)`, `grad_norm(engine)`, then `engine.step()` or `skip_step(engine)`.
    """
    import deepspeed  # optional: only ZeRO-3 runs need DeepSpeed

    _init_distributed()
    # The original per-parameter order of the optimiser (the ids of its state_dict) before ZeRO flattens it.
    order = [p for group in optimizer.param_groups for p in group["params"]]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    names = {id(p): n for n, p in model.named_parameters()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not hasattr(head, "_distill_full_weight_hook"):
        head._distill_full_weight_hook = head.register_forward_hook(_keep_full_weight)
    config = ds_config(max_grad_norm, persistence_threshold, bucket_size, train=True, autocast=autocast)
    partition_in_place(model, config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine._distill_order = [names[id(p)] for p in order]
    engine._distill_group_sizes = sizes
    engine._distill_client_optimizer = optimizer
    return engine


def unwrap(model):
    """The nn.Module under a DeepSpeed engine (or `model` itself)."""
    return getattr(model, "module", model) if type(model).__name__ == "DeepSpeedEngine" else model


def output_weight(model) -> torch.Tensor:
    """The student's full output-embedding weight for the chunked losses (lm, kl).

    Under ZeRO-3: the copy kept during the last forward (it carries the gradient back to the partitioned
    parameter); call it after the forward of the micro-batch whose loss uses it. Without ZeRO-3: the weight.
    """
    module = unwrap(model)
    head = module.get_output_embeddings()
    weight = getattr(head, "_distill_full_weight", None)
    if weight is None or not hasattr(head.weight, "ds_id"):
        return head.weight
    return weight


def backward(engine, loss: torch.Tensor) -> None:
    """Back-propagate one micro-batch's loss so that gradients are summed over ranks (no 1/world, no
    1/GAS)."""
    import torch.distributed as tdist

    world = tdist.get_world_size() if tdist.is_initialized() else 1
    engine.backward(loss * world, scale_wrt_gas=False)


def grad_norm(engine) -> float:
    """The global 2-norm of the summed gradients, BEFORE clipping and stepping (a collective: all ranks call
    it).

    Computed from each rank's fp32 gradient partitions (`safe_get_local_grad`), squared-summed in fp64 and
    all-reduced. `engine.get_global_grad_norm()` gives DeepSpeed's own value only after `engine.step()`.
    """
    import torch.distributed as tdist
    from deepspeed.utils import safe_get_local_grad  # optional: only ZeRO-3 runs need DeepSpeed

    total = torch.zeros((), dtype=torch.float64)
    for p in unwrap(engine).parameters():
        if not p.requires_grad:
            continue
        g = safe_get_local_grad(p)
        if g is not None and g.numel():
            total += g.detach().double().pow(2).sum().cpu()
    device = "cuda" if tdist.get_backend() == "nccl" else "cpu"
    total = total.to(device)
    tdist.all_reduce(total)
    return float(total.sqrt())


def skip_step(engine) -> None:
    """Discard this step's gradients without stepping (non-finite loss or grad norm); all ranks call it.

    ZeRO-3's zero_grad resets its micro-step counter, so the next backward overwrites the accumulated
    gradient partitions instead of adding to them.
    """
    engine.optimizer.zero_grad(set_to_none=True)
    if hasattr(engine.optimizer, "averaged_gradients"):
        engine.optimizer.averaged_gradients = {}


# ---------------------------------------------------------------------------------------------------
# the teacher
# ---------------------------------------------------------------------------------------------------
def shard_teacher(teacher: nn.Module, persistence_threshold: int = 100_000, bucket_size: int = 50_000_000):
    """Partition the frozen teacher's decoder with an optimiser-less ZeRO-3 engine; returns `teacher`.

    Only the decoder (`teacher.model`: embeddings, layers, final norm) is partitioned: its forward is what
    `TruncatedTeacher` calls, and DeepSpeed's start-of-forward hook lives on the engine's root. lm_head stays
    a plain replicated tensor (for a logits KL). Keep the returned engine alive: `teacher._distill_engine`.
    """
    import deepspeed  # optional: only ZeRO-3 runs need DeepSpeed

    if any(p.requires_grad for p in teacher.parameters()) or teacher.training:
        raise ValueError("shard_teacher: the teacher must be frozen (eval(), requires_grad_(False)) first")
    _init_distributed()
    decoder = decoder_of(teacher)
    config = ds_config(0.0, persistence_threshold, bucket_size, train=False)
    _replicate_outside(teacher, decoder)
    partition_in_place(decoder, config)
    engine, _, _, _ = deepspeed.initialize(model=decoder, config=config)
    engine.eval()
    # What stays replicated (lm_head, buffers) to the device; the partitions are there already.
    move_plain_tensors(teacher, engine.device, lambda param: hasattr(param, "ds_id"))
    teacher._distill_engine = engine
    return teacher


def _replicate_outside(model: nn.Module, inner: nn.Module) -> None:
    """Parameters of `model` outside `inner` that zero.Init partitioned (the teacher's lm_head, when it was
    built partitioned) made plain replicated tensors again: no engine hook would gather them."""
    import deepspeed  # optional: only ZeRO-3 runs need DeepSpeed

    inside = {id(p) for p in inner.parameters()}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or id(param) in inside or not hasattr(param, "ds_id"):
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.data.detach().clone()
            module._parameters[name] = nn.Parameter(full, requires_grad=param.requires_grad)


def build_config(dtype: torch.dtype) -> dict:
    """The DeepSpeed config `zero.Init` builds a model with (through transformers' HfDeepSpeedConfig): the
    partitioning of `ds_config`, and parameters in `dtype` (zero.Init creates every floating tensor in the
    config's dtype: fp32 unless bf16 / fp16 is enabled there)."""
    config = ds_config(train=False)
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config["fp16"] = {"enabled": dtype == torch.float16}
    return config


def _source_reader(path: str):
    """{name: () -> tensor} of the weights in `path` (a ZeRO-3 checkpoint, or a directory of safetensors: a
    model, an export, a full checkpoint), each read only when called (rank 0 alone calls them)."""
    from safetensors import safe_open

    if is_zero_checkpoint(path):
        lazy = zero_weights(path, lazy=True)
        return {name: (lambda t=t: t.contiguous()) for name, t in lazy.items()}
    readers = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        handle = safe_open(file, framework="pt")
        readers.update({name: (lambda h=handle, n=name: h.get_tensor(n)) for name in handle.keys()})
    return readers


def fill_partitioned(model: nn.Module, path: str) -> None:
    """Read the weights of `path` into the partitioned `model`: rank 0 reads one tensor at a time and each
    parameter is scattered from it (`GatheredParameters(modifier_rank=0)`), so no other rank reads the
    files and no rank holds more than one whole parameter. Every rank calls it.

    Raises:
        CheckpointError: a FSDP2 checkpoint, or a parameter the files lack (on every rank).
    """
    import deepspeed  # optional: only ZeRO-3 runs need DeepSpeed
    import torch.distributed as tdist

    if is_sharded_checkpoint(path):
        raise CheckpointError(f"{path}: a sharded (FSDP2) checkpoint; ZeRO-3 resumes from its own or a full "
                              f"checkpoint (consolidate it with scripts/evaluate.py first)")
    rank0 = global_rank() == 0
    readers = _source_reader(path) if rank0 else {}
    names = [n for n, _ in model.named_parameters()]
    missing = [[n for n in names if n not in readers] if rank0 else None]
    tdist.broadcast_object_list(missing, src=0)
    if missing[0]:
        raise CheckpointError(f"{path}: not this model's weights (no {missing[0][0]}); check train.resume / "
                              f"train.init_from and model.path")
    with torch.no_grad():
        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank0:
                    param.data.copy_(readers[name]().reshape(param.shape))


# ---------------------------------------------------------------------------------------------------
# full state dicts (the checkpoint format of the unsharded run)
# ---------------------------------------------------------------------------------------------------
def full_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The full state dict as CPU tensors on rank 0 ({} on other ranks); every rank must call it.

    One all-gather per parameter (`deepspeed.zero.GatheredParameters`), so at most one full parameter is
    held at a time. Tied parameters appear under every key that `state_dict()` gives.
    """
    import deepspeed  # optional: only ZeRO-3 runs need DeepSpeed

    module = unwrap(model)
    rank0 = global_rank() == 0
    out, seen = {}, {}
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) in seen:
            if rank0:
                out[key] = out[seen[id(value)]]
            continue
        seen[id(value)] = key
        if hasattr(value, "ds_id"):
            with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                if rank0:
                    out[key] = value.detach().to("cpu", copy=True)
        elif rank0:
            out[key] = value.detach().to("cpu", copy=True)
    return out if rank0 else {}


def _flat_partitions(engine) -> list[torch.Tensor]:
    """ZeRO-3's flat fp32 partitions, one per sub-group: the tensors the client AdamW's state is keyed by
    (ZeRO-3 puts each in its group's "params" only for the duration of its step)."""
    return list(engine.optimizer.fp32_partitioned_groups_flat)


def full_optimizer_state_dict(engine) -> dict:
    """The `state_dict()` an unsharded AdamW(param_groups(model)) would give, on rank 0 ({} on other ranks).

    Parameter ids follow the client optimiser's original order (recorded by `wrap_student`); exp_avg and
    exp_avg_sq are gathered per parameter (`safe_get_full_optimizer_state`, a collective), `step` is the
    flat partitions' common step. Every rank must call it.
    """
    from deepspeed.utils import safe_get_full_optimizer_state  # optional: only ZeRO-3 runs need DeepSpeed

    module = unwrap(engine)
    params = dict(module.named_parameters())
    inner = engine._distill_client_optimizer
    rank0 = global_rank() == 0
    groups, ids = [], 0
    flat_state = [inner.state.get(f, {}) for f in _flat_partitions(engine)]
    steps = {float(s["step"]) for s in flat_state if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"ZeRO-3 partitions disagree on the AdamW step: {sorted(steps)}")
    order = engine._distill_order
    sizes = engine._distill_group_sizes
    state = {}
    for pid, name in enumerate(order):
        p = params[name]
        if not steps:
            continue  # never stepped: the unsharded optimiser has no state either
        entry = {"step": torch.tensor(next(iter(steps)), dtype=torch.float32)}
        for key in ("exp_avg", "exp_avg_sq"):
            full = safe_get_full_optimizer_state(p, key)
            if rank0:
                entry[key] = full.detach().reshape(p.ds_shape).to("cpu", torch.float32, copy=True)
        if rank0:
            state[pid] = entry
    for group, size in zip(inner.param_groups, sizes):
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": list(range(ids, ids + size))})
        ids += size
    if not rank0:
        return {}
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state_dict(engine, sd: dict | None) -> None:
    """Load an unsharded AdamW state dict held by rank 0 into the ZeRO-3 partitions; every rank calls it."""
    import torch.distributed as tdist
    from deepspeed.utils import safe_set_full_optimizer_state  # optional: only ZeRO-3 runs need DeepSpeed

    module = unwrap(engine)
    params = dict(module.named_parameters())
    rank0 = global_rank() == 0
    layout = [None]
    if rank0:
        layout = [{"groups": [{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])}
                              for g in sd["param_groups"]],
                   "step": {float(e["step"]) for e in sd["state"].values()},
                   "ids": sorted(sd["state"])}]
    tdist.broadcast_object_list(layout, src=0)
    layout = layout[0]
    order = engine._distill_order
    if [g["n"] for g in layout["groups"]] != list(engine._distill_group_sizes):
        raise ValueError(f"optimizer state groups of {[g['n'] for g in layout['groups']]} parameters; the "
                         f"optimiser has {list(engine._distill_group_sizes)}")
    inner = engine._distill_client_optimizer
    for group, saved in zip(inner.param_groups, layout["groups"]):
        for k, v in saved.items():
            if k != "n":
                group[k] = v
    if not layout["ids"]:
        return  # a checkpoint before the first step: no state
    if len(layout["step"]) != 1 or layout["ids"] != list(range(len(order))):
        raise CheckpointError(f"optimizer state: ZeRO-3 keeps one AdamW step for all parameters, but this "
                              f"checkpoint has {len(layout['ids'])} of {len(order)} parameters with state at "
                              f"steps {sorted(layout['step'])} (some parameters skipped steps in the run "
                              f"that wrote it); resume it with FSDP2 or data parallel")
    step = layout["step"].pop()
    for f in _flat_partitions(engine):  # AdamW's lazy state, created here so the partitions can be filled
        inner.state[f] = {"step": torch.tensor(step, dtype=torch.float32),
                          "exp_avg": torch.zeros_like(f), "exp_avg_sq": torch.zeros_like(f)}
    for pid, name in enumerate(order):
        p = params[name]
        for key in ("exp_avg", "exp_avg_sq"):
            full = sd["state"][pid][key].to(p.ds_tensor.device, torch.float32) if rank0 else \
                torch.empty(p.ds_shape, dtype=torch.float32, device=p.ds_tensor.device)
            tdist.broadcast(full, src=0)
            safe_set_full_optimizer_state(p, full, key)


# ---------------------------------------------------------------------------------------------------
# the strategy
# ---------------------------------------------------------------------------------------------------
class ZeRO3(Strategy):
    """The student (with the recipe's AdamW) and the teacher's decoder partitioned by DeepSpeed ZeRO-3."""

    name = "zero3"
    aligned = True
    sharded = True
    checkpoint_format = "sharded"
    loads_sharded = True
    builds_on_meta = False

    @contextlib.contextmanager
    def building(self, trainable: bool, dtype: torch.dtype):
        """transformers builds the model inside `deepspeed.zero.Init` while an HfDeepSpeedConfig lives (it
        keeps only a weak reference: this context holds the strong one), and from_pretrained scatters the
        weights from rank 0 module by module: each rank ends with its partitions alone."""
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        del trainable
        _init_distributed()
        config = HfDeepSpeedConfig(build_config(dtype))
        try:
            yield config
        finally:
            del config
            unset_hf_deepspeed_config()

    def load_weights(self, student_source: str, teacher_source: str | None) -> None:
        """The models arrive partitioned with the weights of model.path and the teacher's (`building`); a
        student from elsewhere (the checkpoint to resume, train.init_from) is read into its partitions, rank 0
        reading (`fill_partitioned`), and the engine's fp32 masters refreshed from them. (A ZeRO-3 checkpoint
        of as many processes is read again, exactly, with the optimiser by `load_state`.)"""
        del teacher_source
        built = model_directory(self.student.name_or_path, "model.path")
        if os.path.realpath(student_source) == os.path.realpath(built):
            return
        fill_partitioned(self.student, student_source)
        self.engine.optimizer.refresh_fp32_params()

    def setup(self, student, teacher, optim_cfg, dtype) -> None:
        # fp32 partitions; the compute dtype is autocast's, which the engine must be told (ds_config).
        # The client AdamW is built over the whole model BEFORE ZeRO-3 flattens it: its param_groups keep
        # the parameter order of the checkpoint format and stay the place to set the learning rate.
        self.optimizer = make_optimizer(student, optim_cfg, sharded=True,
                                        lr_scales=self.param_scales(student))
        self.engine = wrap_student(student, self.optimizer, optim_cfg.max_grad_norm, autocast=dtype)
        if teacher is not None:
            shard_teacher(teacher)
        self.student, self.teacher = student, teacher
        self.params = [p for p in student.parameters() if p.requires_grad]

    def describe(self) -> str:
        return (f"DeepSpeed ZeRO-3: student (with optimiser) and teacher partitioned over "
                f"{self.procs.world} processes")

    def forward(self, **inputs):
        return self.engine(**inputs)  # the engine's forward prepares its gradient bookkeeping

    def output_weight(self) -> torch.Tensor:
        return output_weight(self.engine)  # the gathered copy kept during this micro-batch's forward

    def backward(self, loss, last: bool) -> None:
        del last  # ZeRO-3 reduce-scatters after every backward
        backward(self.engine, loss)

    def reduce_gradients(self) -> None:
        """Nothing left to do: gradients were reduce-scattered (summed) in backward."""

    def clip(self, max_norm: float) -> float:
        del max_norm  # DeepSpeed clips inside engine.step() (gradient_clipping = optim.max_grad_norm)
        return grad_norm(self.engine)

    can_stash = False  # the summed gradients live in DeepSpeed's partitions: per-part norms of the step only

    def _local_grad(self, param):
        from deepspeed.utils import safe_get_local_grad  # optional: only ZeRO-3 runs need DeepSpeed

        return safe_get_local_grad(param)

    def step(self) -> None:
        self.engine.step()

    def skip_step(self) -> None:
        skip_step(self.engine)

    def zero_grad(self) -> None:
        """Nothing to do: DeepSpeed resets its partitioned gradients in engine.step() / skip_step."""

    def save_state(self, directory: str) -> None:
        """The engine's own checkpoint under `directory`/zero: every rank writes its partition of the weights
        and of AdamW's moments at once (`distill.model.zero_checkpoint` has the layout); rank 0 adds the
        client optimiser's parameter order, which the conversion to the unsharded format needs."""
        zero = os.path.join(directory, ZERO_DIR)
        self.engine.save_checkpoint(zero, tag=TAG, save_latest=False, exclude_frozen_parameters=False)
        if self.procs.is_main:
            with open(os.path.join(zero, LAYOUT), "w", encoding="utf-8") as f:
                json.dump({"order": self.engine._distill_order,
                           "group_sizes": list(self.engine._distill_group_sizes)}, f)

    def model_state_dict(self):
        return full_model_state_dict(self.engine)

    def optimizer_state_dict(self):
        return full_optimizer_state_dict(self.engine)

    def load_optimizer_state(self, read) -> None:
        load_full_optimizer_state_dict(self.engine, read() if self.procs.is_main else None)

    def load_state(self, directory: str) -> None:
        """Resume from a ZeRO-3 checkpoint: written by as many processes, the engine reads each rank's own
        files (weights and moments, exactly); by another number, the moments are converted to the unsharded
        format on rank 0 and partitioned anew (`load_weights` has read the weights the same way)."""
        if is_sharded_checkpoint(directory):
            raise CheckpointError(f"{directory}: a sharded (FSDP2) checkpoint; ZeRO-3 resumes from its own "
                                  f"or a full checkpoint (resume it under recipes/accelerate/fsdp2.yaml, or "
                                  f"start a new stage from it with train.init_from)")
        if zero_world_size(directory) != self.procs.world:
            self.load_optimizer_state(lambda: zero_optimizer(directory))
            return
        loaded, _ = self.engine.load_checkpoint(os.path.join(directory, ZERO_DIR), tag=TAG,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"{directory}: the ZeRO-3 engine could not read its checkpoint")
