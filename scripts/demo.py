"""The embedded demo: restoration distillation end to end on a CPU, offline, in minutes.

    python scripts/demo.py [--out demo_out] [--quick]

Through the public commands only:
  1. train a sentencepiece tokenizer on the local Python standard library and random-init a small Llama
     with a 256-token window;
  2. `scripts/prepare_data.py data/demo.yaml`: long (1024), short (256) and s2l (256) streams + held-out;
  3. `accelerate launch -m distill.train recipes/demo/teacher.yaml`: pre-train the teacher at 256;
  4. extend it 4x (ABF, 256 -> 1024) with (a) Long CPT, (b) Mix CPT, (c) LongReD (recipes/demo/*.yaml);
  5. `scripts/evaluate.py` on each against the teacher;
  6. write report.md, report.json and the plots.
A step whose output is already complete is reused, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = {"long_cpt": "Long CPT", "mix_cpt": "Mix CPT", "longred": "LongReD"}

# Sizes: a ~1.3M-parameter Llama (4 layers x 128) is what 2 CPU cores can pre-train to a useful teacher
# and extend three times within the demo's budget.
MODEL = dict(arch="llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
             max_position_embeddings=256, rope_theta=10000.0)
FULL = dict(vocab=2000, teacher_steps=700, extend_steps=150, eval_rows=24, passkey_samples=6,
            data=[])
QUICK = dict(vocab=600, teacher_steps=6, extend_steps=3, eval_rows=2, passkey_samples=1,
             data=["streams.long.max_tokens=60000", "streams.short.max_tokens=30000",
                   "streams.s2l.max_tokens=30000", "holdout.max_tokens=20000"])


def write_passkey_documents(path: str, files: list[str], seed: int = 0, every: int = 2) -> int:
    """The demo corpus as JSONL: the stdlib modules, every `every`-th one with key statements (the
    evaluation's `PASSKEY_NEEDLE`, a random key) and, some lines later, a look-up of the same key
    (`PASSKEY_LOOKUP`) — a retrieval skill to measure long context.

    The distance between the two is log-uniform between 1 and 120 lines (about 10–1200 tokens): the teacher
    learns the lookup within its 256-token window, and only long-context training teaches it at 1024. The
    evaluation's passkey prompts use the same two statements inside held-out code.
    """
    from distill.evaluate import PASSKEY_DIGITS, PASSKEY_LOOKUP, PASSKEY_NEEDLE

    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        for n, file in enumerate(files):
            try:
                with open(file, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            if n % every:  # one corpus (no module twice), so the held-out split stays unseen
                out.write(json.dumps({"text": text}) + "\n")
                written += 1
                continue
            lines = text.splitlines()
            doc, i = [], 0
            while i < len(lines):
                gap = rng.randint(0, 10)
                doc.extend(lines[i: i + gap])
                i += gap
                if i >= len(lines):
                    break
                key = rng.randint(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS - 1)
                distance = int(math.exp(rng.uniform(0.0, math.log(120.0))))
                doc.append(PASSKEY_NEEDLE.format(key=key))
                doc.extend(lines[i: i + distance])
                i += distance
                doc.append(PASSKEY_LOOKUP.format(key=key))
            out.write(json.dumps({"text": "\n".join(doc) + "\n"}) + "\n")
            written += 1
    return written


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


PROGRESS = re.compile(r"\d+/\d+ \[")  # a tqdm bar: "desc:  12%|█▏ | 84/700 [01:10<08:40, ...]"


def stream(cmd: list[str], env: dict, show, progress, keep: int = 30) -> tuple[int, list[str]]:
    """Run `cmd`, handing each line of its output (stdout and stderr) to `show` or, for progress-bar
    updates (tqdm rewrites its line with \r), to `progress`, AS IT ARRIVES; returns (exit code, last
    lines)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            bufsize=0)
    tail, pending = [], b""
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        pending += chunk
        *parts, pending = re.split(rb"[\r\n]", pending)
        for raw in parts:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if not line.strip():
                continue
            if PROGRESS.search(line):
                progress(line)
            else:
                tail = (tail + [line])[-keep:]
                show(line)
    if pending.strip():
        line = pending.decode("utf-8", errors="replace").rstrip()
        tail = (tail + [line])[-keep:]
        show(line)
    return proc.wait(), tail


class Console:
    """The demo's live output: a stage's log lines as they come, its progress bar redrawn in place on a
    terminal (on a pipe, one bar line every `every` seconds, so a log file shows progress too)."""

    def __init__(self, every: float = 30.0):
        self.tty = sys.stdout.isatty()
        self.every = every
        self.last = 0.0
        self.open_bar = False

    NOISE = ("Loading weights", "Writing model shards", "Saving the dataset", "Setting accelerator to CPU")

    def show(self, line: str) -> None:
        if any(n in line for n in self.NOISE):
            return
        self._end_bar()
        print("    " + line, flush=True)

    def progress(self, line: str) -> None:
        now = time.time()
        if self.tty:
            if now - self.last >= 0.5:
                print("\r    " + line[:150].ljust(150), end="", flush=True)
                self.open_bar, self.last = True, now
        elif now - self.last >= self.every:
            print("    " + line, flush=True)
            self.last = now

    def _end_bar(self) -> None:
        if self.open_bar:
            print(flush=True)
            self.open_bar = False

    def done(self) -> None:
        self._end_bar()
        self.last = 0.0


def run(cmd: list[str], env: dict | None = None) -> None:
    """Run one public command with live output; stop the demo with its last lines if it fails."""
    log("$ " + " ".join(cmd))
    console = Console()
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           **(env or {})}
    code, tail = stream(cmd, env, console.show, console.progress)
    console.done()
    if code != 0:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"error: demo step failed (exit {code}): {' '.join(cmd)}")


def launch(recipe: str, overrides: list[str]) -> None:
    """`accelerate launch` one process (the same command scales to more with --num_processes)."""
    run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill.train", recipe, *overrides],
        env={"WANDB_MODE": "disabled"})


def done(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "model.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    parser.add_argument("--quick", action="store_true", help="a reduced-size smoke run (used by the tests)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete --out first instead of reusing finished steps")
    parser.add_argument("--seeds", type=int, default=1,
                        help="extension runs per method with run.seed 0..N-1 (the teacher is trained once); "
                             "the report gives each method's mean ± sd over them (default 1)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        print(f"error: --seeds {args.seeds}: expected a whole number ≥ 1", file=sys.stderr)
        return 2
    size = QUICK if args.quick else FULL
    out = os.path.abspath(args.out)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    start = time.time()

    from distill.testing import make_tiny_model, stdlib_files, train_tokenizer

    tok_dir, init_dir, data_dir = (os.path.join(out, n) for n in ("tokenizer", "init", "data"))
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        log(f"training a {size['vocab']}-token sentencepiece tokenizer on the local stdlib")
        train_tokenizer(tok_dir, vocab_size=size["vocab"], files=stdlib_files(limit=400))
    if not done(init_dir):
        log("random-init the teacher: Llama, 4 layers x 128, 256-token window")
        make_tiny_model(init_dir, tokenizer_dir=tok_dir, seed=0, **MODEL)
    passkey_docs = os.path.join(out, "corpus.jsonl")
    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        n = write_passkey_documents(passkey_docs, stdlib_files())
        log(f"wrote {n} stdlib modules (half with PASSKEY look-ups) to {passkey_docs}")
        run([sys.executable, "scripts/prepare_data.py", "data/demo.yaml", f"tokenizer={tok_dir}",
             f"output_dir={data_dir}", "sources.0.kind=jsonl", f"sources.0.path={passkey_docs}",
             "sources.0.include=[]", "sources.0.exclude=[]", *size["data"]])

    runs = os.path.join(out, "runs")
    data = {s: os.path.join(data_dir, s) for s in ("long", "short", "s2l")}
    teacher = os.path.join(runs, "teacher", "final")
    if not done(teacher):
        launch("recipes/demo/teacher.yaml", [
            f"model.path={init_dir}", f"run.output_dir={os.path.join(runs, 'teacher')}",
            f"streams.short.data={data['short']}", f"streams.window.data={data['s2l']}",
            f"train.max_steps={size['teacher_steps']}"])
    names = [method + (f"-seed{seed}" if seed else "") for seed in range(args.seeds) for method in METHODS]
    for name in names:
        method, seed = name.split("-seed")[0], int(name.split("-seed")[1]) if "-seed" in name else 0
        final = os.path.join(runs, name, "final")
        if done(final):
            continue
        overrides = [f"model.path={teacher}", f"run.output_dir={os.path.join(runs, name)}",
                     f"run.seed={seed}", f"train.max_steps={size['extend_steps']}",
                     f"streams.long.data={data['long']}"]
        if method != "long_cpt":
            overrides += [f"streams.short.data={data['short']}", f"streams.s2l.data={data['s2l']}"]
        launch(f"recipes/demo/{method}.yaml", overrides)

    results = {}
    for name in ("teacher", *names):
        model = teacher if name == "teacher" else os.path.join(runs, name, "final")
        eval_dir = os.path.join(out, "eval", name)
        if not os.path.isfile(os.path.join(eval_dir, "eval.json")):
            cmd = [sys.executable, "scripts/evaluate.py", "--model", model, "--short-data", data_dir,
                   "--long-data", data_dir, "--original-length", "256", "--target-length", "1024",
                   "--out", eval_dir, "--max-rows", str(size["eval_rows"]),
                   "--passkey-samples", str(size["passkey_samples"]), "--lengths", "256,512,1024",
                   "--depths", "0.1,0.5,0.9"]
            if name != "teacher":
                cmd += ["--teacher", teacher]
            run(cmd)
        with open(os.path.join(eval_dir, "eval.json"), encoding="utf-8") as f:
            results[name] = json.load(f)
    report = write_report(out, results, time.time() - start, args.seeds)
    log(f"done in {(time.time() - start) / 60:.1f} min: {os.path.join(out, 'report.md')}")
    for method, label in METHODS.items():
        r = report["methods"][method]
        print(f"    {label:9s} short NLL {r['short_nll']:.4f} (gap {r['short_nll_gap']:+.4f}, recovered "
              f"{r['recovered_fraction']:.2f}) | long NLL beyond 256 {r['long_nll']:.4f} | passkey "
              f"{r['passkey_accuracy']:.2f}")
    return 0


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def environment() -> dict:
    """What a rerun must match to give the same digits: library versions, the CPU, the thread count."""
    import platform

    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def _method_figures(results: dict, suffix: str, teacher_short: float) -> dict:
    """Per method of one seed (`suffix` "" or "-seedK"): its figures and, against that seed's Long CPT, the
    recovered fraction of the short-NLL gap and the long NLL ratio."""
    methods = {}
    for method in METHODS:
        fig = results[method + suffix]["figures"]
        methods[method] = {
            "short_nll": _num(fig.get("short_nll")),
            "short_nll_gap": _num(fig.get("short_nll")) - teacher_short,
            "kl_teacher_student": _num(fig.get("kl_teacher_student")),
            "hidden_cosine_mean": _num(fig.get("hidden_cosine_mean")),
            "long_nll": _num(fig.get("long_nll_beyond")),
            "long_nll_all": _num(fig.get("long_nll")),
            "passkey_accuracy": _num(fig.get("passkey_accuracy")),
        }
    cpt_gap = methods["long_cpt"]["short_nll_gap"]
    for m in methods.values():
        usable = cpt_gap and math.isfinite(cpt_gap)
        m["recovered_fraction"] = 1.0 - m["short_nll_gap"] / cpt_gap if usable else float("nan")
        m["long_nll_vs_long_cpt"] = m["long_nll"] / methods["long_cpt"]["long_nll"] - 1.0
    return methods


def write_report(out: str, results: dict, seconds: float, seeds: int = 1) -> dict:
    """report.json (per method: short_nll, short_nll_gap, recovered_fraction, long_nll, passkey_accuracy of
    seed 0, and over the seeds `<figure>_mean` / `<figure>_sd` and `per_seed`), report.md, and a combined
    NLL-by-position plot."""
    import statistics

    teacher = results["teacher"]["figures"]
    teacher_short = _num(teacher.get("short_nll"))
    per_seed = [_method_figures(results, f"-seed{k}" if k else "", teacher_short) for k in range(seeds)]
    methods = per_seed[0]
    for method, m in methods.items():
        for key in ("short_nll", "recovered_fraction", "long_nll", "long_nll_vs_long_cpt"):
            values = [fig[method][key] for fig in per_seed]
            m[f"{key}_mean"] = statistics.fmean(values)
            m[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        m["per_seed"] = {key: [fig[method][key] for fig in per_seed]
                         for key in ("short_nll", "recovered_fraction", "long_nll", "long_nll_vs_long_cpt")}
    report = {
        "seeds": seeds,
        "environment": environment(),
        "teacher": {"short_nll": teacher_short, "long_nll": _num(teacher.get("long_nll_beyond")),
                    "passkey_accuracy": _num(teacher.get("passkey_accuracy"))},
        "methods": methods,
        "seconds": round(seconds, 1),
        "target": {"recovered_fraction": ">= 0.90 for LongReD", "long_nll": "within 2% of Long CPT",
                   "passkey_accuracy": "no worse than Long CPT"},
    }
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, allow_nan=True)

    plot = os.path.join(out, "nll_by_position.png")
    try:
        from distill.evaluate import plot_nll_by_position

        curves = {}
        for n, r in ((n, r) for n, r in results.items() if "-seed" not in n):
            long = r.get("details", {}).get("long")
            if long:
                curves["teacher (256 window)" if n == "teacher" else METHODS[n]] = long.get("student", long)
        plot_nll_by_position(curves, plot, original_length=256)
    except Exception as err:  # noqa: BLE001 - a plot must not lose the report
        log(f"plot skipped: {err}")
        plot = None

    lrd = methods["longred"]
    lines = [
        "# Demo report: restoration distillation on a CPU",
        "",
        "A 4-layer Llama (128 wide) pre-trained at a 256-token window on Python standard-library code, then "
        "extended 4x to 1024 by ABF (theta 1e4 -> 1.6e5) three ways. Held-out data; NLL in nats per token.",
        "",
        f"Teacher short NLL: **{teacher_short:.4f}**; teacher NLL beyond 256: "
        f"{report['teacher']['long_nll']:.4f}; "
        f"teacher passkey accuracy: {report['teacher']['passkey_accuracy']:.2f}.",
        "",
        "| method | short NLL | gap to teacher | recovered | KL(teacher‖student) | long NLL (pos ≥ 256) | "
        "vs Long CPT | passkey |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, label in METHODS.items():
        m = methods[method]
        lines.append(f"| {label} | {m['short_nll']:.4f} | {m['short_nll_gap']:+.4f} | "
                     f"{m['recovered_fraction']:.2f} | {m['kl_teacher_student']:.4f} | {m['long_nll']:.4f} | "
                     f"{m['long_nll_vs_long_cpt']:+.1%} | "
                     f"{m['passkey_accuracy']:.2f} |")
    verdict = []
    verdict.append(f"- recovered fraction of Long CPT's short-NLL gap: {lrd['recovered_fraction']:.2f} "
                   f"(target ≥ 0.90: {'met' if lrd['recovered_fraction'] >= 0.9 else 'NOT met'})")
    verdict.append(f"- long NLL vs Long CPT: {lrd['long_nll_vs_long_cpt']:+.1%} (target within 2%: "
                   f"{'met' if lrd['long_nll_vs_long_cpt'] <= 0.02 else 'NOT met'})")
    cpt_passkey = methods["long_cpt"]["passkey_accuracy"]
    verdict.append(f"- passkey: {lrd['passkey_accuracy']:.2f} vs Long CPT {cpt_passkey:.2f} "
                   f"({'no worse' if lrd['passkey_accuracy'] >= cpt_passkey else 'worse'})")
    lines += ["", "LongReD against the targets:", *verdict, ""]
    if seeds > 1:
        lines += [f"Over {seeds} extension seeds (run.seed 0..{seeds - 1}; the teacher trained once), "
                  f"mean ± sd:", "",
                  "| method | short NLL | recovered | long NLL (pos ≥ 256) | vs Long CPT |",
                  "|---|---|---|---|---|"]
        for method, label in METHODS.items():
            m = methods[method]
            lines.append(f"| {label} | {m['short_nll_mean']:.4f} ± {m['short_nll_sd']:.4f} | "
                         f"{m['recovered_fraction_mean']:.2f} ± {m['recovered_fraction_sd']:.2f} | "
                         f"{m['long_nll_mean']:.4f} ± {m['long_nll_sd']:.4f} | "
                         f"{m['long_nll_vs_long_cpt_mean']:+.1%} ± {m['long_nll_vs_long_cpt_sd']:.1%} |")
        lines.append("")
    if plot:
        lines += ["![NLL by position](nll_by_position.png)", ""]
    lines += [f"Per-model details (per-layer hidden cosine and attention KL, passkey grids): "
              f"`eval/<model>/eval.json`. "
              f"Total time {seconds / 60:.1f} min.", ""]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return report


if __name__ == "__main__":
    sys.exit(main())
