"""Restoration distillation, end to end.

    accelerate launch [--config_file recipes/accelerate/ddp.yaml] -m distill.train RECIPE.yaml [a.b=value ...]
    python -m distill.train RECIPE.yaml            # one process

One loop, top to bottom: per step, a deterministic plan of micro-batches over the streams (independent of
the number of processes); each rank fetches its micro-batches, the loss-bearing tokens of every
(stream, objective) are counted over all micro-batches and ranks once, every micro-batch's loss sums are
divided by those global counts, weighted, and back-propagated; gradients are summed across ranks, clipped,
checked finite, and the optimiser steps. Checkpoints are atomic and the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import sys
import time

import torch

from distill import checkpoint as ckpt
from distill.config import ConfigError, RecipeConfig, load_recipe, save_yaml, to_dict
from distill.mixture import Mixture, StreamPlan, _seed, shard
from distill.schedules import lr_at

logger = logging.getLogger("distill.train")

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = ckpt.PREEMPT_EXIT_CODE


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite steps): one line, non-zero exit."""


# ---------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------
class Processes:
    """Rank, world and the few collectives the loop needs (sums over ranks; no-ops on one process)."""

    def __init__(self):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def sum_gradients(self, params: list[torch.nn.Parameter], bucket_numel: int = 2**24) -> None:
        """Sum gradients over ranks in flat buckets (losses are already divided by global counts)."""
        if self.world == 1:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        start = 0
        while start < len(grads):
            end, numel = start, 0
            while end < len(grads) and (numel == 0 or numel + grads[end].numel() <= bucket_numel):
                numel += grads[end].numel()
                end += 1
            flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
            self.all_reduce(flat)
            offset = 0
            for g in grads[start:end]:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
            start = end


# ---------------------------------------------------------------------------------------------------
# set-up helpers
# ---------------------------------------------------------------------------------------------------
def resolve_layers(cfg: RecipeConfig, num_layers: int, select=None) -> dict[str, list[int]]:
    """Hidden-state indices per stream ('last' = num_layers, the final-norm output); range-checked."""
    resolved = {}
    for name, stream in cfg.streams.items():
        hidden = stream.objectives.hidden
        if hidden is None:
            continue
        if hidden.layers == "auto":
            if select is None:
                raise ConfigError(f"streams.{name}.objectives.hidden.layers: 'auto' needs a layer selection")
            resolved[name] = select(hidden.top_k)
            continue
        layers = []
        for i, layer in enumerate(hidden.layers):
            index = num_layers if layer == "last" else layer
            if not 0 <= index <= num_layers:
                raise ConfigError(
                    f"streams.{name}.objectives.hidden.layers[{i}]: {layer} is out of range; allowed: "
                    f"0..{num_layers} (0 = embeddings, {num_layers} = final-norm output) or 'last'")
            layers.append(index)
        resolved[name] = sorted(set(layers))
    return resolved


def native_rope_reference(student, model_cfg) -> torch.nn.Module:
    """A stand-in for the teacher in RoPE checks: the checkpoint's config and its native rotary module."""
    from transformers import AutoConfig

    from distill.models import rotary_embedding

    config = AutoConfig.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    reference = torch.nn.Module()
    reference.config = config
    reference.rotary_emb = type(rotary_embedding(student))(config=config)
    return reference


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; leave norms, biases and other 1-D parameters undecayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_flop_rates(cfg: RecipeConfig, streams: dict, layers: dict[str, list[int]], student,
                    teacher) -> dict[str, tuple[float, float]]:
    """Per stream, (student training FLOPs, teacher forward FLOPs) per token slot of its rows."""
    from distill.metrics import flop_counts, teacher_flops_per_token, train_flops_per_token

    counts = flop_counts(student)
    teacher_counts = flop_counts(teacher) if teacher is not None else None
    rates = {}
    for name, stream_cfg in cfg.streams.items():
        T, objectives = streams[name].seq_len, stream_cfg.objectives
        taught = 0.0
        if teacher_counts is not None and objectives.needs_teacher:
            depth = max(layers.get(name, []) + ([int(teacher_counts["L"])] if objectives.kl is not None else []))
            taught = teacher_flops_per_token(teacher_counts, T, depth, objectives.kl is not None)
        logits = objectives.lm is not None or objectives.kl is not None  # else no lm_head in the step
        rates[name] = (train_flops_per_token(counts, T, logits), taught)
    return rates


def make_optimizer(model: torch.nn.Module, optim_cfg, sharded: bool) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the kernel `optim.implementation` asks for (see OptimConfig)."""
    kind = optim_cfg.implementation
    if kind == "auto":
        kind = "default" if sharded else "fused"
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False},
             "default": {}}[kind]
    return torch.optim.AdamW(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
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


def _real_mask(stream, rows: list[int], seq_len: int) -> torch.Tensor:
    """(B, T) bool: True on document tokens, False on padding."""
    totals = torch.tensor([sum(stream.lengths(i)) for i in rows])
    return torch.arange(seq_len)[None, :] < totals[:, None]


def holdout_of(stream_dir: str) -> str | None:
    """`<built>/<stream>` → `<built>/holdout/<stream>` when it exists."""
    import json

    root, name = os.path.split(os.path.normpath(stream_dir))
    path = os.path.join(root, "holdout", name)
    try:
        with open(os.path.join(path, "stream.json"), encoding="utf-8") as f:
            rows = json.load(f).get("rows", 0)
    except (OSError, ValueError):
        return None
    return path if rows > 0 else None  # an empty held-out split evaluates nothing


def eval_streams(cfg: RecipeConfig) -> tuple[str | None, str | None]:
    """Held-out short and long data for in-training evaluation (explicit, or derived from the streams)."""
    short, long = cfg.eval.short_data, cfg.eval.long_data
    if short is None:
        held = [holdout_of(s.data) for s in cfg.streams.values() if s.positions == "native" and s.objectives.needs_teacher]
        short = next((h for h in held if h), None)
    if long is None:
        native = [(s.data.endswith("long"), h) for s in cfg.streams.values()
                  if s.positions == "native" and (h := holdout_of(s.data))]
        if native:
            long = max(native, key=lambda x: x[0])[1]  # a stream named ...long first, else the first one
    return short, long


def check_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.output_dir: cannot create '{path}': {err.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"run.output_dir: '{path}' is not writable")


def find_resume(cfg: RecipeConfig) -> str | None:
    mode = cfg.train.resume
    if mode == "never":
        return None
    root = os.path.join(cfg.run.output_dir, "checkpoints")
    if mode == "auto":
        return ckpt.latest(root)
    reason = ckpt.verify(mode) if os.path.isdir(mode) else "not a directory"
    if reason is not None:
        raise ConfigError(f"train.resume: '{mode}' is not a usable checkpoint ({reason})")
    return mode


# ---------------------------------------------------------------------------------------------------
# one micro-batch
# ---------------------------------------------------------------------------------------------------
def micro_batch_losses(student, teacher, teacher_runner, stream_cfg, batch: dict, real: torch.Tensor, layers: list[int],
                       num_layers: int, target_length: int, generator_seed: int, autocast,
                       output_weight=None, forward=None) -> dict:
    """Loss sums of every objective of one micro-batch: {objective: 0-dim tensor}."""
    from distill.objectives import hidden_cosine_loss, kl_loss, lm_loss
    from distill.rope import skipped_positions

    input_ids = batch["input_ids"]  # (B, T)
    positions = batch["position_ids"]  # (B, T) restarting at 0 per document
    B, T = input_ids.shape
    objectives = stream_cfg.objectives
    if stream_cfg.positions == "native":
        student_positions, student_mask = positions, None  # mask None: packed documents stay isolated
    else:
        # Short-to-long: one document per row seen at skipped positions reaching the target length. An
        # explicit all-ones mask stops transformers from reading the position jump as a new document.
        gen = torch.Generator().manual_seed(generator_seed)
        student_positions = torch.stack(
            [skipped_positions(T, target_length, stream_cfg.positions, gen) for _ in range(B)]).to(input_ids.device)
        student_mask = torch.ones_like(input_ids)

    # One autocast region for the forwards and the objectives: the chunked losses' two large matmuls take
    # the compute dtype (as the model's own lm_head would) while their reductions stay fp32 (the hidden
    # cosine upcasts itself). The final hidden state is fp32 under CPU autocast (the residual stream is):
    # outside autocast those matmuls ran in fp32, 3x slower on a bf16 CPU.
    with autocast():
        # Through the root (FSDP2 gathers embeddings and lm_head there); logits only for the last token.
        # (`forward`: the DeepSpeed engine under ZeRO-3, whose forward prepares its gradient bookkeeping.)
        out = (forward or student)(input_ids=input_ids, position_ids=student_positions, attention_mask=student_mask,
                                   output_hidden_states=True, use_cache=False, logits_to_keep=1)
        states = out.hidden_states  # n_layers + 1 entries of (B, T, H); [-1] after the final norm
        # The lm_head weight for the chunked losses (ZeRO-3 keeps a gathered copy from the forward).
        head = output_weight(student) if output_weight is not None else student.get_output_embeddings().weight
        sums = {}
        if objectives.lm is not None:
            sums["lm"] = lm_loss(states[-1], head, batch["labels"],
                                 chunk_size=objectives.lm.chunk_size, use_liger=objectives.lm.fused)[0]
        if teacher is not None and objectives.needs_teacher:
            wanted = sorted(set(layers) | ({num_layers} if objectives.kl is not None else set()))
            taught = teacher_runner(input_ids, positions, None, wanted, objectives.kl is not None)
            if objectives.hidden is not None:
                sums["hidden"] = hidden_cosine_loss([states[i] for i in layers], [taught[i] for i in layers],
                                                    real)[0]
            if objectives.kl is not None:
                kl = objectives.kl
                sums["kl"] = kl_loss(states[-1], head, taught[num_layers], teacher.get_output_embeddings().weight,
                                     real, kind=kl.kind, temperature=kl.temperature, chunk_size=kl.chunk_size)[0]
            del taught  # nothing of the teacher outlives its loss
    return sums  # the counts come from micro_batch_counts, before any forward


def micro_batch_counts(stream_cfg, batch: dict, real: torch.Tensor) -> dict[str, int]:
    """Loss-bearing tokens per objective (the normaliser), known before any forward pass."""
    counts = {}
    if stream_cfg.objectives.lm is not None:
        counts["lm"] = int((batch["labels"][:, 1:] != -100).sum())
    for name in ("hidden", "kl"):
        if getattr(stream_cfg.objectives, name) is not None:
            counts[name] = int(real.sum())
    return counts


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
def run(cfg: RecipeConfig, return_state: bool = False):
    """Train per the recipe; returns the exit code (and, for tests, the live objects if return_state)."""
    from transformers import AutoTokenizer

    from distill.data.dataset import PackedStream
    from distill.metrics import MetricsFile, Tracker, console_line, peak_tflops
    from distill.models import (TruncatedTeacher, check_extension, check_packing_isolation, export, load_student,
                                load_teacher, resolve_dtype)

    procs = Processes()
    torch.manual_seed(cfg.run.seed)
    out_dir = cfg.run.output_dir
    device = procs.device

    # -- everything that can be wrong with the recipe is checked before anything is written ----------
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any load failure is the user's path
        raise ConfigError(f"model.path: cannot load a tokenizer from '{cfg.model.path}': "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    streams = {}
    for name, s in cfg.streams.items():
        try:
            streams[name] = PackedStream(s.data, tokenizer)
        except Exception as err:
            raise ConfigError(f"streams.{name}.data: {err}") from None
        if streams[name].seq_len > cfg.rope.target_length:
            raise ConfigError(f"streams.{name}.data: rows of {streams[name].seq_len} tokens exceed "
                              f"rope.target_length {cfg.rope.target_length}")
    resume_path = find_resume(cfg)
    dtype = resolve_dtype(cfg.model.dtype)
    # The student keeps fp32 master weights and computes under autocast in the recipe's dtype.
    student_model_cfg = dataclasses.replace(cfg.model, dtype="float32")
    init_path = cfg.train.init_from
    student = load_student(student_model_cfg, cfg.rope, device)
    num_layers = student.config.num_hidden_layers
    teacher = teacher_runner = None
    if cfg.needs_teacher:
        teacher_cfg = cfg.model if cfg.teacher.path is None else dataclasses.replace(cfg.model, path=cfg.teacher.path)
        teacher = load_teacher(teacher_cfg.path, teacher_cfg, device)
        teacher_runner = TruncatedTeacher(teacher)  # runs only as deep as the deepest distilled layer
    select = None
    if teacher is not None:
        def select(top_k):
            from distill.layers import select_layers

            short = next(n for n, s in cfg.streams.items() if s.objectives.hidden is not None)
            rows = streams[short].batch(list(range(min(4, len(streams[short])))))
            return select_layers(student, teacher, rows["input_ids"].to(device), top_k=top_k)["layers"]
    layers = resolve_layers(cfg, num_layers, select)
    check_output_dir(out_dir)
    flops = step_flop_rates(cfg, streams, layers, student, teacher)  # before sharding: whole parameter counts
    peak = peak_tflops(device, cfg.log.peak_tflops)

    if procs.is_main:
        # Without a teacher (Long CPT), compare against the checkpoint's native RoPE built from its config.
        reference = teacher if teacher is not None else native_rope_reference(student, cfg.model)
        for line in check_extension(student, reference, cfg.rope):
            logger.info(line)
        err = check_packing_isolation(student, student.config._attn_implementation)
        logger.info("packed documents isolated (%s): max |logit difference| vs alone = %.2e",
                    student.config._attn_implementation, err)
        if cfg.model.dtype == "float32" and err > 1e-3:
            raise TrainingError(f"packed documents are not isolated with attention "
                                f"'{student.config._attn_implementation}' (max logit error {err:.3g})")
        for name, ls in layers.items():
            logger.info("stream %s distils hidden states %s", name, ls)

    if init_path is not None and resume_path is None:
        ckpt.load(init_path, student, None, procs.rank)  # a new stage: weights only
        logger.info("initialised the student from %s (fresh optimiser and data state)", init_path)
    if resume_path is not None:
        ckpt.load(resume_path, student, None, procs.rank)  # weights into the whole model, before any sharding

    # FSDP2 (accelerate launch --config_file recipes/accelerate/fsdp2.yaml): shard after every whole-model
    # check and load above, since a forward on one rank alone would wait forever for the others.
    from distill import parallel

    fsdp = procs.world > 1 and parallel.fsdp_requested()
    zero3 = None  # the distill.zero3 module when DeepSpeed ZeRO-3 runs the student
    if procs.world > 1 and not fsdp:
        from distill import zero3 as _zero3

        try:
            if _zero3.zero3_requested():
                zero3 = _zero3
        except ValueError as err:
            raise ConfigError(str(err)) from None
    sharded = fsdp or zero3 is not None
    if fsdp:
        mesh = parallel.make_mesh(device)
        mp = dtype if device.type == "cuda" and dtype != torch.float32 else None
        parallel.shard_student(student, mesh, parallel.reshard_after_forward_requested(), mp_dtype=mp)
        if teacher is not None:
            parallel.shard_teacher(teacher, mesh)
            teacher_runner = TruncatedTeacher(teacher)
        logger.info("FSDP2: student and teacher sharded over %d processes", procs.world)

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(student, cfg.optim, sharded)
    engine = None
    if zero3 is not None:  # DeepSpeed ZeRO-3 partitions parameters, gradients and this optimiser's state
        engine = zero3.wrap_student(student, optimizer, cfg.optim.max_grad_norm)
        if teacher is not None:
            zero3.shard_teacher(teacher)
            teacher_runner = TruncatedTeacher(teacher)
        logger.info("DeepSpeed ZeRO-3: student (with optimiser) and teacher partitioned over %d processes",
                    procs.world)
    mixture = Mixture([StreamPlan(n, len(streams[n]), streams[n].seq_len, s.micro_batch, s.share)
                       for n, s in cfg.streams.items()], cfg.mix.tokens_per_step, cfg.run.seed)
    cost = {n: streams[n].seq_len for n in streams}

    start_step, tokens_seen, wandb_id, nonfinite_total = 0, 0, None, 0
    if resume_path is not None:
        if fsdp:
            optim_state = ckpt.read_optimizer(resume_path) if procs.is_main else None
            parallel.load_full_optimizer_state_dict(student, optimizer, optim_state)
        elif zero3 is not None:
            zero3.load_full_optimizer_state_dict(engine, ckpt.read_optimizer(resume_path) if procs.is_main else None)
        else:
            optimizer.load_state_dict(ckpt.read_optimizer(resume_path))
        if zero3 is None:
            keep_kernel(optimizer)
        ckpt.load_rng(resume_path, procs.rank)
        state = ckpt.read_state(resume_path)
        start_step, tokens_seen = state["step"], state["tokens"]
        mixture.load_state_dict(state["mixture"])
        wandb_id, nonfinite_total = state.get("wandb_id"), state.get("nonfinite_total", 0)
        logger.info("resumed from %s (step %d, %d tokens; saved on %d processes, now %d)",
                    resume_path, start_step, tokens_seen, state.get("world_size", 1), procs.world)
    live = {"student": student, "teacher": teacher, "optimizer": optimizer, "mixture": mixture}
    finish = (lambda code: (code, live)) if return_state else (lambda code: code)
    if start_step >= cfg.train.max_steps:
        logger.info("nothing to do: the run already reached step %d", start_step)
        return finish(0)

    metrics = tracker = None
    if procs.is_main:
        save_yaml(cfg, os.path.join(out_dir, "config.yaml"))
        metrics = MetricsFile(os.path.join(out_dir, "metrics.jsonl"), resume_step=start_step)
        tracker = Tracker(cfg.log.wandb.project, cfg.log.wandb.mode, cfg.run.name, out_dir, to_dict(cfg),
                          run_id=wandb_id, entity=cfg.log.wandb.entity)
        wandb_id = tracker.run_id
    preempt = ckpt.PreemptionFlag()
    stop_file = os.environ.get("DISTILL_STOP_FILE") or None
    evaluation = None
    if cfg.train.eval_every and sharded:
        logger.warning("train.eval_every: in-training evaluation needs the whole model on one process; skipped "
                       "when sharded (run scripts/evaluate.py on a checkpoint or on final/)")
    if cfg.train.eval_every and procs.is_main and not sharded:
        short_eval, long_eval = eval_streams(cfg)
        if short_eval is None and long_eval is None:
            logger.warning("train.eval_every is set but no held-out data was found (eval.short_data / eval.long_data)")
        else:
            from distill.data.dataset import PackedStream as _Stream
            from distill.rope import original_length

            original = original_length(teacher.config if teacher is not None else student.config, cfg.rope)
            evaluation = dict(
                short_stream=_Stream(short_eval, tokenizer) if short_eval else None,
                long_stream=_Stream(long_eval, tokenizer) if long_eval else None,
                original_length=original, target_length=cfg.rope.target_length, max_rows=cfg.eval.max_rows,
                passkey_samples=cfg.eval.passkey_samples, tokenizer=tokenizer, seed=cfg.run.seed)
            logger.info("evaluating every %d steps on %s and %s", cfg.train.eval_every, short_eval, long_eval)

    keys = [(n, o) for n, s in cfg.streams.items() for o in s.objectives.active()]
    weights = torch.tensor([cfg.streams[n].objectives.active()[o].weight for n, o in keys], dtype=torch.float64)
    use_autocast = dtype != torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if use_autocast else contextlib.nullcontext

    def save_checkpoint(step: int) -> str:
        state = {"tokens": tokens_seen, "mixture": mixture.state_dict(), "wandb_id": wandb_id,
                 "nonfinite_total": nonfinite_total, "lr": lr}
        model_state = optim_state = None
        if fsdp:  # gathered on every rank (collectives), written by rank 0
            model_state = parallel.full_model_state_dict(student)
            optim_state = parallel.full_optimizer_state_dict(student, optimizer)
        elif zero3 is not None:
            model_state = zero3.full_model_state_dict(engine)
            optim_state = zero3.full_optimizer_state_dict(engine)
        path = ckpt.save(os.path.join(out_dir, "checkpoints"), step, student, optimizer, state,
                         procs.rank, procs.world, procs.barrier, model_state=model_state, optim_state=optim_state)
        if procs.is_main:
            ckpt.prune(os.path.join(out_dir, "checkpoints"), cfg.train.keep_last, cfg.train.keep_every)
        return path

    progress = None
    if procs.is_main and cfg.log.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=start_step, desc=cfg.run.name, unit="step",
                        dynamic_ncols=True)
    student.train()
    streak = 0
    lr = cfg.optim.lr
    for step in range(start_step, cfg.train.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.optim.lr, cfg.optim.schedule, cfg.train.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        plan = mixture.plan(step)
        if sharded:  # every rank runs the same sequence of stream kinds (dummies pad it): collectives match
            mine = parallel.shard_plan_aligned(plan, procs.rank, procs.world)
        else:
            mine = [parallel.Slot(mb.stream, mb, mb) for mb in shard(plan, procs.rank, procs.world, cost)]
        # Fetch every micro-batch of the step first, then count loss-bearing tokens over all of them and
        # all ranks once: every micro-batch's sums are divided by these global counts (exact accumulation).
        fetched = []
        local_counts = torch.zeros(len(keys), dtype=torch.float64)
        for slot in mine:
            stream, rows = streams[slot.stream], slot.fetch.rows
            batch = {k: v.to(device) for k, v in stream.batch(rows).items() if torch.is_tensor(v)}
            real = _real_mask(stream, rows, stream.seq_len).to(device)
            if not slot.is_dummy:
                for obj, n in micro_batch_counts(cfg.streams[slot.stream], batch, real).items():
                    local_counts[keys.index((slot.stream, obj))] += n
            fetched.append((slot, batch, real))
        global_counts = procs.all_reduce(local_counts.to(device)).cpu()
        slots = {}  # token slots of the whole step (all ranks) per stream
        for mb in plan:
            slots[mb.stream] = slots.get(mb.stream, 0) + len(mb.rows) * streams[mb.stream].seq_len
        step_tokens = sum(slots.values())
        step_flops = [sum(n * flops[name][k] for name, n in slots.items()) for k in (0, 1)]  # student, teacher

        loss_sums = torch.zeros(len(keys), dtype=torch.float64, device=device)  # on device: no sync per micro-batch
        for slot, batch, real in fetched:
            stream_cfg = cfg.streams[slot.stream]
            sums = micro_batch_losses(student, teacher, teacher_runner, stream_cfg, batch, real,
                                      layers.get(slot.stream, []), num_layers, cfg.rope.target_length,
                                      _seed(cfg.run.seed, "positions", step, slot.fetch.index) % (2**63), autocast,
                                      output_weight=zero3.output_weight if zero3 is not None else None,
                                      forward=engine)
            loss = 0.0
            scale = 0.0 if slot.is_dummy else 1.0  # a dummy only keeps the ranks' collectives in step
            for obj, value in sums.items():
                i = keys.index((slot.stream, obj))
                loss = loss + scale * weights[i].item() * value / max(global_counts[i].item(), 1.0)
                if not slot.is_dummy:
                    loss_sums[i] += value.detach().double()
            if zero3 is not None:
                zero3.backward(engine, loss)  # summed over ranks, no division by accumulation steps
            else:
                loss.backward()
            del sums, loss
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        if fsdp:  # gradients were reduce-scattered (summed) in backward
            grad_norm = parallel.clip_grad_norm(params, max_norm)
        elif zero3 is not None:  # the norm of the partitioned gradients; DeepSpeed clips inside engine.step()
            grad_norm = zero3.grad_norm(engine)
        else:
            procs.sum_gradients(params)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # a sync point
        loss_sums = procs.all_reduce(loss_sums).cpu()
        means = loss_sums / global_counts.clamp(min=1)
        total = float((weights * means).sum())

        if math.isfinite(total) and math.isfinite(grad_norm):
            engine.step() if zero3 is not None else optimizer.step()
            streak = 0
        else:
            streak += 1
            nonfinite_total += 1
            if zero3 is not None:
                zero3.skip_step(engine)
            logger.warning("step %d: non-finite loss %.4g or grad-norm %.4g; step skipped (%d in a row)",
                           step + 1, total, grad_norm, streak)
        if zero3 is None:  # DeepSpeed resets its partitioned gradients itself
            optimizer.zero_grad(set_to_none=True)
        tokens_seen += step_tokens
        elapsed = time.perf_counter() - t0

        done = step + 1
        if procs.is_main:
            record = {"step": done, "tokens": tokens_seen, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": step_tokens / max(elapsed, 1e-9), "loss": total}
            # Model FLOP/s per device (6N + 12·L·d·T per trained token), the teacher's forward apart; MFU
            # against the device's peak when it is known (log.peak_tflops or the GPU's name).
            per_device = [f / max(elapsed, 1e-9) / procs.world / 1e12 for f in step_flops]
            record["tflops_per_s"] = per_device[0]
            if step_flops[1] > 0:
                record["teacher_tflops_per_s"] = per_device[1]
            if peak is not None:
                record["mfu"] = per_device[0] / peak
            for (n, o), value, count in zip(keys, means.tolist(), global_counts.tolist()):
                if count > 0:  # a stream absent from this step has no loss to report
                    record[f"loss/{n}/{o}"] = value
            record["skipped_steps"] = nonfinite_total
            if evaluation is not None and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps):
                from distill.evaluate import evaluate_suite

                figures = evaluate_suite(student, teacher, **evaluation)
                record.update({f"eval/{k}": v for k, v in figures.items() if isinstance(v, (int, float))})
            metrics.write(record)
            tracker.log(record, done)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{total:.4f}", refresh=False)
            if done % cfg.train.log_every == 0:
                (progress.write if progress is not None else print)(console_line(record))

        if streak >= cfg.train.max_nonfinite_steps:  # after the step's record is written
            raise TrainingError(
                f"{streak} non-finite steps in a row (last: step {done}, loss {total}, grad-norm {grad_norm}); "
                f"stopping. Lower optim.lr, check the data, or resume from the last checkpoint")
        # A signal, or the stop file a cluster script creates (scripts/slurm/train.sbatch), stops the run.
        asked = preempt.raised or (procs.is_main and stop_file is not None and os.path.exists(stop_file))
        stop = torch.tensor([1.0 if asked else 0.0], device=device)
        stop = procs.all_reduce(stop, op="max").item() > 0  # all ranks agree at the step boundary
        last = done == cfg.train.max_steps
        if stop or last or (cfg.train.save_every and done % cfg.train.save_every == 0):
            path = save_checkpoint(done)
            logger.info("checkpoint %s", path)
        if stop and procs.is_main and stop_file is not None:
            if os.path.exists(stop_file):
                os.remove(stop_file)  # acted on: the resumed run must not stop again at once
            # Launchers (torchrun) turn a worker's exit code 75 into 1: leave a note the job script can read.
            with open(stop_file + ".checkpointed", "w", encoding="utf-8") as f:
                f.write(f"{done}\n")
        if stop and not last:
            logger.warning("stopped (%s) after step %d; checkpoint written; run the same command to resume "
                           "(exit code %d)", f"signal {preempt.signum}" if preempt.raised else f"stop file {stop_file}",
                           done, EXIT_PREEMPTED)
            if progress is not None:
                progress.close()
            return finish(EXIT_PREEMPTED)

    if progress is not None:
        progress.close()
    full_state = None
    if cfg.train.export and fsdp:
        full_state = parallel.full_model_state_dict(student)
    elif cfg.train.export and zero3 is not None:
        full_state = zero3.full_model_state_dict(engine)
    if cfg.train.export and procs.is_main:
        final = os.path.join(out_dir, "final")
        # fp32 master weights are exported in the recipe's dtype (bf16 for real models).
        source = full_state if sharded else student.state_dict()
        export(student, tokenizer, final, state_dict={k: v.detach().to(dtype) for k, v in source.items()})
        logger.info("exported %s", final)
    procs.barrier()
    if metrics is not None:
        metrics.close()
        tracker.finish()
    return finish(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="a.b=value overrides (parsed as YAML)")
    args = parser.parse_intermixed_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        return run(cfg)
    except (ConfigError, ckpt.CheckpointError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE if isinstance(err, TrainingError) else EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
