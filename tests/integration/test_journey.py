"""The user's journey as shipped. Every shipped 8B and 70B recipe (recipes/llama3-8b/,
recipes/mistral-7b-v0.3/, recipes/llama3-70b/) runs as written, on data built from the shipped data specs by
scripts/prepare_data.py, with only these swaps:
- the model: the recipes' and specs' hub ids (meta-llama/Meta-Llama-3-8B, mistralai/Mistral-7B-v0.3,
  meta-llama/Meta-Llama-3-70B) resolve, offline (HF_HUB_OFFLINE=1), through a Hugging Face cache this test
  fills with a tiny random-init model of the same family and depth (32 layers, so the recipes' layer lists
  stay as shipped; the 70B recipes name none but `last` and `auto`, so their stand-in has 32 too, at 40% of
  an 80-layer one's time) and a 128-token window (the 70B stand-in shares the 8B's tokenizer, as the real
  models do, so it reads the data the 8B specs build);
- the sources: one override per source, `sources.<name>.path=<local JSON lines>` (docs/data.md);
- the scale: lengths / 64 (target 512, original window 128, short rows 64), token budgets, 2 steps, one row
  per micro-batch; a sequence-parallel recipe other than the sharded run below runs on one process.
Before any data exists, scripts/plan.py plans each recipe as shipped. One recipe (128K LongReD with 2-way
sequence parallelism) runs sharded (FSDP2, 2 processes, in-training evaluation on) and scripts/evaluate.py
reads its mid-run checkpoint with the teacher named by its hub id; scripts/merge.py interpolates its export
with the hub id. The README's quickstart is followed literally with the same swaps (test_readme_quickstart).
The SmolLM2 recipes run with the real model in tests/integration/test_real_model.py, the demo's in
tests/integration/test_demo.py.
"""

import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest

from distill.config import load_recipe, merge
from distill.data.spec import load_spec
from distill.testing import fill_hub_cache, make_tiny_model, stdlib_files
from distill.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "integration", "journey_worker.py")
HUB = {"meta-llama/Meta-Llama-3-8B": "llama", "mistralai/Mistral-7B-v0.3": "mistral",
       "meta-llama/Meta-Llama-3-70B": "llama"}
WINDOW, TARGET = 128, 512
LENGTHS = {"long": TARGET, "s2l": WINDOW, "short": 64}
TOKENS_PER_STEP = 1024  # LongReD's 4 : 3 : 1 = one 512-token long row, 6 short rows, one s2l window
SPECS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "data", "*.yaml"))
               if not os.path.basename(p).startswith(("demo", "smollm2")))
RECIPES = sorted(os.path.relpath(p, ROOT) for d in ("llama3-8b", "mistral-7b-v0.3", "llama3-70b")
                 for p in glob.glob(os.path.join(ROOT, "recipes", d, "*.yaml")))
SHARDED = "recipes/llama3-8b/longred-128k-abf-sp2.yaml"
STEPS = 2


def _env(hub_cache: str, hf_home: str) -> dict:
    return {**os.environ, "HF_HUB_CACHE": hub_cache, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ROOT,
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def _nested(keys: list[str], value) -> dict:
    return {keys[0]: value} if len(keys) == 1 else {keys[0]: _nested(keys[1:], value)}


def readme_quickstart() -> list[str]:
    """The command lines of the README's quickstart block, as a user copies them."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text[text.index("<!-- quickstart"):]
    block = block[block.index("```bash") + len("```bash"): block.index("```", block.index("```bash") + 7)]
    return [line.split("  #")[0].strip() for line in block.strip().splitlines() if line.strip()]


def spec_swaps(spec_path: str, corpora: str, texts: list[str]) -> list[str]:
    """The overrides that build `spec_path` from local JSON lines at the test's scale: each source's records
    (its text field, and the fields its `match` asks for) in `<corpora>/<spec>-<source>.jsonl`."""
    spec = load_spec(os.path.join(ROOT, spec_path))
    stem = os.path.splitext(os.path.basename(spec_path))[0]
    swaps = []
    for i, source in enumerate(spec.sources):
        path = os.path.join(corpora, f"{stem}-{source.name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for k, text in enumerate(texts[i::len(spec.sources)] or texts):
                record = {source.text_field: text}
                for key, want in source.match.items():
                    record = merge(record, _nested(key.split("."), want))
                f.write(json.dumps(record) + "\n")
        swaps.append(f"sources.{source.name}.path={path}")
    for name, stream in spec.streams.items():
        length = LENGTHS[name]
        swaps.append(f"streams.{name}.seq_len={length}")
        if stream.min_doc_tokens > 1:
            shortest = length if stream.pack == "window" else length // 2
            swaps.append(f"streams.{name}.min_doc_tokens={shortest}")
        if stream.max_tokens is not None:
            swaps.append(f"streams.{name}.max_tokens=40000")
    return swaps + ["holdout.fraction=0.2"]


def recipe_swaps(recipe_path: str) -> list[str]:
    """The recipe's scale, shrunk: target and row lengths, token slots, steps, one row per micro-batch."""
    cfg = load_recipe(os.path.join(ROOT, recipe_path))
    swaps = [f"rope.target_length={TARGET}", f"mix.tokens_per_step={TOKENS_PER_STEP}",
             f"train.max_steps={STEPS}", "train.save_every=0", "train.eval_every=0", "train.export=false",
             "log.progress_bar=false"]
    for name in cfg.streams:
        swaps += [f"streams.{name}.seq_len={LENGTHS[name]}", f"streams.{name}.micro_batch=1"]
    if cfg.parallel.sequence_parallel > 1:
        swaps.append("parallel.sequence_parallel=1")
    return swaps


@pytest.fixture(scope="module")
def journey(tmp_path_factory, tokenizer_dir):
    """The working directory after the whole journey, its environment, and each command's result."""
    work = tmp_path_factory.mktemp("journey")
    hub_cache, hf_home = str(work / "hf" / "hub"), str(work / "hf")
    for repo, arch in HUB.items():
        model = make_tiny_model(str(work / "models" / repo.split("/")[1]), arch, tokenizer_dir=tokenizer_dir,
                                seed=1, hidden_size=64, num_layers=32, num_heads=4, num_kv_heads=2,
                                intermediate_size=128, max_position_embeddings=WINDOW)
        fill_hub_cache(hub_cache, repo, model)
    env = _env(hub_cache, hf_home)
    corpora = work / "corpora"
    corpora.mkdir()
    texts = []
    for path in stdlib_files(min_bytes=6000, max_bytes=40000, limit=120):
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    commands = [{"name": f"plan {r}", "command": "plan", "argv": [os.path.join(ROOT, r), "--json"]}
                for r in RECIPES]
    commands += [{"name": f"build {s}", "command": "prepare_data",
                  "argv": [os.path.join(ROOT, s), *spec_swaps(s, str(corpora), texts)]} for s in SPECS]
    commands += [{"name": f"train {r}", "command": "train", "argv": [os.path.join(ROOT, r), *recipe_swaps(r)]}
                 for r in RECIPES if r != SHARDED]
    (work / "commands.json").write_text(json.dumps(commands))
    proc = subprocess.run([sys.executable, WORKER, "commands.json", "results.json"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    failed = {name: r["code"] for name, r in results.items() if r["code"] != 0}
    assert not failed, (failed, proc.stderr[-4000:])

    # The README's quickstart, line by line in a fresh directory, with the same swaps: its FSDP2 launch is the
    # sharded run (2 gloo processes instead of 8 GPUs), its evaluate.py reads the export.
    quick = work / "quickstart"
    quick.mkdir()
    for line in readme_quickstart():
        cmd = shlex.split(line)
        if cmd[0] == "hf":  # the login: this machine's cache already holds the model
            continue
        run_env = env
        if cmd[:2] == ["python", "scripts/prepare_data.py"]:
            cmd += spec_swaps(cmd[2], str(corpora), texts)
        elif cmd[:2] == ["python", "scripts/plan.py"]:
            cmd += [s for s in recipe_swaps(cmd[2]) if not s.startswith("parallel.")]
        elif cmd[0] == "accelerate":
            at = cmd.index("--config_file") + 2
            cmd[at:at] = ["--num_processes", "2", "--main_process_port", "29671"]
            cmd += [s for s in recipe_swaps(SHARDED) if not s.startswith(("train.", "parallel."))]
            cmd += [f"train.max_steps={STEPS}", "train.save_every=1", "train.eval_every=1", "eval.max_rows=2"]
            run_env = {**env, "ACCELERATE_USE_CPU": "1"}
        elif cmd[:2] == ["python", "scripts/evaluate.py"]:
            cmd += ["--max-rows", "2", "--long-rows", "1", "--passkey-samples", "0"]
        cmd = [sys.executable if c == "python" else c for c in cmd]
        if cmd[:2] == ["accelerate", "launch"]:
            cmd[:2] = [sys.executable, "-m", "accelerate.commands.launch"]
        cmd = [os.path.join(ROOT, c) if c.startswith(("scripts/", "recipes/", "data/")) and os.path.isfile(
            os.path.join(ROOT, c)) else c for c in cmd]
        proc = subprocess.run(cmd, cwd=quick, env=run_env, capture_output=True, text=True, timeout=900,
                              check=False)
        assert proc.returncode == 0, (line, proc.stderr[-4000:])
    return {"work": work, "quick": quick, "env": env, "results": results}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_plans_builds_and_trains(journey, recipe):
    """The planner reads the recipe as shipped (hub id → the cached config); then it trains its steps on data
    from the shipped specs, every stream and objective it names reporting a finite loss."""
    plan = json.loads(journey["results"][f"plan {recipe}"]["stdout"])
    assert plan["peak_bytes"] > 0 and plan["world"] >= 1
    cfg = load_recipe(os.path.join(ROOT, recipe))
    out = journey["quick" if recipe == SHARDED else "work"] / cfg.run.output_dir
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for name, stream in cfg.streams.items():
        for objective in ("lm", "hidden", "kl"):
            if getattr(stream.objectives, objective) is not None:
                values = [r[f"loss/{name}/{objective}"] for r in records if f"loss/{name}/{objective}" in r]
                assert values and all(math.isfinite(v) for v in values), (name, objective)
    assert "base:" not in (out / "config.yaml").read_text()  # the resolved recipe, bases merged in


def test_every_shipped_spec_builds(journey):
    for spec in SPECS:
        out = journey["work"] / load_spec(os.path.join(ROOT, spec)).output_dir
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["tokenizer"]["name"] in HUB, spec
        assert all(s["train"]["rows"] > 0 for s in manifest["streams"].values()), spec


@pytest.mark.slow
def test_readme_quickstart_runs_and_its_sharded_run_is_read(journey):
    """The README's quickstart followed literally (tiny-model cache, local sources, shrunk scale): its launch
    is FSDP2 on 2 processes with sequence parallelism; in-training evaluation logs the short-text gap;
    evaluate.py reads a mid-run checkpoint (teacher by hub id); merge.py interpolates the export with the hub
    id."""
    work, env = journey["quick"], journey["env"]
    cfg = load_recipe(os.path.join(ROOT, SHARDED))
    out = work / cfg.run.output_dir
    # The quickstart's own evaluate.py line read the export with the teacher named by its hub id.
    assert math.isfinite(json.loads((out / "eval" / "eval.json").read_text())["figures"]["short_nll_gap"])
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    gaps = [r["eval/short_nll_gap"] for r in records if "eval/short_nll_gap" in r]
    assert gaps and all(math.isfinite(g) for g in gaps)
    checkpoint = out / "checkpoints" / "step-1"
    evaluation = work / "eval-step-1"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--model",
                           str(checkpoint), "--teacher", "meta-llama/Meta-Llama-3-8B", "--short-data",
                           str(work / "data" / "built" / "fineweb-edu-short"), "--long-data",
                           str(work / "data" / "built" / "slimpajama-llama3-128k"), "--max-rows", "2",
                           "--passkey-samples", "0", "--out", str(evaluation)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((evaluation / "eval.json").read_text())["figures"]
    assert math.isfinite(figures["short_nll_gap"]) and math.isfinite(figures["long_nll"])
    merged = work / "merged"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "merge.py"), "interpolate",
                           "--original", "meta-llama/Meta-Llama-3-8B", "--extended", str(out / "final"),
                           "--alpha", "0.5", "--out", str(merged)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (merged / "alpha-0.5" / "config.json").is_file()


def test_swaps_are_only_sources_and_scale():
    """The journey changes no method setting of a recipe: its swaps touch lengths, budgets, steps, logging and
    the single-process stand-in for sequence parallelism, nothing else."""
    allowed = re.compile(r"^(rope\.target_length|mix\.tokens_per_step|train\.\w+|log\.progress_bar|"
                         r"streams\.\w+\.(seq_len|micro_batch)|parallel\.sequence_parallel)=")
    for recipe in RECIPES:
        assert all(allowed.match(s) for s in recipe_swaps(recipe)), recipe
