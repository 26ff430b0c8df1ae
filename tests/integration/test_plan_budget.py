"""The planner's budget (scripts/plan.py): tokens per step and run, step time at a stated MFU from the
trainer's own FLOP formulas, checkpoints on disk under the real retention, the stop grace; and a command
line that takes recipe overrides after its flags, as distill.train does."""

import json
import logging
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from distill.config import load_recipe
from distill.plan import Shape, checkpoints_on_disk, flop_counts_of, recipe_seq_lens, run_budget
from distill.testing import tiny_config

from .test_plan import LLAMA3_8B
from .test_train import ROOT


@pytest.mark.parametrize("tied", [False, True])
def test_flop_counts_from_the_config_equal_the_trainers(tied):
    """The planner counts FLOPs from config.json alone exactly as the trainer's MFU does from the model."""
    from distill.model.flops import flop_counts

    config = tiny_config("llama", vocab_size=300, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                         intermediate_size=100)
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config)
    assert flop_counts_of(Shape.from_config(config)) == flop_counts(model)


@pytest.mark.parametrize("max_steps, save_every, keep_last, keep_every", [
    (512, 32, 2, 0), (512, 32, 3, 128), (100, 7, 1, 0), (10, 0, 2, 0), (64, 8, 2, 16), (50, 10, 5, 0)])
def test_checkpoints_on_disk_follow_the_real_retention(tmp_path, max_steps, save_every, keep_last,
                                                       keep_every):
    """Saving complete checkpoints where the trainer saves them and pruning with
    distill.train.checkpoint.prune
    leaves what the planner counts: the most at once (while a new one exists before the prune) and at the
    end."""
    from distill.train.checkpoint import MARKER, prune

    root = tmp_path / "checkpoints"
    most = 0
    for step in range(1, max_steps + 1):
        if not ((save_every and step % save_every == 0) or step == max_steps):
            continue
        path = root / f"step-{step}"
        path.mkdir(parents=True)
        (path / MARKER).write_text(json.dumps({"files": {}}))
        most = max(most, len(os.listdir(root)))
        prune(str(root), keep_last, keep_every)
    assert checkpoints_on_disk(max_steps, save_every, keep_last, keep_every) == (most, len(os.listdir(root)))


def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plan.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=180, check=False)


def test_plan_takes_overrides_after_flags_and_prints_the_budget(tmp_path):
    """`plan.py RECIPE --gpus 8 --json model.path=X` (overrides after the flags) works; the budget's step time
    is the recipe's FLOPs over MFU × peak × GPUs, its hours add up, and an override of the retention changes
    the disk figure as the real retention would."""
    model = tmp_path / "llama3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    recipe = "recipes/llama3-8b/longred-32k-abf.yaml"
    proc = _plan(recipe, "--gpus", "8", "--json", f"model.path={model}", "--mfu", "0.4", "train.keep_last=3",
                 "train.keep_every=128")
    assert proc.returncode == 0, proc.stderr
    budget = json.loads(proc.stdout)["budget"]
    cfg = load_recipe(os.path.join(ROOT, recipe), [f"model.path={model}"])
    assert budget["tokens_per_step"] == 2**21
    assert budget["tokens_per_step_by_stream"] == {"long": 2**20, "short": 3 * 2**18, "s2l": 2**18}
    assert budget["tokens_per_run"]["long"] == 512 * 2**20
    assert budget["step_s"] == pytest.approx(budget["step_flops"] / (0.4 * 989e12 * 8))
    assert budget["train_hours"] == pytest.approx(512 * budget["step_s"] / 3600)
    assert budget["total_hours"] == pytest.approx(budget["train_hours"] + budget["checkpoint_hours"])
    assert budget["checkpoint_bytes"] == 12 * 8_030_261_248  # fp32 weights + AdamW: ~96 GB
    # Every rank writes its eighth at the same time, at 0.2 GB/s each.
    assert budget["checkpoint_writers"] == 8
    assert budget["checkpoint_write_s"] == pytest.approx(budget["checkpoint_bytes"] / 8 / 0.2e9)
    assert budget["checkpoints_saved"] == 16  # every 32 steps of 512
    assert budget["checkpoints_on_disk_max"] == 7  # as shipped before: newest 3 + 128/256/384 + the new one
    assert budget["checkpoint_disk_bytes_max"] == 7 * budget["checkpoint_bytes"]  # ~0.67 TB
    assert budget["stop_grace_s"] >= budget["step_s"] + budget["checkpoint_write_s"]
    assert budget["stop_grace_s"] % 60 == 0
    # The same from the library, as shipped (keep_last 2): 3 on disk at most, ~0.29 TB.
    shape = Shape.from_config(AutoConfig.from_pretrained(model))
    shipped = run_budget(cfg, shape, None, 8, recipe_seq_lens(cfg), 0.4, 989.0)
    assert shipped["step_flops"] == budget["step_flops"] and shipped["checkpoints_on_disk_max"] == 3
    # A lower MFU, in text: twice the step time; a GPU of unknown peak says how to give it.
    text = _plan(recipe, f"model.path={model}", "--mfu", "0.2", "--gpu", "85e9")
    assert text.returncode == 0, text.stderr
    assert "time: unknown peak TFLOP/s for this --gpu; give --peak-tflops" in text.stdout
    text = _plan(recipe, "--mfu", "0.2", f"model.path={model}")
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith("time at MFU 0.20"))
    assert f"{2 * budget['step_s']:.1f} s per step" in line
    assert "per run: long 537M, short 403M, s2l 134M" in text.stdout
    assert "at most 3 on disk = 0.29 TB" in text.stdout and "--signal=B:USR1@" in text.stdout
    bad = _plan(recipe, f"model.path={model}", "--mfu", "1.5")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --mfu 1.5") and "Traceback" not in bad.stderr


def test_trainer_warns_when_a_run_reads_more_rows_than_were_built(tmp_path, tiny_llama, built_data, caplog):
    """A stream smaller than what max_steps reads starts a second epoch: the trainer says so at start-up."""
    from distill.data.mixture import Mixture, StreamPlan
    from distill.train.loop import warn_repeated_data

    from .test_train import recipe, write

    data = recipe(tiny_llama, built_data, tmp_path / "run", "long_cpt", steps=40)
    cfg = load_recipe(write(data, tmp_path / "r.yaml"))
    rows = 100  # 40 steps × 4096 token slots / 1024 per row = 160 rows read
    mixture = Mixture([StreamPlan("long", rows, 1024, 1, 1.0)], cfg.mix.tokens_per_step, 0)
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        warn_repeated_data(cfg, mixture)
    assert "streams.long: the run reads ~160 rows of 1024 tokens" in caplog.text
    assert "1.60 epochs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill.train"):
        warn_repeated_data(cfg, Mixture([StreamPlan("long", 160, 1024, 1, 1.0)], cfg.mix.tokens_per_step, 0))
    assert caplog.text == ""


def test_tokens_per_step_follow_a_share_schedule():
    """A scheduled share is followed step by step: short at 0 for the first half, 6 for the second, against
    long 4 and s2l 1, averages to what the mixture plans over the run."""
    from distill.plan import stream_tokens_per_step

    cfg = load_recipe(os.path.join(ROOT, "recipes/llama3-8b/longred-32k-abf.yaml"),
                      ["streams.short.share={name: stages, stages: [[0, 0], [256, 6]]}"])
    got = stream_tokens_per_step(cfg)
    step = 2**21
    assert got["short"] == pytest.approx(step * (0 + 6 / 11) / 2)
    assert got["long"] == pytest.approx(step * (4 / 5 + 4 / 11) / 2)
    assert sum(got.values()) == pytest.approx(step)
