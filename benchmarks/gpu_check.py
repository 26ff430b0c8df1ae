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
Multi-GPU runs (FSDP2 / ZeRO-3 over 2+ GPUs) need `accelerate launch`; this script reports the device
count and leaves them to recipes/accelerate/*.yaml.

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
        records = read_metrics(os.path.join(out, "metrics.jsonl"))[1:]  # the first step warms up
        result = {"steps": steps, "wall_s": round(wall, 1), "peak_mb": _peak_mb(device),
                  "attention": "auto", "dtype": "bfloat16"}
        for key in ("tokens_per_s", "tflops_per_s", "teacher_tflops_per_s", "mfu"):
            values = [r[key] for r in records if key in r]
            if values:
                result[key] = _sig(common.median(values), 4)
        result["loss_first_last"] = [round(records[0]["loss"], 4), round(records[-1]["loss"], 4)]
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--seq", type=int, default=None, help="(1) packed row length (cuda 8192, cpu 1024)")
    parser.add_argument("--rows", type=int, default=2, help="(1) packed rows per batch")
    parser.add_argument("--loss-tokens", type=int, default=None, help="(2) tokens (cuda 16384, cpu 2048)")
    parser.add_argument("--steps", type=int, default=None, help="(3) training steps (cuda 12, cpu 3)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="(3) per-device peak for MFU")
    parser.add_argument("--part", default="123", help="which checks to run, e.g. 12")
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
