"""A few optimiser steps of a LongReD-shaped loss with DeepSpeed ZeRO-3 (under torchrun, 2 CPU processes, gloo).

    torchrun --nproc_per_node 2 tests/integration/zero3_worker.py MODEL_DIR OUT_DIR [--steps N] [--save-at K]

The streams, plan, rows and the unsharded reference are those of tests/integration/fsdp2_worker.py (3 + 2 + 1
micro-batches of three streams, so ranks get dummies; an LM loss on the final hidden states with the
partitioned lm_head weight, hidden cosine against the full-depth and a truncated ZeRO-3 teacher).
Writes OUT_DIR/teacher.json (sharded vs plain TruncatedTeacher hidden states), and for each run
OUT_DIR/<run>/{result.json, model.safetensors, optimizer.pt} (full state dicts, the unsharded format):
`zero3` (with OUT_DIR/zero3/step-K/ after K steps), `resumed` (a fresh engine loaded from zero3/step-K) and
`poisoned` (one step after a skipped NaN step).
"""

from __future__ import annotations

import json
import os

import torch

from tests.integration.fsdp2_worker import (
    MAX_NORM,
    STREAMS,
    batch_of,
    counts_of,
    parse_args,
    plan_of,
    teacher_diffs,
)

PERSIST = 0  # partition every parameter (the default threshold would keep the tiny model's lm_head whole)


def losses_of(engine, teacher_runner, mb, batch) -> dict[str, torch.Tensor]:
    """Loss sums of one micro-batch, as distill.train.micro_batch_losses computes them, under ZeRO-3."""
    from distill import zero3
    from distill.objectives import hidden_cosine_loss, lm_loss

    _, _, _, objectives, layers = STREAMS[mb.stream]
    out = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                 output_hidden_states=True, use_cache=False, logits_to_keep=1)
    states = out.hidden_states
    sums = {}
    if "lm" in objectives:
        sums["lm"] = lm_loss(states[-1], zero3.output_weight(engine), batch["labels"], chunk_size=16)[0]
    if "hidden" in objectives:
        taught = teacher_runner(batch["input_ids"], batch["position_ids"], None, layers)
        real = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        sums["hidden"] = hidden_cosine_loss([states[i] for i in layers], [taught[i] for i in layers], real)[0]
    return sums


def train(model_dir: str, out: str, steps: int, save_at: int = 0, resume: str | None = None,
          poison: bool = False) -> dict:
    """`poison`: first back-propagate a NaN loss on every rank, check the norm is non-finite and discard it with
    `zero3.skip_step` (the loop's skipped step); the run must then match an unpoisoned one exactly."""
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from distill import parallel, zero3
    from distill.config import ModelConfig, RopeConfig
    from distill.models import TruncatedTeacher, load_student, load_teacher
    from distill.train import param_groups

    rank, world = dist.get_rank(), dist.get_world_size()
    model_cfg = ModelConfig(path=model_dir, dtype="float32", attention="auto")
    student = load_student(model_cfg, RopeConfig(method="abf", theta=40000.0, target_length=512))
    teacher = load_teacher(model_dir, model_cfg)
    vocab = student.config.vocab_size
    start = 0
    result = {"loss": [], "grad_norm": [], "ds_grad_norm": [], "world": world}
    model_sd = optim_sd = None
    if resume:
        with open(os.path.join(resume, "result.json"), encoding="utf-8") as f:
            start = json.load(f)["steps"]
        model_sd = load_file(os.path.join(resume, "model.safetensors"))
        optim_sd = torch.load(os.path.join(resume, "optimizer.pt"), weights_only=True) if rank == 0 else None
        student.load_state_dict(model_sd, strict=True)  # as the loop does: into the whole model, before ZeRO-3
    optimizer = torch.optim.AdamW(param_groups(student, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    engine = zero3.wrap_student(student, optimizer, MAX_NORM, persistence_threshold=PERSIST)
    zero3.shard_teacher(teacher, persistence_threshold=PERSIST)
    teacher_runner = TruncatedTeacher(teacher)
    if resume:
        zero3.load_full_optimizer_state_dict(engine, optim_sd)
        again = zero3.full_model_state_dict(engine)
        again_optim = zero3.full_optimizer_state_dict(engine)
        if rank == 0:
            result["roundtrip_model"] = again.keys() == model_sd.keys() and all(
                torch.equal(again[k], model_sd[k]) for k in model_sd)
            result["roundtrip_optimizer"] = again_optim["param_groups"] == optim_sd["param_groups"] and all(
                torch.equal(again_optim["state"][i][k], v) for i, entry in optim_sd["state"].items()
                for k, v in entry.items())

    keys = [(n, o) for n, spec in STREAMS.items() for o in spec[3]]
    weights = {(n, o): spec[3][o] for n, spec in STREAMS.items() for o in spec[3]}

    def save(directory: str, done: int) -> None:
        model_state = zero3.full_model_state_dict(engine)
        optim_state = zero3.full_optimizer_state_dict(engine)
        if rank == 0:
            os.makedirs(directory, exist_ok=True)
            save_file(model_state, os.path.join(directory, "model.safetensors"))
            torch.save(optim_state, os.path.join(directory, "optimizer.pt"))
            with open(os.path.join(directory, "result.json"), "w", encoding="utf-8") as f:
                json.dump({**result, "steps": done}, f)

    engine.train()
    if poison:
        mb = plan_of(0)[0]
        sums = losses_of(engine, teacher_runner, mb, batch_of(mb, vocab))
        zero3.backward(engine, sum(sums.values()) * float("nan"))
        result["poisoned_norm"] = str(zero3.grad_norm(engine))
        zero3.skip_step(engine)
    for step in range(start, steps):
        plan = plan_of(step)
        slots = parallel.shard_plan_aligned(plan, rank, world)
        global_counts = {k: 0 for k in keys}
        for mb in plan:
            for obj, n in counts_of(mb, batch_of(mb, vocab)).items():
                global_counts[(mb.stream, obj)] += n
        loss_sums = torch.zeros(len(keys), dtype=torch.float64)
        for slot in slots:
            batch = batch_of(slot.fetch, vocab)
            sums = losses_of(engine, teacher_runner, slot.fetch, batch)
            scale = 0.0 if slot.is_dummy else 1.0
            loss = 0.0
            for obj, value in sums.items():
                key = (slot.stream, obj)
                loss = loss + scale * weights[key] * value / global_counts[key]
                if not slot.is_dummy:
                    loss_sums[keys.index(key)] += value.detach().double()
            zero3.backward(engine, loss)
        dist.all_reduce(loss_sums)
        norm = zero3.grad_norm(engine)  # before the step, for the loop's skip decision
        engine.step()
        result["loss"].append(sum(weights[k] * loss_sums[i].item() / global_counts[k] for i, k in enumerate(keys)))
        result["grad_norm"].append(norm)
        result["ds_grad_norm"].append(float(engine.get_global_grad_norm()))
        if save_at and step + 1 == save_at:
            save(os.path.join(out, f"step-{step + 1}"), step + 1)
    save(out, steps)
    return result


def check_teacher(model_dir: str, out: str) -> None:
    """Max |difference| of TruncatedTeacher's hidden states, ZeRO-3 vs plain, per requested depth."""
    import torch.distributed as dist

    from distill import zero3
    from distill.config import ModelConfig
    from distill.models import load_teacher

    model_cfg = ModelConfig(path=model_dir, dtype="float32", attention="auto")
    plain = load_teacher(model_dir, model_cfg)
    sharded = zero3.shard_teacher(load_teacher(model_dir, model_cfg), persistence_threshold=PERSIST)
    partitioned = all(p.numel() == 0 for p in sharded.model.layers.parameters())
    diffs = teacher_diffs(plain, sharded, ([0], [1], [1, 2], [2], [1]))  # back to a truncated depth after the full one
    if dist.get_rank() == 0:
        with open(os.path.join(out, "teacher.json"), "w", encoding="utf-8") as f:
            json.dump({"diffs": diffs, "partitioned": partitioned}, f)


def main() -> None:
    args = parse_args()

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    os.makedirs(args.out, exist_ok=True)
    check_teacher(args.model, args.out)
    first = os.path.join(args.out, "zero3")
    result = train(args.model, first, args.steps, args.save_at)
    if dist.get_rank() == 0:
        with open(os.path.join(first, "result.json"), "w", encoding="utf-8") as f:
            json.dump({**result, "steps": args.steps}, f)
    resumed = os.path.join(args.out, "resumed")
    result = train(args.model, resumed, args.steps, resume=os.path.join(first, f"step-{args.save_at}"))
    if dist.get_rank() == 0:
        with open(os.path.join(resumed, "result.json"), "w", encoding="utf-8") as f:
            json.dump({**result, "steps": args.steps}, f)
    poisoned = os.path.join(args.out, "poisoned")
    result = train(args.model, poisoned, 1, poison=True)
    if dist.get_rank() == 0:
        with open(os.path.join(poisoned, "result.json"), "w", encoding="utf-8") as f:
            json.dump({**result, "steps": 1}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
