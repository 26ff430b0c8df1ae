"""The shipped trainer (`distill.train.loop.main`, hence `distill.train.step.train_step` through the
launcher's strategy)
run several times in one multi-process launch, for tests/integration/test_strategies.py:

    accelerate launch --config_file recipes/accelerate/<cpu2|fsdp2|zero3>.yaml --num_processes 2 \
        tests/integration/strategy_worker.py RECIPE OUT [--teacher MODEL]

Runs (each its own output directory under OUT, 3 steps, a checkpoint every step):
  full/          uninterrupted
  resumed/       stopped after 2 steps (train.max_steps=2), then resumed to 3 by a second run
  poisoned/      every LM loss of step 1 is NaN: the step is skipped, then steps 2 and 3 train
  checkpointing/ (FSDP2) activation checkpointing in the student's layers
  deferred/      (FSDP2) parallel.gradient_sync: step (one reduce-scatter per step)
  sequence/      (FSDP2) parallel.sequence_parallel: 2 (the long stream's rows split over both ranks), with
                 gradient checkpointing (the recompute in backward splits again); sequence.json: the
                 all-to-all entries per stream
  sequence_ring/ (FSDP2) the same with parallel.sequence_parallel_mode: ring (zigzag slices, K/V round the
                 ring); sequence_ring.json: the ring's entries per stream
  sparse/        (replicated) the long stream, the only one with an LM loss, absent from steps 1 and 3:
                 its lm_head gets no gradient there, on any rank
  expanded/      (replicated, FSDP2) hybrid expansion of both layers (dlerp, alignment), optim.layers traced
                 with lr_scale (measured again every 2 steps), per-part gradient norms every step, per stream
  localised/     (ZeRO-3, which refuses expansion) traced with lr_scale and per-part gradient norms
  flash/         flash_attention_2 through the CPU stand-in (tests/flash_standin, on PYTHONPATH), bf16
                 autocast, gradient checkpointing; flash_calls.json: the stand-in's calls per rank
  flash_sequence/ (FSDP2) the same with parallel.sequence_parallel: 2 (GQA: 4 heads, 2 key/value heads)
  startup/       (replicated) rank 0's start-up check crashes: every rank must stop with one line
  sequence_sdpa/ (FSDP2) sequence parallelism with transformers' sdpa: refused before loading (exit 2)
With --teacher, OUT/teacher.json holds the sharded teacher's truncated hidden states against the plain ones.
Process start-up dominates on CPU, hence one launch for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


SPARSE = ("streams.long.share=0.2", "streams.short.objectives.kl=null")
"""The long stream in step 2 only (of 3), and no other stream with a loss through lm_head."""
LOCALISED = ("optim.layers={mode: traced, select: lr_scale, rows: 2, every: 2}", "log.layer_grad_every=1")
EXPANDED = ("model.expansion={layers: 2, interpolation: dlerp, alignment: {kind: cosine, weight: 0.5}}",
            *LOCALISED)


FLASH = ("model.attention=flash_attention_2", "model.dtype=bfloat16", "model.gradient_checkpointing=true")
"""flash-attn 2 (the stand-in on CPU) as a GPU run uses it: bf16 autocast, activation checkpointing."""
BF16 = ("model.attention=sdpa_varlen", "model.dtype=bfloat16", "model.gradient_checkpointing=true")
"""The same precision with sdpa_varlen: the reference of the flash runs."""


def flash_run(recipe: str, out: str, *overrides: str) -> int:
    """`distill.train.loop.main` with FLASH; the stand-in's calls of this run on this rank go to
    OUT/flash_calls.json (rank 0: a list per rank)."""
    import torch.distributed as dist
    from flash_attn import standin

    from distill.train import loop as train

    standin.reset()
    code = train.main([recipe, f"run.output_dir={out}", *FLASH, *overrides])
    calls = list(standin.CALLS)
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, calls)
    else:
        gathered = [calls]
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(out, "flash_calls.json"), "w", encoding="utf-8") as f:
            json.dump(gathered, f)
    return code


def failing_startup_run(recipe: str, out: str) -> int:
    """`distill.train.loop.main` where rank 0's packing-isolation check raises (as flash-attn did on fp32
    inputs):
    every rank must stop with the same one-line error, none left waiting in a collective."""
    import torch.distributed as dist

    from distill.train import loop as train

    real = train.packing_isolation  # the loop's own name for it (imported at the loop's top)

    def crash(*args, **kwargs):
        if not dist.is_initialized() or dist.get_rank() == 0:
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        return real(*args, **kwargs)

    train.packing_isolation = crash
    try:
        return train.main([recipe, f"run.output_dir={out}"])
    finally:
        train.packing_isolation = real


def poisoned_run(recipe: str, out: str, *overrides: str) -> int:
    """`distill.train.loop.main` with every LM loss of step 1 (index 0) multiplied by NaN on every rank."""
    from distill.train import loop as train
    from distill.train import step as step_module

    real_step, real_lm = train.train_step, step_module.lm_loss
    poison = {"on": False}

    def train_step(ctx, index):
        poison["on"] = index == 0
        return real_step(ctx, index)

    def lm_loss(*args, **kwargs):
        total, count = real_lm(*args, **kwargs)
        return (total * float("nan") if poison["on"] else total), count

    train.train_step, step_module.lm_loss = train_step, lm_loss
    try:
        return train.main([recipe, f"run.output_dir={out}", *overrides])
    finally:
        train.train_step, step_module.lm_loss = real_step, real_lm


def teacher_diffs(model_dir: str, mode: str) -> dict[str, float]:
    """Max |difference| of TruncatedTeacher's hidden states, sharded (the strategy module's shard_teacher) vs
    plain, per requested list of hidden-state indices (one runner per side, reused across the lists as the
    trainer reuses it)."""
    from distill.config import ModelConfig
    from distill.model.decoder import TruncatedTeacher
    from distill.model.load import load_teacher
    from distill.parallel import fsdp2, zero3

    model_cfg = ModelConfig(path=model_dir, dtype="float32", attention="auto")
    plain = load_teacher(model_dir, model_cfg)
    sharded = load_teacher(model_dir, model_cfg)
    if mode == "fsdp2":
        fsdp2.shard_teacher(sharded, fsdp2.make_mesh("cpu"))
    else:
        zero3.shard_teacher(sharded, persistence_threshold=0)  # partition everything, the lm_head included
    layers_partitioned = all(p.numel() == 0 for p in sharded.model.layers.parameters())
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, plain.config.vocab_size, (2, 24), generator=g)
    positions = torch.arange(24)[None].expand(2, -1)
    runner_plain, runner = TruncatedTeacher(plain), TruncatedTeacher(sharded)
    diffs = {}
    for layers in ([0], [1], [1, 2], [2], [1]):  # back to a truncated depth after the full one
        want = runner_plain(ids, positions, None, layers)
        got = runner(ids, positions, None, layers)
        diffs[str(layers)] = max((got[i] - want[i]).abs().max().item() for i in layers) if \
            got.keys() == want.keys() else float("inf")
    return {"diffs": diffs, "partitioned": layers_partitioned}


def record_partitions(out: str):
    """Wrap ZeRO-3's `setup` so that each rank records, for the models it is handed, whether they were built
    inside zero.Init (every parameter a DeepSpeed one) and the elements of its own partitions against the
    whole; rank 0 writes every rank's record to OUT/partitions.json after the run (`write`)."""
    from distill.parallel import zero3

    real, seen = zero3.ZeRO3.setup, {}

    def setup(self, student, teacher, optim_cfg, dtype):
        for name, model in (("student", student), ("teacher", teacher)):
            params = list(model.parameters())
            seen[name] = {"built_partitioned": all(hasattr(p, "ds_id") for p in params),
                          "local": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                                       for p in params),
                          "whole": sum(getattr(p, "ds_numel", p.numel()) for p in params),
                          "dtype": str(next(iter(params)).ds_tensor.dtype) if hasattr(params[0], "ds_tensor")
                          else None}
        return real(self, student, teacher, optim_cfg, dtype)

    zero3.ZeRO3.setup = setup

    def write():
        import torch.distributed as dist

        zero3.ZeRO3.setup = real
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, seen)
        if dist.get_rank() == 0:
            with open(os.path.join(out, "partitions.json"), "w", encoding="utf-8") as f:
                json.dump(gathered, f)

    return write


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--teacher", help="a model directory: also check the sharded teacher")
    args = parser.parse_args()

    import torch.distributed as dist

    from distill.parallel.base import Processes
    from distill.parallel.launcher import choose
    from distill.train import loop as train

    torch.set_num_threads(1)
    codes = {}

    def run(name, *overrides):
        return train.main([args.recipe, f"run.output_dir={os.path.join(args.out, name)}", *overrides])

    # The first run creates the process group, with the recipe's parallel.collective_timeout_s.
    from distill.parallel.zero3 import zero3_requested

    write_partitions = record_partitions(args.out) if zero3_requested() else None
    codes["full"] = run("full")
    if write_partitions is not None:
        write_partitions()
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    timeout_s = backend.options._timeout.total_seconds()
    procs = Processes()
    mode = choose(procs).name
    if args.teacher and mode != "replicated":
        result = teacher_diffs(args.teacher, mode)
        if procs.is_main:
            with open(os.path.join(args.out, "teacher.json"), "w", encoding="utf-8") as f:
                json.dump(result, f)
    codes["resumed_first"] = run("resumed", "train.max_steps=2")
    codes["resumed"] = run("resumed")
    codes["poisoned"] = poisoned_run(args.recipe, os.path.join(args.out, "poisoned"))
    if mode == "fsdp2":
        codes["checkpointing"] = run("checkpointing", "model.gradient_checkpointing=true")
        codes["deferred"] = run("deferred", "parallel.gradient_sync=step")
        from distill.config import load_recipe

        for name, extra in (("sequence", []), ("sequence_ring", ["parallel.sequence_parallel_mode=ring"])):
            out = os.path.join(args.out, name)
            cfg = load_recipe(args.recipe, [f"run.output_dir={out}", "parallel.sequence_parallel=2",
                                            "model.gradient_checkpointing=true", *extra])
            code, live = train.run(cfg, return_state=True)
            codes[name] = code
            if procs.is_main:
                with open(os.path.join(args.out, f"{name}.json"), "w", encoding="utf-8") as f:
                    json.dump(dict(live["strategy"].sequence.calls), f)
    if mode == "replicated":
        codes["sparse"] = run("sparse", *SPARSE)
        codes["startup"] = failing_startup_run(args.recipe, os.path.join(args.out, "startup"))
    codes["flash"] = flash_run(args.recipe, os.path.join(args.out, "flash"))
    if mode == "fsdp2":
        # transformers' sdpa builds its mask for the local slice while Ulysses attends over the whole row:
        # refused in one line before any model is loaded (exit 2).
        codes["sequence_sdpa"] = run("sequence_sdpa", "parallel.sequence_parallel=2", "model.attention=sdpa")
        codes["flash_sequence"] = flash_run(args.recipe, os.path.join(args.out, "flash_sequence"),
                                            "parallel.sequence_parallel=2")
    if mode != "zero3":
        codes["expanded"] = run("expanded", *EXPANDED)
    else:
        codes["localised"] = run("localised", *LOCALISED)
    if procs.is_main:
        with open(os.path.join(args.out, "codes.json"), "w", encoding="utf-8") as f:
            json.dump({"mode": mode, "world": procs.world, "codes": codes, "timeout_s": timeout_s}, f)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
