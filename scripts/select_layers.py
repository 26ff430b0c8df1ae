"""Choose the layers to distil on short text: the LongReD criterion, per-layer attention KL.

    python scripts/select_layers.py --model DIR [--teacher DIR] --rope-method abf --rope-theta 2e7 \\
        --target-length 32768 [--factor F] --data data/built/<name>/holdout/short --top-k 6 [--rows 4] \\
        [--tokens 1024] [--out layers.yaml]

Builds the extended student exactly as training will (`distill.model.load.load_student` with the RoPE flags)
and
the teacher with its native RoPE (`load_teacher`; default: the same checkpoint), runs both with eager
attention on sample short documents, and ranks decoder layers by KL(teacher ‖ student) of their attention
distributions. Prints the ranking and a YAML snippet for a recipe's `hidden.layers`: the top-k layers plus
the last one, as indices into the `hidden_states` tuple (decoder layer i → index i + 1; the last index is the
final-norm output).
A user mistake prints one line `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.cli import Parser, UsageError, number  # noqa: E402
from distill.config import ConfigError  # noqa: E402
from distill.data.dataset import STREAM_INFO, DataError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the checkpoint to extend (Hugging Face directory or id)")
    p.add_argument("--teacher", help="the original model (default: --model with its native RoPE)")
    p.add_argument("--rope-method", required=True, choices=["abf", "pi", "yarn", "llama3"])
    p.add_argument("--rope-theta", type=number(float), help="new rope theta (abf)")
    p.add_argument("--target-length", type=number(int), required=True, help="extended context length")
    p.add_argument("--factor", type=number(float),
                   help="scaling factor (pi / yarn / llama3; default target/original)")
    p.add_argument("--original-length", type=number(int),
                   help="original window (default: from the checkpoint)")
    p.add_argument("--data", required=True,
                   help="a built short stream (e.g. data/built/<name>/holdout/short)")
    p.add_argument("--top-k", type=number(int), required=True,
                   help="layers to keep besides the last (paper: 6 at 32K)")
    p.add_argument("--rows", type=number(int), default=4, help="sample documents (default 4)")
    p.add_argument("--tokens", type=number(int), default=1024,
                   help="tokens per sample document (default 1024)")
    p.add_argument("--out", help="also write the YAML snippet to this file")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return p


def select(args) -> dict:
    import torch

    from distill.config import ModelConfig, RopeConfig
    from distill.model.layers import sample_documents, select_layers
    from distill.model.load import load_student, load_teacher

    if not os.path.isfile(os.path.join(args.data, STREAM_INFO)):
        raise DataError(f"--data {args.data}: not a built stream (no {STREAM_INFO}); build it with "
                        f"scripts/prepare_data.py")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available")
    rope = RopeConfig(method=args.rope_method, target_length=args.target_length, theta=args.rope_theta,
                      factor=args.factor, original_length=args.original_length)
    rope.validate("rope")
    # Eager attention from the start: it is the only backend that returns attention probabilities.
    model_cfg = ModelConfig(path=args.model, dtype=args.dtype, attention="eager")
    student = load_student(model_cfg, rope, args.device)
    student.eval()
    teacher = load_teacher(args.teacher, model_cfg, args.device)
    docs = sample_documents(args.data, args.rows, args.tokens).to(args.device)  # (N, T)
    with torch.no_grad():
        result = select_layers(student, teacher, docs, top_k=args.top_k)
    result["documents"], result["tokens"] = int(docs.shape[0]), int(docs.shape[1])
    return result


def format_report(result: dict) -> tuple[str, str]:
    """(ranking table, YAML snippet)."""
    kl = result["kl"]
    lines = [(f"attention KL(teacher ‖ student) on {result['documents']} documents × "
              f"{result['tokens']} tokens"),
             "rank  layer  hidden_states index  attention KL"]
    for rank, index in enumerate(result["ranking"], 1):
        mark = "  *" if index in result["layers"] else ""
        lines.append(f"{rank:>4}  {index - 1:>5}  {index:>19}  {kl[index - 1]:.6g}{mark}")
    snippet = f"layers: [{', '.join(str(i) for i in result['layers'])}]"
    return "\n".join(lines), snippet


def main(argv: list[str] | None = None) -> int:
    from distill.cli import guarded

    code, args, result = guarded(build_parser(), select, (ConfigError, DataError), argv)
    if code:
        return code
    table, snippet = format_report(result)
    print(table)
    print(f"# top-{args.top_k} by attention KL plus the last layer, for streams.<short>.objectives.hidden")
    print(snippet)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"# scripts/select_layers.py --rope-method {args.rope_method} --target-length "
                    f"{args.target_length} --top-k {args.top_k}\n{snippet}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
