"""Training throughput: (a) our trainer's LM-only loop against the Hugging Face Trainer; (b) packed against
padded batches of variable-length short documents.

Model: the tiny Llama of benchmarks/common.py (4 layers x 256 hidden, 8 heads, vocab 5000, ~6.8M
parameters), bf16 autocast on the CPU with fp32 master weights (--dtype float32 for plain fp32), fused
AdamW (betas 0.9/0.95, weight decay 0.1: the default of both our trainer and the HF Trainer), grad-norm
clip 1.0, constant LR, one intra-op thread (see common.set_threads). Data: stdlib sources built by
`distill.data.build`.

(a) Long CPT, LM only, rows of 1024 tokens (concat packing), 4 micro-batches of 1 row per optimiser step:
    ours = `distill.train.loop.run` on the built `long` stream with its defaults (`attention: auto`, i.e.
           sdpa_varlen on the CPU: documents isolated by position_ids, one causal SDPA per document;
           chunked cross-entropy);
    HF   = `transformers.Trainer` on the same rows as a `datasets.Dataset` of input_ids/labels (labels
           identical to ours), sdpa, per_device_train_batch_size 1, gradient_accumulation_steps 4, bf16,
           use_cpu, its default optimiser (adamw_torch_fused), constant schedule, logging/saving/reporting
           off, no position_ids (plain causal attention over the whole row, as `group_texts` recipes train).
    Both: the same number of steps; tokens/s = token slots / wall time between consecutive step ends,
    median over the steps after --warmup, over --repeats interleaved runs of each.
(b) The same short documents (stdlib modules of 30-1024 tokens, EOS included), one pass, the same number
    of optimiser steps on each side, forward + loss + backward + clip + AdamW step timed per step, the
    trainer's attention (sdpa_varlen) and optimiser on both sides:
    packed = best_fit rows of 1024 from our builder, 2 rows per step, position_ids restarting per document
             and attention_mask None (documents isolated: one causal SDPA per document);
    padded = the documents of those rows in a seeded random order, one per row, padded on the right to the
             longest in the batch, attention_mask marking the padding (transformers' masked sdpa); as many
             documents per step as make the same number of steps.
    Both use the decoder + `distill.model.objectives.lm_loss`; real tokens/s counts document tokens only.

Prints one JSON line:
    {"ours_tokens_per_s", "hf_trainer_tokens_per_s", "ratio" (ours / HF, target >= 1.0), "cpu_ratio" (the
     same by process CPU time, less disturbed by other load),
     "packed_real_tokens_per_s", "padded_real_tokens_per_s", "packed_vs_padded_ratio" (target >= 1.5),
     "cpu_packed_vs_padded_ratio", "docs", "setup",
     "profile": {"ours_step": where our step's time goes, "hf_step_s", "diagnostics_1x1024": the cost of
                 isolating documents (dense mask vs sdpa_varlen) and of our chunked LM loss on one row,
                 "packed", "padded"}}

    python benchmarks/throughput.py            # ~4-5 minutes on 2 shared cores
    python benchmarks/throughput.py --quick    # ~2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

SEQ_LEN = 1024
MICRO_BATCHES = 4  # per optimiser step in part (a), 1 row of SEQ_LEN each
PACKED_ROWS_PER_STEP = 2  # part (b)
LR, BETAS, WEIGHT_DECAY, MAX_GRAD_NORM = 1.0e-4, (0.9, 0.95), 0.1, 1.0


def reset_accelerate() -> None:
    """Forget the process-wide accelerate state between runs (the HF Trainer sets bf16 mixed precision on
    it)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def autocast(dtype: str):
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# (a) our loop vs transformers.Trainer
# ---------------------------------------------------------------------------------------------------
def run_ours(ws, data: dict, out: str, steps: int, warmup: int, dtype: str) -> tuple[list[dict], list[float]]:
    reset_accelerate()
    streams = {"long": {"data": data["long"], "share": 1, "micro_batch": 1, "objectives": {"lm": 1.0}}}
    cfg = common.recipe(ws, out, streams, MICRO_BATCHES * SEQ_LEN, steps, dtype=dtype)
    profiler = common.run_profiled(cfg, warmup)
    steps_ = profiler.measured(warmup)
    return steps_, [s["step_tokens"] / s["wall_s"] for s in steps_]


def hf_dataset(path: str):
    """Every row of a built stream as a datasets.Dataset of input_ids / labels (lists of ints)."""
    import datasets
    import numpy as np

    from distill.data.dataset import PackedStream

    stream = PackedStream(path)
    batch = stream.batch(np.arange(len(stream)))
    return datasets.Dataset.from_dict({"input_ids": batch["input_ids"].tolist(),
                                       "labels": batch["labels"].tolist()})


def run_hf(ws, dataset, out: str, steps: int, warmup: int, dtype: str) -> tuple[list[float], list[float]]:
    """tokens/s per measured step by wall time and by process CPU time."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    reset_accelerate()
    ends: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            ends.append((time.perf_counter(), time.process_time()))

    model = AutoModelForCausalLM.from_pretrained(ws.model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    args = TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=MICRO_BATCHES,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused",
        bf16=dtype == "bfloat16", use_cpu=True, logging_strategy="no", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=[StepClock()])
    # the Trainer prints its summary dict; stdout is for the JSON line
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    pairs = list(itertools.pairwise(ends))[warmup:]
    return ([MICRO_BATCHES * SEQ_LEN / (b[0] - a[0]) for a, b in pairs],
            [MICRO_BATCHES * SEQ_LEN / (b[1] - a[1]) for a, b in pairs])


# ---------------------------------------------------------------------------------------------------
# (b) packed vs padded
# ---------------------------------------------------------------------------------------------------
def packed_and_padded_batches(path: str, rows: int, seed: int = 0):
    """The first `rows` rows of a built best_fit stream as packed batches, and their documents as padded
    batches (same documents, same number of batches). Returns (packed, padded, real_tokens, stats)."""
    import numpy as np
    import torch

    from distill.data.dataset import IGNORE_INDEX, PackedStream

    stream = PackedStream(path)
    rows = min(rows, len(stream))
    rows -= rows % PACKED_ROWS_PER_STEP
    packed, docs = [], []
    for start in range(0, rows, PACKED_ROWS_PER_STEP):
        index = list(range(start, start + PACKED_ROWS_PER_STEP))
        batch = stream.batch(index)
        packed.append({k: batch[k] for k in ("input_ids", "position_ids", "labels")})
        for i in index:
            ids, offset = stream.input_ids(i), 0
            for n in stream.lengths(i):
                docs.append(ids[offset: offset + n].astype(np.int64))
                offset += n
    order = np.random.default_rng(seed).permutation(len(docs))
    pad_id = int(stream.info.get("pad_token_id") or 0)
    padded = []
    for group in np.array_split(order, len(packed)):
        width = max(len(docs[j]) for j in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, j in enumerate(group):
            ids[r, : len(docs[j])] = torch.from_numpy(docs[j])
            mask[r, : len(docs[j])] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX  # a document's first token has no target (as in packed rows)
        positions = torch.arange(width)[None].expand(len(group), width)
        padded.append({"input_ids": ids, "position_ids": positions, "labels": labels, "attention_mask": mask})
    real = sum(len(d) for d in docs)
    lengths = [len(d) for d in docs]
    stats = {"documents": len(docs), "real_tokens": real, "steps": len(packed),
             "doc_tokens_min_median_max": [min(lengths), int(np.median(lengths)), max(lengths)],
             "packed_slots": rows * SEQ_LEN, "padded_slots": int(sum(b["input_ids"].numel() for b in padded)),
             "docs_per_padded_step": round(len(docs) / len(packed), 2)}
    return packed, padded, real, stats


def train_batches(ws, batches: list[dict], dtype: str) -> list[tuple[float, float]]:
    """One untimed warm-up step on the first batch, then every batch once: [(wall_s, cpu_s)] per step."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import OptimConfig
    from distill.model.load import resolve_attention
    from distill.model.objectives import lm_loss
    from distill.optim.optimizer import make_optimizer

    # The trainer's default (`attention: auto` = sdpa_varlen on the CPU): packed rows run one causal SDPA per
    # document; padded rows carry a mask, which sdpa_varlen hands to transformers' sdpa unchanged.
    model = AutoModelForCausalLM.from_pretrained(ws.model, dtype=torch.float32,
                                                 attn_implementation=resolve_attention("auto"))
    model.config.use_cache = False
    model.train()
    optimizer = make_optimizer(model, OptimConfig(lr=LR, betas=list(BETAS), weight_decay=WEIGHT_DECAY),
                               sharded=False)
    params = [p for p in model.parameters() if p.requires_grad]
    decoder, head = model.get_decoder(), model.get_output_embeddings()

    def step(batch):
        with autocast(dtype):
            hidden = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
            loss, count = lm_loss(hidden, head.weight, batch["labels"])  # (B, T, H) -> sum, count
        (loss / count.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    times = []
    for batch in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


# ---------------------------------------------------------------------------------------------------
# diagnostics behind the two ratios
# ---------------------------------------------------------------------------------------------------
def _cpu_median(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return common.median(times)


def diagnostics(ws, dtype: str) -> dict:
    """Process CPU seconds of the pieces that differ between the sides, on one 1024-token row:
    decoder forward+backward with contiguous positions (causal, no mask: what the HF Trainer runs) vs
    positions restarting at document boundaries (isolated documents, as our packed rows need) through
    transformers' sdpa (a dense T x T document mask) and through sdpa_varlen (one causal SDPA per
    document, our default), for two documents (1/3 + 2/3 of the row) and for six of 49-291 tokens; and the
    LM loss forward+backward as `distill.model.objectives.lm_loss` computes it (logits in chunks, matmuls in
    the
    autocast dtype, reductions fp32, recomputed in backward) vs bf16 logits under autocast +
    F.cross_entropy (what the HF model runs)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from distill.model.load import resolve_attention
    from distill.model.objectives import lm_loss

    model = AutoModelForCausalLM.from_pretrained(ws.model, dtype=torch.float32, attn_implementation="sdpa")
    decoder, weight = model.get_decoder(), model.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, SEQ_LEN), generator=gen)  # (1, T)

    def positions(*lengths):
        return torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T)

    rows = {"two_documents": positions(SEQ_LEN // 3, SEQ_LEN - SEQ_LEN // 3),
            "six_documents": positions(227, 245, 50, 162, 291, SEQ_LEN - 975)}

    def decoder_step(pos, implementation):  # timed right after it is made: the implementation is set once
        model.set_attn_implementation(implementation)

        def fn():
            with autocast(dtype):
                hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
            hidden.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        return fn

    hidden = torch.randn(1, SEQ_LEN, weight.shape[1], generator=gen)  # fp32, as the residual stream is

    def ours_loss():
        h = hidden.detach().requires_grad_()
        with autocast(dtype):  # as the trainer calls it: matmuls in the autocast dtype
            loss, _ = lm_loss(h, weight, ids)
        loss.backward()
        weight.grad = None

    def hf_loss():
        h = hidden.detach().float().requires_grad_()
        with autocast(dtype):
            logits = F.linear(h, weight)  # (1, T, V), bf16 under autocast
        loss = F.cross_entropy(logits.float()[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        loss.backward()
        weight.grad = None

    varlen = resolve_attention("sdpa_varlen")
    causal = _cpu_median(decoder_step(positions(SEQ_LEN), "sdpa"))
    decoder_s = {"causal_no_mask": round(causal, 4)}
    for name, pos in rows.items():
        dense, ours_attn = _cpu_median(decoder_step(pos, "sdpa")), _cpu_median(decoder_step(pos, varlen))
        decoder_s[name] = {"sdpa_dense_mask": round(dense, 4), "sdpa_varlen": round(ours_attn, 4),
                           "varlen_vs_causal": round(ours_attn / causal, 3),
                           "dense_mask_vs_causal": round(dense / causal, 3)}
    ours, hf = _cpu_median(ours_loss), _cpu_median(hf_loss)
    return {"decoder_fwd_bwd_cpu_s": decoder_s,
            "lm_loss_fwd_bwd_cpu_s": {"ours_chunked": round(ours, 4),
                                      "bf16_logits_cross_entropy": round(hf, 4),
                                      "ours_overhead": round(ours / hf - 1, 3)}}


# ---------------------------------------------------------------------------------------------------
def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, fewer steps and documents")
    parser.add_argument("--steps", type=int, default=6, help="(a) optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="(a) steps dropped at the start of every run")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each side, (a) and (b)")
    parser.add_argument("--packed-rows", type=int, default=32,
                        help="(b) packed rows of 1024 (the document set)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (see common.set_threads)")
    parser.add_argument("--keep", default=None,
                        help="keep the workspace (model, data, runs) in this directory")
    parser.add_argument("--part", default="ab", choices=["a", "b", "ab"], help="run part (a), (b) or both")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats, args.packed_rows = 4, 1, 1, 12
    common.quiet()
    threads = common.set_threads(args.threads)
    result, profile = {}, {}

    with common.workspace(args.keep) as ws:
        t0 = time.perf_counter()
        common.prepare_model(ws)
        sources = {"big": common.copy_corpus(ws, "big", common.long_files(6)),
                   "small": common.copy_corpus(ws, "small", common.short_files(limit=400))}
        data = common.build_streams(ws, "streams", sources, {
            "long": {"sources": ["big"], "seq_len": SEQ_LEN, "min_doc_tokens": SEQ_LEN, "pack": "concat"},
            "docs": {"sources": ["small"], "seq_len": SEQ_LEN, "min_doc_tokens": 30,
                     "max_doc_tokens": SEQ_LEN, "pack": "best_fit", "long_docs": "drop"},
        })
        built = {s: {k: data["manifest"]["streams"][s]["train"][k] for k in ("rows", "real_tokens", "fill")}
                 for s in ("long", "docs")}
        common.log(f"set-up {time.perf_counter() - t0:.0f}s: {built}")

        if "a" in args.part:
            dataset = hf_dataset(data["long"])
            ours, hf, ours_steps, hf_cpu = [], [], [], []
            for r in range(args.repeats):
                for side in (["ours", "hf"] if r % 2 == 0 else ["hf", "ours"]):
                    out = ws.path("runs", f"{side}-{r}")
                    if side == "ours":
                        steps, tps = run_ours(ws, data, out, args.steps, args.warmup, args.dtype)
                        ours += tps
                        ours_steps += steps
                    else:
                        tps, cpu_tps = run_hf(ws, dataset, out, args.steps, args.warmup, args.dtype)
                        hf += tps
                        hf_cpu += cpu_tps
                    common.log(f"(a) repeat {r} {side}: tokens/s " + " ".join(f"{x:.0f}" for x in tps))
            result.update({"ours_tokens_per_s": round(common.median(ours), 1),
                           "hf_trainer_tokens_per_s": round(common.median(hf), 1),
                           "ratio": round(common.median(ours) / common.median(hf), 3),
                           "cpu_ratio": round(common.median(s["step_tokens"] / s["cpu_s"] for s in ours_steps)
                                              / common.median(hf_cpu), 3)})
            profile["ours_step"] = common.summarize(ours_steps)
            profile["hf_step_s"] = round(MICRO_BATCHES * SEQ_LEN / common.median(hf), 4)
            profile["diagnostics_1x1024"] = diagnostics(ws, args.dtype)

        if "b" in args.part:
            packed, padded, real, stats = packed_and_padded_batches(data["docs"], args.packed_rows)
            rates = {"packed": [], "padded": []}
            detail = {"packed": [], "padded": []}
            for r in range(args.repeats):
                for side in (["packed", "padded"] if r % 2 == 0 else ["padded", "packed"]):
                    times = train_batches(ws, packed if side == "packed" else padded, args.dtype)
                    wall, cpu = sum(t[0] for t in times), sum(t[1] for t in times)
                    rates[side].append(real / wall)
                    detail[side].append({"wall_s": wall, "cpu_s": cpu})
                    common.log(f"(b) repeat {r} {side}: {real / wall:.0f} real tokens/s ({wall:.1f}s)")
            packed_tps, padded_tps = common.median(rates["packed"]), common.median(rates["padded"])
            result.update({"packed_real_tokens_per_s": round(packed_tps, 1),
                           "padded_real_tokens_per_s": round(padded_tps, 1),
                           "packed_vs_padded_ratio": round(packed_tps / padded_tps, 3)})
            for side in ("packed", "padded"):
                slots = stats[f"{side}_slots"]
                profile[side] = {"step_s": round(
                                     common.median(d["wall_s"] for d in detail[side]) / stats["steps"], 4),
                                 "cpu_s_per_1k_real_tokens": round(
                                     1000 * common.median(d["cpu_s"] for d in detail[side]) / real, 4),
                                 "slots": slots, "fill": round(real / slots, 4)}
            result["cpu_packed_vs_padded_ratio"] = round(
                common.median(d["cpu_s"] for d in detail["padded"])
                / common.median(d["cpu_s"] for d in detail["packed"]), 3)
            result["docs"] = stats

    result["setup"] = {"dtype": args.dtype + (" autocast, fp32 master weights"
                                              if args.dtype != "float32" else ""),
                       "threads": threads, "params": "~6.8M (4x256, 8 heads, vocab 5000)", "seq_len": SEQ_LEN,
                       "a_step": f"{MICRO_BATCHES}x(1x{SEQ_LEN})", "steps": args.steps, "warmup": args.warmup,
                       "repeats": args.repeats, "built": built}
    result["profile"] = profile
    return result


if __name__ == "__main__":
    # Anything the libraries print (the HF Trainer's summary dict reached stdout despite a redirect around
    # its train()) goes to stderr: stdout carries the one JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        summary = main()
    print(json.dumps(summary))
