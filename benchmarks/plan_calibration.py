"""The memory planner against measurement on the CPU: predicted vs measured bytes, side by side.

For the benchmarks' tiny Llama (4 layers x 256, ~6.8M parameters) and the LongReD step of
distill_overhead.py (long 1 x 1024 LM, short 4 x 256 hidden-state distillation, s2l 4 x 256 at CREAM
positions), one optimiser step through `distill.train.loop.run` per regime (fp32; bf16 autocast over fp32
weights; fp32 with gradient checkpointing; and the long-context savers on the long stream, bf16 autocast:
`tiled_mlp` 4 chunks without checkpointing, `offload` with checkpointing). Activations:
`distill.plan.saved_forward_bytes` against the bytes the trainer's own student forward saves for backward
(`distill.train.spans.SavedTensorBytes`, saved-tensor hooks through the step's spans); offload also: the
planner's
host bytes against the offloaded buffers' peak (`host`). State: the planner's weights + gradients + AdamW
moments against the live tensors after the step.

Prints one JSON line: {"activations": {regime: {stream: {"predicted", "measured", "ratio"}}}, "state":
{"predicted", "measured", "ratio"}, "host": {"predicted", "measured", "ratio"}, "max_activation_error"}
(target: every ratio within 1 ± 0.15).

    python benchmarks/plan_calibration.py      # ~1 minute on 2 cores
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from distill_overhead import build_data, streams  # noqa: E402

REGIMES = {"fp32": ("float32", False, {}), "autocast": ("bfloat16", False, {}),
           "fp32_checkpointing": ("float32", True, {}),
           "tiled_mlp": ("bfloat16", False, {"tiled_mlp": 4}),
           "offload": ("bfloat16", True, {"offload_activations": True})}


def main() -> None:
    from transformers import AutoConfig

    from distill.config import from_dict, to_dict
    from distill.parallel import memory
    from distill.plan import Shape, offloaded_host_bytes, plan, saved_forward_bytes
    from distill.train.loop import run
    from distill.train.spans import SavedTensorBytes

    common.quiet()
    common.set_threads(1)
    out = {"activations": {}}
    with common.workspace() as ws:
        common.prepare_model(ws)
        data = build_data(ws)
        shape = Shape.from_config(AutoConfig.from_pretrained(ws.model))
        seq = {"long": 1024, "short": 256, "s2l": 256}
        for regime, (dtype, checkpointing, parallel) in REGIMES.items():
            cfg = common.recipe(ws, ws.path("runs", regime), streams(data, "longred"), 8192, 1, dtype=dtype)
            raw = to_dict(cfg)
            raw["model"]["gradient_checkpointing"] = checkpointing
            raw["parallel"].update(parallel)
            cfg = from_dict(type(cfg), raw)
            memory.OFFLOAD.peak_host_bytes = memory.OFFLOAD.host_bytes
            recorder = SavedTensorBytes()
            code, live = run(cfg, return_state=True, spans=recorder)
            if code != 0:
                raise RuntimeError(f"run returned {code}")
            kind = "autocast" if dtype == "bfloat16" else "fp32"
            figures = {}
            for name, measured in recorder.bytes.items():
                tokens = cfg.streams[name].micro_batch * seq[name]
                saver = name == "long"  # the savers act on the stream with the longest rows
                predicted = saved_forward_bytes(shape, tokens, kind, checkpointing,
                                                parallel.get("tiled_mlp", 1) if saver else 1,
                                                parallel.get("offload_activations", False) and saver)
                got = sorted(measured)[len(measured) // 2]
                figures[name] = {"predicted": predicted, "measured": got, "ratio": round(predicted / got, 3)}
            out["activations"][regime] = figures
            if parallel.get("offload_activations"):
                predicted = offloaded_host_bytes(shape, seq["long"], kind)
                got = memory.OFFLOAD.peak_host_bytes - memory.OFFLOAD.host_bytes
                out["host"] = {"predicted": predicted, "measured": got, "ratio": round(predicted / got, 3)}
            if regime == "fp32":
                state = plan(cfg, shape, "replicated", 1, 2**40, seq)["breakdown"]
                predicted = state["student_weights"] + state["optimizer_state"]
                moments = sum(t.numel() * t.element_size() for s in live["optimizer"].state.values()
                              for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
                weights = sum(p.numel() * p.element_size() for p in live["student"].parameters())
                out["state"] = {"predicted": predicted, "measured": weights + moments,
                                "ratio": round(predicted / (weights + moments), 3)}
    out["max_activation_error"] = round(max(abs(f["ratio"] - 1) for r in out["activations"].values()
                                            for f in r.values()), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
