"""Build the packed streams of a data spec.

    python scripts/prepare_data.py data/<spec>.yaml [key=value ...] [--overwrite]
    python scripts/prepare_data.py --verify data/built/<name>
    python scripts/prepare_data.py --export-text data/built/<name>/holdout/short OUT.jsonl

Overrides reach a source by its name: `sources.<name>.path=PATH` (on an hf source: read a local copy of the
dataset instead; format by extension), `sources.<name>.<key>=VALUE`; every source is checked before any is
read. Spec keys: docs/data.md.

Writes <output_dir>/<stream>/, <output_dir>/holdout/<stream>/ and <output_dir>/manifest.json. A user
mistake (bad spec, missing file, bad data) prints one line `error: ...` and exits with status 2.
`--verify DIR` checks every file of a built directory against the sha256 its manifest recorded, with a
progress bar: one line per bad file and exit status 1 when any is bad, 0 when all are intact.
`--export-text STREAM OUT.jsonl` decodes every document of a built stream (e.g. a held-out split) to JSON
lines {"text": ...} with the tokenizer it was built with, for tools that read text (an lm-evaluation-harness
local task, docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.config import ConfigError
from distill.data.dataset import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", nargs="?", help="data spec YAML (data/<name>.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="key.path=value overrides, e.g. tokenizer=path/to/tok sources.<name>.path=PATH")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output_dir once the new one is built")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--verify", metavar="DIR",
                        help="check a built directory's files against its manifest")
    parser.add_argument("--export-text", nargs=2, metavar=("STREAM", "OUT"),
                        help="decode every document of a built stream to JSON lines {\"text\": ...}")
    parser.add_argument("--tokenizer", help="with --export-text: the tokenizer (default: the build's)")
    args = parser.parse_intermixed_args(argv)
    if args.export_text:
        return export(*args.export_text, args.tokenizer)
    if args.verify:
        return verify(args.verify, progress=not args.quiet)
    if args.spec is None:
        print("error: give a data spec (data/<name>.yaml) or --verify DIR", file=sys.stderr)
        return 2
    # Progress and summaries on stdout: stderr carries only the one-line error.
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from distill.data.build import build
    from distill.data.spec import load_spec

    try:
        spec = load_spec(args.spec, args.overrides)
        manifest = build(spec, overwrite=args.overwrite, progress=not args.quiet)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was replaced", file=sys.stderr)
        return 130
    for splits in manifest["streams"].values():
        for r in splits.values():
            print(f"{spec.output_dir}/{r['path']}: {r['rows']} rows × {r['seq_len']} ({r['pack']}), "
                  f"{r['real_tokens']} real tokens, fill {r['fill']:.4f}")
    return 0


def export(stream_dir: str, out: str, tokenizer_name: str | None) -> int:
    from transformers import AutoTokenizer

    from distill.data.dataset import PackedStream, export_text, find_manifest

    try:
        if tokenizer_name is None:
            _, manifest = find_manifest(stream_dir)
            if manifest is None:
                raise DataError(f"{stream_dir}: no manifest.json above it to name the tokenizer; "
                                f"pass --tokenizer")
            tokenizer_name = manifest["tokenizer"]["name"]
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
        except Exception as err:  # noqa: BLE001 - any failure: the tokenizer cannot be used
            raise DataError(f"tokenizer {tokenizer_name}: cannot be loaded ({type(err).__name__}); "
                            f"pass --tokenizer") from None
        n = export_text(PackedStream(stream_dir, tokenizer), tokenizer, out)
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {n} documents to {out}")
    return 0


def verify(directory: str, progress: bool = True) -> int:
    from distill.data.build import verify as verify_files

    try:
        checked, problems = verify_files(directory, progress=progress)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    for line in problems:
        print(f"bad: {line}", file=sys.stderr)
    if problems:
        print(f"{directory}: {len(problems)} of {checked} files failed verification", file=sys.stderr)
        return 1
    print(f"{directory}: all {checked} files match the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
