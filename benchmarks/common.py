"""Shared set-up for the trainer benchmarks (distill_overhead.py, throughput.py).

Everything is offline and built through the library's own entry points, as a user would:
  - a byte-fallback BPE sentencepiece tokenizer trained on standard-library sources
    (`distill.testing.train_tokenizer`),
  - a tiny random-init Llama saved to disk (`distill.testing.make_tiny_model`; 4 layers x 256 hidden,
    8 heads, vocab 5000: about 6.8M parameters) and loaded back by path,
  - packed streams built from standard-library files by `distill.data.build`,
  - recipes as dicts turned into `RecipeConfig`s by `distill.config.from_dict` and run by
  `distill.train.loop.run`.

`StepProfiler` times the parts of the real training loop through the spans the step itself exposes
(`distill.train.spans.Spans`, passed to `distill.train.loop.run(cfg, spans=...)`): data fetch, student
forward, teacher
forward, objectives, backward, gradient reduction and clipping, optimiser step; it closes a step when the
loop hands it the step's metrics record. Nothing of the library is patched. CPU work is synchronous, so
wall-clock timers around a span measure that span.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread unless told otherwise (see set_threads); set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from distill.train.spans import Spans  # noqa: E402  (after the environment above: it imports torch)

# The tiny model every benchmark trains (about 6.8M parameters with the 5000-token vocabulary).
VOCAB = 5000
MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 8, "num_kv_heads": 8,
         "max_position_embeddings": 256}
NATIVE_WINDOW = 256
"""The tiny model's native context (the teacher's); the student's RoPE is extended to `TARGET_LENGTH`."""
TARGET_LENGTH = 1024


def quiet() -> None:
    """Silence progress bars, info logs and known warnings so that stdout carries only the JSON line."""
    import torch

    # DeepSpeed (imported by transformers/accelerate) warns on stdout otherwise
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import transformers

    logging.basicConfig(level=logging.WARNING)
    for name in ("distill", "transformers", "accelerate", "datasets", "httpx", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")


def log(message: str) -> None:
    """Progress on stderr (stdout is reserved for the one JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def set_threads(n: int) -> int:
    """Use `n` intra-op threads. The default is 1: on the shared 2-core machine (load ~4 from other
    engineers' tests) 2 OpenMP threads were 4-6x SLOWER than 1 for the same forward+backward, because a
    descheduled thread stalls the other at every parallel region's barrier. Both sides of every
    comparison run with the same setting."""
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def median(values) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------
# tokenizer, model, corpora, built streams
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Workspace:
    """A temporary directory holding the tokenizer, the model and the built data of one benchmark run."""

    root: str
    tokenizer: str = ""
    model: str = ""

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)


@contextlib.contextmanager
def workspace(keep: str | None = None):
    """A Workspace in a fresh temporary directory (removed afterwards unless `keep` names a directory)."""
    if keep:
        os.makedirs(keep, exist_ok=True)
        yield Workspace(os.path.abspath(keep))
        return
    root = tempfile.mkdtemp(prefix="distill-bench-")
    try:
        yield Workspace(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def prepare_model(ws: Workspace, vocab: int = VOCAB, seed: int = 0) -> Workspace:
    """Train the tokenizer on stdlib sources and save the tiny random-init Llama beside it."""
    from distill.testing import make_tiny_model, train_tokenizer

    ws.tokenizer = train_tokenizer(ws.path("tokenizer"), vocab_size=vocab)
    ws.model = make_tiny_model(ws.path("model"), "llama", tokenizer_dir=ws.tokenizer, seed=seed, **MODEL)
    return ws


def packed_row(tokens: int, vocab_size: int, seed: int = 0, shortest: int = 300, longest: int = 1500):
    """One packed row of `tokens` random ids (documents of shortest..longest-1 tokens, the last cut to fit):
    (ids, positions restarting per document, targets shifted with -100 at the end), each (1, tokens), CPU."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths, left = [], tokens
    while left > 0:
        n = min(left, int(torch.randint(shortest, longest, (1,), generator=gen)))
        lengths.append(n)
        left -= n
    ids = torch.randint(3, vocab_size, (1, tokens), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    return ids, positions, targets


def copy_corpus(ws: Workspace, name: str, files: list[str]) -> str:
    """Copy stdlib files into <root>/corpus/<name>/ (one file = one document for a `files` source)."""
    out = ws.path("corpus", name)
    os.makedirs(out, exist_ok=True)
    for i, path in enumerate(files):
        shutil.copy(path, os.path.join(out, f"{i:04d}_{os.path.basename(path)}"))
    return out


def build_streams(ws: Workspace, name: str, sources: dict[str, str], streams: dict,
                  seed: int = 0) -> dict[str, str]:
    """Build `streams` (data-spec stream entries) from `files` sources {source name: directory} with the
    workspace's tokenizer; returns {stream: built directory} plus 'manifest' (the build's manifest dict)."""
    from distill.data.build import build
    from distill.data.spec import spec_from_dict

    out = ws.path("built", name)
    spec = spec_from_dict({
        "tokenizer": ws.tokenizer,
        "output_dir": out,
        "seed": seed,
        "sources": [{"name": n, "kind": "files", "path": d, "include": ["*.py"]} for n, d in sources.items()],
        "streams": streams,
    })
    manifest = build(spec, overwrite=True, progress=False)
    dirs = {s: os.path.join(out, s) for s in streams}
    dirs["manifest"] = manifest
    return dirs


def long_files(limit: int = 8) -> list[str]:
    """Large stdlib modules (about 15K-50K tokens each at vocab 5000): long rows and s2l windows."""
    from distill.testing import stdlib_files

    return stdlib_files(min_bytes=30_000, max_bytes=100_000, limit=limit)


def short_files(min_bytes: int = 100, max_bytes: int = 2400, limit: int | None = None) -> list[str]:
    """Small stdlib modules (about 30-1100 tokens each at vocab 5000)."""
    from distill.testing import stdlib_files

    return stdlib_files(min_bytes=min_bytes, max_bytes=max_bytes, limit=limit)


# ---------------------------------------------------------------------------------------------------
# recipes and runs
# ---------------------------------------------------------------------------------------------------
def recipe(ws: Workspace, out_dir: str, streams: dict, tokens_per_step: int, steps: int,
           dtype: str = "bfloat16", seed: int = 0):
    """A RecipeConfig for the tiny model: abf RoPE extended from 256 to 1024 tokens, constant LR, no
    checkpoints between steps, no export, no resume, no console lines, no tracker."""
    from distill.config import RecipeConfig, from_dict

    return from_dict(RecipeConfig, {
        "run": {"name": "bench", "output_dir": out_dir, "seed": seed},
        "model": {"path": ws.model, "dtype": dtype, "attention": "auto"},  # sdpa_varlen on the CPU
        "rope": {"method": "abf", "theta": 160000.0, "target_length": TARGET_LENGTH},
        "streams": streams,
        "mix": {"tokens_per_step": tokens_per_step},
        "optim": {"lr": 1.0e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "max_grad_norm": 1.0,
                  "schedule": {"name": "constant", "warmup_steps": 0}},
        "train": {"max_steps": steps, "log_every": 10**9, "save_every": 0, "keep_last": 1, "resume": "never",
                  "export": False},
        "log": {"wandb": {"mode": "disabled"}, "progress_bar": False},
    })


PARTS = ("data", "student_forward", "teacher_forward", "loss", "backward", "clip_grad", "optimizer")
FORWARD = ("student_forward", "teacher_forward", "loss")  # a micro-batch's forward: student + teacher + loss


class StepProfiler(Spans):
    """Records the step's spans (`distill.train.spans.Spans`) per step.

    Per step: wall time between consecutive metrics records (the whole step, logging included), the loop's
    own `tokens_per_s`, seconds in each of PARTS (`other` = the rest: planning, counting, metrics), and per
    stream the micro-batch forward (student + teacher + loss) and backward seconds, wall and process CPU.
    `loss` is the objectives' forward only; their backward is inside `backward`.
    """

    def __init__(self):
        self.steps: list[dict] = []
        self._parts = defaultdict(float)
        self._streams = defaultdict(lambda: defaultdict(float))
        self._last, self._last_cpu = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def _span(self, name: str, stream: str | None):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            self._parts[name] += wall
            if stream is not None and name in FORWARD + ("backward",):
                per = self._streams[stream]
                kind = "backward" if name == "backward" else "forward"
                per[f"{kind}_s"] += wall
                per[f"{kind}_cpu_s"] += cpu
                per["micro_batches"] += name == "student_forward"

    def __call__(self, name: str, stream: str | None = None):
        return self._span(name, stream)

    def step_done(self, record: dict) -> None:
        now, cpu_now = time.perf_counter(), time.process_time()
        wall, cpu = now - self._last, cpu_now - self._last_cpu
        self._last, self._last_cpu = now, cpu_now
        step_tokens = record["tokens"] - (self.steps[-1]["tokens"] if self.steps else 0)
        step_s = step_tokens / record["tokens_per_s"] if record.get("tokens_per_s") else float("nan")
        streams = {k: dict(v) for k, v in self._streams.items()}
        for name, per in streams.items():
            per["tokens"] = record.get(f"tokens/{name}", 0)
        self.steps.append({
            "step": record["step"], "tokens": record["tokens"], "step_tokens": step_tokens, "wall_s": wall,
            "cpu_s": cpu, "loop_s": step_s, "tokens_per_s": record["tokens_per_s"],
            "parts": {p: self._parts.get(p, 0.0) for p in PARTS}, "streams": streams,
        })
        self._parts.clear()
        self._streams.clear()

    def measured(self, warmup: int) -> list[dict]:
        return self.steps[warmup:]


def run_profiled(cfg, warmup: int) -> StepProfiler:
    """`distill.train.loop.run(cfg)` with a StepProfiler as its spans; returns it (steps after `warmup` are
    the
    measured ones)."""
    from distill.train.loop import run

    profiler = StepProfiler()
    code = run(cfg, spans=profiler)
    if code != 0:
        raise RuntimeError(f"distill.train.loop.run returned {code}")
    if len(profiler.steps) <= warmup:
        raise RuntimeError(f"only {len(profiler.steps)} steps recorded, {warmup} of them warm-up")
    return profiler


def summarize(steps: list[dict]) -> dict:
    """Median seconds per step (wall and process CPU) of each part, `other`, and per stream the wall seconds
    of the micro-batch forward (student + teacher + objectives) and backward per 1K token slots, and the
    process CPU seconds of both (less disturbed by other processes on a shared machine)."""
    out = {"step_s": round(median(s["wall_s"] for s in steps), 4),
           "step_cpu_s": round(median(s["cpu_s"] for s in steps), 4),
           "loop_step_s": round(median(s["loop_s"] for s in steps), 4)}
    parts = {p: median(s["parts"][p] for s in steps) for p in PARTS}
    for p, v in parts.items():
        out[f"{p}_s"] = round(v, 4)
    out["other_s"] = round(median(s["wall_s"] - sum(s["parts"].values()) for s in steps), 4)
    out["share"] = {p: round(median(s["parts"][p] / s["wall_s"] for s in steps), 3) for p in PARTS}
    by_stream = {}
    names = sorted({n for s in steps for n in s["streams"]})
    for name in names:
        per = [s["streams"][name] for s in steps if name in s["streams"]]
        tokens = sum(p["tokens"] for p in per)
        total = {k: sum(p.get(k, 0.0) for p in per) for k in ("forward_s", "backward_s", "forward_cpu_s",
                                                               "backward_cpu_s")}
        by_stream[name] = {
            "tokens_per_step": round(tokens / len(per)),
            "forward_s_per_1k_tokens": round(1000 * total["forward_s"] / tokens, 4),
            "backward_s_per_1k_tokens": round(1000 * total["backward_s"] / tokens, 4),
            "fwd_bwd_cpu_s_per_1k_tokens": round(
                1000 * (total["forward_cpu_s"] + total["backward_cpu_s"]) / tokens, 4),
        }
    out["by_stream"] = by_stream
    return out

