"""In-training evaluation of a sharded run, and its checkpoints read by scripts/evaluate.py.

A 2-process run (gloo, `accelerate launch` with the shipped launcher config) with `train.eval_every` logs the
short-text figures under eval/ in metrics.jsonl, and its steps equal a 1-process run's without evaluation;
its mid-run checkpoint loads in scripts/evaluate.py as a model directory, and the 1-process evaluation of that
checkpoint gives the figures the sharded ranks logged at that step (the same weights, scored by another code
path)."""

import json
import os
import subprocess
import sys

import pytest

from distill.train.metrics import read_metrics

from .test_train import ROOT, recipe, write

LAUNCH = {"fsdp2": ("fsdp2.yaml", "29591"), "zero3": ("zero3.yaml", "29592")}


def _script(name):
    import importlib.util

    path = os.path.join(ROOT, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp2", "zero3"])  # 20-40 s each on 2 idle cores
def test_sharded_run_evaluates_in_training_and_its_checkpoint_evaluates(mode, tmp_path, tiny_llama,
                                                                       built_data, capsys):
    """On main, a sharded run skipped in-training evaluation (no eval/ keys) and its checkpoints held no
    config.json, so evaluate.py refused them."""
    out = tmp_path / "run"
    cfg = recipe(tiny_llama, built_data, out, "longred", steps=3, train__eval_every=2, train__save_every=2)
    cfg["train"].update({"export": False, "keep_last": 5})
    cfg["eval"] = {"max_rows": 5}  # uneven: 3 rows on rank 0, 2 on rank 1
    config, port = LAUNCH[mode]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1", "DS_BUILD_OPS": "0"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "recipes", "accelerate", config), "--num_processes", "2", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", port, "-m", "distill.train",
           write(cfg, tmp_path / "r.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert "eval/short_nll" not in records[1]
    # Evaluating leaves training as it was: the steps equal one process's without evaluation.
    from distill.train.loop import main

    reference = tmp_path / "reference"
    assert main([str(tmp_path / "r.yaml"), f"run.output_dir={reference}", "train.eval_every=0"]) == 0
    for r in read_metrics(reference / "metrics.jsonl"):
        assert records[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-5), r["step"]
    for step in (2, 3):  # every eval_every steps and at the last step
        r = records[step]
        assert r["eval/short_nll_gap"] == pytest.approx(r["eval/short_nll"] - r["eval/teacher_short_nll"])
        assert r["eval/short_tokens"] > 0 and r["eval/kl_teacher_student"] > 0
    assert records[3]["eval/teacher_short_nll"] == records[2]["eval/teacher_short_nll"]  # a frozen teacher

    checkpoint = out / "checkpoints" / "step-2"
    assert (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer.json").is_file()
    code = _script("evaluate").main([
        "--model", str(checkpoint), "--teacher", tiny_llama, "--short-data", built_data["root"],
        "--max-rows", "5", "--passkey-samples", "0", "--out", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
    figures = json.loads((tmp_path / "eval" / "eval.json").read_text())["figures"]
    logged = records[2]
    for key in ("short_nll", "teacher_short_nll", "short_nll_gap", "kl_teacher_student", "short_nll_se"):
        assert figures[key] == pytest.approx(logged[f"eval/{key}"], rel=1e-4, abs=1e-6), key
    # The checkpoint's config carries the extended RoPE and the window it was extended from.
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["rope_theta"] == 160000.0 and saved["original_max_position_embeddings"] == 256
