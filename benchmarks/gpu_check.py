"""The GPU paths in one short run: attention kernels on packed rows, the chunked loss against full logits
(and Liger), and a few LongReD training steps with the logged MFU. Written for a machine with a GPU (the
device sessions are short: one call of this script should answer everything); on a CPU it runs the same
checks on the CPU kernels, smaller, which is how it is tested.

(1) attention: a random-init Llama (GQA: 8 query heads, 2 key/value heads) on packed rows of --seq tokens
    (documents of 64..--seq/2 tokens). Reference: transformers' sdpa with its dense document mask, fp32.
    Each implementation (sdpa dense mask, sdpa_varlen, flash_attention_2 when flash-attn imports) runs
    forward + backward under the trainer's precision (bf16 autocast on CUDA, fp32 on CPU): max |logit
    error| / max |reference logit|, gradient error ‖g - g_ref‖ / ‖g_ref‖ over all parameters, the median
    time and (CUDA) the peak memory.
(2) loss: `lm_loss` (chunked) against full-logits cross-entropy, fp32, T = --loss-tokens, V = 32000:
    value and gradient relative errors, time, peak memory; liger-kernel's fused cross-entropy the same way
    when it is installed (CUDA only).
(3) train: `distill.train.run` on the LongReD step of distill_overhead.py (long : short : s2l =
    4 : 3 : 1, long rows 4x the short window, 8192 token slots) for --steps steps: tokens/s,
    tflops_per_s and mfu (as logged; MFU needs a known GPU name or --peak-tflops), and the peak memory.
    The planner's estimate for the same run (distill.plan, one process) against
    torch.cuda.max_memory_allocated.
(4) layout: the trainer's own inputs for a micro-batch of 4 packed rows (`StreamObjectives.model_inputs`:
    flattened to one row) through the device's attention (flash_attention_2 on CUDA when flash-attn imports,
    else sdpa_varlen): each document's logits against the document run alone (max |error|).
(5) ZeRO-3 precision: a one-process DeepSpeed engine of the student (`distill.strategies.zero3`) under the
    trainer's autocast: the dtype a linear layer computes in inside the engine's forward, with the config we
    generate and without its torch_autocast section (CUDA: bf16 and fp32).
(6) sequence parallelism, with 2+ GPUs: benchmarks/sequence_parallel.py on S = 2, 4 and 8 GPUs (as many as
    there are; nccl): each rank's slice against the unsplit row, activation memory and time per token.
Multi-GPU training runs (FSDP2 / ZeRO-3) need `accelerate launch` with recipes/accelerate/*.yaml.

Prints one JSON line.

    python benchmarks/gpu_check.py                 # CUDA: ~2-4 minutes including the set-up
    python benchmarks/gpu_check.py --device cpu    # the CPU kernels, small sizes (~2 minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import distill_overhead


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _sig(x: float, digits: int = 3) -> float:
    return float(f"{x:.{digits}g}")


def _timed(fn, device, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return common.median(times)


def packed_positions(seq: int, rows: int, seed: int):
    """(rows, seq) position_ids restarting at 0 per document, documents of 64..seq/2 tokens."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        lengths, left = [], seq
        while left > 0:
            n = min(left, int(torch.randint(64, max(65, seq // 2), (1,), generator=gen)))
            lengths.append(n)
            left -= n
        out.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(out)


def check_attention(device, seq: int, rows: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.models import resolve_attention
    from distill.testing import tiny_config

    config = tiny_config("llama", vocab_size=5000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
                         max_position_embeddings=seq)
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(copy.deepcopy(config)).state_dict()
    implementations = ["sdpa", resolve_attention("sdpa_varlen")]
    if device.type == "cuda" and resolve_attention("auto", device) == "flash_attention_2":
        implementations.append("flash_attention_2")
    positions = packed_positions(seq, rows, 0).to(device)
    ids = torch.randint(3, 5000, positions.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def model_for(name):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name)
        model.load_state_dict(state)
        return model.to(device).train()

    def run(model, autocast: bool):
        context = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
        with context:
            out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach().float()

    reference = model_for("sdpa")
    ref_logits = run(reference, autocast=False)
    ref_grads = [p.grad.detach().clone() for p in reference.parameters()]
    del reference
    low = device.type == "cuda"  # the trainer's precision on this device
    results = {}
    for name in implementations:
        model = model_for(name)
        logits = run(model, autocast=low)
        grads = [p.grad for p in model.parameters()]
        num = sum(float((g - r).float().square().sum()) for g, r in zip(grads, ref_grads))
        den = sum(float(r.float().square().sum()) for r in ref_grads)
        logit_err = float((logits - ref_logits).abs().max() / ref_logits.abs().max())

        def step(model=model):
            model.zero_grad(set_to_none=True)
            run(model, autocast=low)

        _peak_reset(device)
        seconds = _timed(step, device)
        results[name] = {"logit_rel_err": _sig(logit_err), "grad_rel_err": _sig((num / den) ** 0.5),
                         "fwd_bwd_s": round(seconds, 4), "peak_mb": _peak_mb(device)}
        del model, step
    dense = results["sdpa"]["fwd_bwd_s"]
    for r in results.values():
        r["time_vs_dense_mask"] = round(r["fwd_bwd_s"] / dense, 3)
    docs = [int((row == 0).sum()) for row in positions.cpu()]
    return {"rows": rows, "seq": seq, "documents_per_row": docs,
            "precision": "bf16 autocast" if low else "fp32", "implementations": results}


def check_loss(device, tokens: int) -> dict:
    import torch
    import torch.nn.functional as F

    from distill.objectives import IGNORE_INDEX, liger_available, lm_loss

    V, H = 32000, 512
    gen = torch.Generator().manual_seed(2)
    hidden0 = (torch.randn(1, tokens, H, generator=gen) * 0.5).to(device)
    weight0 = (torch.randn(V, H, generator=gen) * 0.02).to(device)
    labels = torch.randint(0, V, (1, tokens), generator=gen).to(device)
    labels[0, :7] = IGNORE_INDEX

    def fwd_bwd(loss_of):
        """A side: fresh leaf copies of the inputs, loss forward + backward -> (loss, grad hidden, grad
        weight)."""
        def fn():
            h, w = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
            loss = loss_of(h, w)
            loss.backward()
            return loss.detach(), h.grad, w.grad
        return fn

    def full_logits(h, w):
        logits = (h @ w.t()).float()[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    sides = {"naive": fwd_bwd(full_logits), "chunked": fwd_bwd(lambda h, w: lm_loss(h, w, labels)[0])}
    if device.type == "cuda" and liger_available():
        sides["liger"] = fwd_bwd(lambda h, w: lm_loss(h, w, labels, use_liger=True)[0])
    ref = sides["naive"]()
    out = {"tokens": tokens, "vocab": V, "hidden": H}
    for name, fn in sides.items():
        _peak_reset(device)
        got = fn()
        peak = _peak_mb(device)
        rel = [float((a - b).norm() / b.norm()) for a, b in zip(got, ref)]
        out[name] = {"loss_rel_err": _sig(rel[0]), "grad_hidden_rel_err": _sig(rel[1]),
                     "grad_weight_rel_err": _sig(rel[2]), "fwd_bwd_s": round(_timed(fn, device, 3), 4),
                     "peak_mb": peak}
    return out


def check_train(device, steps: int, peak_tflops: float | None) -> dict:
    from distill.metrics import read_metrics
    from distill.train import run

    with common.workspace() as ws:
        common.prepare_model(ws)
        out = ws.path("runs", "longred")
        streams = distill_overhead.streams(distill_overhead.build_data(ws), "longred")
        cfg = common.recipe(ws, out, streams, 8192, steps)
        cfg.log.peak_tflops = peak_tflops
        _peak_reset(device)
        t0 = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t0
        planned = _planned_peak(ws, cfg)
        records = read_metrics(os.path.join(out, "metrics.jsonl"))[1:]  # the first step warms up
        result = {"steps": steps, "wall_s": round(wall, 1), "peak_mb": _peak_mb(device),
                  "attention": "auto", "dtype": "bfloat16"}
        for key in ("tokens_per_s", "tflops_per_s", "teacher_tflops_per_s", "mfu"):
            values = [r[key] for r in records if key in r]
            if values:
                result[key] = _sig(common.median(values), 4)
        result["loss_first_last"] = [round(records[0]["loss"], 4), round(records[-1]["loss"], 4)]
        result["planned_peak_mb_without_overhead"] = round(planned / 2**20, 1)
        if result["peak_mb"]:
            result["planned_vs_measured"] = round(planned / 2**20 / result["peak_mb"], 3)
        return result


def _planned_peak(ws, cfg) -> int:
    """The planner's peak for this one-process run, without its fixed framework overhead (which
    max_memory_allocated does not see)."""
    from transformers import AutoConfig

    from distill.plan import OVERHEAD_BYTES, Shape, plan, recipe_seq_lens

    shape = Shape.from_config(AutoConfig.from_pretrained(ws.model))
    result = plan(cfg, shape, "replicated", 1, 2**50, recipe_seq_lens(cfg))
    return result["peak_bytes"] - OVERHEAD_BYTES


def check_layout(device) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import StreamConfig, from_dict
    from distill.models import resolve_attention
    from distill.step import StreamObjectives
    from distill.testing import tiny_config

    name = resolve_attention("auto", device, "llama")
    config = tiny_config("llama", vocab_size=5000, hidden_size=256, num_layers=2, num_heads=8,
                         num_kv_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name).to(device).eval()
    low = device.type == "cuda"
    if low:
        model = model.to(torch.bfloat16)
    positions = packed_positions(512, 4, 3)  # (4, 512)
    ids = torch.randint(3, 5000, positions.shape, generator=torch.Generator().manual_seed(4))
    stream_cfg = from_dict(StreamConfig, {"data": "-", "objectives": {"lm": 1.0}})
    stream = StreamObjectives(name="short", cfg=stream_cfg, data=None, layers=[], num_layers=2,
                              target_length=4096)
    inputs, _ = stream.model_inputs({"input_ids": ids, "position_ids": positions}, 0)
    with torch.no_grad():
        flat = model(**{k: (v.to(device) if v is not None else None) for k, v in inputs.items()},
                     use_cache=False).logits.float().view(4, 512, -1)
        worst = 0.0
        for r in range(4):
            starts = (positions[r] == 0).nonzero().flatten().tolist() + [512]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=ids[r:r + 1, a:b].to(device), use_cache=False).logits.float()
                worst = max(worst, (flat[r, a:b] - alone[0]).abs().max().item())
    return {"attention": name, "rows": 4, "tokens_per_row": 512, "max_logit_error_vs_alone": _sig(worst),
            "dtype": "bfloat16" if low else "float32"}


def check_zero3_precision(device) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from distill.config import OptimConfig
    from distill.optim import make_optimizer
    from distill.strategies import zero3
    from distill.testing import tiny_config

    if not dist.is_initialized():
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29631"), ("RANK", "0"),
                           ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    result = {}
    for label, dtype in (("with_torch_autocast", torch.bfloat16), ("without", None)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=64, hidden_size=64, num_layers=1),
                                                 dtype=torch.float32).to(device)
        optimizer = make_optimizer(model, OptimConfig(), sharded=True)
        engine = zero3.wrap_student(model, optimizer, 1.0, autocast=dtype)
        seen = {}
        engine.module.model.layers[0].mlp.up_proj.register_forward_hook(
            lambda m, a, out: seen.update(dtype=str(out.dtype)))
        with torch.autocast(device.type, dtype=torch.bfloat16):  # the trainer's autocast
            engine(input_ids=torch.randint(0, 64, (1, 8), device=device), use_cache=False)
        result[label] = seen["dtype"]
    return result


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--seq", type=int, default=None, help="(1) packed row length (cuda 8192, cpu 1024)")
    parser.add_argument("--rows", type=int, default=2, help="(1) packed rows per batch")
    parser.add_argument("--loss-tokens", type=int, default=None, help="(2) tokens (cuda 16384, cpu 2048)")
    parser.add_argument("--steps", type=int, default=None, help="(3) training steps (cuda 12, cpu 3)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="(3) per-device peak for MFU")
    parser.add_argument("--part", default="123456", help="which checks to run, e.g. 12")
    parser.add_argument("--out", help="also write the JSON report to this file")
    args = parser.parse_args()
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    gpu = device.type == "cuda"
    common.quiet()
    if not gpu:
        common.set_threads(1)
    result = {"device": torch.cuda.get_device_name(device) if gpu else "cpu",
              "cuda_devices": torch.cuda.device_count(), "torch": torch.__version__}
    import transformers

    result["transformers"] = transformers.__version__
    if "1" in args.part:
        common.log("(1) attention kernels on packed rows")
        result["attention"] = check_attention(device, args.seq or (8192 if gpu else 1024), args.rows)
    if "2" in args.part:
        common.log("(2) chunked loss vs full logits")
        result["loss"] = check_loss(device, args.loss_tokens or (16384 if gpu else 2048))
    if "3" in args.part:
        common.log("(3) LongReD training steps")
        result["train"] = check_train(device, args.steps or (12 if gpu else 3), args.peak_tflops)
    if "4" in args.part:
        common.log("(4) packed micro-batch layout through the device's attention")
        result["layout"] = check_layout(device)
    if "5" in args.part:
        common.log("(5) ZeRO-3 compute dtype")
        try:
            result["zero3_precision"] = check_zero3_precision(device)
        except ImportError as err:
            result["zero3_precision"] = f"skipped: {err}"
    if "6" in args.part:
        result["sequence_parallel"] = check_sequence_parallel(device)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


def check_sequence_parallel(device) -> dict | str:
    import subprocess

    import torch

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        return f"skipped: needs 2+ GPUs ({gpus} visible); CPU equality is tests/integration/test_sequence.py"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sequence_parallel.py")
    results = {}
    for size in (2, 4, 8):
        if size > gpus:
            break
        common.log(f"(6) sequence parallelism over {size} GPUs")
        cmd = [sys.executable, script, "--device", "cuda", "--processes", str(size), "--tokens",
               str(16384 * size), "--repeats", "3"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        results[str(size)] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
            f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}"
    return results


if __name__ == "__main__":
    import contextlib

    # Whatever the libraries print (DeepSpeed announces the ops it builds) goes to stderr: stdout carries
    # the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        report = main()
    print(json.dumps(report))
