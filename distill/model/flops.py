"""Model FLOPs per token (from a loaded model or a config's shape) and the per-device peaks for MFU: the
one source for the trainer's logged MFU and the planner's time estimates."""

from __future__ import annotations

from distill.model.decoder import decoder_layers

# ---------------------------------------------------------------------------------------------------
# Model FLOPs and MFU
# ---------------------------------------------------------------------------------------------------
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIE": 756.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0,
               "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A6000": 155.0,
               "A10G": 70.0, "A10": 125.0, "L4": 121.0, "4090": 165.0, "3090": 71.0}
"""Dense bf16 tensor-core peak TFLOP/s per device (vendor datasheets, without sparsity), by name fragment."""


def peak_tflops(device, configured: float | None = None) -> float | None:
    """The per-device peak used for MFU: the recipe's `log.peak_tflops`, else looked up from the CUDA
    device's name (`PEAK_TFLOPS`); None on a CPU or an unknown GPU (no MFU is logged)."""
    import torch

    if configured is not None:
        return float(configured)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_by_name(torch.cuda.get_device_name(device))


def peak_by_name(name: str) -> float | None:
    """`PEAK_TFLOPS` of a device name ("NVIDIA H100 80GB HBM3", or the planner's "h100-80gb"), or None."""
    name = name.upper()
    for fragment in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if fragment in name:
            return PEAK_TFLOPS[fragment]
    return None


def flop_counts(model) -> dict[str, float]:
    """What the FLOP formulas need from a causal LM: L layers, width d, vocabulary V, N_layers (the
    decoder layers' parameters) and N = every parameter that is a matmul operand (all but the input
    embedding, which is a lookup; lm_head counts, tied or not)."""
    def numel(p):  # a ZeRO-3 partitioned parameter holds an empty tensor; ds_numel is its whole size
        return getattr(p, "ds_numel", p.numel())

    config = model.config
    layers = sum(numel(p) for p in decoder_layers(model).parameters())
    embed = model.get_input_embeddings().weight
    total = sum(numel(p) for p in model.parameters())
    head = model.get_output_embeddings().weight
    tied = head is embed
    rows = getattr(head, "ds_shape", head.shape)[0]
    return {"L": float(config.num_hidden_layers), "d": float(config.hidden_size), "V": float(rows),
            "N_layers": float(layers), "N": float(total - numel(embed) + (numel(head) if tied else 0))}


def train_flops_per_token(counts: dict, seq_len: int, logits: bool = True) -> float:
    """Training FLOPs per token of a row of `seq_len`: 6N + 12·L·d·T (forward + backward; the attention
    term counts the full T×T scores, as the usual MFU convention does, not the causal half). Without
    `logits` (a stream trained on hidden states only) the lm_head's 6·d·V is not run and not counted."""
    n = counts["N"] - (0.0 if logits else counts["d"] * counts["V"])
    return 6.0 * n + 12.0 * counts["L"] * counts["d"] * seq_len


def teacher_flops_per_token(counts: dict, seq_len: int, depth: int, logits: bool) -> float:
    """Forward-only FLOPs per token of a teacher run to `depth` layers (lm_head only with `logits`)."""
    share = depth / counts["L"]
    head = 2.0 * counts["d"] * counts["V"] if logits else 0.0
    return 2.0 * counts["N_layers"] * share + head + 4.0 * depth * counts["d"] * seq_len


def flop_rates(cfg, seq_lens: dict[str, int], layers: dict[str, list[int]], student,
               teacher) -> dict[str, tuple[float, float]]:
    """Per stream, (student training FLOPs, teacher forward FLOPs) per token slot of its rows, from the
    whole (unsharded) models' parameter counts (`student`, `teacher`: the models, or their `flop_counts`
    taken before sharding).

    Args:
        cfg: the RecipeConfig (each stream's objectives).
        seq_lens: each stream's row length.
        layers: each stream's distilled hidden-state indices (distill.model.layers.resolve_layers).
    """
    counts = student if isinstance(student, dict) else flop_counts(student)
    teacher_counts = teacher if isinstance(teacher, dict) or teacher is None else flop_counts(teacher)
    rates = {}
    for name, stream_cfg in cfg.streams.items():
        T, objectives = seq_lens[name], stream_cfg.objectives
        taught = 0.0
        if teacher_counts is not None and objectives.needs_teacher:
            depth = max(layers.get(name, [])
                        + ([int(teacher_counts["L"])] if objectives.kl is not None else []))
            taught = teacher_flops_per_token(teacher_counts, T, depth, objectives.kl is not None)
        logits = objectives.lm is not None or objectives.kl is not None  # else no lm_head in the step
        rates[name] = (train_flops_per_token(counts, T, logits), taught)
    return rates
