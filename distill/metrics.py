"""metrics.jsonl, the console line and wandb (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets

logger = logging.getLogger(__name__)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


class MetricsFile:
    """Append-only metrics.jsonl holding each step exactly once across resumes.

    On resume from the checkpoint after step S, the lines for steps > S (written after that checkpoint,
    before the stop) are dropped first, so replaying those steps does not duplicate them.
    """

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        if os.path.exists(path):
            kept = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill mid-write
                    if record.get("step", 0) <= resume_step:
                        kept.append(json.dumps(record))
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def console_line(record: dict) -> str:
    """One compact line: step, loss, per-objective losses, lr, grad-norm, tokens/s (and MFU when known)."""
    parts = [f"step {record['step']:>6d}", f"loss {record['loss']:.4f}"]
    parts += [f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss/")]
    parts += [f"lr {record['lr']:.3e}", f"gnorm {record['grad_norm']:.3f}",
              f"tok/s {record['tokens_per_s']:.0f}"]
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    return " | ".join(parts)


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
    name = torch.cuda.get_device_name(device).upper()
    for fragment in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if fragment in name:
            return PEAK_TFLOPS[fragment]
    return None


def flop_counts(model) -> dict[str, float]:
    """What the FLOP formulas need from a causal LM: L layers, width d, vocabulary V, N_layers (the
    decoder layers' parameters) and N = every parameter that is a matmul operand (all but the input
    embedding, which is a lookup; lm_head counts, tied or not)."""
    from distill.models import decoder_layers

    config = model.config
    layers = sum(p.numel() for p in decoder_layers(model).parameters())
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight
    tied = head is embed
    return {"L": float(config.num_hidden_layers), "d": float(config.hidden_size), "V": float(head.shape[0]),
            "N_layers": float(layers), "N": float(total - embed.numel() + (head.numel() if tied else 0))}


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
        layers: each stream's distilled hidden-state indices (distill.layers.resolve_layers).
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


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(mode: str) -> str:
    """auto: online with an API key, else offline (no network needed)."""
    if mode == "auto":
        return "online" if _has_wandb_key() else "offline"
    return mode


class Tracker:
    """A thin wandb wrapper that resumes the same run id; a no-op when disabled."""

    def __init__(self, project: str, mode: str, name: str, output_dir: str, config: dict,
                 run_id: str | None = None, entity: str | None = None):
        self.run = None
        self.run_id = run_id
        mode = wandb_mode(mode)
        if mode == "disabled":
            return
        import wandb

        os.makedirs(output_dir, exist_ok=True)
        self.run_id = run_id or secrets.token_hex(4)  # kept in checkpoints: a resumed run logs to the same id
        try:
            self.run = wandb.init(project=project, entity=entity, name=name, dir=output_dir, config=config,
                                  id=self.run_id, resume="allow", mode=mode, reinit="finish_previous")
        except Exception as err:  # a tracker must never kill a training run
            logger.warning("wandb disabled: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
            self.run = None

    def log(self, record: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k.replace("loss/", "train/"): v for k, v in record.items() if k != "step"},
                         step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
