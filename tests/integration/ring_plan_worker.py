"""The trainer's step with ring attention (2 CPU processes, gloo), measured for the planner's ring terms, for
tests/integration/test_plan_ring.py:

    accelerate launch --config_file recipes/accelerate/cpu2.yaml --num_processes 2 \
        tests/integration/ring_plan_worker.py RECIPE OUT_DIR

Runs `distill.train.loop.run` on RECIPE (parallel.sequence_parallel: 2, sequence_parallel_mode: ring) with
`distill.train.spans.SavedTensorBytes` (what each student forward saves for backward, per stream) and, inside
every
ring attention call, the peak of the blocks the ring holds in flight: every tensor `RingParallel.shift` sends
or receives (key/value blocks in the compute dtype, dK/dV accumulators in fp32) counted while its storage
lives (the pending transfers keep theirs alive too). Writes OUT_DIR/rank<r>.json: {"saved": {stream: [bytes
per forward]}, "forward_peaks": [bytes per call], "backward_peaks": [...], "tokens": [n per call],
"dtypes": [the blocks' dtypes seen]}.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    from torch.multiprocessing.reductions import StorageWeakRef

    from distill.config import load_recipe
    from distill.parallel import ring
    from distill.train.loop import run
    from distill.train.spans import SavedTensorBytes

    recipe_path, out = sys.argv[1], sys.argv[2]
    live: dict[int, tuple[StorageWeakRef, int]] = {}  # storage address → (weak ref, bytes)
    peak = [0]
    seen = {"forward_peaks": [], "backward_peaks": [], "tokens": [], "dtypes": set()}

    original_shift = ring.RingParallel.shift

    def shift(self, tensor):
        received, works = original_shift(self, tensor)
        for key in [k for k, (ref, _) in live.items() if ref.expired()]:
            del live[key]
        for t in (tensor, received):
            storage = t.untyped_storage()
            live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            seen["dtypes"].add(str(t.dtype))
        peak[0] = max(peak[0], sum(size for _, size in live.values()))
        return received, works

    def measured(phase, inner):
        def call(ctx, *args):
            live.clear()
            peak[0] = 0
            result = inner(ctx, *args)
            seen[f"{phase}_peaks"].append(peak[0])
            if phase == "forward":
                seen["tokens"].append(args[0].shape[2])  # q (h, g, n, D)
            return result

        return staticmethod(call)

    ring.RingParallel.shift = shift
    ring.RingAttention.forward = measured("forward", ring.RingAttention.forward)
    ring.RingAttention.backward = measured("backward", ring.RingAttention.backward)
    recorder = SavedTensorBytes()
    code = run(load_recipe(recipe_path), spans=recorder)
    if code != 0:
        raise SystemExit(code)
    seen["dtypes"] = sorted(seen["dtypes"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w", encoding="utf-8") as f:
        json.dump({"saved": recorder.bytes, **seen}, f)


if __name__ == "__main__":
    main()
