"""Restoration distillation, end to end.

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m distill.train RECIPE.yaml [a.b=value ...]
    python -m distill.train RECIPE.yaml            # one process

`run` reads top to bottom: set-up (everything that can be wrong with the recipe or the data is checked
before anything is written), the loop (one `distill.train.step.train_step` per optimiser step, then metrics,
checkpoints and the stop check), and the export. The parallel mode is a `distill.parallel.base.Strategy`
picked once from the launcher; nothing below branches on it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import os
import resource
import sys
import time

import torch

from distill.config import ConfigError, RecipeConfig, load_recipe, save_yaml, to_dict
from distill.data.dataset import DataError, PackedStream
from distill.data.mixture import Mixture, StreamPlan
from distill.eval.retention import sharded_short_retention
from distill.eval.suite import eval_streams, evaluate_suite
from distill.files import replace_dir
from distill.hub import hub_reason, model_directory
from distill.model import expansion
from distill.model.expansion import expand
from distill.model.export import export, export_streamed, write_model_files
from distill.model.flops import flop_counts, flop_rates, peak_tflops
from distill.model.layers import resolve_layers
from distill.model.load import (
    attention_override,
    check_extension,
    isolation_tolerance,
    load_config,
    load_student,
    load_teacher,
    native_rope_reference,
    packing_isolation,
    resolve_attention,
    resolve_dtype,
)
from distill.model.rope import original_length
from distill.model.zero_checkpoint import is_zero_checkpoint
from distill.optim.localise import (
    diagnostic_loss,
    diagnostic_norms,
    freeze_untraced,
    grad_groups,
    layer_norms,
    layer_plan,
    plot_layer_grads,
)
from distill.optim.optimizer import rescale
from distill.parallel.base import Processes
from distill.parallel.fsdp2 import fsdp_requested
from distill.parallel.launcher import choose
from distill.parallel.memory import install_savers, return_freed_host_memory
from distill.parallel.state import checkpoint_keys, is_sharded_checkpoint
from distill.parallel.ulysses import check_attention, check_groups, check_heads, split_streams
from distill.parallel.zero3 import zero3_requested
from distill.plan import (
    MIN_COLLECTIVE_TIMEOUT_S,
    Shape,
    host_problem,
    memory_problem,
    node_ram_bytes,
    recipe_seq_lens,
    replicate_problem,
    stream_tokens_per_step,
)
from distill.plan import collective_timeout as plan_collective_timeout
from distill.schedules import lr_at
from distill.train import checkpoint as ckpt
from distill.train.metrics import MetricsFile, Tracker, console_line
from distill.train.spans import NO_SPANS, Spans
from distill.train.step import BadRowError, StepContext, build_objectives, check_stream, train_step

logger = logging.getLogger("distill.train")

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = ckpt.PREEMPT_EXIT_CODE


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite steps): one line, non-zero exit."""


def check_output_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"run.output_dir: cannot create '{path}': {err.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ConfigError(f"run.output_dir: '{path}' is not writable")


def open_streams(cfg: RecipeConfig, tokenizer) -> dict:
    """Every stream's built data, checked against its manifest (row counts, file sizes) and the tokenizer."""
    streams = {}
    for name, s in cfg.streams.items():
        try:
            streams[name] = PackedStream(s.data, tokenizer)
            streams[name].check_manifest()
        except DataError as err:
            raise ConfigError(f"streams.{name}.data: {err}") from None
    return streams


def warn_sparse_streams(cfg: RecipeConfig, mixture) -> None:
    """A stream whose share is below one micro-batch per step is present on only some steps: say so."""
    for name, e in mixture.sparse_streams(0).items():
        s, seq_len = cfg.streams[name], mixture.streams[name].seq_len
        logger.warning(
            "streams.%s: its share gives %.0f of mix.tokens_per_step %d token slots, %.2f micro-batches of "
            "%d × %d per step: it is present on ~%.0f%% of steps, and its losses are weighted ×%.2f there so "
            "its configured weights hold on average; raise mix.tokens_per_step or lower micro_batch to have "
            "it in every step", name, e * s.micro_batch * seq_len, cfg.mix.tokens_per_step, e, s.micro_batch,
            seq_len, 100 * e, 1 / e)


def warn_repeated_data(cfg: RecipeConfig, mixture) -> None:
    """A stream whose built rows are fewer than the run reads (train.max_steps × its token slots per step)
    starts another epoch: the same rows again. Say so once, at start-up."""
    for name, per_step in stream_tokens_per_step(cfg).items():
        plan = mixture.streams[name]
        needed = per_step * cfg.train.max_steps / plan.seq_len  # rows read over the run
        if needed > plan.rows:
            logger.warning(
                "streams.%s: the run reads ~%d rows of %d tokens (%.0fM tokens over train.max_steps %d) but "
                "%s holds %d: %.2f epochs, rows repeat; build more (the data spec's "
                "streams.<name>.max_tokens) or lower train.max_steps", name, needed, plan.seq_len,
                needed * plan.seq_len / 1e6, cfg.train.max_steps, cfg.streams[name].data, plan.rows,
                needed / plan.rows)


def check_memory(cfg: RecipeConfig, mode: str, world: int, device, seq_lens: dict[str, int]) -> None:
    """Before any model is loaded: the planner's estimates from the configs (scripts/plan.py) against the
    device's memory (on a GPU) and against this node's RAM (host memory per node, LOCAL_WORLD_SIZE ranks of
    the launch here, on a CPU too); one line when either will not fit (`parallel.skip_memory_check: true`
    goes on).
    """
    from transformers import AutoConfig


    def shape(path):
        trust = cfg.model.trust_remote_code
        return Shape.from_config(AutoConfig.from_pretrained(path, trust_remote_code=trust))

    student = shape(cfg.model.path)
    teacher = shape(cfg.teacher.path) if cfg.teacher.path else None
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # unknown: every rank on this node
    problem = host_problem(cfg, student, teacher, mode, world, ranks_here, node_ram_bytes(), seq_lens,
                           on_gpu=device.type == "cuda")
    if problem is not None:
        raise ConfigError(problem)
    if device.type != "cuda":
        return
    gpu_bytes = torch.cuda.get_device_properties(device).total_memory
    name = torch.cuda.get_device_name(device)
    problem = memory_problem(cfg, student, teacher, mode, world, gpu_bytes, seq_lens, name)
    if problem is not None:
        raise ConfigError(problem)


def collective_timeout(cfg: RecipeConfig) -> dict:
    """The process group's timeout, before it exists: parallel.collective_timeout_s, or the planner's default
    from the configs alone (distill.plan.collective_timeout: one step at the launch's world size and this
    device's peak, one rank's checkpoint write) -- what scripts/plan.py prints. The floor
    (`MIN_COLLECTIVE_TIMEOUT_S`) when a config or the data cannot be read here: set-up then reports the
    problem in one line."""
    explicit = cfg.parallel.collective_timeout_s
    if explicit is not None:
        return {"seconds": float(explicit), "reason": "parallel.collective_timeout_s"}
    from transformers import AutoConfig


    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        mode = "fsdp2" if world > 1 and fsdp_requested() else "zero3" if world > 1 and zero3_requested() \
            else "replicated"
        trust = cfg.model.trust_remote_code
        shape = Shape.from_config(AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=trust))
        teacher = (Shape.from_config(AutoConfig.from_pretrained(cfg.teacher.path, trust_remote_code=trust))
                   if cfg.teacher.path else None)
        seq_lens = recipe_seq_lens(cfg)
    except Exception:  # noqa: BLE001 - the set-up's own checks give the one-line error
        return {"seconds": MIN_COLLECTIVE_TIMEOUT_S, "reason": "the floor (the configs could not be read)"}
    local = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    return plan_collective_timeout(cfg, shape, teacher, mode, world, seq_lens,
                                   peak_tflops(local, cfg.log.peak_tflops))


def take_lock(procs, output_dir: str) -> ckpt.RunLock:
    """Rank 0 takes the output directory's lock; every rank raises the same one-line error if it is held."""
    lock = ckpt.RunLock(output_dir)
    problem = None
    if procs.is_main:
        try:
            lock.acquire()
        except ckpt.RunLockError as err:
            problem = str(err)
    problem = procs.gather_objects(problem)[0]
    if problem is not None:
        raise ConfigError(problem)
    return lock


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------
def run(cfg: RecipeConfig, return_state: bool = False, spans: Spans = NO_SPANS):
    """Train per the recipe; returns the exit code (and, for tests, the live objects if return_state).

    Args:
        spans: a recorder of the step's named spans (benchmarks); the default records nothing.
    """
    return_freed_host_memory()  # before the models: freed tensors' pages go back to the system
    timeout = collective_timeout(cfg)
    procs = Processes(timeout["seconds"])
    if procs.is_main:
        logger.info("collective timeout %.0f s: %s", timeout["seconds"], timeout["reason"])
    check_output_dir(cfg.run.output_dir)
    lock = take_lock(procs, cfg.run.output_dir)
    try:
        return _run(cfg, procs, return_state, spans)
    finally:
        lock.release()


@dataclasses.dataclass
class Session:
    """What set-up builds for the loop and the export (`_set_up`)."""

    cfg: RecipeConfig
    procs: object
    tokenizer: object
    streams: dict
    strategy: object
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    state: ckpt.TrainState
    mixture: object
    ctx: StepContext | None
    dtype: torch.dtype
    autocast: object
    trace: dict | None
    groups: dict | None
    flops: dict
    peak: float | None
    window: int
    """The teacher's native window (the export records it as its original length)."""

    @property
    def live(self) -> dict:
        """The live objects `run(return_state=True)` hands back (tests)."""
        return {"student": self.student, "teacher": self.teacher, "optimizer": self.strategy.optimizer,
                "mixture": self.mixture, "strategy": self.strategy,
                "layers": {n: s.layers for n, s in self.ctx.streams.items()}}


def _run(cfg: RecipeConfig, procs, return_state: bool, spans: Spans):
    session = _set_up(cfg, procs, spans)
    finish = (lambda code: (code, session.live)) if return_state else (lambda code: code)
    out_dir = cfg.run.output_dir
    if session.state.step >= cfg.train.max_steps:
        if cfg.train.export and not os.path.isfile(os.path.join(out_dir, "final", "config.json")):
            # A run stopped (killed) after its last checkpoint but before its export finished.
            _export(session)
        logger.info("nothing to do: the run already reached step %d", session.state.step)
        return finish(0)
    return finish(_train(session, spans))


def _set_up(cfg: RecipeConfig, procs, spans: Spans) -> Session:
    """Everything before the first step. What can be wrong with the recipe, the data or the launch is
    checked from the configs before any model is loaded; the models are loaded on the host (sharded modes) or
    the device, laid out by the strategy, and only then checked by forwards (`startup_checks`), the way the
    step runs them."""
    from transformers import AutoTokenizer


    torch.manual_seed(cfg.run.seed)
    out_dir, device = cfg.run.output_dir, procs.device
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path,
                                                  trust_remote_code=cfg.model.trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any load failure is the user's path

        raise ConfigError(f"model.path: cannot load a tokenizer from '{cfg.model.path}': "
                          f"{hub_reason(err)}") from None
    streams = open_streams(cfg, tokenizer)
    seq_lens = {n: s.seq_len for n, s in streams.items()}
    # Rank 0's view of the checkpoints decides (nodes may list a shared directory differently for a while).
    resume_path = procs.gather_objects(ckpt.resume_point(cfg.train.resume, out_dir))[0]
    dtype = resolve_dtype(cfg.model.dtype)
    # The launcher's mode, picked once.
    strategy = choose(procs, cfg.parallel.gradient_sync, cfg.parallel.sequence_parallel)
    strategy.sequence_mode = cfg.parallel.sequence_parallel_mode
    strategy.ring_degree = cfg.parallel.ring_degree
    strategy.replicate = cfg.parallel.replicate
    strategy.split = split_streams(cfg, seq_lens)
    attention, window = check_launch(cfg, strategy, streams, device)
    if not cfg.parallel.skip_memory_check:
        check_memory(cfg, strategy.name, procs.world, device, seq_lens)

    # FSDP2 builds the models on the meta device, shards them there and has each rank read only its part
    # (`strategy.load_weights` after `setup`); the other modes, and FSDP2 where the whole student must be
    # rewritten or measured first (expansion, traced layers), load on the host (sharded modes: nothing whole
    # reaches a GPU) or the device. The student keeps fp32 master weights and computes under autocast in the
    # recipe's dtype.
    # ZeRO-3 builds them inside zero.Init instead (`strategy.building`): from_pretrained scatters model.path's
    # weights from rank 0, each rank keeping its partitions.
    sources = weight_sources(cfg, strategy, resume_path)
    host = torch.device("cpu") if strategy.sharded else device
    where, meta = (device, strategy.builds_on_meta) if sources is not None else (host, False)
    building = strategy.building if sources is not None else lambda *_: contextlib.nullcontext()
    with building(True, torch.float32):
        student = load_student(dataclasses.replace(cfg.model, dtype="float32"), cfg.rope, where, meta)
    savers = install_savers(student, cfg.parallel)  # parallel.offload_activations / tiled_mlp: long stream
    teacher = None
    if cfg.needs_teacher:
        teacher_cfg = cfg.model if cfg.teacher.path is None else \
            dataclasses.replace(cfg.model, path=cfg.teacher.path)
        with building(False, dtype):
            teacher = load_teacher(teacher_cfg.path, teacher_cfg, where, meta)
    if sources is None:
        _load_weights(cfg, student, resume_path)
    autocast = _autocast(device, dtype, strategy.name)  # ZeRO-3: no cast cache
    trace = None
    if cfg.optim.layers.mode == "traced":
        trace = _start_trace(cfg, student, streams, resume_path, strategy, _autocast(host, dtype), host)
    counts = (flop_counts(student), flop_counts(teacher) if teacher is not None else None)  # unsharded
    strategy.setup(student, teacher, cfg.optim, dtype)
    if sources is not None:
        strategy.load_weights(*sources)
        logger.info("sharded load: each rank read its part of %s", " and ".join(s for s in sources if s))
    logger.info("%s", strategy.describe())
    layers = startup_checks(cfg, strategy, student, teacher, streams, autocast)


    flops = flop_rates(cfg, seq_lens, layers, *counts)
    mixture = Mixture([StreamPlan(n, len(streams[n]), streams[n].seq_len, s.micro_batch, s.share)
                       for n, s in cfg.streams.items()], cfg.mix.tokens_per_step, cfg.run.seed)
    if procs.is_main:
        warn_sparse_streams(cfg, mixture)
        warn_repeated_data(cfg, mixture)
    state = ckpt.TrainState(mixture, lr=cfg.optim.lr, layer_trace=trace)
    if resume_path is not None:
        ckpt.restore(resume_path, strategy, state, procs.rank)
        saved_world = ckpt.read_state(resume_path).get("world_size", 1)
        logger.info("resumed from %s (step %d, %d tokens; saved on %d processes, now %d)",
                    resume_path, state.step, state.tokens, saved_world, procs.world)


    # After sharding (the parameter objects change); for the logged norms and optim.layers' re-measurement.
    groups = grad_groups(student) if cfg.log.layer_grad_every or (trace and cfg.optim.layers.every) else None
    num_layers = student.config.num_hidden_layers
    ctx = StepContext(strategy=strategy, streams=build_objectives(cfg, streams, layers, num_layers, teacher,
                                                                  strategy, attention, savers),
                      mixture=mixture, device=device, autocast=autocast, seed=cfg.run.seed,
                      max_grad_norm=cfg.optim.max_grad_norm, vocab_size=student.config.vocab_size,
                      bad_rows=cfg.train.bad_rows, spans=spans, layer_grad_every=cfg.log.layer_grad_every,
                      grad_groups=groups)
    return Session(cfg=cfg, procs=procs, tokenizer=tokenizer, streams=streams, strategy=strategy,
                   student=student, teacher=teacher, state=state, mixture=mixture, ctx=ctx, dtype=dtype,
                   autocast=autocast, trace=trace, groups=groups, flops=flops,
                   peak=peak_tflops(device, cfg.log.peak_tflops), window=window)


def check_launch(cfg: RecipeConfig, strategy, streams: dict, device) -> tuple[str, int]:
    """The recipe against the launch and the data, from the configs alone (no model loaded yet); one line on
    a problem. Returns the attention implementation the models will load with and the teacher's window."""
    if cfg.model.expansion is not None and strategy.name == "zero3":
        raise ConfigError("model.expansion: hybrid expansion runs on one process, data parallel or FSDP2, "
                          "not under ZeRO-3 (launch with recipes/accelerate/fsdp2.yaml)")
    if cfg.model.expansion is not None and cfg.parallel.sequence_parallel > 1:
        raise ConfigError("model.expansion: not with parallel.sequence_parallel > 1 (the alignment loss "
                          "reads whole rows); set parallel.sequence_parallel: 1")
    config = load_config(cfg.model.path, cfg.model.trust_remote_code)
    attention = resolve_attention(cfg.model.attention, device, getattr(config, "model_type", None))
    if attention == "flash_attention_2" and cfg.model.dtype == "float32":
        raise ConfigError("model.dtype: float32 cannot run flash_attention_2 (flash-attn computes in float16 "
                          "or bfloat16 only); set model.dtype: bfloat16 or model.attention: sdpa_varlen")
    check_attention(attention, cfg.parallel.sequence_parallel)
    problem = replicate_problem(strategy.name, strategy.procs.world, cfg.parallel.replicate)
    if problem is not None:
        raise ConfigError(problem)
    check_groups(strategy.procs.world, cfg.parallel.sequence_parallel, cfg.parallel.replicate)
    if cfg.parallel.sequence_parallel > 1:
        check_heads(config, cfg.parallel.sequence_parallel, cfg.parallel.sequence_parallel_mode,
                    cfg.parallel.ring_degree)
    # The teacher's native window, from its config (the student's own config before extension without one).
    native = load_config(cfg.teacher.path, cfg.model.trust_remote_code) if cfg.teacher.path else config
    window = original_length(native, cfg.rope)
    for name, stream in streams.items():
        check_stream(name, cfg.streams[name], stream, window, cfg.rope.target_length)
    return attention, window


def startup_checks(cfg: RecipeConfig, strategy, student, teacher, streams: dict, autocast) -> dict:
    """The checks that need the models, run on every rank through the strategy's own forward (collectives in
    sharded modes), under the step's autocast, after the models are laid out: our RoPE against the live
    buffers, packed documents isolated by the attention implementation, and `layers: auto`. Any failure,
    on any rank, stops every rank with one line (no rank is left waiting in a collective).

    Returns:
        {stream: distilled hidden-state indices}.
    """
    procs, problem, layers = strategy.procs, None, {}
    try:
        # Without a teacher (Long CPT) the RoPE checks compare against the checkpoint's native rotary module.
        reference = teacher if teacher is not None else native_rope_reference(student, cfg.model)
        for line in check_extension(student, reference, cfg.rope):
            logger.info(line)
        attention = student.config._attn_implementation
        worst, scale = packing_isolation(strategy.forward, student, autocast)
        logger.info("packed documents isolated (%s, %s): max |logit difference| vs alone = %.2e (of %.2e)",
                    attention, cfg.model.dtype, worst, scale)
        if worst > isolation_tolerance(cfg.model.dtype) * max(scale, 1.0):
            raise TrainingError(f"packed documents are not isolated with attention '{attention}' (max logit "
                                f"error {worst:.3g} of {scale:.3g})")
        layers = resolve_layers(cfg, student.config.num_hidden_layers, student, teacher, streams,
                                forward=strategy.forward, autocast=autocast)
    except (ConfigError, TrainingError) as err:
        problem = (type(err), str(err))
    except Exception as err:  # noqa: BLE001 - a start-up check that crashes is reported like one that fails
        logger.debug("start-up check failed", exc_info=True)  # the traceback only at debug level
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        problem = (TrainingError, f"start-up check failed: {type(err).__name__}: {reason}")
    problems = [p for p in procs.gather_objects(problem) if p is not None]
    if problems:
        kind, message = problems[0]
        raise kind(message)
    # Rank 0's choice for `layers: auto` (a tie broken differently would give ranks different teacher depths).
    layers = procs.gather_objects(layers)[0]
    if procs.is_main:
        for name, ls in layers.items():
            logger.info("stream %s distils hidden states %s", name, ls)
    return layers


def _train(session: Session, spans: Spans) -> int:
    """The loop: one `train_step` per optimiser step, then metrics, the stop check and checkpoints; at the
    end the export. Returns the exit code."""
    cfg, procs, strategy, state = session.cfg, session.procs, session.strategy, session.state
    out_dir, trace = cfg.run.output_dir, session.trace

    metrics = tracker = None
    if procs.is_main:
        save_yaml(cfg, os.path.join(out_dir, "config.yaml"))
        metrics = MetricsFile(os.path.join(out_dir, "metrics.jsonl"), resume_step=state.step)
        tracker = Tracker(cfg.log.wandb.project, cfg.log.wandb.mode, cfg.run.name, out_dir, to_dict(cfg),
                          run_id=state.wandb_id, entity=cfg.log.wandb.entity)
        state.wandb_id = tracker.run_id
    evaluation = _in_training_evaluation(session)

    def model_files(directory: str) -> None:  # the checkpoint reads as a model directory (evaluate.py)
        write_model_files(session.student, session.tokenizer, directory, original_length=session.window)

    def save_checkpoint(step: int) -> str:
        path = ckpt.save(os.path.join(out_dir, "checkpoints"), step, strategy, state, procs,
                         model_files=model_files if cfg.model.expansion is None else None)
        if procs.is_main:
            ckpt.prune(os.path.join(out_dir, "checkpoints"), cfg.train.keep_last, cfg.train.keep_every)
            if cfg.log.layer_grad_every:
                plot_layer_grads(os.path.join(out_dir, "metrics.jsonl"),
                                 os.path.join(out_dir, "layer_grad_norms.png"))
        return path

    progress = None
    if procs.is_main and cfg.log.progress_bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=state.step, desc=cfg.run.name, unit="step",
                        dynamic_ncols=True)
    preempt = ckpt.PreemptionFlag()
    stop_file = os.environ.get("DISTILL_STOP_FILE") or None
    session.student.train()
    streak = 0
    for step in range(state.step, cfg.train.max_steps):
        t0 = time.perf_counter()
        state.lr = lr_at(step, cfg.optim.lr, cfg.optim.schedule, cfg.train.max_steps)
        strategy.set_lr(state.lr)
        try:
            result = train_step(session.ctx, step)
        except BadRowError:
            logger.error("a bad row in step %d: writing a checkpoint at step %d before stopping", step + 1,
                         step)
            save_checkpoint(step)
            raise
        elapsed = time.perf_counter() - t0
        state.step, state.tokens = step + 1, state.tokens + result.tokens
        state.skipped_rows += result.skipped_rows
        streak = 0 if result.stepped else streak + 1
        state.nonfinite_total += 0 if result.stepped else 1
        if not result.stepped:
            logger.warning("step %d: non-finite loss %.4g or grad-norm %.4g; step skipped (%d in a row)",
                           state.step, result.loss, result.grad_norm, streak)
        done = state.step
        figures = None  # sharded: every rank evaluates (its forwards are collectives); else rank 0 alone
        if evaluation is not None and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps):
            figures = evaluation()
        if procs.is_main:
            record = _step_record(session, result, elapsed)
            if figures is not None:
                record.update({f"eval/{k}": v for k, v in figures.items() if isinstance(v, (int, float))})
            metrics.write(record)
            tracker.log(record, done)
            spans.step_done(record)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
            if done % cfg.train.log_every == 0:
                (progress.write if progress is not None else print)(console_line(record))
        every = cfg.optim.layers.every
        # Also at the last step: a run stopped there and resumed later must hold the same measurement.
        if trace is not None and every and done % every == 0:
            state.layer_trace = trace = _retrace(cfg, strategy, session.streams, session.autocast,
                                                 session.groups)
        if streak >= cfg.train.max_nonfinite_steps:  # after the step's record is written
            raise TrainingError(
                f"{streak} non-finite steps in a row (last: step {done}, loss {result.loss}, grad-norm "
                f"{result.grad_norm}); stopping. Lower optim.lr, check the data, or resume from the last "
                f"checkpoint")
        # A signal, or the stop file a cluster script creates (scripts/slurm/train.sbatch), stops the run; all
        # ranks agree at the step boundary.
        from_file = procs.is_main and stop_file is not None and os.path.exists(stop_file)
        stop = procs.any(preempt.raised or from_file)
        last = done == cfg.train.max_steps
        if stop or last or (cfg.train.save_every and done % cfg.train.save_every == 0):
            logger.info("checkpoint %s", save_checkpoint(done))
        if stop and not last:
            if progress is not None:
                progress.close()
            return _stopped(done, preempt, stop_file, procs.is_main)

    if progress is not None:
        progress.close()
    _finish(session, stop_file)
    if metrics is not None:
        metrics.close()
        tracker.finish()
    return 0


def _finish(session: Session, stop_file: str | None) -> None:
    """After the last step: the gradient-norm plot, the export, the stop file's removal, a barrier."""
    cfg, procs, out_dir = session.cfg, session.procs, session.cfg.run.output_dir
    if procs.is_main and cfg.log.layer_grad_every:
        plot_layer_grads(os.path.join(out_dir, "metrics.jsonl"),
                         os.path.join(out_dir, "layer_grad_norms.png"))
    if cfg.train.export:
        _export(session)
    if stop_file is not None and procs.is_main and os.path.exists(stop_file):
        os.remove(stop_file)  # a stop asked for at the very end: the run is complete, nothing to requeue
    report_host_memory(procs, out_dir)
    procs.barrier()


def report_host_memory(procs, out_dir: str) -> None:
    """Each rank's peak host RSS over the run (the kernel's high-water mark, ru_maxrss), logged by rank 0 and
    written to `<output_dir>/host_memory.json` (per rank, in rank order, and per node); a collective."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    node = os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))
    peaks = procs.gather_objects((int(peak), node))
    if not procs.is_main:
        return
    per_node: dict[str, int] = {}
    for value, name in peaks:
        per_node[name] = per_node.get(name, 0) + value
    ranks = ", ".join(f"{v / 2**30:.2f}" for v, _ in peaks)
    logger.info("peak host RSS per rank: %s GiB (per node: %s GiB)", ranks,
                ", ".join(f"{v / 2**30:.2f}" for v in per_node.values()))
    with open(os.path.join(out_dir, "host_memory.json"), "w", encoding="utf-8") as f:
        json.dump({"peak_rss_bytes_per_rank": [v for v, _ in peaks], "peak_rss_bytes_per_node": per_node}, f)


def _step_record(session: Session, result, elapsed: float) -> dict:
    """The step's metrics.jsonl record (rank 0)."""
    state, procs, flops, peak = session.state, session.procs, session.flops, session.peak
    record = {"step": state.step, "tokens": state.tokens, "lr": state.lr, "grad_norm": result.grad_norm,
              "tokens_per_s": result.tokens / max(elapsed, 1e-9), "loss": result.loss}
    # Model FLOP/s per device (6N + 12·L·d·T per trained token), the teacher's forward apart; MFU against the
    # device's peak when it is known (log.peak_tflops or the GPU's name).
    step_flops = [sum(n * flops[name][k] for name, n in result.slots.items()) for k in (0, 1)]
    per_device = [f / max(elapsed, 1e-9) / procs.world / 1e12 for f in step_flops]
    record["tflops_per_s"] = per_device[0]
    if step_flops[1] > 0:
        record["teacher_tflops_per_s"] = per_device[1]
    if peak is not None:
        record["mfu"] = per_device[0] / peak
    record.update({f"loss/{n}/{o}": v for (n, o), v in result.means.items()})
    record.update({f"tokens/{n}": v for n, v in result.slots.items()})  # token slots of this step
    record.update({f"grad_norm/{k}": v for k, v in result.part_norms.items()})
    record["skipped_steps"] = state.nonfinite_total
    if state.skipped_rows:
        record["skipped_rows"] = state.skipped_rows
    return record


def _in_training_evaluation(session: Session):
    """`train.eval_every`'s evaluation as a callable returning flat figures, or None where this rank has none
    to run. Unsharded: `evaluate_suite` on rank 0. Sharded (FSDP2, ZeRO-3): every rank scores the held-out
    short rows through the strategy's forwards (`sharded_short_retention`: short_nll, teacher_short_nll,
    short_nll_gap, kl_teacher_student); the long-text and passkey figures need the whole model on one process:
    scripts/evaluate.py on a checkpoint gives them."""
    cfg, strategy = session.cfg, session.strategy
    if not cfg.train.eval_every or not (strategy.sharded or session.procs.is_main):
        return None
    native = session.teacher if session.teacher is not None else session.student
    arguments = _evaluation(cfg, session.tokenizer, native, eval_streams(cfg))
    if arguments is None:
        return None
    if not strategy.sharded:
        return lambda: evaluate_suite(session.student, session.teacher, **arguments)
    if arguments["short_stream"] is None:
        logger.warning("train.eval_every: a sharded run evaluates held-out short data only, and none was "
                       "found (eval.short_data); no in-training evaluation")
        return None
    if session.procs.is_main:
        logger.info("sharded: in-training evaluation scores the held-out short rows (short_nll, "
                    "teacher_short_nll, short_nll_gap); long-text and passkey figures: scripts/evaluate.py "
                    "--model %s/checkpoints/step-N", cfg.run.output_dir)
    flatten = any(s.flatten for s in session.ctx.streams.values()) if session.ctx is not None else None

    def evaluate() -> dict:
        return sharded_short_retention(strategy, session.teacher, arguments["short_stream"],
                                       arguments["max_rows"], autocast=session.autocast, flatten=flatten)

    return evaluate


def _stopped(done: int, preempt: ckpt.PreemptionFlag, stop_file: str | None, is_main: bool) -> int:
    """After the stop's checkpoint: the exit code, and the note a job script reads.

    Under a job script that set DISTILL_STOP_FILE (scripts/slurm/train.sbatch) the stop is a planned
    preemption: the trainer leaves `<stop file>.checkpointed` holding the step and exits 0; the script
    requeues the job from that note (a non-zero code would only make the launcher print a failure traceback
    and mark the step FAILED). Otherwise a signal exits with 75 (EX_TEMPFAIL): run the same command to resume.
    """
    cause = f"signal {preempt.signum}" if preempt.raised else "the stop file"
    if stop_file is not None:
        if is_main:
            if os.path.exists(stop_file):
                os.remove(stop_file)  # acted on: the resumed run must not stop again at once
            with open(stop_file + ".checkpointed", "w", encoding="utf-8") as f:
                f.write(f"{done}\n")
            logger.warning("preempted at step %d (%s): checkpoint written; the job script requeues the job",
                           done, cause)
        return 0
    logger.warning("stopped (%s) after step %d; checkpoint written; run the same command to resume (exit "
                   "code %d)", cause, done, EXIT_PREEMPTED)
    return EXIT_PREEMPTED


def _export(session: Session) -> None:
    """Write the Hugging Face export `<output_dir>/final` atomically: into a temporary directory renamed once
    complete (a kill mid-write leaves the previous export or none, never a partial one). fp32 master weights
    go out in the recipe's dtype (bf16 for real models).

    An expanded student is folded into a plain model (`distill.model.expansion.fold_state`, ᾱ per block in
    final/expansion_fold.json), and the unfolded one is saved as `<output_dir>/expanded` for
    scripts/evaluate.py, which also measures how far the folded logits are from it.
    """
    import shutil

    cfg, strategy, student, tokenizer = session.cfg, session.strategy, session.student, session.tokenizer
    dtype, out_dir, spec = session.dtype, session.cfg.run.output_dir, session.cfg.model.expansion
    if spec is None and strategy.streams_export:  # FSDP2: shard by shard, one tensor gathered at a time
        final, tmp = os.path.join(out_dir, "final"), os.path.join(out_dir, "final.tmp")
        if session.procs.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        shapes, tensors = strategy.export_tensors()
        export_streamed(student, tokenizer, tmp, shapes, tensors, dtype, session.window,
                        main=session.procs.is_main)
        if session.procs.is_main:
            replace_dir(tmp, final)
            logger.info("exported %s (streamed, one shard at a time)", final)
        return
    full_state = strategy.model_state_dict()  # a collective when sharded
    alphas = None
    if spec is not None:
        rows = _fold_batches(cfg, session.streams, tokenizer, spec.fold_rows, strategy.procs.device)
        alphas = expansion.fold_alphas(student, full_state, rows, strategy.forward)  # every rank: forwards
    if not session.procs.is_main:
        return
    targets = [("final", full_state if alphas is None else expansion.fold_state(full_state, alphas))]
    if alphas is not None:
        targets.append(("expanded", full_state))
    for name, state in targets:
        final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f"{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if name == "expanded":
            expansion.save_unfolded(student, tokenizer, tmp, state, spec, alphas, dtype=dtype)
        else:
            export(student, tokenizer, tmp, state_dict=state, dtype=dtype, original_length=session.window)
            if alphas is not None:
                with open(os.path.join(tmp, "expansion_fold.json"), "w", encoding="utf-8") as f:
                    folded = {str(i): a for i, a in alphas.items()}
                    json.dump({"interpolation": spec.interpolation, "fold_alphas": folded}, f, indent=1)
        replace_dir(tmp, final)
        logger.info("exported %s%s", final, "" if alphas is None else
                    f" ({'unfolded' if name == 'expanded' else 'folded with ᾱ ' + str(alphas)})")


def _fold_batches(cfg: RecipeConfig, streams: dict, tokenizer, rows: int, device) -> list[dict]:
    """The rows the export measures the dynamic interpolations' mean α on: held-out data (eval.short_data or
    eval.long_data, or the streams' holdout) when there is some, else the first stream's first rows; one row
    of inputs each (the same on every rank)."""
    held_out = next((path for path in eval_streams(cfg) if path), None)
    data = PackedStream(held_out, tokenizer) if held_out else streams[next(iter(streams))]
    if not held_out:
        logger.warning("no held-out data: the mean α of the expanded blocks is measured on training rows")
    out = []
    for i in range(min(rows, len(data))):
        b = data.batch([i])
        out.append({"input_ids": b["input_ids"].to(device), "position_ids": b["position_ids"].to(device),
                    "attention_mask": None})
    return out


def _expanded_checkpoint(path: str) -> bool:
    """Whether a checkpoint's weights are an expanded model's (they hold `.original.` branch tensors)."""
    from safetensors import safe_open

    if is_sharded_checkpoint(path):
        return any(".original." in key for key in checkpoint_keys(path))
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return any(".original." in key for key in f.keys())


def weight_sources(cfg: RecipeConfig, strategy, resume_path: str | None) -> tuple[str, str | None] | None:
    """(student, teacher) directories for the sharded load, or None where the models load whole: a strategy
    that takes them whole, a student that must be rewritten or measured whole before sharding (expansion,
    traced layers), or weights that are not safetensors. The student's come from the checkpoint to resume,
    else train.init_from, else model.path."""
    if not strategy.loads_sharded or cfg.model.expansion is not None:
        return None
    if cfg.optim.layers.mode == "traced":
        logger.info("optim.layers traced measures the whole student before %s lays it out: every rank loads "
                    "the models whole", strategy.name)
        return None
    teacher = None
    if cfg.needs_teacher:
        key = "teacher.path" if cfg.teacher.path else "model.path"
        teacher = model_directory(cfg.teacher.path or cfg.model.path, key)
    student = resume_path or cfg.train.init_from or model_directory(cfg.model.path, "model.path")
    if resume_path is None and cfg.train.init_from is not None:
        logger.info("initialised the student from %s (fresh optimiser and data state)", student)
    for path in (p for p in (student, teacher) if p is not None):
        zero = is_zero_checkpoint(path) and strategy.name == "zero3"  # read into its partitions
        files = glob.glob(os.path.join(path, "*.safetensors"))
        if not zero and not is_sharded_checkpoint(path) and not files:
            logger.warning("%s holds no safetensors: every rank loads the whole model", path)
            return None
    return student, teacher


def _load_weights(cfg: RecipeConfig, student, resume_path: str | None) -> None:
    """The student's weights before any sharding: expanded per model.expansion, then the checkpoint to resume
    from, or train.init_from's weights (a new stage: weights only; a plain model's are loaded before the
    expansion, an expanded one's after it)."""
    spec, init_from = cfg.model.expansion, cfg.train.init_from
    plain_init = init_from is not None and (spec is None or not _expanded_checkpoint(init_from))
    if resume_path is None and plain_init:
        ckpt.load_weights(init_from, student)
        logger.info("initialised the student from %s (fresh optimiser and data state)", init_from)
        init_from = None
    if spec is not None:
        indices = expand(student, spec)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        logger.info("hybrid expansion (%s): blocks %s expanded; %d trainable parameters, everything else "
                    "frozen", spec.interpolation, indices, trainable)
    if resume_path is not None:
        ckpt.load_weights(resume_path, student)  # into the whole model, before any sharding
    elif init_from is not None:
        ckpt.load_weights(init_from, student)
        logger.info("initialised the expanded student from %s (fresh optimiser and data state)", init_from)


def _diagnostic_batch(cfg: RecipeConfig, streams: dict, device) -> dict:
    """optim.layers' diagnostic batch: the first `rows` rows of its stream, flattened into one packed row."""
    layers_cfg = cfg.optim.layers
    name = layers_cfg.stream or next(n for n, s in cfg.streams.items() if s.objectives.lm is not None)
    data = streams[name]
    b = data.batch(list(range(min(layers_cfg.rows, len(data)))))
    return {k: b[k].reshape(1, -1).to(device) for k in ("input_ids", "position_ids", "labels")}


def _start_trace(cfg: RecipeConfig, student, streams: dict, resume_path: str | None, strategy,
                 autocast, device) -> dict:
    """optim.layers: traced at start-up, on the whole student where it sits before the strategy lays it out
    (`device`: the host in sharded modes; every rank computes the same): the per-layer gradient norms of the
    diagnostic batch, then the layers frozen (above_mean) or the per-layer LR factors handed to the strategy
    (lr_scale). A resumed run reuses its checkpoint's measurement. flash-attn has no CPU kernels: on the host
    the measurement runs with sdpa_varlen (the same attention values; the relative norms are what is kept)."""
    layers_cfg = cfg.optim.layers
    trace = ckpt.read_state(resume_path).get("layer_trace") if resume_path is not None else None
    if trace is None:
        host_flash = device.type == "cpu" and student.config._attn_implementation == "flash_attention_2"
        with attention_override(student, "sdpa_varlen" if host_flash else None):
            norms = diagnostic_norms(student, _diagnostic_batch(cfg, streams, device), autocast)
        trace = layer_plan(norms, layers_cfg.select, layers_cfg.max_scale)
    relative = ", ".join(f"{i}: {r:.2f}" for i, r in trace["relative"].items())
    if layers_cfg.select == "above_mean":
        frozen = freeze_untraced(student, trace["trained"])
        logger.info("traced layers (gradient norm / mean: %s): training layers %s, frozen %s", relative,
                    trace["trained"], frozen)
    else:
        strategy.layer_scales = trace["scales"]
        logger.info("traced layers (gradient norm / mean: %s): LR factors %s", relative,
                    {int(i): round(s, 3) for i, s in trace["scales"].items()})
    return trace


def _retrace(cfg: RecipeConfig, strategy, streams: dict, autocast, groups: dict) -> dict:
    """optim.layers.every: measure the per-layer gradient norms again through the strategy (every rank runs
    the same diagnostic batch; the relative norms do not depend on the sum over ranks), rescale each layer's
    LR, and discard the diagnostic gradients."""
    layers_cfg = cfg.optim.layers
    batch = _diagnostic_batch(cfg, streams, strategy.procs.device)
    loss = diagnostic_loss(strategy.forward, strategy.output_weight, batch, autocast)
    strategy.backward(loss, last=True)
    strategy.reduce_gradients()
    norms = layer_norms(strategy.grad_norms(groups))
    strategy.skip_step()
    strategy.zero_grad()
    trace = layer_plan(norms, layers_cfg.select, layers_cfg.max_scale)
    rescale(strategy.optimizer, trace["scales"])
    factors = {int(i): round(v, 3) for i, v in trace["scales"].items()}
    logger.info("traced layers again: LR factors %s", factors)
    return trace


def _autocast(device: torch.device, dtype: torch.dtype, mode: str = "replicated"):
    """The step's compute: autocast to the recipe's dtype over fp32 master weights (none in fp32).

    Autocast caches its cast of every fp32 weight until the region ends (the step's whole forward and
    losses). Under ZeRO-3 (`mode` "zero3") that cast is of the gathered full weight, so the cache would hold a
    bf16 copy of the whole model on every GPU (2 bytes per parameter, 15 GiB at 8B): it is off there, and each
    use casts again. DeepSpeed's own autocast region (the engine's `torch_autocast` section) inherits the
    setting. Elsewhere it stays on: FSDP2 on a GPU gathers bf16 parameters (nothing to cast), and a
    replicated model's copies are its own (scripts/plan.py counts them); the cache spares recasting the
    lm_head for every loss chunk."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    cache = mode != "zero3"
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def _evaluation(cfg: RecipeConfig, tokenizer, native_model,
                held_out: tuple[str | None, str | None]) -> dict | None:
    """The arguments of `evaluate_suite` for in-training evaluation, or None without held-out data."""
    short_eval, long_eval = held_out
    if short_eval is None and long_eval is None:
        logger.warning("train.eval_every is set but no held-out data was found (eval.short_data / "
                       "eval.long_data)")
        return None
    logger.info("evaluating every %d steps on %s and %s", cfg.train.eval_every, short_eval, long_eval)
    return dict(short_stream=PackedStream(short_eval, tokenizer) if short_eval else None,
                long_stream=PackedStream(long_eval, tokenizer) if long_eval else None,
                original_length=original_length(native_model.config, cfg.rope),
                target_length=cfg.rope.target_length, max_rows=cfg.eval.max_rows,
                passkey_samples=cfg.eval.passkey_samples, tokenizer=tokenizer, seed=cfg.run.seed)


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
    except (ConfigError, DataError, ckpt.CheckpointError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_NONFINITE if isinstance(err, TrainingError) else EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())

