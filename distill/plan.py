"""The memory planner: a recipe, the model's config.json and a launch → bytes per GPU, before anything runs.

    python scripts/plan.py RECIPE [--accelerate-config X] [--gpus N]
        [--gpu h100-80gb|h200-141gb|a100-80gb|BYTES]

It reads only `config.json` (never the weights) and the recipe; a stream's row length comes from its built
data when present, else from the recipe's `streams.<name>.seq_len`. Per GPU it counts:
- the student's fp32 master weights, gradients and AdamW moments (16 bytes per parameter), divided over the
  ranks when sharded (FSDP2, ZeRO-3), plus what sharding gathers at a time (two decoder layers in flight, the
  root's embeddings and lm_head kept gathered), or autocast's bf16 copy of the weights (replicated, ZeRO-3);
- the frozen teacher in the recipe's dtype (decoder layers sharded, embeddings and lm_head replicated);
- per stream, one micro-batch's activations with and without gradient checkpointing, from per-token, per-layer
  byte counts measured with saved-tensor accounting on the CPU (tests/unit/test_plan.py keeps them within
  ±15%): fp32 `36H + 8Hkv + 16I`, autocast over fp32 weights `32H + 4Hkv + 8I`, bf16 weights (FSDP2 mixed
  precision) `22H + 4Hkv + 8I`; with checkpointing only each layer's input stays (`r·H`, r the residual's
  bytes: 4 under autocast, 2 under FSDP2 bf16 mixed precision) plus one layer recomputed in backward;
- the chunked losses' buffers (a logits chunk, the fp32 lm_head gradient accumulator), the teacher's hidden
  states up to the deepest distilled layer and one of its layers in flight;
- framework overhead (CUDA context, NCCL, allocator slack): 1.5 GiB plus 5%.
The peak is the static part plus the largest stream. `min_sequence_parallel` is the smallest degree S
the trainer accepts (dividing the number of GPUs and the attention heads, `sequence_parallel_problem`) with
which the longest stream's activations, split over S ranks, fit.
"""

from __future__ import annotations

import dataclasses
import math
import os

from distill.config import ConfigError
from distill.data.dataset import STREAM_INFO
from distill.model.flops import flop_rates
from distill.parallel.memory import auto_chunks, long_streams, resolve_chunks
from distill.parallel.ulysses import group_problem, heads_problem
from distill.schedules import share_at

GiB = 1024**3
GPUS = {"h100-80gb": int(79.1 * GiB), "h200-141gb": int(139.8 * GiB), "a100-80gb": int(79.2 * GiB)}
"""Memory torch reports as usable on each device (total_memory), bytes."""
MODES = ("replicated", "fsdp2", "zero3")
OVERHEAD_BYTES = int(1.5 * GiB)
OVERHEAD_FRACTION = 0.05
HOST_PROCESS_BYTES = 2 * GiB
"""Host memory of one GPU rank before any model: Python, torch, the CUDA and NCCL libraries' host state, the
tokenizer and the data's index (an estimate; the built data is memory-mapped, its pages are the OS's)."""
CPU_PROCESS_BYTES = GiB // 2
"""The same for a rank on a CPU (no CUDA libraries)."""
EXPORT_SHARD_BYTES = 5 * 10**9
"""The streamed export's output shard (bf16 safetensors): the most of the final model rank 0 holds at once."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the planner needs of a decoder-only transformer's config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=getattr(config, "model_type", "") == "qwen2")

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """One decoder layer: attention projections, the gated MLP, two norms (and Qwen2's q/k/v biases)."""
        q = self.heads * self.head_dim
        attention = self.hidden * q + 2 * self.hidden * self.kv_width + q * self.hidden
        bias = q + 2 * self.kv_width if self.qkv_bias else 0
        return attention + bias + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * self.layer_params + self.embed_params + head + self.hidden


def activation_bytes_per_token_layer(shape: Shape, regime: str, mlp_chunks: int = 1) -> float:
    """Saved-for-backward bytes per token per decoder layer (no checkpointing), as measured on the CPU.

    Args:
        regime: "fp32" (fp32 weights, no autocast), "autocast" (fp32 master weights, bf16 autocast: the
            residual stream stays fp32), "bf16" (bf16 weights: FSDP2 mixed precision on a GPU).
        mlp_chunks: `parallel.tiled_mlp` (1: off): the tiled MLP saves only its input, so the MLP's
            intermediates (`mlp_intermediate_bytes`) leave the saved bytes, and one chunk of the MLP's share
            (`mlp_bytes`/N) exists while that chunk is recomputed in backward (counted here: this is also
            the layer at its backward's peak).
    """
    h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
    full = {"fp32": 36 * h + 8 * kv + 16 * i, "autocast": 32 * h + 4 * kv + 8 * i,
            "bf16": 22 * h + 4 * kv + 8 * i}[regime]
    if mlp_chunks <= 1:
        return full
    return full - mlp_intermediate_bytes(shape, regime) + mlp_bytes(shape, regime) / mlp_chunks


def mlp_intermediate_bytes(shape: Shape, regime: str) -> int:
    """Per token, what a gated MLP saves of width `intermediate` (gate, its activation, up, their product:
    4 tensors in the compute dtype; 2 bytes each under autocast and bf16, 4 in fp32)."""
    return (16 if regime == "fp32" else 8) * shape.intermediate


def mlp_bytes(shape: Shape, regime: str) -> int:
    """Per token, everything a gated MLP saves for backward: its intermediates and its input (fp32 input: 4H,
    two bf16 casts of it under autocast: 4H, bf16: 2H)."""
    return mlp_intermediate_bytes(shape, regime) + (2 if regime == "bf16" else 4) * shape.hidden


def residual_bytes(regime: str) -> int:
    """Bytes per hidden unit of the residual stream (a checkpointed layer input)."""
    return 2 if regime == "bf16" else 4


def saved_forward_bytes(shape: Shape, tokens: int, regime: str, checkpointing: bool, mlp_chunks: int = 1,
                        offload: bool = False) -> float:
    """What one micro-batch's student forward keeps for backward on the device (embeddings and final norm
    included): every layer's activations (with a tiled MLP: without its intermediates), or with gradient
    checkpointing only each layer's input (`r·H`, r the residual's bytes), which `offload` moves to the host
    (`offloaded_host_bytes`)."""
    if checkpointing:
        per_layer = 0 if offload else residual_bytes(regime) * shape.hidden
    elif mlp_chunks > 1:
        per_layer = activation_bytes_per_token_layer(shape, regime) - mlp_intermediate_bytes(shape, regime)
    else:
        per_layer = activation_bytes_per_token_layer(shape, regime)
    base = 6 * shape.hidden if regime == "bf16" else 10 * shape.hidden  # embeddings out, final norm
    if checkpointing and offload:
        base -= 2 * shape.hidden  # what stays is the final norm's (measured: 8H of the 10H under autocast)
    return tokens * (shape.layers * per_layer + base)


def offloaded_host_bytes(shape: Shape, tokens: int, regime: str) -> int:
    """Host memory `parallel.offload_activations` holds per rank at the end of a micro-batch's forward: every
    layer's checkpointed input (pinned on a GPU host)."""
    return tokens * shape.layers * residual_bytes(regime) * shape.hidden


def student_activation_bytes(shape: Shape, tokens: int, regime: str, checkpointing: bool,
                             mlp_chunks: int = 1, offload: bool = False) -> float:
    """One micro-batch's activations at the backward's peak: the saved forward, plus, with checkpointing,
    the layer being recomputed (its MLP `mlp_chunks` pieces at a time) and, offloaded, that layer's input
    brought back and the next one's in flight."""
    recompute = tokens * activation_bytes_per_token_layer(shape, regime, mlp_chunks) if checkpointing else 0
    in_flight = 2 * tokens * residual_bytes(regime) * shape.hidden if checkpointing and offload else 0
    if not checkpointing and mlp_chunks > 1:  # the one chunk being recomputed in backward
        recompute = tokens * mlp_bytes(shape, regime) / mlp_chunks
    return saved_forward_bytes(shape, tokens, regime, checkpointing, mlp_chunks, offload) + recompute + \
        in_flight


def ring_blocks_bytes(shape: Shape, tokens: int, kv_bytes: int) -> int:
    """Ring attention's blocks in flight per rank at their peak, in backward (`tokens` is already T/S): the
    key/value block being used and the one arriving (`kv_bytes` each: the keys come out of RoPE in the
    residual's dtype, `residual_bytes`), plus the fp32 dK/dV accumulator being sent on and the one arriving,
    each (T/S) x kv_heads x head_dim for keys and for values. The forward holds only the key/value pair.
    Measured within ±15% on the CPU (tests/integration/test_plan_ring.py). The fp32 per-query accumulators
    (the running output, dq) are not counted, as no attention kernel's workspace is."""
    block = 2 * tokens * shape.kv_heads * shape.head_dim  # keys and values of T/S tokens
    return 2 * block * kv_bytes + 2 * block * 4


def distilled_states(objectives) -> int:
    """How many hidden states a stream's `hidden` objective compares (`auto`: its top_k plus the last)."""
    hidden = objectives.hidden
    if hidden is None:
        return 0
    if hidden.layers == "auto":
        return hidden.top_k + 1
    return len({str(layer) for layer in hidden.layers})


def cosine_loss_bytes(shape: Shape, tokens: int, states: int) -> int:
    """What `hidden_cosine_loss` saves for backward: fp32 copies of the student's and the teacher's states at
    the loss-bearing tokens, 8 bytes per token per hidden unit per distilled state (measured with
    saved-tensor accounting)."""
    return 8 * tokens * shape.hidden * states


def loss_bytes(shape: Shape, tokens: int, objectives, compute_bytes: int) -> int:
    """The losses' peak: a chunk of fp32 logits (and their gradient), the fp32 lm_head gradient
    accumulator, the gradient of the final hidden states; plus the hidden-state cosine's saved copies."""
    total = 0
    if objectives.lm is not None:
        chunk = min(tokens, objectives.lm.chunk_size)
        total = max(total, chunk * shape.vocab * (8 + compute_bytes) + 4 * shape.vocab * shape.hidden)
    if objectives.kl is not None:
        chunk = min(tokens, objectives.kl.chunk_size)
        total = max(total, chunk * shape.vocab * (16 + compute_bytes) + 4 * shape.vocab * shape.hidden)
    cosine = cosine_loss_bytes(shape, tokens, distilled_states(objectives))
    return total + (4 * tokens * shape.hidden if total else 0) + cosine


def teacher_activation_bytes(shape: Shape, tokens: int, depth: int, weight_bytes: int,
                             kept: int | None = None) -> int:
    """The teacher's forward (no grad) to `depth`: the `kept` hidden states a loss asked for (the teacher
    keeps only those, `distill.model.decoder.TruncatedTeacher`; None: all depth + 1), the state flowing
    through
    the layers, and one layer's intermediates in flight."""
    if depth <= 0:
        return tokens * shape.hidden * weight_bytes
    kept = depth + 1 if kept is None else kept
    in_flight = 4 * shape.hidden + 2 * shape.kv_width + 3 * shape.intermediate
    return tokens * (kept * shape.hidden + in_flight) * weight_bytes


def savers(cfg, shape: Shape) -> tuple[bool, int]:
    """The recipe's (offload, MLP chunks) for its long stream (`distill.parallel.memory`; tiled_mlp auto
    resolved)."""
    return (bool(cfg.parallel.offload_activations),
            resolve_chunks(cfg.parallel.tiled_mlp, shape.hidden, shape.intermediate))


def sequence_parallel_mode(cfg) -> str:
    """parallel.sequence_parallel_mode where the recipe has it (ring attention), else ulysses."""
    return getattr(cfg.parallel, "sequence_parallel_mode", "ulysses")


def plan(cfg, shape: Shape, mode: str, world: int, gpu_bytes: int, seq_lens: dict[str, int],
         teacher_shape: Shape | None = None, sequence_parallel: int = 1, on_gpu: bool = True,
         ranks_per_node: int = 8, offload: bool | None = None, mlp_chunks: int | None = None,
         sp_mode: str | None = None, host_ram: int | None = None) -> dict:
    """Bytes per GPU of the recipe `cfg` on `world` GPUs in `mode`.

    Args:
        shape / teacher_shape: the student's and teacher's configs (teacher: the student's by default).
        mode: "replicated" (one process or DDP), "fsdp2", "zero3".
        seq_lens: each stream's row length.
        sequence_parallel: S, the ranks the longest stream's rows are split over (its activations / S).
        on_gpu: FSDP2 runs its parameters in the recipe's dtype (mixed precision) only on a GPU.
        ranks_per_node: processes per node (host memory per node).
        offload / mlp_chunks / sp_mode: the long stream's savers and the sequence-parallel kind ("ulysses",
            "ring"); None: the recipe's.
        host_ram: a node's RAM in bytes, against which the host memory per node is checked (None: not
            checked; `host["fits"]` is then None).

    The sharded state is divided by the shard group: all `world` ranks, or under FSDP2 with
    `parallel.replicate` R (HSDP) the world / R ranks of one replica (`shard_group_size`).

    Returns:
        {"peak_bytes", "gpu_bytes", "fits" (GPU memory), "setup_peak_bytes" (GPU, before the first step),
         "host_bytes_per_rank", "host_bytes_per_node", "ranks_per_node", "host": {...} (`host_memory`),
         "breakdown": {...}, "streams": {name: {...}}, "mode", "world", "replicate", "shard_group",
         "replicate_problem", "sequence_parallel"}.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; allowed: {', '.join(MODES)}")
    low = cfg.model.dtype != "float32"
    weight_bytes = 2 if low else 4
    replicate = cfg.parallel.replicate
    group = shard_group_size(mode, world, replicate)
    shards = group if mode in ("fsdp2", "zero3") else 1
    n, layer = shape.params, shape.layer_params
    breakdown = {
        "student_weights": 4 * n / shards,  # fp32 masters
        "student_gradients": 4 * n / shards,
        "optimizer_state": 8 * n / shards,  # AdamW exp_avg, exp_avg_sq
    }
    fsdp_mixed = mode == "fsdp2" and low and on_gpu
    gathered = 0.0
    if mode == "fsdp2":
        # Two layers in flight (this one and the prefetched next) in the parameter dtype, their unsharded
        # fp32 gradients during backward, and the root (embeddings, lm_head) kept gathered.
        param_bytes = 2 if fsdp_mixed else 4
        root = shape.embed_params + (0 if shape.tied else shape.vocab * shape.hidden)
        gathered = 2 * layer * param_bytes + 2 * layer * 4 + root * param_bytes
    elif mode == "zero3":
        root = 0 if shape.tied else shape.vocab * shape.hidden  # the full lm_head copy the losses keep
        gathered = 2 * layer * 4 + 2 * layer * 4 + root * 4
        if low:  # no cast cache (distill.train.loop._autocast): each use casts what is gathered, then frees
            gathered += 2 * layer * 2 + root * 2
    breakdown["gathered_parameters"] = gathered
    # Autocast keeps a bf16 copy of every weight it casts until the autocast region ends; ZeRO-3 runs with
    # that cache off (its casts would be of gathered full weights, a whole bf16 model on every GPU).
    breakdown["autocast_weight_copies"] = 2 * n if low and not fsdp_mixed and mode != "zero3" else 0.0
    teacher_shape = teacher_shape or shape
    needs_teacher = cfg.needs_teacher
    if needs_teacher:
        t_layers = teacher_shape.layers * teacher_shape.layer_params
        t_head = 0 if teacher_shape.tied else teacher_shape.vocab * teacher_shape.hidden
        t_edges = teacher_shape.embed_params + t_head
        t_shards = shards  # the teacher shards within the shard group too
        breakdown["teacher_weights"] = weight_bytes * (t_layers / t_shards + t_edges + teacher_shape.hidden)
        if mode in ("fsdp2", "zero3"):
            breakdown["teacher_weights"] += weight_bytes * teacher_shape.layer_params  # one layer gathered
    else:
        breakdown["teacher_weights"] = 0.0

    regime = ("bf16" if fsdp_mixed else "autocast") if low else "fp32"
    split_names = _split_streams(cfg, seq_lens)
    recipe_offload, recipe_chunks = savers(cfg, shape)
    offload = recipe_offload if offload is None else offload
    mlp_chunks = recipe_chunks if mlp_chunks is None else mlp_chunks
    sp_mode = sequence_parallel_mode(cfg) if sp_mode is None else sp_mode
    longest = long_streams(seq_lens)
    streams = {}
    offloaded_host = 0
    for name, stream in cfg.streams.items():
        rows = stream.micro_batch * seq_lens[name]
        split = sequence_parallel if name in split_names else 1
        tokens = math.ceil(rows / split)
        chunks = min(mlp_chunks, tokens) if name in longest else 1
        moved = offload and name in longest and cfg.model.gradient_checkpointing
        with_ckpt = student_activation_bytes(shape, tokens, regime, True, chunks, moved)
        without = student_activation_bytes(shape, tokens, regime, False, chunks)
        if split > 1 and sp_mode == "ring":
            ring = ring_blocks_bytes(shape, tokens, residual_bytes(regime))
            with_ckpt, without = with_ckpt + ring, without + ring
        if moved:
            offloaded_host = max(offloaded_host, offloaded_host_bytes(shape, tokens, regime))
        objectives = stream.objectives
        depth = 0
        if needs_teacher and objectives.needs_teacher:
            layers = _distilled_depth(objectives, teacher_shape.layers)
            depth = max(layers, teacher_shape.layers if objectives.kl is not None else 0)
        kept = distilled_states(objectives) + (1 if objectives.kl is not None else 0)
        teacher_act = teacher_activation_bytes(teacher_shape, rows, depth, weight_bytes, kept) if depth else 0
        losses = loss_bytes(shape, tokens, objectives, weight_bytes)
        activations = with_ckpt if cfg.model.gradient_checkpointing else without
        streams[name] = {"tokens_per_micro_batch": rows, "sequence_parallel": split,
                         "activations": activations, "activations_with_checkpointing": with_ckpt,
                         "activations_without_checkpointing": without, "loss_buffers": losses,
                         "teacher_activations": teacher_act,
                         "total": activations + losses + teacher_act}
    static = sum(breakdown.values())
    largest = max(s["total"] for s in streams.values()) if streams else 0
    overhead = OVERHEAD_BYTES + OVERHEAD_FRACTION * (static + largest)
    breakdown["largest_stream"] = largest
    breakdown["overhead"] = overhead
    peak = static + largest + overhead
    setup = setup_bytes(shape, teacher_shape if needs_teacher else None, mode, shards, weight_bytes)
    ranks_per_node = min(world, ranks_per_node)
    host = host_memory(shape, teacher_shape if needs_teacher else None, mode, shards, weight_bytes,
                       offloaded_host, ranks_per_node, host_ram, None if on_gpu else static + largest)
    return {"mode": mode, "world": world, "replicate": replicate, "shard_group": group,
            "replicate_problem": replicate_problem(mode, world, replicate),
            "sequence_parallel": sequence_parallel, "peak_bytes": int(peak),
            "gpu_bytes": int(gpu_bytes), "fits": peak <= gpu_bytes,
            "setup_peak_bytes": int(setup + OVERHEAD_BYTES), "host_bytes_per_rank": host["per_rank_bytes"],
            "checkpoint_bytes": checkpoint_bytes(shape),
            "host_bytes_per_node": host["per_node_bytes"], "ranks_per_node": ranks_per_node, "host": host,
            "offloaded_host_bytes_per_rank": int(offloaded_host),
            "offloaded_host_bytes_per_node": int(offloaded_host * ranks_per_node),
            "savers": {"offload_activations": bool(offload), "tiled_mlp": int(mlp_chunks),
                       "sequence_parallel_mode": sp_mode},
            "breakdown": {k: int(v) for k, v in breakdown.items()},
            "streams": {k: {kk: int(vv) for kk, vv in v.items()} for k, v in streams.items()}}


CHECKPOINT_BYTES_PER_PARAM = 12
"""A checkpoint: fp32 weights (model.safetensors) and AdamW's two fp32 moments (optimizer.pt)."""
MIN_COLLECTIVE_TIMEOUT_S = 600.0
"""The default timeout's floor (NCCL's own default): it also covers what no figure here measures: the set-up
(loading, start-up checks) and rank 0's work alone (a replicated run's evaluation, pruning checkpoints)."""
COLLECTIVE_TIMEOUT_FACTOR = 3.0
"""The default timeout over the longer of one step and one rank's checkpoint write: a step 3x slower than
planned (MFU ~0.13), or a filesystem 3x slower than parallel.checkpoint_write_gb_per_s, still finishes."""
COLLECTIVE_TIMEOUT_MFU = 0.4
"""The MFU the default timeout's step time assumes (scripts/plan.py's default), whatever --mfu says: the
figure it prints is the one the trainer uses."""


def checkpoint_bytes(shape: Shape) -> int:
    return CHECKPOINT_BYTES_PER_PARAM * shape.params


def collective_timeout_s(step_s: float | None, write_s: float) -> float:
    """The default process-group timeout: `COLLECTIVE_TIMEOUT_FACTOR` times the longer of one step (None:
    unknown, not counted) and one rank's checkpoint write, at least `MIN_COLLECTIVE_TIMEOUT_S`.

    A rank waits in a collective for as long as a peer works without it, at most about a step (a peer behind
    by its micro-batches) or a checkpoint write (a peer with a larger share); a dead or hung peer makes the
    wait endless, and this is when the run ends instead. The model's size enters only through those two
    times: sharded checkpoints are written by every rank at once, so a 70B run on 32 ranks writes in about
    what an 8B run on 8 does."""
    return max(MIN_COLLECTIVE_TIMEOUT_S, COLLECTIVE_TIMEOUT_FACTOR * max(step_s or 0.0, write_s))


def collective_timeout(cfg, shape: Shape, teacher_shape: Shape | None, mode: str, world: int,
                       seq_lens: dict[str, int], peak_tflops: float | None) -> dict:
    """The collective timeout a run gets and why: `parallel.collective_timeout_s` when set, else
    `collective_timeout_s` of the planner's step time (`run_budget` at `COLLECTIVE_TIMEOUT_MFU` of
    `peak_tflops` on `world` GPUs; None: unknown) and one rank's checkpoint write at
    `parallel.checkpoint_write_gb_per_s`.

    Returns:
        {"seconds", "reason", "step_s", "write_s"} (step_s None without a peak).
    """
    par = cfg.parallel
    writers = checkpoint_writers(mode, world)
    write_s = checkpoint_bytes(shape) / writers / (par.checkpoint_write_gb_per_s * 1e9)
    step_s = None
    if peak_tflops:
        step_s = run_budget(cfg, shape, teacher_shape, world, seq_lens, COLLECTIVE_TIMEOUT_MFU,
                            peak_tflops)["step_s"]
    if par.collective_timeout_s is not None:
        return {"seconds": float(par.collective_timeout_s), "reason": "parallel.collective_timeout_s",
                "step_s": step_s, "write_s": write_s}
    step = (f"one step ({step_s:.0f} s at MFU {COLLECTIVE_TIMEOUT_MFU} of {peak_tflops:.0f} TFLOP/s)"
            if step_s is not None else "one step (unknown: no peak TFLOP/s for this device, log.peak_tflops)")
    share = checkpoint_bytes(shape) / writers
    write = (f"one rank's checkpoint write ({write_s:.0f} s: {share / 1e9:.1f} GB "
             f"at {par.checkpoint_write_gb_per_s:g} GB/s, parallel.checkpoint_write_gb_per_s)")
    reason = (f"{COLLECTIVE_TIMEOUT_FACTOR:g} x the longer of {step} and {write}, at least "
              f"{MIN_COLLECTIVE_TIMEOUT_S:.0f} s; parallel.collective_timeout_s sets it")
    return {"seconds": collective_timeout_s(step_s, write_s), "reason": reason, "step_s": step_s,
            "write_s": write_s}


def host_bytes(shape: Shape, teacher_shape: Shape | None, weight_bytes: int) -> float:
    """Host memory of one rank loading whole models: the student's fp32 master weights and the teacher in the
    recipe's dtype (one process or data parallel; measured as peak RSS on the CPU,
    tests/integration/test_plan.py)."""
    return 4 * shape.params + (weight_bytes * teacher_shape.params if teacher_shape is not None else 0)


def largest_tensor(shape: Shape) -> int:
    """Elements of the model's largest weight (the embedding matrix, or an MLP projection)."""
    return max(shape.embed_params, shape.hidden * shape.intermediate)


def host_memory(shape: Shape, teacher_shape: Shape | None, mode: str, shards: int, weight_bytes: int,
                offloaded: float = 0.0, ranks_per_node: int = 1, host_ram: int | None = None,
                device_peak: float | None = None) -> dict:
    """Host memory of a rank and a node, at the worst of the run's phases, each on top of the process itself
    (`HOST_PROCESS_BYTES`):
    - load: sharded modes build the models on the meta device and fill only this rank's part from the
      checkpoint, so a rank holds at most its shard of the fp32 student and of the teacher (the shard group's
      1/`shards`) plus a read buffer: under FSDP2 one slice of the largest tensor (a DCP read item), under
      ZeRO-3 the largest tensor whole (`zero.Init` partitions after each full tensor is read); one process or
      data parallel load both models whole (`host_bytes`);
    - training: the pinned buffers of offloaded checkpoints (`offloaded`, parallel.offload_activations) plus
      the checkpoint's copy-out: sharded, one tensor of this rank's part at a time (DCP: the largest slice;
      ZeRO-3: a flat fp32 partition), unsharded, rank 0's whole state (weights + AdamW, 12 bytes a parameter);
    - export (rank 0): the streamed export's one bf16 output shard (`EXPORT_SHARD_BYTES`) and the tensor
      being cast into it, with the training buffers still held.
    On a CPU (`device_peak` given) the device's memory is the host's: the training peak is added to the
    training and export phases, and the process is `CPU_PROCESS_BYTES`. The node's figure counts every rank
    at rank 0's (an upper bound by one export shard).

    Returns:
        {"per_rank": {"process", "load", "offload_buffers", "checkpoint", "export"}, "per_rank_bytes",
         "per_node_bytes", "ranks_per_node", "ram_bytes", "fits" (None without `host_ram`)}.
    """
    n, big = shape.params, largest_tensor(shape)
    teacher = weight_bytes * teacher_shape.params if teacher_shape is not None else 0
    if mode == "replicated":
        load = host_bytes(shape, teacher_shape, weight_bytes)
        checkpoint = CHECKPOINT_BYTES_PER_PARAM * n
    elif mode == "fsdp2":
        load = (4 * n + teacher) / shards + 4 * big / shards
        checkpoint = 4 * big / shards
    else:
        load = (4 * n + teacher) / shards + 4 * big
        checkpoint = 4 * n / shards
    export = min(EXPORT_SHARD_BYTES, 2 * n) + 2 * big
    held = offloaded + (device_peak or 0)
    process = HOST_PROCESS_BYTES if device_peak is None else CPU_PROCESS_BYTES
    phases = {"process": process, "load": load, "offload_buffers": offloaded,
              "checkpoint": checkpoint, "export": export}
    per_rank = process + max(load, held + checkpoint, held + export)
    per_node = per_rank * ranks_per_node
    return {"per_rank": {k: int(v) for k, v in phases.items()}, "per_rank_bytes": int(per_rank),
            "per_node_bytes": int(per_node), "ranks_per_node": ranks_per_node,
            "ram_bytes": None if host_ram is None else int(host_ram),
            "fits": None if host_ram is None else per_node <= host_ram}


def shard_group_size(mode: str, world: int, replicate: int = 1) -> int:
    """The ranks the sharded state is divided over: the world, or under FSDP2 with `parallel.replicate` R
    (HSDP, when R divides the world) one replica's world / R."""
    if mode == "fsdp2" and replicate > 1 and world % replicate == 0:
        return world // replicate
    return world


def replicate_problem(mode: str, world: int, replicate: int) -> str | None:
    """Why the trainer would refuse `parallel.replicate` for this launch, or None (one line)."""
    if replicate == 1:
        return None
    if mode != "fsdp2":
        return (f"parallel.replicate: {replicate} needs the FSDP2 launch (recipes/accelerate/fsdp2.yaml); "
                f"this is {mode} on {world} processes")
    if world % replicate:
        return f"parallel.replicate: {replicate} does not divide the {world} processes"
    return None


def setup_bytes(shape: Shape, teacher_shape: Shape | None, mode: str, world: int, weight_bytes: int) -> float:
    """GPU memory at the set-up's peak, before the first step (no gradients, no optimiser state yet): the
    models arrive whole on the host in sharded modes, and the strategy moves them one piece at a time.
    - replicated: the whole student (fp32) and teacher on every GPU;
    - fsdp2: this rank's shards, plus the unit being sharded whole (`fully_shard` moves a unit's parameters to
      the GPU, then keeps the shard): the largest of a decoder layer and the root (embeddings, lm_head);
    - zero3: this rank's partitions, plus the parameter being partitioned whole (`zero.Init` goes one
      parameter at a time): the largest, the embedding matrix.
    The teacher the same way in its dtype (its embeddings and lm_head replicated under FSDP2)."""
    n = shape.params
    root = shape.embed_params + (0 if shape.tied else shape.vocab * shape.hidden)
    if mode == "replicated":
        student = 4 * n
    elif mode == "fsdp2":
        student = 4 * n / world + 4 * max(shape.layer_params, root)
    else:
        student = 4 * n / world + 4 * shape.embed_params
    if teacher_shape is None:
        return student
    t_layers = teacher_shape.layers * teacher_shape.layer_params
    t_edges = teacher_shape.params - t_layers
    if mode == "replicated":
        teacher = teacher_shape.params
    elif mode == "fsdp2":
        teacher = t_layers / world + teacher_shape.layer_params + t_edges
    else:
        teacher = teacher_shape.params / world + teacher_shape.embed_params
    return student + weight_bytes * teacher


def _split_streams(cfg, seq_lens: dict[str, int]) -> set[str]:
    """The streams sequence parallelism would split (as distill.parallel.ulysses.split_streams picks them,
    without its
    checks: the planner also answers for degrees the recipe does not ask for)."""
    native = {n: seq_lens[n] for n, s in cfg.streams.items() if s.positions == "native"}
    longest = max(native.values()) if native else 0
    return {n for n, t in native.items()
            if t == longest and set(cfg.streams[n].objectives.active()) == {"lm"}}


def _distilled_depth(objectives, num_layers: int) -> int:
    hidden = objectives.hidden
    if hidden is None:
        return 0
    if hidden.layers == "auto":
        return num_layers
    return max(num_layers if layer == "last" else int(layer) for layer in hidden.layers)


def sequence_parallel_problem(shape: Shape, world: int, size: int, sp_mode: str = "ulysses",
                              ring_degree: int = 1, replicate: int = 1) -> str | None:
    """Why the trainer would refuse sequence parallelism over `size` ranks of `world` for this model, or
    None: the degree must divide the processes and, under HSDP (`replicate` > 1), one shard group
    (`distill.parallel.ulysses.group_problem`), and the heads must suit the Ulysses degree by the trainer's
    own rule (`distill.parallel.ulysses.heads_problem`: S for ulysses, S / ring_degree for hybrid, none for
    ring)."""
    if size == 1:
        return None
    return group_problem(world, size, replicate) or \
        heads_problem(shape.heads, shape.kv_heads, size, sp_mode, ring_degree)


def plan_with_sequence_parallel(cfg, shape: Shape, mode: str, world: int, gpu_bytes: int,
                                seq_lens: dict[str, int], teacher_shape: Shape | None = None,
                                on_gpu: bool = True, variants: bool = False, host_ram: int | None = None,
                                need_host: bool = False, **savers_) -> dict:
    """`plan` at the recipe's `parallel.sequence_parallel` (with `sequence_parallel_problem` when the trainer
    would refuse it), plus `min_sequence_parallel`: the smallest degree the trainer accepts for this model
    and launch at which the peak fits, or None when none does.

    Args:
        variants: also `peak_by_savers`: the peak at the recipe's degree with each saver off and on
            ({"plain", "offload", "tiled_mlp", "offload+tiled_mlp"} and, split, "ring" for the other kind).
        host_ram: a node's RAM (`plan`'s host check).
        need_host: the smallest degree must fit the node's RAM too (what `max_context` asks), not only the
            GPU.
        savers_: `plan`'s offload / mlp_chunks / sp_mode overrides.
    """
    configured = cfg.parallel.sequence_parallel
    sp_mode = savers_.get("sp_mode") or sequence_parallel_mode(cfg)
    result = plan(cfg, shape, mode, world, gpu_bytes, seq_lens, teacher_shape, configured, on_gpu,
                  host_ram=host_ram, **savers_)
    ring_degree, replicate = cfg.parallel.ring_degree, cfg.parallel.replicate
    result["sequence_parallel_problem"] = sequence_parallel_problem(shape, world, configured, sp_mode,
                                                                    ring_degree, replicate)
    result["min_sequence_parallel"] = None
    for s in range(1, world + 1):
        if sequence_parallel_problem(shape, world, s, sp_mode, ring_degree, replicate) is not None:
            continue
        trial = result if s == configured else \
            plan(cfg, shape, mode, world, gpu_bytes, seq_lens, teacher_shape, s, on_gpu, host_ram=host_ram,
                 **savers_)
        if trial["fits"] and (not need_host or trial["host"]["fits"] is not False):
            result["min_sequence_parallel"] = s
            result["peak_bytes_at_min_sequence_parallel"] = trial["peak_bytes"]
            result["host_bytes_per_node_at_min_sequence_parallel"] = trial["host_bytes_per_node"]
            break
    if variants:
        _, chunks = savers(cfg, shape)
        tiled = chunks if chunks > 1 else auto_chunks(shape.hidden, shape.intermediate)
        table = {"plain": (False, 1), "offload": (True, 1), "tiled_mlp": (False, tiled),
                 "offload+tiled_mlp": (True, tiled)}
        peaks = {}
        for key, (off, n) in table.items():
            if off and not cfg.model.gradient_checkpointing:
                continue
            peaks[key] = plan(cfg, shape, mode, world, gpu_bytes, seq_lens, teacher_shape, configured, on_gpu,
                              offload=off, mlp_chunks=n, sp_mode=sp_mode)["peak_bytes"]
        if configured > 1:
            other = "ring" if sp_mode == "ulysses" else "ulysses"
            kept = {k: v for k, v in savers_.items() if k != "sp_mode"}
            peaks[other] = plan(cfg, shape, mode, world, gpu_bytes, seq_lens, teacher_shape, configured,
                                on_gpu, sp_mode=other, **kept)["peak_bytes"]
        result["peak_by_savers"] = peaks
        result["tiled_mlp_chunks_compared"] = tiled
    return result


def max_context(cfg, shape: Shape, mode: str, world: int, gpu_bytes: int, seq_lens: dict[str, int],
                teacher_shape: Shape | None = None, on_gpu: bool = True, stream: str | None = None,
                step: int = 1024, host_ram: int | None = None, **savers_) -> dict:
    """The longest row of the long stream (`stream`, default: the recipe's longest) that fits for this model
    and launch at some sequence-parallel degree the trainer accepts, with the recipe's other streams as they
    are: a bisection over multiples of `step` tokens (the peak grows with the length). With `host_ram` the
    node's host memory must fit too (offloaded checkpoints grow with the row).

    Returns:
        {"max_context": tokens or 0, "stream", "sequence_parallel" (the smallest degree at that length),
         "peak_bytes", "host_bytes_per_node"}.
    """
    name = stream or sorted(long_streams(seq_lens))[0]

    def fits(length: int) -> dict | None:
        lens = {**seq_lens, name: length}
        result = plan_with_sequence_parallel(cfg, shape, mode, world, gpu_bytes, lens, teacher_shape, on_gpu,
                                             host_ram=host_ram, need_host=host_ram is not None, **savers_)
        return result if result["min_sequence_parallel"] is not None else None

    low, high, best = 0, step, None
    while (found := fits(high)) is not None and high < 2**30:
        low, high, best = high, high * 2, found
    while high - low > step:
        mid = (low + high) // 2 // step * step
        if mid <= low:
            break
        if (found := fits(mid)) is not None:
            low, best = mid, found
        else:
            high = mid
    return {"max_context": low, "stream": name,
            "sequence_parallel": best["min_sequence_parallel"] if best else None,
            "peak_bytes": best["peak_bytes_at_min_sequence_parallel"] if best else None,
            "host_bytes_per_node": best["host_bytes_per_node_at_min_sequence_parallel"] if best else None}


def gpu_memory(name: str) -> int:
    """Bytes of a named GPU (`GPUS`) or a number of bytes given as text ("85e9", "80GiB")."""
    key = name.strip().lower()
    if key in GPUS:
        return GPUS[key]
    return byte_size(key)


def byte_size(text: str) -> int:
    """A size given as text: bytes ("85e9") or with a unit ("80GiB", "1TiB", "512GB", "2TB").

    Raises:
        ValueError: not a positive size.
    """
    text = text.strip().lower().replace("_", "")
    value = text
    scale = 1
    for suffix, unit in (("tib", 1024**4), ("gib", GiB), ("tb", 10**12), ("gb", 10**9)):
        if text.endswith(suffix):
            value, scale = text[: -len(suffix)], unit
            break
    size = int(float(value) * scale)
    if size <= 0:
        raise ValueError(text)
    return size


def node_ram_bytes() -> int:
    """This machine's physical memory (bytes): the node a run or a plan is on."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def accelerate_launch(path: str | None) -> tuple[str, int]:
    """(mode, number of processes) an accelerate config file launches."""
    import yaml


    if path is None:
        return "fsdp2", 8
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        reason = str(err).splitlines()[0]
        raise ConfigError(f"--accelerate-config {path}: cannot read it ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--accelerate-config {path}: expected a mapping (an accelerate config)")
    kind = str(data.get("distributed_type", "NO")).upper()
    mode = {"FSDP": "fsdp2", "DEEPSPEED": "zero3"}.get(kind, "replicated")
    return mode, int(data.get("num_processes", 1) or 1)


def recipe_seq_lens(cfg) -> dict[str, int]:
    """Each stream's row length: the built data's when it exists (checked against `streams.<name>.seq_len`
    when both are given), else the recipe's `seq_len`.

    Raises:
        ConfigError: neither is available, or they disagree.
    """
    import json


    lens = {}
    for name, stream in cfg.streams.items():
        built = None
        info = os.path.join(stream.data, STREAM_INFO)
        if os.path.isfile(info):
            with open(info, encoding="utf-8") as f:
                built = int(json.load(f)["seq_len"])
        if built is not None and stream.seq_len is not None and built != stream.seq_len:
            raise ConfigError(f"streams.{name}.seq_len: {stream.seq_len}, but {stream.data} was built with "
                              f"rows of {built}")
        value = built if built is not None else stream.seq_len
        if value is None:
            raise ConfigError(f"streams.{name}.seq_len: the data {stream.data} is not built yet; give the "
                              f"row length in the recipe (streams.{name}.seq_len) to plan without it")
        lens[name] = value
    return lens


def memory_problem(cfg, shape: Shape, teacher_shape: Shape | None, mode: str, world: int, gpu_bytes: int,
                   seq_lens: dict[str, int], device_name: str = "GPU") -> str | None:
    """The trainer's start-up check on a GPU: one line when the estimated peak does not fit, else None."""
    result = plan_with_sequence_parallel(cfg, shape, mode, world, gpu_bytes, seq_lens, teacher_shape)
    if result["fits"]:
        return None
    sp = result["min_sequence_parallel"]
    hint = (f"sequence parallelism over {sp} ranks would fit" if sp
            else "no sequence-parallel degree fits either")
    return (f"the run needs ~{result['peak_bytes'] / GiB:.1f} GiB per GPU ({mode} on {world} GPUs) but the "
            f"{device_name} has {gpu_bytes / GiB:.1f} GiB ({hint}); see scripts/plan.py for the breakdown, "
            f"shard more (recipes/accelerate/fsdp2.yaml), lower micro_batch, turn on "
            f"model.gradient_checkpointing, or set parallel.skip_memory_check: true to try anyway")


def host_problem(cfg, shape: Shape, teacher_shape: Shape | None, mode: str, world: int, ranks_per_node: int,
                 host_ram: int, seq_lens: dict[str, int], on_gpu: bool = True) -> str | None:
    """The trainer's start-up check of the node's RAM: one line when the planner's host memory per node
    (`host_memory`, `ranks_per_node` ranks of this launch) exceeds `host_ram`, else None."""
    result = plan(cfg, shape, mode, world, GPUS["h100-80gb"], seq_lens, teacher_shape,
                  cfg.parallel.sequence_parallel, on_gpu, ranks_per_node=ranks_per_node, host_ram=host_ram)
    host = result["host"]
    if host["fits"]:
        return None
    worst = max(("load", "checkpoint", "export"), key=lambda k: host["per_rank"][k])
    ranks = host["ranks_per_node"]
    return (f"the run needs ~{host['per_node_bytes'] / GiB:.1f} GiB of host memory on this node "
            f"({ranks} rank{'s' if ranks > 1 else ''} x {host['per_rank_bytes'] / GiB:.1f} GiB, {mode} on "
            f"{world} processes; the most at {worst}) but the node has {host_ram / GiB:.1f} GiB; see "
            f"scripts/plan.py --host-ram for the breakdown, shard over more processes, run fewer ranks per "
            f"node, turn off parallel.offload_activations, or set parallel.skip_memory_check: true to try "
            f"anyway")


# ---------------------------------------------------------------------------------------------------
# The run's budget: tokens, time at a stated MFU, checkpoints on disk, the stop grace a cluster must give
# ---------------------------------------------------------------------------------------------------
def flop_counts_of(shape: Shape) -> dict[str, float]:
    """distill.model.flops.flop_counts from a config's shape (no model built): N counts every matmul operand,
    i.e.
    all parameters but the input embedding (a lookup), with the lm_head counted even when tied."""
    head = shape.vocab * shape.hidden
    return {"L": float(shape.layers), "d": float(shape.hidden), "V": float(shape.vocab),
            "N_layers": float(shape.layers * shape.layer_params),
            "N": float(shape.params - shape.embed_params + (head if shape.tied else 0))}


def stream_tokens_per_step(cfg) -> dict[str, float]:
    """Each stream's token slots per optimiser step (all ranks), averaged over the run's steps: its share of
    `mix.tokens_per_step` (a share schedule is followed step by step; micro-batch counts are rounded
    stochastically around exactly this, distill.data.mixture)."""
    steps = cfg.train.max_steps
    if all(isinstance(s.share, float) for s in cfg.streams.values()):  # fixed shares: no walk needed
        whole = sum(s.share for s in cfg.streams.values())
        return {n: cfg.mix.tokens_per_step * s.share / whole for n, s in cfg.streams.items()}
    totals = dict.fromkeys(cfg.streams, 0.0)
    for step in range(steps):
        shares = {n: share_at(step, s.share) for n, s in cfg.streams.items()}
        whole = sum(shares.values())
        for name, share in shares.items():
            totals[name] += share / whole if whole > 0 else 0.0
    return {n: cfg.mix.tokens_per_step * t / steps for n, t in totals.items()}


def checkpoints_on_disk(max_steps: int, save_every: int, keep_last: int, keep_every: int) -> tuple[int, int]:
    """(the most checkpoints on disk at once, those left at the end) for saves at every `save_every` steps and
    at the last step, pruned as distill.train.checkpoint.prune does after each save (the newest `keep_last`
    plus
    multiples of `keep_every`). The most is counted while a new one is written, before the prune."""
    saves = sorted({*(range(save_every, max_steps + 1, save_every) if save_every else ()), max_steps})
    kept: list[int] = []
    most = 0
    for step in saves:
        kept.append(step)
        most = max(most, len(kept))
        newest = sorted(kept, reverse=True)
        kept = [s for i, s in enumerate(newest) if i < keep_last or (keep_every and s % keep_every == 0)]
    return most, len(kept)


STOP_GRACE_MARGIN = 1.25
"""The suggested stop grace: (one step + one checkpoint write) times this, rounded up to a minute."""


def checkpoint_writers(mode: str, world: int) -> int:
    """The ranks that write a checkpoint at the same time: every rank its own part when sharded (FSDP2's
    DCP; under HSDP DCP's planner spreads the replicas' duplicate shards over their holders, so every rank
    still writes ~1/world; ZeRO-3's engine checkpoint), rank 0 alone otherwise."""
    return world if mode in ("fsdp2", "zero3") else 1


def run_budget(cfg, shape: Shape, teacher_shape: Shape | None, world: int, seq_lens: dict[str, int],
               mfu: float, peak_tflops: float | None, mode: str = "fsdp2") -> dict:
    """What a run costs besides memory: tokens per step and per run (per stream), step time and hours at a
    stated MFU, checkpoints on disk, and the stop grace a scheduler must leave between its signal and the
    kill.

    Time: FLOPs per step are the trainer's own (distill.model.flops.flop_rates: 6N + 12·L·d·T per trained
    token,
    plus the teacher's forward 2·N·depth/L + 4·depth·d·T), at `mfu` of `peak_tflops` on each of `world` GPUs.
    The attention term counts the whole row as one document (an upper bound for packed rows) and gradient
    checkpointing's recomputation is not counted, as the MFU convention has it: MFU 0.4 with recomputation
    is about 0.53 of the hardware. The trainer logs `mfu` for the student alone and `teacher_tflops_per_s`
    apart; the planner's MFU is their sum over the peak.

    Checkpoints: sharded modes write in parallel, each of the `checkpoint_writers` ranks its own
    checkpoint_bytes / writers at `parallel.checkpoint_write_gb_per_s` (a per-rank bandwidth: the filesystem
    is assumed to sustain writers x that in aggregate, as parallel filesystems do for a few dozen clients);
    one process or data parallel writes everything from rank 0.

    Args:
        mfu: model FLOPs utilisation assumed (e.g. 0.4).
        peak_tflops: dense bf16 peak per GPU; None: no time figures.
        mode: the launch's ("replicated", "fsdp2", "zero3"): who writes checkpoints.

    Returns:
        {"tokens_per_step", "tokens_per_run": {stream: tokens}, "step_flops", "mfu", "peak_tflops",
         "step_s", "train_hours", "checkpoint_bytes", "checkpoint_writers", "checkpoint_write_s",
         "checkpoint_write_gb_per_s", "checkpoints_saved",
         "checkpoints_on_disk_max", "checkpoints_at_end", "checkpoint_disk_bytes_max",
         "checkpoint_hours", "total_hours", "stop_grace_s"} (time figures None without a peak).
    """
    teacher_shape = teacher_shape or shape
    per_step = stream_tokens_per_step(cfg)
    layers = {}
    for name, stream in cfg.streams.items():
        hidden = stream.objectives.hidden
        if hidden is not None:  # `auto` picks its top_k below the last state: the teacher runs to the last
            picked = ["last"] if hidden.layers == "auto" else hidden.layers
            layers[name] = [teacher_shape.layers if x == "last" else int(x) for x in picked]
    rates = flop_rates(cfg, seq_lens, layers, flop_counts_of(shape),
                       flop_counts_of(teacher_shape) if cfg.needs_teacher else None)
    step_flops = sum(per_step[n] * (student + teacher) for n, (student, teacher) in rates.items())
    size = checkpoint_bytes(shape)
    writers = checkpoint_writers(mode, world)
    write_s = size / writers / (cfg.parallel.checkpoint_write_gb_per_s * 1e9)
    train = cfg.train
    most, at_end = checkpoints_on_disk(train.max_steps, train.save_every, train.keep_last, train.keep_every)
    saves = len({*(range(train.save_every, train.max_steps + 1, train.save_every) if train.save_every
                   else ()), train.max_steps})
    result = {"tokens_per_step": cfg.mix.tokens_per_step,
              "tokens_per_step_by_stream": {n: int(round(t)) for n, t in per_step.items()},
              "tokens_per_run": {n: int(round(t * train.max_steps)) for n, t in per_step.items()},
              "step_flops": step_flops, "mfu": mfu, "peak_tflops": peak_tflops,
              "checkpoint_bytes": size, "checkpoint_writers": writers, "checkpoint_write_s": write_s,
              "checkpoint_write_gb_per_s": cfg.parallel.checkpoint_write_gb_per_s, "checkpoints_saved": saves,
              "checkpoints_on_disk_max": most, "checkpoints_at_end": at_end,
              "checkpoint_disk_bytes_max": most * size, "checkpoint_hours": saves * write_s / 3600,
              "step_s": None, "train_hours": None, "total_hours": None, "stop_grace_s": None}
    if peak_tflops:
        step_s = step_flops / (mfu * peak_tflops * 1e12 * world)
        grace = math.ceil(STOP_GRACE_MARGIN * (step_s + write_s) / 60) * 60
        result.update({"step_s": step_s, "train_hours": train.max_steps * step_s / 3600,
                       "total_hours": train.max_steps * step_s / 3600 + result["checkpoint_hours"],
                       "stop_grace_s": grace})
    return result
