"""Plan a run's memory per GPU from the recipe and the model's config.json, before anything is loaded.

    python scripts/plan.py RECIPE [--accelerate-config recipes/accelerate/fsdp2.yaml] [--gpus N]
        [--gpu h100-80gb|h200-141gb|a100-80gb|BYTES] [--host-ram BYTES] [--mfu 0.4] [--peak-tflops T]
        [--max-context] [--json] [a.b=value ...]

Reads only the model's (and the teacher's) `config.json`, never the weights, so a 70B run can be planned on a
laptop; works before the data is built when the recipe gives `streams.<name>.seq_len`. Prints the parameters,
gradients and optimiser state, the teacher, each stream's activations (with and without gradient
checkpointing), loss buffers and overhead per GPU, the peak, whether it fits, the smallest
sequence-parallel degree that fits, the peak with each long-context saver off and on (offloaded
checkpoints, tiled MLP, ring vs Ulysses attention), the set-up's GPU peak, host memory per rank and node (the
rank's shard at load, pinned offload buffers, the checkpoint and export path) against `--host-ram` (default:
this machine's RAM), the shard group under parallel.replicate (HSDP), the checkpoint size and the collective
timeout (from the step time and one rank's checkpoint write, as the trainer sizes it); then the budget:
tokens per step and per run, step time and hours at `--mfu` (default 0.4), checkpoints on disk under
train.keep_last / keep_every, and the stop grace a cluster must leave between its signal and the kill.
`--max-context` adds the longest long-stream row that fits the GPUs and the node's RAM (a bisection over its
length, the other streams as they are, at the smallest sequence-parallel degree that fits). `--json` prints
the same as one JSON object (the budget under "budget"). Overrides may come before or after the flags. A user
mistake prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.cli import Parser, UsageError, number  # noqa: E402
from distill.config import ConfigError  # noqa: E402


class _Parser(Parser):
    def parse_args(self, args=None, namespace=None):
        # `plan.py RECIPE --gpus 8 --json model.path=X`: overrides may come after the flags, as distill.train
        # takes them (a plain `nargs="*"` positional cannot follow optionals).
        return self.parse_intermixed_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="training recipe YAML")
    p.add_argument("overrides", nargs="*", help="a.b=value recipe overrides")
    p.add_argument("--accelerate-config", help="the launcher config (default: FSDP2 on 8 GPUs)")
    p.add_argument("--gpus", type=number(int), help="GPUs in the launch (default: the accelerate config's)")
    p.add_argument("--gpu", default="h100-80gb", help="h100-80gb (default), h200-141gb, a100-80gb, or bytes")
    p.add_argument("--host-ram", help="a node's RAM, bytes or 512GiB / 1TiB / 2TB (default: this machine's)")
    p.add_argument("--max-context", action="store_true",
                   help="also the longest long-stream row that fits (JSON: max_context)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--mfu", type=number(float), default=0.4,
                   help="model FLOPs utilisation the step time assumes (default 0.4)")
    p.add_argument("--peak-tflops", type=number(float),
                   help="dense bf16 peak TFLOP/s per GPU (default: log.peak_tflops, else the --gpu's)")
    return p


def make_plan(args) -> dict:
    from transformers import AutoConfig

    from distill.config import load_recipe
    from distill.plan import (
        Shape,
        accelerate_launch,
        byte_size,
        collective_timeout,
        gpu_memory,
        max_context,
        node_ram_bytes,
        plan_with_sequence_parallel,
        recipe_seq_lens,
    )

    cfg = load_recipe(args.recipe, args.overrides)
    try:
        gpu_bytes = gpu_memory(args.gpu)
    except ValueError:
        raise UsageError(f"--gpu {args.gpu!r}: allowed: h100-80gb, h200-141gb, a100-80gb, or a size in bytes "
                         f"(e.g. 85e9, 80GiB)") from None
    try:
        host_ram = node_ram_bytes() if args.host_ram is None else byte_size(args.host_ram)
    except (ValueError, OverflowError):
        raise UsageError(f"--host-ram {args.host_ram!r}: a size in bytes or with a unit (e.g. 512GiB, 1TiB, "
                         f"2e12)") from None
    if args.accelerate_config is not None and not os.path.isfile(args.accelerate_config):
        raise UsageError(f"--accelerate-config {args.accelerate_config}: no such file")
    mode, world = accelerate_launch(args.accelerate_config)
    world = args.gpus or world

    def config(path: str, key: str):
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        except Exception as err:  # noqa: BLE001 - any failure here is the user's path
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{key}: cannot read the config of '{path}': {first}") from None

    shape = Shape.from_config(config(cfg.model.path, "model.path"))
    teacher = Shape.from_config(config(cfg.teacher.path, "teacher.path")) if cfg.teacher.path else shape
    seq_lens = recipe_seq_lens(cfg)
    result = plan_with_sequence_parallel(cfg, shape, mode, world, gpu_bytes, seq_lens, teacher, variants=True,
                                         host_ram=host_ram)
    result.update({"recipe": args.recipe, "gpu": args.gpu, "parameters": shape.params})
    result["budget"] = make_budget(args, cfg, shape, teacher, mode, world, seq_lens)
    timeout = collective_timeout(cfg, shape, teacher if cfg.teacher.path else None, mode, world, seq_lens,
                                 result["budget"]["peak_tflops"])
    result.update(collective_timeout_s=timeout["seconds"], collective_timeout_reason=timeout["reason"])
    if args.max_context:
        longest = max_context(cfg, shape, mode, world, gpu_bytes, seq_lens, teacher, host_ram=host_ram)
        result.update({"max_context": longest["max_context"], "max_context_stream": longest["stream"],
                       "max_context_sequence_parallel": longest["sequence_parallel"],
                       "max_context_peak_bytes": longest["peak_bytes"],
                       "max_context_host_bytes_per_node": longest["host_bytes_per_node"]})
    return result


def make_budget(args, cfg, shape, teacher, mode: str, world: int, seq_lens: dict[str, int]) -> dict:
    """Tokens, time at --mfu, checkpoints on disk and the stop grace (distill.plan.run_budget)."""
    from distill.model.flops import peak_by_name
    from distill.plan import run_budget

    if args.mfu > 1:
        raise UsageError(f"--mfu {args.mfu}: a fraction of the peak, in (0, 1]")
    peak = args.peak_tflops or cfg.log.peak_tflops or peak_by_name(args.gpu.strip())
    return run_budget(cfg, shape, teacher if cfg.teacher.path else None, world, seq_lens, args.mfu, peak,
                      mode)


def format_budget(result: dict) -> list[str]:
    b, world = result["budget"], result["world"]
    per_stream = ", ".join(f"{n} {t / 1e6:.2f}M" for n, t in b["tokens_per_step_by_stream"].items())
    run = ", ".join(f"{n} {t / 1e6:.0f}M" for n, t in b["tokens_per_run"].items())
    lines = [f"tokens per step {b['tokens_per_step'] / 1e6:.2f}M ({per_stream}); per run: {run}"]
    if b["step_s"] is None:
        lines.append("time: unknown peak TFLOP/s for this --gpu; give --peak-tflops")
    else:
        lines.append(f"time at MFU {b['mfu']:.2f} of {b['peak_tflops']:.0f} TFLOP/s x {world} GPUs: "
                     f"{b['step_s']:.1f} s per step, {b['train_hours']:.1f} h of training + "
                     f"{b['checkpoint_hours']:.1f} h writing {b['checkpoints_saved']} checkpoints = "
                     f"{b['total_hours']:.1f} h")
    writers = b["checkpoint_writers"]
    speed = f"{b['checkpoint_write_gb_per_s']:g} GB/s"
    who = f"{writers} ranks writing in parallel at {speed} each" if writers > 1 else \
        f"rank 0 writing at {speed}"
    lines.append(f"checkpoints: {b['checkpoint_bytes'] / 1e9:.1f} GB each (fp32 weights + AdamW), "
                 f"{b['checkpoint_write_s']:.0f} s to write ({who}, parallel.checkpoint_write_gb_per_s); "
                 f"at most "
                 f"{b['checkpoints_on_disk_max']} on disk = {b['checkpoint_disk_bytes_max'] / 1e12:.2f} TB "
                 f"(train.keep_last / keep_every), {b['checkpoints_at_end']} at the end")
    if b["stop_grace_s"] is not None:
        lines.append(f"stop grace: one step + one checkpoint ~ {b['stop_grace_s']} s: sbatch "
                     f"--signal=B:USR1@{b['stop_grace_s']} and STOP_GRACE={b['stop_grace_s']} "
                     f"(scripts/slurm/train.sbatch)")
    return lines


def format_plan(result: dict) -> str:
    gib = 1024**3
    lines = [f"{result['recipe']}: {result['mode']} on {result['world']} x {result['gpu']} "
             f"({result['gpu_bytes'] / gib:.1f} GiB each), {result['parameters'] / 1e9:.2f}B parameters",
             "per GPU (GiB):"]
    for key, value in result["breakdown"].items():
        lines.append(f"  {key:<28} {value / gib:8.2f}")
    lines.append("per stream, one micro-batch (GiB):")
    lines.append(f"  {'stream':<10} {'tokens':>9} {'act (ckpt)':>11} {'act (none)':>11} {'losses':>8} "
                 f"{'teacher':>8}")
    for name, s in result["streams"].items():
        lines.append(f"  {name:<10} {s['tokens_per_micro_batch']:>9} "
                     f"{s['activations_with_checkpointing'] / gib:>11.2f} "
                     f"{s['activations_without_checkpointing'] / gib:>11.2f} {s['loss_buffers'] / gib:>8.2f} "
                     f"{s['teacher_activations'] / gib:>8.2f}")
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines.append(f"peak {result['peak_bytes'] / gib:.1f} GiB per GPU: {verdict}")
    if result["replicate"] > 1:
        group = result["shard_group"]
        lines.append(f"HSDP: parallel.replicate {result['replicate']} x shard groups of {group} ranks "
                     f"(the state above is divided by {group})")
    if result.get("replicate_problem"):
        lines.append(f"the trainer refuses it: {result['replicate_problem']}")
    host = result["host"]
    phases = ", ".join(f"{k} {v / gib:.1f}" for k, v in host["per_rank"].items())
    verdict = "" if host["fits"] is None else (
        f": {'fits' if host['fits'] else 'does NOT fit'} the node's {host['ram_bytes'] / gib:.1f} GiB "
        f"(--host-ram)")
    lines.append(f"set-up (before the first step): {result['setup_peak_bytes'] / gib:.1f} GiB per GPU; host "
                 f"memory {result['host_bytes_per_rank'] / gib:.1f} GiB per rank, "
                 f"{result['host_bytes_per_node'] / gib:.1f} GiB per node of "
                 f"{result['ranks_per_node']} ranks{verdict}")
    lines.append(f"host per rank (GiB; the process plus the worst of load / offload + checkpoint / export): "
                 f"{phases}")
    saver = result["savers"]
    if saver["offload_activations"]:
        lines.append(f"offloaded checkpoints (parallel.offload_activations): "
                     f"{result['offloaded_host_bytes_per_rank'] / gib:.1f} GiB pinned host memory per rank, "
                     f"{result['offloaded_host_bytes_per_node'] / gib:.1f} GiB per node")
    peaks = ", ".join(f"{k} {v / gib:.1f}" for k, v in result["peak_by_savers"].items())
    chunks = result["tiled_mlp_chunks_compared"]
    lines.append(f"peak by long-stream saver (GiB; tiled MLP in {chunks} chunks): {peaks}")
    lines.append(f"checkpoint {result['checkpoint_bytes'] / 1e9:.1f} GB; collective timeout "
                 f"{result['collective_timeout_s']:.0f} s: {result['collective_timeout_reason']}")
    if result.get("sequence_parallel_problem"):
        lines.append(f"parallel.sequence_parallel {result['sequence_parallel']}: the trainer refuses it: "
                     f"{result['sequence_parallel_problem']}")
    sp = result["min_sequence_parallel"]
    lines.append("smallest sequence-parallel degree that fits: "
                 + (f"{sp} ({result['peak_bytes_at_min_sequence_parallel'] / gib:.1f} GiB)" if sp
                    else "none"))
    if "budget" in result:
        lines.extend(format_budget(result))
    if "max_context" in result:
        sp = result["max_context_sequence_parallel"]
        lines.append(f"longest {result['max_context_stream']} row that fits: {result['max_context']} tokens"
                     + (f" (sequence parallelism {sp}, {result['max_context_peak_bytes'] / gib:.1f} GiB)"
                        if sp else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from distill.cli import guarded

    code, args, result = guarded(build_parser(), make_plan, (ConfigError,), argv)
    if code:
        return code
    print(json.dumps(result) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
