"""Long-context activation memory per rank: plain gradient checkpointing against offloaded checkpoints, a
tiled MLP, both, and Ulysses sequence parallelism over 2 processes, in one run.

A tiny random-init Llama shaped like Llama-3-8B in proportion (16 layers x 128, intermediate 448 = 3.5 x
hidden, 4 heads, 2 key/value heads, vocab 5000; ~5M parameters: the checkpointed residual and the MLP weigh
against the rest as they do at 8B), one packed row of --tokens tokens (documents of 300-1500 tokens), the
trainer's forward as its long stream runs it (gradient checkpointing, bf16 autocast over fp32 weights,
sdpa_varlen, only the final hidden state kept), the chunked LM loss (chunks of 512 tokens) and backward, on 2
gloo processes (one thread each):
  plain            checkpointing; each rank runs the whole row
  offload          + parallel.offload_activations (distill.parallel.memory)
  tiled_mlp        + parallel.tiled_mlp: auto (14 chunks here, as for Llama-3-8B)
  offload+tiled    both
  sp2              Ulysses over the 2 ranks (distill.parallel.ulysses), checkpointing only
  sp2+offload+tiled
Peak activation bytes per rank: every storage the forward, loss and backward allocate, live at once at its
most (a dispatch mode tracks each new storage until it is freed), leaving out the parameters' gradients
(allocated before, accumulated in place) and the offloaded host buffers, which are reported as host bytes.
On a GPU these are the bytes torch.cuda.max_memory_allocated adds over the step (benchmarks/gpu_check.py,
part long_context_memory, measures that for Llama-3-8B-shaped layers).

Prints one JSON line: {"peak_activation_bytes_per_rank": {config: bytes}, "host_bytes_per_rank": {config},
"planned_activation_bytes": {config: distill.plan's figure}, "seconds": {config}, "max_loss_error" (every
config's loss against plain's), "reduction" (plain / the best config), "best", "reduction_offload_tiled"
(plain / offload+tiled on one rank; target >= 2), "setup"}.

    python benchmarks/long_context_memory.py              # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODEL = {"hidden_size": 64, "num_layers": 16, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 224,
         "vocab_size": 2000, "max_position_embeddings": 256}
LOSS_CHUNK = 512
CONFIGS = {"plain": (1, False, False), "offload": (1, True, False), "tiled_mlp": (1, False, True),
           "offload+tiled": (1, True, True), "sp2": (2, False, False), "sp2+offload+tiled": (2, True, True)}
"""name: (sequence-parallel degree, offload, tiled MLP)."""


class LiveBytes:
    """A dispatch mode that tracks the bytes of every storage created inside it until that storage is freed,
    and their peak; storages made while `host` is set count as host bytes instead."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._saw(out)
                return out

        self.mode = Mode()
        self.live: dict[int, tuple[int, bool]] = {}
        self.now = self.peak = self.host_now = self.host_peak = 0
        self.host = False

    def _saw(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if not key or key in self.live:
                continue
            n = storage.nbytes()
            self.live[key] = (n, self.host)
            if self.host:
                self.host_now += n
                self.host_peak = max(self.host_peak, self.host_now)
            else:
                self.now += n
                self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        n, host = self.live.pop(key, (0, False))
        if host:
            self.host_now -= n
        else:
            self.now -= n

    def __enter__(self):
        """Track, with the offloaded host buffers (`distill.parallel.memory.HostOffload.pack`) counted as
        host."""
        from distill.parallel import memory

        self._pack = memory.HostOffload.pack
        tracker, pack = self, self._pack

        def host_pack(offload, tensor):
            tracker.host = True
            try:
                return pack(offload, tensor)
            finally:
                tracker.host = False

        memory.HostOffload.pack = host_pack
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        from distill.parallel import memory

        memory.HostOffload.pack = self._pack
        return self.mode.__exit__(*exc)


def saver_step(forward, offload: bool, chunks: int, around=contextlib.nullcontext,
               tracker: LiveBytes | None = None):
    """One measured forward and backward with the savers on: `forward(scoped)` returns the loss and runs the
    model inside `scoped()` (`memory.scope(offload, chunks)` and `around()`, e.g. sequence parallelism),
    which the backward enters again (it recomputes the checkpointed layers). Returns the loss, detached."""
    from distill.parallel import memory

    def scoped():
        stack = contextlib.ExitStack()
        stack.enter_context(memory.scope(offload, chunks))
        stack.enter_context(around())
        return stack

    with tracker if tracker is not None else contextlib.nullcontext():
        loss = forward(scoped)
        with scoped():
            loss.backward()
        value = loss.detach().clone()
        del loss
    return value


def worker(model_dir: str, tokens: int, out: str) -> None:
    import common
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.model.attention import document_offsets
    from distill.model.load import enable_checkpointing, resolve_attention
    from distill.model.objectives import lm_loss
    from distill.parallel import memory
    from distill.parallel import ulysses as sequence
    from distill.parallel.memory import auto_chunks
    from distill.plan import Shape, student_activation_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    inner = resolve_attention("auto", torch.device("cpu"), "llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=inner, dtype=torch.float32)
    model.config.use_cache = False
    enable_checkpointing(model)
    model.train()
    memory.install(model, offload=True, tiled=True)  # both act only inside memory.scope
    chunks = auto_chunks(model.config.hidden_size, model.config.intermediate_size)
    ids, positions, targets = common.packed_row(tokens, model.config.vocab_size)
    offsets = document_offsets(positions)
    sp = sequence.SequenceParallel(world, rank, world)
    split_name = sequence.register(inner)
    head = model.get_output_embeddings().weight

    def run(size: int, offload: bool, tiled: bool, tracker: LiveBytes | None) -> float:
        split = size > 1
        model.set_attn_implementation(split_name if split else inner)
        inputs = {"input_ids": sp.piece(ids) if split else ids,
                  "position_ids": sp.piece(positions) if split else positions, **offsets}
        tgt = sp.piece(targets) if split else targets

        def forward(scoped):
            with torch.autocast("cpu", dtype=torch.bfloat16), memory.FinalState(model) as final:
                with scoped():
                    model(**inputs, use_cache=False, logits_to_keep=1)
                loss = lm_loss(final.value, head, tgt, chunk_size=LOSS_CHUNK, shifted=True)[0]
                final.value = None
            return loss

        def attention():
            return sp.on("long") if split else contextlib.nullcontext()

        value = saver_step(forward, offload, chunks if tiled else 1, attention, tracker)
        if split:
            dist.all_reduce(value)
        return float(value)

    run(1, False, False, None)  # warm-up; the parameters' gradients now exist and accumulate in place
    results, losses, seconds = {}, {}, {}
    for name, (size, offload, tiled) in CONFIGS.items():
        model.zero_grad(set_to_none=False)
        tracker = LiveBytes()
        dist.barrier()
        t0 = time.perf_counter()
        losses[name] = run(size, offload, tiled, tracker)
        seconds[name] = time.perf_counter() - t0
        results[name] = (tracker.peak, tracker.host_peak)
    peaks = torch.tensor([[results[n][0], results[n][1]] for n in CONFIGS], dtype=torch.float64)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)  # the worst rank
    if rank == 0:
        shape = Shape.from_config(AutoConfig.from_pretrained(model_dir))
        peak = {n: int(peaks[i, 0]) for i, n in enumerate(CONFIGS)}
        host = {n: int(peaks[i, 1]) for i, n in enumerate(CONFIGS)}
        planned = {n: int(student_activation_bytes(shape, tokens // size, "autocast", True,
                                                   chunks if tiled else 1, offload))
                   for n, (size, offload, tiled) in CONFIGS.items()}
        best = min(peak, key=peak.get)
        result = {
            "peak_activation_bytes_per_rank": peak, "host_bytes_per_rank": host,
            "planned_activation_bytes": planned,
            "seconds": {n: round(s, 2) for n, s in seconds.items()},
            "max_loss_error": max(abs(v - losses["plain"]) / abs(losses["plain"]) for v in losses.values()),
            "reduction": round(peak["plain"] / peak[best], 2), "best": best,
            "reduction_offload_tiled": round(peak["plain"] / peak["offload+tiled"], 2),
            "setup": {"tokens": tokens, "documents": int((positions == 0).sum()), "processes": world,
                      "attention": inner,
                      "dtype": "bfloat16 autocast over fp32 weights", "tiled_mlp_chunks": chunks,
                      "model": MODEL, "loss_chunk": LOSS_CHUNK},
        }
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192,
                        help="the row's length (even; 16384: ~2.5 minutes)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.tokens, args.worker[1])
        return
    import common

    from distill.testing import make_tiny_model, run_workers

    common.quiet()
    with common.workspace() as ws:
        ws.model = make_tiny_model(ws.path("model"), "llama", **MODEL)
        out = ws.path("result.json")
        try:
            result = run_workers(os.path.abspath(__file__), 2, 29623,
                                 ["--tokens", str(args.tokens), "--worker", ws.model, out], out)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
        print(json.dumps(result))


if __name__ == "__main__":
    main()
