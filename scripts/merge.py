"""Merge models after the extension, shard by shard (memory: about one shard per input).

    python scripts/merge.py interpolate --original ORIG --extended EXT --alpha 0.3 [0.5 ...] --out DIR
        θ(α) = (1 − α)·θ_original + α·θ_extended, one directory DIR/alpha-<α> per α; config (the extended
        RoPE) and tokenizer from the extended model.
    python scripts/merge.py residual --base BASE --instruct INSTRUCT --target CPT --out DIR [--scale λ]
        θ_CPT + λ·(θ_instruct − θ_base): an instruction-following long model without new instruction tuning;
        config from the CPT'd model, tokenizer and chat template from the instruct model.

Every input is a model directory or a Hugging Face hub id, resolved through the Hugging Face cache as
training resolves model.path (HF_HUB_OFFLINE=1 with the model in the cache: no network). Every output is
sharded safetensors in the layout of the model its config comes from, in its dtype, and loads
with AutoModelForCausalLM. Mismatched architectures, shapes, vocabularies or tokenizers: one line `error: ...`
and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.cli import Parser, UsageError, number  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    inter = commands.add_parser("interpolate", help="(1 − α)·original + α·extended")
    inter.add_argument("--original", required=True, help="the model before the extension")
    inter.add_argument("--extended", required=True,
                       help="the extended model (its config and tokenizer are kept)")
    inter.add_argument("--alpha", type=float, nargs="+", required=True, help="one or more α (0: original)")
    inter.add_argument("--out", required=True)
    res = commands.add_parser("residual", help="target + λ·(instruct − base)")
    res.add_argument("--base", required=True)
    res.add_argument("--instruct", required=True)
    res.add_argument("--target", required=True, help="the continually pre-trained base (its config is kept)")
    res.add_argument("--scale", type=number(float, minimum=0, strict=False), default=1.0,
                     help="λ (default 1)")
    res.add_argument("--out", required=True)
    for sub in (inter, res):
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def work(args):
    from distill.hub import model_directory
    from distill.merge import interpolate, residual

    # A directory, or a hub id resolved through the Hugging Face cache as training resolves model.path.
    for role in ("original", "extended", "base", "instruct", "target"):
        if getattr(args, role, None) is not None:
            setattr(args, role, model_directory(getattr(args, role), f"--{role}"))
    if args.command == "interpolate":
        bad = [a for a in args.alpha if not 0.0 <= a <= 1.0]
        if bad:
            raise UsageError(f"--alpha {bad[0]}: allowed: numbers in [0, 1]")
        return interpolate(args.original, args.extended, args.alpha, args.out, progress=not args.quiet)
    return [residual(args.base, args.instruct, args.target, args.out, args.scale, progress=not args.quiet)]


def main(argv: list[str] | None = None) -> int:
    from distill.cli import guarded
    from distill.config import ConfigError
    from distill.merge import MergeError

    code, _, written = guarded(build_parser(), work, (MergeError, ConfigError), argv)
    if code:
        return code
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
