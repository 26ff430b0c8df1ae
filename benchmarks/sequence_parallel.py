"""Sequence parallelism on 2 CPU processes: activation memory and time per token, S = 2 against S = 1.

The benchmarks' tiny Llama (4 layers x 256, 8 heads, ~6.8M parameters), the trainer's attention (--attention
auto: flash-attn on CUDA when installed, else sdpa_varlen) and precision (--dtype), one long packed row
of --tokens tokens (documents of 300-1500 tokens, one of them crossing the shard edge), forward + LM loss +
backward, both ranks at once (gloo, one thread each):
  S = 1: each rank runs the whole row (what a rank holds without sequence parallelism);
  S = 2: the two ranks split the row (distill.parallel.ulysses), all-to-all around attention (Ulysses);
  ring (with --ring): the two ranks hold zigzag slices of the row, K/V blocks round the ring
  (distill.parallel.ring).
Activation memory per rank: the bytes the forward saves for backward (distill.train.spans.SavedTensorBytes,
the
planner's calibration instrument), the peak a rank holds for the row. Time per token: rank-seconds per token
of the row (S x wall time / tokens), median over --repeats interleaved repeats after a warm-up.

Prints one JSON line: {"activation_memory_ratio" (S / S=1 per rank; target <= 0.55 at S = 2),
"time_per_token_ratio" (S / S=1), "max_state_error" (the final hidden states of each rank's slice against the
unsplit row's; loss and gradients are checked in tests/integration/test_sequence.py),
"saved_bytes_per_rank": {"1", "S"}, "seconds": {"1", "S"}, "setup"}; with --ring also
"ring_activation_memory_ratio", "ring_time_per_token_ratio", "ring_max_state_error" (ring against S = 1) and
"ring" entries in saved_bytes_per_rank and seconds, from the same interleaved repeats.

    python benchmarks/sequence_parallel.py             # ~1 minute on 2 cores
    python benchmarks/sequence_parallel.py --ring      # Ulysses and ring, S = 2
    python benchmarks/sequence_parallel.py --device cuda --processes 4 --tokens 65536   # S = 4 on 4 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def worker(model_dir: str, tokens: int, repeats: int, out: str, device_type: str = "cpu",
           attention_name: str = "auto", dtype_name: str = "float32", with_ring: bool = False) -> None:
    import common
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from distill.model.objectives import lm_loss
    from distill.parallel import ring
    from distill.parallel import ulysses as sequence
    from distill.train.spans import SavedTensorBytes

    torch.set_num_threads(1)
    cuda = device_type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    from distill.model.attention import document_offsets
    from distill.model.load import resolve_attention

    inner = resolve_attention(attention_name, device, "llama")
    sequence.check_attention(inner, world)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=inner,
                                                 dtype=torch.float32).to(device)
    low = getattr(torch, dtype_name)
    ids, positions, targets = (t.to(device) for t in common.packed_row(tokens, model.config.vocab_size))
    offsets = {k: v.to(device) if hasattr(v, "to") else v
               for k, v in document_offsets(positions.cpu()).items()}
    sp = sequence.SequenceParallel(world, rank, world)
    split_name = sequence.register(inner)
    zigzag = ring.RingParallel(world, rank, world)
    ring_name = ring.register(inner)

    final = {}

    def step(size) -> tuple[int, float]:
        model.zero_grad(set_to_none=True)
        # The trainer's inputs: the whole row's document offsets with every (piece of the) row.
        if size == 1:
            model.set_attn_implementation(inner)
            inputs, tgt, context = {"input_ids": ids, "position_ids": positions, **offsets}, targets, None
        else:
            group = zigzag if size == "ring" else sp
            model.set_attn_implementation(ring_name if size == "ring" else split_name)
            inputs = {"input_ids": group.piece(ids), "position_ids": group.piece(positions), **offsets}
            tgt, context = group.piece(targets), group.on("long")
        recorder = SavedTensorBytes()
        dist.barrier()
        t0 = time.perf_counter()
        with recorder("student_forward", "long"), torch.autocast(device.type, dtype=low,
                                                                 enabled=low != torch.float32):
            if context is not None:
                with context:
                    out = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
            else:
                out = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        loss = lm_loss(out.hidden_states[-1], model.get_output_embeddings().weight, tgt, shifted=True)[0]
        loss.backward()
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        final[size] = out.hidden_states[-1].detach()
        return recorder.bytes["long"][0], time.perf_counter() - t0

    sizes = (1, world, "ring") if with_ring else (1, world)
    for size in sizes:  # warm-up
        step(size)
    saved, seconds = {s: [] for s in sizes}, {s: [] for s in sizes}
    for r in range(repeats):
        for size in (sizes if r % 2 == 0 else sizes[::-1]):
            b, s = step(size)
            saved[size].append(b)
            seconds[size].append(s)
    errors = [(final[world] - sp.piece(final[1])).abs().max().item()]
    if with_ring:
        errors.append((final["ring"] - zigzag.piece(final[1])).abs().max().item())
    error = torch.tensor(errors, device=device)
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in seconds.items()}
        result = {
            "activation_memory_ratio": round(statistics.median(saved[world]) / statistics.median(saved[1]),
                                             3),
            "time_per_token_ratio": round((world * med[world]) / (1 * med[1]), 3),
            "max_state_error": float(error[0].item()),
            "saved_bytes_per_rank": {str(k): int(statistics.median(v)) for k, v in saved.items()},
            "seconds": {str(k): round(v, 4) for k, v in med.items()},
            "setup": {"tokens": tokens, "documents": int((positions == 0).sum()), "repeats": repeats,
                      "processes": world,
                      "device": device_type, "attention": inner, "dtype": dtype_name,
                      "model": "4 layers x 256, 8 heads"},
        }
        if with_ring:
            result["ring_activation_memory_ratio"] = round(statistics.median(saved["ring"])
                                                           / statistics.median(saved[1]), 3)
            result["ring_time_per_token_ratio"] = round((world * med["ring"]) / med[1], 3)
            result["ring_max_state_error"] = float(error[1].item())
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2, help="S, the processes of the group (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--attention", default="auto", help="model.attention (auto: flash-attn on CUDA when "
                                                            "installed, else sdpa_varlen)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="autocast dtype over fp32 weights, as the trainer (default: bfloat16 on CUDA, "
                             "float32 on a CPU)")
    parser.add_argument("--ring", action="store_true",
                        help="also ring attention at S (distill.parallel.ring)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        worker(args.worker[0], args.tokens, args.repeats, args.worker[1], args.device, args.attention, dtype,
               args.ring)
        return
    import common

    from distill.testing import run_workers

    common.quiet()
    with common.workspace() as ws:
        common.prepare_model(ws)
        out = ws.path("result.json")
        flags = ["--tokens", str(args.tokens), "--repeats", str(args.repeats), "--device", args.device,
                 "--attention", args.attention, "--dtype", dtype, "--worker", ws.model, out]
        try:
            result = run_workers(os.path.abspath(__file__), args.processes, 29620,
                                 flags + (["--ring"] if args.ring else []), out)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
        print(json.dumps(result))


if __name__ == "__main__":
    main()
