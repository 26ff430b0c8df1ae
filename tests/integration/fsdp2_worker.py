"""A few optimiser steps of a LongReD-shaped loss, sharded with FSDP2 (under torchrun) or in one process.

    torchrun --nproc_per_node 2 tests/integration/fsdp2_worker.py MODEL_DIR OUT_DIR [--steps N] ...
    python tests/integration/fsdp2_worker.py MODEL_DIR OUT_DIR          # one process, unsharded reference

Three streams with unequal micro-batch counts (so ranks get dummies): `long` (LM loss), `short` (hidden
cosine at layers [1, 2] against the full-depth teacher) and `mid` (LM + hidden cosine at layer [1], through a
truncated teacher). Writes OUT_DIR/result.json (per-step losses and grad norms), OUT_DIR/model.safetensors
and OUT_DIR/optimizer.pt (full state dicts, the unsharded trainer's checkpoint format), and with
--save-at K the same files after K steps under OUT_DIR/step-K/.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

STREAMS = {  # name: (micro-batches per step, rows per micro-batch, seq_len, objectives {name: weight}, layers)
    "long": (3, 2, 48, {"lm": 1.0}, []),
    "short": (2, 3, 24, {"hidden": 2.0}, [1, 2]),
    "mid": (1, 2, 32, {"lm": 0.5, "hidden": 1.0}, [1]),
}
MAX_NORM = 0.5  # small enough that the tiny random model's gradients are clipped


def plan_of(step: int):
    """The global plan of a step (same on every rank, independent of the world size)."""
    from distill.mixture import MicroBatch

    plan, index = [], 0
    for name, (count, rows, _, _, _) in STREAMS.items():
        for k in range(count):
            plan.append(MicroBatch(name, [1000 * step + 10 * k + j for j in range(rows)], index))
            index += 1
    # interleave the streams as the mixture does (a fixed permutation)
    order = [3, 0, 5, 1, 4, 2]
    return [dataclass_replace(plan[j], i) for i, j in enumerate(order)]


def dataclass_replace(mb, index):
    import dataclasses

    return dataclasses.replace(mb, index=index)


def batch_of(mb, vocab: int) -> dict:
    """Deterministic token rows from the row ids: (B, T) input_ids, position_ids, labels."""
    _, _, seq_len, _, _ = STREAMS[mb.stream]
    rows = []
    for r in mb.rows:
        g = torch.Generator().manual_seed(r)
        rows.append(torch.randint(3, vocab, (seq_len,), generator=g))
    input_ids = torch.stack(rows)  # (B, T)
    positions = torch.arange(seq_len)[None, :].expand_as(input_ids).clone()  # one document per row
    labels = input_ids.clone()
    labels[:, :3] = -100  # a few positions without a target
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels}


def counts_of(mb, batch) -> dict[str, int]:
    objectives = STREAMS[mb.stream][3]
    counts = {}
    if "lm" in objectives:
        counts["lm"] = int((batch["labels"][:, 1:] != -100).sum())
    if "hidden" in objectives:
        counts["hidden"] = batch["input_ids"].numel()
    return counts


def losses_of(student, teacher_runner, mb, batch) -> dict[str, torch.Tensor]:
    """Loss sums of one micro-batch, as distill.train.micro_batch_losses computes them."""
    from distill.objectives import hidden_cosine_loss, lm_loss

    _, _, _, objectives, layers = STREAMS[mb.stream]
    # The root's forward (not get_decoder()): under FSDP2 only the root gathers embeddings and lm_head.
    out = student(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                  output_hidden_states=True, use_cache=False, logits_to_keep=1)
    states = out.hidden_states  # n_layers + 1 of (B, T, H)
    sums = {}
    if "lm" in objectives:
        sums["lm"] = lm_loss(states[-1], student.get_output_embeddings().weight, batch["labels"], chunk_size=16)[0]
    if "hidden" in objectives:
        taught = teacher_runner(batch["input_ids"], batch["position_ids"], None, layers)
        real = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        sums["hidden"] = hidden_cosine_loss([states[i] for i in layers], [taught[i] for i in layers], real)[0]
    return sums


def train(model_dir: str, out: str, steps: int, save_at: int = 0, resume: str | None = None,
          deferred_sync: bool = False, gradient_checkpointing: bool = False, mesh=None) -> dict:
    """Load student and teacher, shard both when `mesh` is given, train `steps` steps (from `resume`'s).

    Writes out/{result.json, model.safetensors, optimizer.pt} (and out/step-<save_at>/) on rank 0 and
    returns the result dict (rank 0) with per-step `loss` and `grad_norm`.
    """
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from distill import parallel
    from distill.config import ModelConfig, RopeConfig
    from distill.models import TruncatedTeacher, load_student, load_teacher
    from distill.train import param_groups

    sharded = mesh is not None
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    model_cfg = ModelConfig(path=model_dir, dtype="float32", attention="auto",
                            gradient_checkpointing=gradient_checkpointing)
    student = load_student(model_cfg, RopeConfig(method="abf", theta=40000.0, target_length=512))
    teacher = load_teacher(model_dir, model_cfg)
    vocab = student.config.vocab_size
    if sharded:
        parallel.shard_student(student, mesh)
        parallel.shard_teacher(teacher, mesh)
    teacher_runner = TruncatedTeacher(teacher)  # depth 2 (full) for `short`, a truncated copy for `mid`
    optimizer = torch.optim.AdamW(param_groups(student, 0.1), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    params = [p for p in student.parameters() if p.requires_grad]

    start = 0
    result = {"loss": [], "grad_norm": [], "world": world}
    if resume:
        with open(os.path.join(resume, "result.json"), encoding="utf-8") as f:
            start = json.load(f)["steps"]
        model_sd = load_file(os.path.join(resume, "model.safetensors")) if rank == 0 else None
        optim_sd = torch.load(os.path.join(resume, "optimizer.pt"), weights_only=True) if rank == 0 else None
        if sharded:
            parallel.load_full_model_state_dict(student, model_sd)
            parallel.load_full_optimizer_state_dict(student, optimizer, optim_sd)
            # Round trip: gathering again gives back exactly what was loaded.
            again = parallel.full_model_state_dict(student)
            again_optim = parallel.full_optimizer_state_dict(student, optimizer)
            if rank == 0:
                result["roundtrip_model"] = again.keys() == model_sd.keys() and all(
                    torch.equal(again[k], model_sd[k]) for k in model_sd)
                result["roundtrip_optimizer"] = again_optim["param_groups"] == optim_sd["param_groups"] and all(
                    torch.equal(again_optim["state"][i][k], v) for i, entry in optim_sd["state"].items()
                    for k, v in entry.items())
        else:
            student.load_state_dict(model_sd, strict=True)
            optimizer.load_state_dict(optim_sd)

    keys = [(n, o) for n, spec in STREAMS.items() for o in spec[3]]
    weights = {(n, o): spec[3][o] for n, spec in STREAMS.items() for o in spec[3]}

    def save(directory: str, done: int) -> None:
        model_sd = parallel.full_model_state_dict(student) if sharded else \
            {k: v.detach().clone() for k, v in student.state_dict().items()}
        optim_sd = parallel.full_optimizer_state_dict(student, optimizer) if sharded else optimizer.state_dict()
        if rank == 0:
            os.makedirs(directory, exist_ok=True)
            save_file(model_sd, os.path.join(directory, "model.safetensors"))
            torch.save(optim_sd, os.path.join(directory, "optimizer.pt"))
            with open(os.path.join(directory, "result.json"), "w", encoding="utf-8") as f:
                json.dump({**result, "steps": done}, f)

    for step in range(start, steps):
        plan = plan_of(step)
        slots = parallel.shard_plan_aligned(plan, rank, world) if sharded else \
            [parallel.Slot(mb.stream, mb, mb) for mb in plan]
        global_counts = {k: 0 for k in keys}
        for mb in plan:  # every micro-batch is real on one rank: the global counts come from the plan
            for obj, n in counts_of(mb, batch_of(mb, vocab)).items():
                global_counts[(mb.stream, obj)] += n
        loss_sums = torch.zeros(len(keys), dtype=torch.float64)
        for i, slot in enumerate(slots):
            if deferred_sync:
                parallel.set_gradient_sync(student, i == len(slots) - 1)
            batch = batch_of(slot.fetch, vocab)
            sums = losses_of(student, teacher_runner, slot.fetch, batch)
            scale = 0.0 if slot.is_dummy else 1.0  # a dummy: same collectives, zero gradient
            loss = 0.0
            for obj, value in sums.items():
                key = (slot.stream, obj)
                loss = loss + scale * weights[key] * value / global_counts[key]
                if not slot.is_dummy:
                    loss_sums[keys.index(key)] += value.detach().double()
            loss.backward()
        if sharded:
            dist.all_reduce(loss_sums)
        grad_norm = parallel.clip_grad_norm(params, MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result["loss"].append(sum(weights[k] * loss_sums[i].item() / global_counts[k] for i, k in enumerate(keys)))
        result["grad_norm"].append(grad_norm)
        if save_at and step + 1 == save_at:
            save(os.path.join(out, f"step-{step + 1}"), step + 1)
    save(out, steps)
    return result


def teacher_diffs(plain, sharded, layer_lists) -> dict[str, float]:
    """Max |difference| of TruncatedTeacher's hidden states, sharded vs plain, per requested layer list
    (one runner per side, reused across the lists as the trainer reuses it)."""
    from distill.models import TruncatedTeacher

    batch = batch_of(plan_of(7)[0], plain.config.vocab_size)
    runner_plain, runner = TruncatedTeacher(plain), TruncatedTeacher(sharded)
    diffs = {}
    for layers in layer_lists:
        want = runner_plain(batch["input_ids"], batch["position_ids"], None, layers)
        got = runner(batch["input_ids"], batch["position_ids"], None, layers)
        diffs[str(layers)] = max((got[i] - want[i]).abs().max().item() for i in layers) if \
            got.keys() == want.keys() else float("inf")
    return diffs


def check_teacher(model_dir: str, out: str, mesh) -> None:
    """Max |difference| of TruncatedTeacher's hidden states, sharded vs unsharded, per requested depth."""
    import torch.distributed as dist

    from distill import parallel
    from distill.config import ModelConfig
    from distill.models import load_teacher

    model_cfg = ModelConfig(path=model_dir, dtype="float32", attention="auto")
    plain = load_teacher(model_dir, model_cfg)
    sharded = parallel.shard_teacher(load_teacher(model_dir, model_cfg), mesh)
    diffs = teacher_diffs(plain, sharded, ([0], [1], [1, 2], [2]))
    if dist.get_rank() == 0:
        with open(os.path.join(out, "teacher.json"), "w", encoding="utf-8") as f:
            json.dump(diffs, f)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The workers' command line: MODEL OUT [--steps N] [--save-at K]."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--save-at", type=int, default=2)
    return parser.parse_args(argv)


def main() -> None:
    """Under torchrun: three sharded runs in one launch (process start-up dominates on CPU).

    OUT/fsdp2: `--steps` steps with a checkpoint after `--save-at`; OUT/resumed: a fresh sharded model and
    optimiser loaded from OUT/fsdp2/step-<save-at> trained to `--steps`; OUT/deferred: like OUT/fsdp2 with
    gradients reduced once per step (set_requires_gradient_sync); OUT/checkpointing: like OUT/fsdp2 with
    activation checkpointing in the student's layers. Without torchrun: one unsharded run.
    """
    args = parse_args()

    import torch.distributed as dist

    from distill import parallel

    torch.set_num_threads(1)
    if "RANK" not in os.environ:
        train(args.model, os.path.join(args.out, "single"), args.steps, args.save_at)
        return
    dist.init_process_group("gloo")
    mesh = parallel.make_mesh("cpu")
    os.makedirs(args.out, exist_ok=True)
    check_teacher(args.model, args.out, mesh)
    first = os.path.join(args.out, "fsdp2")
    train(args.model, first, args.steps, args.save_at, mesh=mesh)
    train(args.model, os.path.join(args.out, "resumed"), args.steps,
          resume=os.path.join(first, f"step-{args.save_at}"), mesh=mesh)
    train(args.model, os.path.join(args.out, "deferred"), args.steps, deferred_sync=True, mesh=mesh)
    train(args.model, os.path.join(args.out, "checkpointing"), args.steps, gradient_checkpointing=True, mesh=mesh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
