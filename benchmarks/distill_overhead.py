"""Wall time per token of a LongReD step against a Long CPT step, same model, same token slots per step.

Both methods run through `distill.train.loop.run` (the real loop, one process) on the tiny Llama of
benchmarks/common.py (4 layers x 256 hidden, 8 heads, vocab 5000, ~6.8M parameters), student RoPE abf
extended from 256 to 1024 tokens, bf16 autocast on the CPU with fp32 master weights (--dtype float32 for
plain fp32), the trainer's default attention (sdpa_varlen on the CPU), 8192 token slots per optimiser step:
  LongReD   long : short : s2l shares 4 : 3 : 1 -> per step 4 x (1 x 1024) long rows with the LM loss,
            3 x (4 x 256) short rows distilling hidden states [1, 2, last] from the frozen teacher (native
            RoPE, truncated to the deepest layer needed), 1 x (4 x 256) short-to-long rows at CREAM
            positions distilling the last hidden state;
  Long CPT  long only, LM loss -> per step 8 x (1 x 1024) long rows.
Data: stdlib sources built by `distill.data.build` (long: concat 1024; short: best_fit 256; s2l: window 256).
Runs alternate CPT / LongReD (ABBA order over repeats); the first --warmup steps of every run are dropped;
tokens/s is the loop's own `tokens_per_s` (metrics.jsonl), the median over all measured steps.

Prints one JSON line:
    {"longred_tokens_per_s", "cpt_tokens_per_s", "time_ratio" (= cpt_tps / longred_tps = LongReD time per
     token / CPT time per token; target <= 1.0), "time_ratio_per_repeat", "setup", "profile": {method: ...}}
where each profile gives the median seconds per step in data fetch, student forward, teacher forward,
objectives (forward), backward, gradient clipping, optimiser step and the rest, and per stream the
forward (student + teacher + loss) and backward seconds per 1K token slots.

    python benchmarks/distill_overhead.py            # ~4 minutes on 2 cores
    python benchmarks/distill_overhead.py --quick    # ~1.5 minutes: one repeat of 4 steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

LONG, SHORT, S2L = 1024, 256, 256
SHORT_LAYERS = [1, 2, "last"]


def streams(data: dict, method: str) -> dict:
    long = {"data": data["long"], "share": 4, "micro_batch": 1, "objectives": {"lm": 1.0}}
    if method == "cpt":
        return {"long": long}
    return {
        "long": long,
        "short": {"data": data["short"], "share": 3, "micro_batch": 4,
                  "objectives": {"hidden": {"weight": 3.75, "layers": SHORT_LAYERS}}},
        "s2l": {"data": data["s2l"], "share": 1, "micro_batch": 4, "positions": "cream",
                "objectives": {"hidden": {"weight": 2.5, "layers": ["last"]}}},
    }


def build_data(ws) -> dict:
    """The long / short / s2l streams of the LongReD step, built from stdlib modules (after prepare_model)."""
    big = common.copy_corpus(ws, "big", common.long_files(8))
    small = common.copy_corpus(ws, "small", common.short_files(limit=200))
    return common.build_streams(ws, "streams", {"big": big, "small": small}, {
        "long": {"sources": ["big"], "seq_len": LONG, "min_doc_tokens": LONG, "pack": "concat"},
        "short": {"sources": ["small"], "seq_len": SHORT, "pack": "best_fit", "long_docs": "split"},
        "s2l": {"sources": ["big"], "seq_len": S2L, "min_doc_tokens": S2L, "pack": "window"},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat of 4 steps (1 warm-up)")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each method, interleaved")
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (see common.set_threads)")
    parser.add_argument("--keep", default=None,
                        help="keep the workspace (model, data, runs) in this directory")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 4, 1, 1
    common.quiet()
    threads = common.set_threads(args.threads)

    with common.workspace(args.keep) as ws:
        t0 = time.perf_counter()
        common.prepare_model(ws)
        data = build_data(ws)
        rows = {s: data["manifest"]["streams"][s]["train"]["rows"] for s in ("long", "short", "s2l")}
        setup_s = time.perf_counter() - t0
        common.log(f"set-up {setup_s:.0f}s: rows {rows}")

        results = {"cpt": [], "longred": []}
        for r in range(args.repeats):
            order = ["cpt", "longred"] if r % 2 == 0 else ["longred", "cpt"]
            for method in order:
                cfg = common.recipe(ws, ws.path("runs", f"{method}-{r}"), streams(data, method),
                                    args.tokens_per_step, args.steps, dtype=args.dtype)
                profiler = common.run_profiled(cfg, args.warmup)
                steps = profiler.measured(args.warmup)
                results[method].append(steps)
                common.log(f"repeat {r} {method}: tokens/s " +
                           " ".join(f"{s['tokens_per_s']:.0f}" for s in profiler.steps))

    tps = {m: common.median(s["tokens_per_s"] for run in runs for s in run) for m, runs in results.items()}
    # Process CPU seconds per token: the same comparison, less disturbed by other load on the machine.
    cpu = {m: common.median(s["cpu_s"] / s["step_tokens"] for run in runs for s in run)
           for m, runs in results.items()}
    per_repeat = [common.median(s["tokens_per_s"] for s in c) / common.median(s["tokens_per_s"] for s in lr)
                  for c, lr in zip(results["cpt"], results["longred"])]
    result = {
        "longred_tokens_per_s": round(tps["longred"], 1),
        "cpt_tokens_per_s": round(tps["cpt"], 1),
        "time_ratio": round(tps["cpt"] / tps["longred"], 3),
        "time_ratio_per_repeat": [round(x, 3) for x in per_repeat],
        "cpu_time_ratio": round(cpu["longred"] / cpu["cpt"], 3),
        "setup": {"dtype": args.dtype + (" autocast, fp32 master weights" if args.dtype != "float32" else ""),
                  "threads": threads, "params": "~6.8M (4x256, 8 heads, vocab 5000)",
                  "tokens_per_step": args.tokens_per_step, "steps": args.steps, "warmup": args.warmup,
                  "repeats": args.repeats, "rows": rows,
                  "longred_step": "4x(1x1024) long lm + 3x(4x256) short hidden[1,2,last] + 1x(4x256) s2l "
                                  "cream hidden[last]",
                  "cpt_step": "8x(1x1024) long lm"},
        "profile": {m: common.summarize([s for run in runs for s in run]) for m, runs in results.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
