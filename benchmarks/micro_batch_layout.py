"""Micro-batch layout per attention backend: LM-only tokens/s at micro_batch 4 against micro_batch 1.

The trainer flattens a micro-batch of packed rows to one row only for flash_attention_2, which separates
packed documents only in a one-row batch (`distill.model.attention.flattens`). transformers' sdpa builds a
dense
document mask per row: flattened, 4 rows of 1024 become one (4096)² mask instead of four (1024)² ones. This
measures it through `distill.train.loop.run` on the benchmarks' tiny Llama (common.py: 4 layers x 256, bf16
autocast, one thread), Long CPT on rows of 1024 tokens, 4096 token slots per step:
  sdpa mb1        micro_batch 1 (4 micro-batches of one row per step): the reference;
  sdpa mb4        micro_batch 4, rows kept (the trainer's layout for sdpa);
  sdpa mb4 flat   micro_batch 4 flattened to one row of 4096 (the layout the trainer used to give every
                  backend), by forcing `StreamObjectives.flatten`;
  sdpa_varlen mb1 / mb4 for comparison.
Sides alternate over --repeats; tokens/s is the loop's own (metrics.jsonl), median over the steps after the
first of every repeat.

Prints one JSON line: {"tokens_per_s": {side: median}, "mb4_vs_mb1_sdpa" (target >= 1.0),
"flattened_vs_rows_sdpa" (the old layout's cost), "setup"}.

    python benchmarks/micro_batch_layout.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

SIDES = {"sdpa mb1": ("sdpa", 1, False), "sdpa mb4": ("sdpa", 4, False), "sdpa mb4 flat": ("sdpa", 4, True),
         "sdpa_varlen mb1": ("sdpa_varlen", 1, False), "sdpa_varlen mb4": ("sdpa_varlen", 4, False)}


def run_side(ws, data: str, name: str, steps: int, repeat: int) -> list[float]:
    from distill.train import loop as train
    from distill.train.metrics import read_metrics

    attention, micro_batch, flat = SIDES[name]
    out = ws.path("runs", f"{name.replace(' ', '_')}_{repeat}")
    long = {"data": data, "share": 1, "micro_batch": micro_batch, "objectives": {"lm": 1.0}}
    cfg = common.recipe(ws, out, {"long": long}, 4096, steps)
    cfg.model.attention = attention
    real = train.build_objectives

    def flattened(*args, **kwargs):  # the old layout: every backend got one row
        built = real(*args, **kwargs)
        for stream in built.values():
            stream.flatten = True
        return built

    train.build_objectives = flattened if flat else real
    try:
        if train.run(cfg) != 0:
            raise RuntimeError(f"{name}: the run failed")
    finally:
        train.build_objectives = real
    return [r["tokens_per_s"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    common.quiet()
    common.set_threads(args.threads)
    with common.workspace() as ws:
        common.prepare_model(ws)
        big = common.copy_corpus(ws, "big", common.long_files(8))
        data = common.build_streams(ws, "long", {"big": big}, {
            "long": {"sources": ["big"], "seq_len": 1024, "pack": "concat"}})["long"]
        speeds = {name: [] for name in SIDES}
        for repeat in range(args.repeats):
            order = list(SIDES) if repeat % 2 == 0 else list(reversed(SIDES))
            for name in order:
                common.log(f"{name} (repeat {repeat + 1})")
                speeds[name] += run_side(ws, data, name, args.steps, repeat)
    med = {name: round(common.median(v), 1) for name, v in speeds.items()}
    print(json.dumps({
        "tokens_per_s": med,
        "mb4_vs_mb1_sdpa": round(med["sdpa mb4"] / med["sdpa mb1"], 3),
        "flattened_vs_rows_sdpa": round(med["sdpa mb4 flat"] / med["sdpa mb4"], 3),
        "mb4_vs_mb1_sdpa_varlen": round(med["sdpa_varlen mb4"] / med["sdpa_varlen mb1"], 3),
        "setup": {"steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                  "rows": "1024 tokens, concat packing", "tokens_per_step": 4096, "dtype": "bfloat16"},
    }))


if __name__ == "__main__":
    main()
