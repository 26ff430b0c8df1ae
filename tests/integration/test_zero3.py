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
import torch
from safetensors.torch import load_file

from distill.zero3 import ds_config, zero3_requested
from tests.integration import fsdp2_worker as reference
from tests.integration.test_fsdp2 import _close_rel, _max_diff, _result, launch_with_retry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, SAVE_AT = 3, 2


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


def _optim(path):
    return torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)


@pytest.mark.slow
def test_zero3_matches_one_process(runs, tiny_llama):
    one, two = _result(runs["single"]), _result(runs["zero3"])
    assert one["world"] == 1 and two["world"] == 2
    _close_rel(two["loss"], one["loss"])
    _close_rel(two["grad_norm"], one["grad_norm"])  # summed (not averaged) gradients, norm before the step
    _close_rel(two["ds_grad_norm"], two["grad_norm"], rtol=1e-9)  # = DeepSpeed's own norm after the step
    assert max(one["grad_norm"]) > reference.MAX_NORM  # DeepSpeed's clipping was exercised
    w1, w2 = load_file(os.path.join(runs["single"], "model.safetensors")), \
        load_file(os.path.join(runs["zero3"], "model.safetensors"))
    assert _max_diff(w2, w1) < 1e-5
    w0 = load_file(os.path.join(tiny_llama, "model.safetensors"))
    assert max((w1[k] - w0[k]).abs().max().item() for k in w0) > 1e-4  # training moved the weights
    o1, o2 = _optim(runs["single"]), _optim(runs["zero3"])
    assert o2["param_groups"] == o1["param_groups"]  # same ids, order and hyper-parameters
    assert o2["state"].keys() == o1["state"].keys() and len(o1["state"]) > 0
    for pid, entry in o1["state"].items():
        assert torch.equal(o2["state"][pid]["step"], entry["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            assert o2["state"][pid][key].shape == entry[key].shape
            scale = entry[key].abs().max().item()
            torch.testing.assert_close(o2["state"][pid][key], entry[key], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
def test_zero3_resume_is_bit_identical(runs):
    first, resumed = _result(runs["zero3"]), _result(runs["resumed"])
    assert resumed["roundtrip_model"] and resumed["roundtrip_optimizer"]  # load then gather = the files
    assert resumed["loss"] == first["loss"][SAVE_AT:]
    assert resumed["grad_norm"] == first["grad_norm"][SAVE_AT:]
    a, b = load_file(os.path.join(runs["zero3"], "model.safetensors")), \
        load_file(os.path.join(runs["resumed"], "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the step after resuming too
    oa, ob = _optim(runs["zero3"]), _optim(runs["resumed"])
    assert oa["param_groups"] == ob["param_groups"] and len(oa["state"]) > 0
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for i in oa["state"] for k in oa["state"][i])


@pytest.mark.slow
def test_zero3_checkpoint_resumes_in_one_process(runs):
    two, one = _result(runs["zero3"]), _result(runs["single_from_zero3"])
    _close_rel(one["loss"], two["loss"][SAVE_AT:])
    a, b = load_file(os.path.join(runs["zero3"], "model.safetensors")), \
        load_file(os.path.join(runs["single_from_zero3"], "model.safetensors"))
    assert _max_diff(b, a) < 1e-5


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
