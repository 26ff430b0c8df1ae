"""The memory savers through the trainer's real step (distill.train.loop.run): offloaded checkpoints change
nothing
bit for bit, the tiled MLP changes nothing beyond float tolerance, and both act on the long stream only."""

import json
import os
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from distill.config import ConfigError, load_recipe
from distill.parallel import memory

from .test_train import ROOT, recipe, write


def _run(tmp_path, tiny_llama, built_data, name, **parallel):
    from distill.train.loop import run

    cfg = recipe(tiny_llama, built_data, tmp_path / name, "longred", steps=1)
    cfg["model"].update({"dtype": "bfloat16", "gradient_checkpointing": True})  # autocast: the GPU regime
    cfg["train"]["export"] = False
    cfg["parallel"] = parallel
    grads = []  # the gradients the optimiser steps on, in its parameter order

    def snapshot(optimizer, args, kwargs):
        grads.extend(p.grad.clone() for group in optimizer.param_groups for p in group["params"])

    handle = register_optimizer_step_pre_hook(snapshot)
    try:
        assert run(load_recipe(write(cfg, tmp_path / f"{name}.yaml"))) == 0
    finally:
        handle.remove()
    with open(tmp_path / name / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return records, grads


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_llama, built_data):
    return _run(tmp_path_factory.mktemp("plain"), tiny_llama, built_data, "plain")


def test_offload_is_bit_identical_in_the_training_step(tmp_path, tiny_llama, built_data, plain):
    """One optimiser step of LongReD (long LM + short and s2l distillation; gradient checkpointing, bf16
    autocast) with parallel.offload_activations on and off: every logged loss, the gradient norm and every
    gradient the optimiser steps on bit-identical; the long stream's layer inputs did go through host buffers
    (1 x 1024 tokens x 64 hidden x 4 bytes per layer at the peak), the short streams' did not."""
    plain, plain_w = plain
    memory.OFFLOAD.peak_host_bytes = 0
    packed = []
    original = memory.HostOffload.pack

    def pack(self, tensor):
        packed.append(tuple(tensor.shape))
        return original(self, tensor)

    memory.HostOffload.pack = pack
    try:
        off, off_w = _run(tmp_path, tiny_llama, built_data, "offload", offload_activations=True)
    finally:
        memory.HostOffload.pack = original
    assert packed and set(packed) == {(1, 1024, 64)}  # the long stream only, (B, T, H), one per layer
    assert memory.OFFLOAD.peak_host_bytes == 2 * 1024 * 64 * 4  # 2 layers, fp32 residual
    assert len(plain) == len(off) == 1
    for a, b in zip(plain, off):
        for key in a:
            if key.startswith("loss") or key == "grad_norm":
                assert a[key] == b[key], (key, a[key], b[key])
    assert len(plain_w) == len(off_w) > 0
    for i, (a, b) in enumerate(zip(plain_w, off_w)):
        assert torch.equal(a, b), i


def test_tiled_mlp_and_offload_match_in_the_training_step(tmp_path, tiny_llama, built_data, plain):
    """parallel.tiled_mlp: 4 with offload: the losses and the step's gradient norm equal the plain run's
    within float tolerance (bf16 autocast), and so does every gradient the optimiser steps on (2% of its
    largest entry: bf16 matmuls over other chunk shapes round differently)."""
    plain, plain_w = plain
    tiled, tiled_w = _run(tmp_path, tiny_llama, built_data, "tiled", tiled_mlp=4, offload_activations=True)
    for a, b in zip(plain, tiled):
        assert a["loss/long/lm"] == pytest.approx(b["loss/long/lm"], rel=1e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-2)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    assert len(plain_w) == len(tiled_w) > 0
    for i, (a, b) in enumerate(zip(plain_w, tiled_w)):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2 * a.abs().max().item(), msg=str(i))


def test_bad_settings_are_one_line(tmp_path, tiny_llama, built_data):
    cfg = recipe(tiny_llama, built_data, tmp_path / "r", "long_cpt")
    cfg["parallel"] = {"offload_activations": True}
    with pytest.raises(ConfigError, match=r"^parallel.offload_activations: true needs model.gradient_check"):
        load_recipe(write(cfg, tmp_path / "a.yaml"))
    cfg["parallel"] = {"tiled_mlp": 0}
    with pytest.raises(ConfigError, match=r"^parallel.tiled_mlp: must be a positive number of chunks"):
        load_recipe(write(cfg, tmp_path / "b.yaml"))
    cfg["parallel"] = {"tiled_mlp": "many"}
    with pytest.raises(ConfigError, match=r"^parallel.tiled_mlp"):
        load_recipe(write(cfg, tmp_path / "c.yaml"))
    cfg["parallel"] = {"tiled_mlp": "auto"}
    assert load_recipe(write(cfg, tmp_path / "d.yaml")).parallel.tiled_mlp == "auto"


def test_savers_under_fsdp2_with_sequence_parallelism(tmp_path, tiny_llama, built_data, plain):
    """accelerate launch, FSDP2 on 2 CPU processes, the long stream split over both (Ulysses) with its
    checkpoints offloaded and its MLP tiled: the step's losses and gradient norm equal the plain one-process
    run's within the float tolerance of a split, tiled, bf16 step."""
    from .test_train import train_cli

    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "longred", steps=1)
    cfg["model"].update({"dtype": "bfloat16", "gradient_checkpointing": True})
    cfg["train"]["export"] = False
    cfg["parallel"] = {"sequence_parallel": 2, "offload_activations": True, "tiled_mlp": 4}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                os.path.join(ROOT, "recipes", "accelerate", "fsdp2.yaml"), "--num_processes", "2",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29571"]
    proc = train_cli(write(cfg, tmp_path / "r.yaml"), launcher=launcher,
                     env_extra={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpointed inputs offloaded to host and MLP in 4 sequence chunks" in proc.stderr
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        got = [json.loads(line) for line in f]
    want = plain[0]
    assert len(got) == len(want) == 1
    for key in ("loss", "loss/long/lm", "loss/short/hidden", "grad_norm"):
        assert got[0][key] == pytest.approx(want[0][key], rel=2e-2), key
