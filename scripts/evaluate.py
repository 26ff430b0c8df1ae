"""Evaluate an extended model: short-text retention against the teacher, NLL by position, passkey grid.

    python scripts/evaluate.py --model runs/<run>/final [--teacher ORIGINAL] \\
        --short-data data/built/<name>/holdout/short --long-data data/built/<name>/holdout/long \\
        [--original-length N] [--target-length N] [--out OUT_DIR] [--max-rows N] [--passkey-samples N] \\
        [--lengths 256,512,1024] [--depths 0,0.25,0.5,0.75,1]

Writes OUT_DIR/eval.json ({"model", "teacher", "figures": flat numbers, "details": per-layer lists, buckets,
grids}) and the plots nll_by_position.png, needle_student.png (and needle_teacher.png with a teacher).
OUT_DIR defaults to <model>/eval (eval/<org>--<name> for a hub id). --model and --teacher take a directory
(an export, a training checkpoint) or a Hugging Face hub id, resolved through the Hugging Face cache as
training resolves model.path (HF_HUB_OFFLINE=1 with the model in the cache: no network). A data argument may
also be a built directory's root: its holdout/short and holdout/long streams are used. The original length
defaults to the teacher's max_position_embeddings (else the
model's rope_parameters["original_max_position_embeddings"], else the `original_max_position_embeddings` our
exports record), the target length to the model's max_position_embeddings. A user mistake prints one line
`error: ...` and exits with status 2.

Real benchmarks. This suite measures drift and retrieval on held-out data; the paper's short-text scores
(MMLU, HellaSwag, ...) and long-context scores (RULER) come from lm-evaluation-harness, which loads the
exported model as it is (the extended RoPE is in its config):

    pip install 'lm-eval[hf]'
    lm_eval --model hf --model_args pretrained=runs/<run>/final,dtype=bfloat16 \\
        --tasks mmlu,hellaswag,arc_challenge,winogrande,gsm8k --batch_size auto --output_path results/<run>
    # the original model, for the retention ratio:
    lm_eval --model hf --model_args pretrained=<original>,dtype=bfloat16 --tasks mmlu,hellaswag,... ...
    # RULER at the target length (the harness's `ruler` group; it needs the tokenizer and a max length):
    lm_eval --model hf --model_args pretrained=runs/<run>/final,dtype=bfloat16,max_length=32768 \\
        --tasks ruler --metadata='{"max_seq_lengths":[4096,8192,16384,32768]}' --batch_size 1

See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.cli import Parser, UsageError, number  # noqa: E402
from distill.config import ConfigError  # noqa: E402
from distill.data.dataset import STREAM_INFO, DataError  # noqa: E402
from distill.eval.sweep import SweepError  # noqa: E402

logger = logging.getLogger("evaluate")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def unit_list(text: str) -> list[float]:
    """Comma-separated numbers in [0, 1] (needle depths, interpolation weights α)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"each value must lie in [0, 1], got {text!r}")
    return values


def read_points(specs: list[str]) -> dict[str, dict]:
    """--point NAME=EVAL_JSON → {NAME: the plotted figures of that evaluation}."""
    from distill.eval.sweep import point

    points = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--point {spec!r}: expected NAME=PATH/eval.json")
        try:
            with open(path, encoding="utf-8") as f:
                points[name] = point(json.load(f)["figures"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"--point {spec}: cannot read figures from {path} "
                             f"({type(err).__name__})") from None
    return points


def read_extra(specs: list[str]) -> dict[str, str]:
    """--extra-data NAME=STREAM → {NAME: the built stream directory} (a built root: its holdout/NAME)."""
    extra = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or not path:
            raise UsageError(f"--extra-data {spec!r}: expected NAME=STREAM, NAME of letters, digits and _")
        if name in extra:
            raise UsageError(f"--extra-data {spec!r}: {name} given twice")
        if name in ("short", "long", "short_whole") or name.startswith(("teacher", "fold")):
            raise UsageError(f"--extra-data {spec!r}: {name}_nll is one of the suite's own figures; "
                             "choose another NAME")
        extra[name] = stream_dir(path, name, "--extra-data")
    return extra


def stream_dir(path: str, name: str, flag: str) -> str:
    """A built stream directory: `path` itself, or `<path>/holdout/<name>` when given a built root."""
    if os.path.isfile(os.path.join(path, STREAM_INFO)):
        return path
    nested = os.path.join(path, "holdout", name)
    if os.path.isfile(os.path.join(nested, STREAM_INFO)):
        return nested
    if not os.path.isdir(path):
        raise DataError(f"{flag} {path}: no such directory")
    raise DataError(f"{flag} {path}: not a built stream (no {STREAM_INFO}, "
                    f"nor holdout/{name}/{STREAM_INFO}); build it with scripts/prepare_data.py")


def default_lengths(model_config, teacher_config, original: int | None,
                    target: int | None) -> tuple[int, int]:
    """(original, target) from the flags, else from the configs (see the module docstring)."""
    if target is None:
        target = int(model_config.max_position_embeddings)
    if original is None:
        params = getattr(model_config, "rope_parameters", None) or {}
        recorded = getattr(model_config, "original_max_position_embeddings", None)  # our exports write it
        if teacher_config is not None:
            original = int(teacher_config.max_position_embeddings)
        elif params.get("original_max_position_embeddings"):
            original = int(params["original_max_position_embeddings"])
        elif recorded:
            original = int(recorded)
        else:
            raise UsageError("cannot tell the original context length from the model's config "
                             "(an abf extension does not record it): "
                             "pass --original-length N or --teacher DIR")
    if original > target:
        raise UsageError(f"--original-length {original} is greater than --target-length {target}")
    return original, target


def default_out(name: str, path: str, leaf: str) -> str:
    """<model>/<leaf> for a model directory; ./<leaf>/<org>--<name> for a hub id (its directory is the
    Hugging Face cache's snapshot, no place for results)."""
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.join(path, leaf)
    return os.path.join(leaf, name.replace("/", "--"))


def named(name: str | None) -> str | None:
    """What eval.json records of a model: a directory's absolute path, a hub id as given."""
    if name is None or not os.path.isdir(os.path.expanduser(name)):
        return name
    return os.path.abspath(os.path.expanduser(name))


def doubling(original: int, target: int) -> list[int]:
    """original, 2·original, ... up to target (target always included)."""
    out, n = [], original
    while n < target:
        out.append(n)
        n *= 2
    return out + [target]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the model to evaluate: a Hugging Face directory (runs/<run>/final, a "
                                   "checkpoint runs/<run>/checkpoints/step-N) or a hub id (read through the "
                                   "Hugging Face cache; HF_HUB_OFFLINE=1 reads the cache alone)")
    p.add_argument("--sweep", nargs=2, metavar=("ORIGINAL", "EXTENDED"),
                   help="instead of --model/--teacher: evaluate (1-α)·ORIGINAL + α·EXTENDED for each "
                        "of --alphas (EXTENDED's config), against ORIGINAL; writes sweep.json, sweep.md and "
                        "pareto.png")
    p.add_argument("--alphas", type=unit_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="the sweep's α grid (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--point", action="append", default=[], metavar="NAME=EVAL_JSON",
                   help="another model's eval.json to put on the sweep's plot (repeatable)")
    p.add_argument("--teacher",
                   help="the original model, for retention figures (KL, hidden cosine, attention KL): a "
                        "directory or a hub id, as --model")
    p.add_argument("--short-data", required=True,
                   help="held-out short stream (or a built root: uses holdout/short)")
    p.add_argument("--long-data",
                   help="held-out long stream (or a built root: uses holdout/long); without it, no long-text "
                        "figures and no passkey (its filler is long text)")
    p.add_argument("--short-whole-data",
                   help="held-out short documents packed whole at the target length, scored whole (the "
                        "teacher through a rolling window of the original length); a built root uses "
                        "holdout/short_whole (default: that stream of --short-data's root when it exists)"),
    p.add_argument("--extra-data", action="append", default=[], metavar="NAME=STREAM",
                   help="another held-out stream (or a built root: its holdout/NAME) scored as the short one "
                        "(--max-rows rows, whole rows): NAME_nll and NAME_nll_se (its standard error over "
                        "documents) in the figures (repeatable)")
    p.add_argument("--original-length", type=number(int), help="original context window")
    p.add_argument("--target-length", type=number(int), help="extended context window")
    p.add_argument("--out", help="output directory (default: <model>/eval)")
    p.add_argument("--max-rows", type=number(int, strict=False), default=8,
                   help="rows per held-out stream; 0: all of them (default 8)")
    p.add_argument("--long-rows", type=number(int, strict=False),
                   help="rows of the long stream (default: --max-rows); 0: all of them")
    p.add_argument("--passkey-samples", type=number(int, strict=False), default=4,
                   help="passkey prompts per (length, depth); 0 skips passkey (default 4)")
    p.add_argument("--lengths", type=int_list,
                   help="passkey context lengths (default: original, 2×, ..., target)")
    p.add_argument("--depths", type=unit_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="needle depths in [0, 1]")
    p.add_argument("--buckets", type=number(int), default=16,
                   help="equal-width position buckets (default 16)")
    p.add_argument("--batch-size", type=number(int), default=4,
                   help="short rows / passkey prompts per forward")
    p.add_argument("--seed", type=int, default=0, help="passkey seed")
    p.add_argument("--ruler-samples", type=number(int, strict=False), default=0,
                   help="prompts per (RULER-style task, length), scored by greedy generation; 0 skips them "
                        "(default 0; distill/eval/ruler.py)")
    p.add_argument("--ruler-tasks", type=lambda s: s.split(","),
                   help="comma-separated tasks (default: all of distill.eval.ruler.TASKS)")
    p.add_argument("--passkey-template", default="text", choices=["text", "code"],
                   help="text: the classic natural-language passkey (default, for pretrained models); code: "
                        "`PASSKEY = <key>` ... `assert PASSKEY ==`, the form the CPU demo's corpus uses")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--attention", default="auto",
                   choices=["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"],
                   help="attention implementation: auto (default) is flash_attention_2 on CUDA with "
                        "flash-attn, else sdpa_varlen (per-document SDPA: no dense T×T mask over a packed "
                        "row, which sdpa builds); flash_attention_2 runs under bf16 autocast on any device")
    p.add_argument("--tokenizer",
                   help="tokenizer directory or hub id (default: the model's, else the teacher's)")
    p.add_argument("--no-teacher-baselines", action="store_true",
                   help="with --teacher, skip the teacher's own long-text figures (past its window and "
                        "through its rolling window) and passkey grid: they are the same for every model of "
                        "one teacher, so evaluating several models needs them once")
    return p


def read_config(path: str, flag: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any failure means "not a model directory"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{flag} {path}: cannot read the model config ({reason[:200]})") from None


def load_tokenizer(candidates: list[str | None]):
    from transformers import AutoTokenizer

    last = None
    for path in candidates:
        if not path:
            continue
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as err:  # noqa: BLE001 - try the next candidate, report the last reason
            last = f"{path}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
    raise UsageError(f"cannot load a tokenizer ({last}); pass --tokenizer DIR")


def main(argv: list[str] | None = None) -> int:
    from distill.cli import guarded

    code, _, figures = guarded(build_parser(), evaluate, (ConfigError, DataError, SweepError), argv)
    if code:
        return code
    width = max(len(k) for k in figures) if figures else 0
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    return 0


def check_args(args) -> None:
    """The flags that contradict each other or name unknown tasks (one line); --sweep sets both models."""
    from distill.eval.ruler import TASKS

    unknown = [t for t in (args.ruler_tasks or []) if t not in TASKS]
    if unknown:
        raise UsageError(f"--ruler-tasks {','.join(unknown)}: unknown; tasks: {', '.join(TASKS)}")
    if args.sweep and (args.model or args.teacher):
        raise UsageError("--sweep ORIGINAL EXTENDED replaces --model and --teacher; pass one or the other")
    if not args.sweep and not args.model:
        raise UsageError("pass --model DIR (or --sweep ORIGINAL EXTENDED)")
    if args.sweep and args.extra_data:
        raise UsageError("--extra-data is not scored by --sweep; evaluate those models with --model")
    if args.sweep:
        args.teacher, args.model = args.sweep


def evaluate(args) -> dict:
    import torch

    from distill.config import ModelConfig
    from distill.data.dataset import PackedStream
    from distill.eval.retention import short_retention
    from distill.eval.suite import evaluate_suite
    from distill.hub import model_directory
    from distill.model import expansion
    from distill.model.export import consolidate
    from distill.model.load import load_teacher, resolve_dtype

    check_args(args)
    points = read_points(args.point)
    # A directory, or a hub id resolved through the Hugging Face cache as training resolves model.path.
    names = {"model": args.model, "teacher": args.teacher}  # as given, for eval.json
    # --tokenizer stays as given: AutoTokenizer resolves a hub id itself and fetches no weights. A sharded
    # training checkpoint (FSDP2) is consolidated into safetensors beside its DCP files, once.
    for flag in ("model", "teacher"):
        if getattr(args, flag) is not None:
            setattr(args, flag, consolidate(model_directory(getattr(args, flag), f"--{flag}")))
    short_path = stream_dir(args.short_data, "short", "--short-data")
    long_path = stream_dir(args.long_data, "long", "--long-data") if args.long_data else None
    extra_paths = read_extra(args.extra_data)
    whole_path = None
    if args.short_whole_data:
        whole_path = stream_dir(args.short_whole_data, "short_whole", "--short-whole-data")
    elif os.path.isfile(os.path.join(args.short_data, "holdout", "short_whole", STREAM_INFO)):
        whole_path = os.path.join(args.short_data, "holdout", "short_whole")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available")
    dtype = (args.dtype if args.dtype != "auto"
             else ("bfloat16" if torch.device(device).type == "cuda" else "float32"))

    tokenizer = load_tokenizer([args.tokenizer, args.model, args.teacher])
    short = PackedStream(short_path, tokenizer)  # refuses data built with another tokenizer
    long = PackedStream(long_path, tokenizer) if long_path else None
    whole = PackedStream(whole_path, tokenizer) if whole_path else None
    extra = {name: PackedStream(path, tokenizer) for name, path in extra_paths.items()}
    for stream in (short, long, whole, *extra.values()):
        if stream is None:
            continue
        if stream.info.get("split", "holdout") != "holdout":
            logger.warning("warning: %s is a %s split, not held out", stream.path, stream.info.get("split"))

    # Lengths first, from the configs alone: a missing length should not cost loading the weights.
    original, target = default_lengths(read_config(args.model, "--model"),
                                       read_config(args.teacher, "--teacher") if args.teacher else None,
                                       args.original_length, args.target_length)
    # Both load as frozen models with the RoPE their own config carries (the exported model: the extended
    # one).
    fold_alphas = None
    if expansion.is_unfolded(args.model):  # a hybrid-expansion run's expanded/: the unfolded model
        if args.sweep:
            raise UsageError(f"--sweep {args.model}: an unfolded expanded model; sweep its folded final/")
        model, fold_alphas = expansion.load_unfolded(args.model, resolve_dtype(dtype), args.attention, device)
    else:
        model = load_teacher(args.model, ModelConfig(path=args.model, dtype=dtype, attention=args.attention),
                             device)
    teacher = None
    if args.teacher:
        teacher = load_teacher(args.teacher,
                               ModelConfig(path=args.teacher, dtype=dtype, attention=args.attention), device)
    lengths = args.lengths or doubling(original, target)
    long_rows = args.max_rows if args.long_rows is None else args.long_rows
    suite = dict(max_rows=args.max_rows or None, long_rows=long_rows or None,
                 passkey_samples=args.passkey_samples if long is not None else 0, tokenizer=tokenizer,
                 passkey_lengths=lengths, passkey_depths=args.depths, seed=args.seed,
                 passkey_template=args.passkey_template, ruler_samples=args.ruler_samples,
                 ruler_tasks=args.ruler_tasks,
                 batch_size=args.batch_size, buckets=args.buckets, short_whole_stream=whole)
    if args.sweep:
        from distill.eval.sweep import run_sweep

        out_dir = args.out or default_out(names["model"], args.model, "sweep")
        record = run_sweep(teacher, model, args.alphas, short, long, original, target, out_dir, points,
                           **suite)
        print(f"wrote {os.path.join(out_dir, 'sweep.json')}", file=sys.stderr)
        return {f"alpha_{r['alpha']:g}/{k}": v for r in record["rows"] for k, v in r.items() if k != "alpha"}
    out_dir = args.out or default_out(names["model"], args.model, "eval")
    figures = evaluate_suite(model, teacher, short, long, original, target, out_dir=out_dir,
                             teacher_baselines=teacher is not None and not args.no_teacher_baselines,
                             teacher_rolling=not args.no_teacher_baselines, **suite)
    # Record what was evaluated next to the figures.
    path = os.path.join(out_dir, "eval.json")
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    for name, stream in extra.items():  # the other held-out streams: the model's NLL alone
        scored = short_retention(model, None, stream, max_rows=args.max_rows or None,
                                 batch_size=args.batch_size)
        scored = {f"{name}_nll": scored["short_nll"], f"{name}_nll_se": scored["short_nll_se"]}
        figures.update(scored)
        record["figures"].update(scored)
    if fold_alphas is not None:  # how far final/ (the fold) is from this unfolded model
        rows = list(range(min(args.max_rows or 8, len(short))))
        fold = expansion.fold_figures(model, fold_alphas, short, rows)
        figures.update(fold)
        record["figures"].update(fold)
        record["fold"] = {"alphas": {str(i): a for i, a in fold_alphas.items()}, "rows": len(rows),
                          "data": os.path.abspath(short_path)}
    record = {"model": named(names["model"]), "teacher": named(names["teacher"]),
              "short_data": os.path.abspath(short_path),
              "long_data": os.path.abspath(long_path) if long_path else None,
              "short_whole_data": os.path.abspath(whole_path) if whole_path else None,
              "extra_data": {name: os.path.abspath(path) for name, path in extra_paths.items()},
              "max_rows": args.max_rows, "device": device, "dtype": dtype, **record}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}", file=sys.stderr)
    return figures


if __name__ == "__main__":
    sys.exit(main())
