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
        import wandb  # optional and slow to import: only a run that logs to wandb

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
