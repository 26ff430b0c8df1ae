"""DeepSpeed ZeRO-3 (distill.zero3): 2 CPU processes (gloo) against 1 unsharded process on the tiny Llama.

One torchrun launch of tests/integration/zero3_worker.py checks the ZeRO-3 teacher and runs two sharded trainings
(a run with a checkpoint, and a run resumed from it); the unsharded references are fsdp2_worker's (same plan,
streams, losses and AdamW) run in this process. Every parameter is partitioned (persistence threshold 0),
the lm_head weight included. Needs deepspeed (`pip install --no-build-isolation deepspeed`, DS_BUILD_OPS=0).
"""

import json
import os
import sys

import pytest

from distill.zero3 import ds_config, zero3_requested
from tests.integration import fsdp2_worker as reference
from tests.integration.test_fsdp2 import (
    SAVE_AT,
    STEPS,
    _assert_resumed_identical,
    _assert_trained_like,
    _close_rel,
    _max_diff,
    _optim,
    _result,
    _weights,
    launch_with_retry,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_zero3_requested_reads_the_launcher_environment(monkeypatch):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    assert not zero3_requested()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    assert zero3_requested()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ValueError, match="zero_stage"):
        zero3_requested()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json")
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        zero3_requested()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ValueError, match="offload_optimizer_device"):
        zero3_requested()


def test_ds_config_is_zero3_without_gradient_accumulation():
    cfg = ds_config(max_grad_norm=1.0)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_allow_untested_optimizer"]
    assert ds_config(0.0)["gradient_clipping"] == 0.0
    assert "gradient_clipping" not in ds_config(train=False)


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """{name: directory}: zero3, resumed (2 processes), single, single_from_zero3 (1 process), root."""
    pytest.importorskip("deepspeed", reason="ZeRO-3 needs deepspeed (pip install --no-build-isolation deepspeed)")
    out = tmp_path_factory.mktemp("zero3")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "DS_BUILD_OPS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "integration", "zero3_worker.py"), tiny_llama, str(out),
           "--steps", str(STEPS), "--save-at", str(SAVE_AT)]
    proc = launch_with_retry(cmd, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    dirs = {"root": str(out), "zero3": str(out / "zero3"), "resumed": str(out / "resumed"),
            "poisoned": str(out / "poisoned"),
            "single": str(out / "single"), "single_from_zero3": str(out / "single_from_zero3")}
    reference.train(tiny_llama, dirs["single"], STEPS)
    # The 2-process checkpoint, loaded by a plain unsharded model and AdamW(param_groups(model)).
    reference.train(tiny_llama, dirs["single_from_zero3"], STEPS,
                    resume=os.path.join(dirs["zero3"], f"step-{SAVE_AT}"))
    return dirs


@pytest.mark.slow
def test_zero3_matches_one_process(runs, tiny_llama):
    one, two = _result(runs["single"]), _result(runs["zero3"])
    assert one["world"] == 1 and two["world"] == 2
    _close_rel(two["loss"], one["loss"])
    _close_rel(two["grad_norm"], one["grad_norm"])  # summed (not averaged) gradients, norm before the step
    _close_rel(two["ds_grad_norm"], two["grad_norm"], rtol=1e-9)  # = DeepSpeed's own norm after the step
    assert max(one["grad_norm"]) > reference.MAX_NORM  # DeepSpeed's clipping was exercised
    _assert_trained_like(runs["zero3"], runs["single"], tiny_llama)


@pytest.mark.slow
def test_zero3_resume_is_bit_identical(runs):
    _assert_resumed_identical(runs["zero3"], runs["resumed"])


@pytest.mark.slow
def test_zero3_checkpoint_resumes_in_one_process(runs):
    two, one = _result(runs["zero3"]), _result(runs["single_from_zero3"])
    _close_rel(one["loss"], two["loss"][SAVE_AT:])
    assert _max_diff(_weights(runs["single_from_zero3"]), _weights(runs["zero3"])) < 1e-5


@pytest.mark.slow
def test_zero3_teacher_truncation_is_exact(runs):
    with open(os.path.join(runs["root"], "teacher.json"), encoding="utf-8") as f:
        teacher = json.load(f)
    assert teacher["partitioned"]  # the decoder layers' parameters are empty outside their forward
    assert set(teacher["diffs"]) == {"[0]", "[1]", "[1, 2]", "[2]"}  # embeddings, truncated, full depth
    assert all(d <= 1e-6 for d in teacher["diffs"].values()), teacher["diffs"]


@pytest.mark.slow
def test_zero3_skipped_step_leaves_no_trace(runs):
    first, poisoned = _result(runs["zero3"]), _result(runs["poisoned"])
    assert poisoned["poisoned_norm"] == "nan"  # the loop sees the non-finite norm before stepping
    assert poisoned["loss"] == first["loss"][:1] and poisoned["grad_norm"] == first["grad_norm"][:1]
    ob = _optim(runs["poisoned"])
    assert all(float(e["step"]) == 1.0 for e in ob["state"].values())  # exactly one AdamW step taken
