"""The planner's long-context terms against measurement on the CPU (saved-tensor accounting of the trainer's
own step, as tests/integration/test_plan.py calibrates the rest; host buffers for offloading), and what it
answers for Llama-3-8B: --max-context, the 1M and 2M recipes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

from distill.config import load_recipe
from distill.parallel import memory
from distill.plan import (
    GiB,
    Shape,
    mlp_bytes,
    offloaded_host_bytes,
    plan,
    recipe_seq_lens,
    saved_forward_bytes,
    student_activation_bytes,
)
from distill.train.spans import SavedTensorBytes

from .test_plan import LLAMA3_8B
from .test_train import ROOT, recipe, write


def _run(tmp_path, tiny_llama, built_data, name, checkpointing, **parallel):
    from distill.train.loop import run

    cfg = recipe(tiny_llama, built_data, tmp_path / name, "longred", steps=1)
    cfg["model"].update({"dtype": "bfloat16", "gradient_checkpointing": checkpointing})
    cfg["train"]["export"] = False
    cfg["parallel"] = parallel
    recipe_cfg = load_recipe(write(cfg, tmp_path / f"{name}.yaml"))
    recorder = SavedTensorBytes()
    assert run(recipe_cfg, spans=recorder) == 0
    return recipe_cfg, recorder


def test_tiled_mlp_terms_match_saved_tensors(tmp_path, tiny_llama, built_data):
    """parallel.tiled_mlp: 4 without checkpointing: what the long stream's forward saves (the MLPs'
    intermediates gone) and what one chunk's recompute saves in backward (the MLP's share / 4), each within
    ±15% of the planner; the other streams keep the untiled figure."""
    chunk_bytes = []
    original = memory.TiledMLP.backward

    def counted(ctx, grad_out):
        seen = []

        def pack(t):
            seen.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = original(ctx, grad_out)
        chunk_bytes.append(sum(seen) / ctx.chunks)
        return out

    memory.TiledMLP.backward = staticmethod(counted)
    try:
        cfg, recorder = _run(tmp_path, tiny_llama, built_data, "tiled", False, tiled_mlp=4)
    finally:
        memory.TiledMLP.backward = staticmethod(original)
    shape = Shape.from_config(AutoConfig.from_pretrained(tiny_llama))
    seq = recipe_seq_lens(cfg)
    for name, measured in recorder.bytes.items():
        tokens = cfg.streams[name].micro_batch * seq[name]
        predicted = saved_forward_bytes(shape, tokens, "autocast", False, 4 if name == "long" else 1)
        for got in measured:
            assert abs(predicted / got - 1) <= 0.15, (name, predicted, got)
    untiled = saved_forward_bytes(shape, 1024, "autocast", False)
    assert recorder.bytes["long"][0] < 0.8 * untiled  # the MLP's intermediates are a real share
    assert len(chunk_bytes) == shape.layers
    predicted = 1024 * mlp_bytes(shape, "autocast") / 4
    for got in chunk_bytes:
        assert abs(predicted / got - 1) <= 0.15, (predicted, got)


def test_offload_terms_match_saved_tensors_and_host_buffers(tmp_path, tiny_llama, built_data):
    """parallel.offload_activations with checkpointing: what stays saved on the device for the long stream
    (the embeddings and final norm, no layer inputs) and the host buffers' peak (every layer's input), each
    within ±15% of the planner."""
    memory.OFFLOAD.peak_host_bytes = 0
    cfg, recorder = _run(tmp_path, tiny_llama, built_data, "offload", True, offload_activations=True)
    shape = Shape.from_config(AutoConfig.from_pretrained(tiny_llama))
    seq = recipe_seq_lens(cfg)
    for name, measured in recorder.bytes.items():
        tokens = cfg.streams[name].micro_batch * seq[name]
        predicted = saved_forward_bytes(shape, tokens, "autocast", True, offload=name == "long")
        for got in measured:
            assert abs(predicted / got - 1) <= 0.15, (name, predicted, got)
    host = offloaded_host_bytes(shape, 1024, "autocast")
    assert abs(host / memory.OFFLOAD.peak_host_bytes - 1) <= 0.15, (host, memory.OFFLOAD.peak_host_bytes)


def _llama3(tmp_path, name, *overrides):
    model = tmp_path / "llama3-8b"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    path = os.path.join(ROOT, "recipes", "llama3-8b", f"{name}.yaml")
    return path, load_recipe(path, [f"model.path={model}", *overrides]), model


def test_savers_lower_the_llama3_8b_peak(tmp_path):
    """At 512K with S = 8 on 8 x H100: each saver lowers the long stream's activations, offload by the
    checkpointed residual (32 layers x 64K tokens x 4096 x 2 bytes = 16 GiB, which the host then holds),
    tiled MLP by the recomputed layer's intermediates; ring attention costs its K/V blocks (and its dK/dV
    accumulators) on top of Ulysses."""
    _, cfg, _ = _llama3(tmp_path, "longred-512k-abf-sp8")
    shape = Shape.from_config(AutoConfig.for_model(**LLAMA3_8B))
    seq = recipe_seq_lens(cfg)
    runs = {(off, n): plan(cfg, shape, "fsdp2", 8, int(79.1 * GiB), seq, None, 8, offload=off, mlp_chunks=n)
            for off in (False, True) for n in (1, 14)}
    long = {k: r["streams"]["long"]["activations"] for k, r in runs.items()}
    tokens = 524288 // 8
    # 32 layer inputs leave, 2 are back in flight; the embeddings' output (2H bf16) leaves with layer 0's
    moved = (32 - 2) * tokens * 4096 * 2 + tokens * 2 * 4096
    assert long[(True, 1)] == pytest.approx(long[(False, 1)] - moved)
    assert runs[(True, 1)]["offloaded_host_bytes_per_rank"] == 32 * tokens * 4096 * 2 == 16 * GiB
    assert runs[(False, 1)]["offloaded_host_bytes_per_rank"] == 0
    tiled = tokens * (8 * 14336 - mlp_bytes(shape, "bf16") / 14)
    assert long[(False, 14)] == pytest.approx(long[(False, 1)] - tiled)
    assert long[(True, 14)] < long[(True, 1)] < long[(False, 1)]
    ring = plan(cfg, shape, "fsdp2", 8, int(79.1 * GiB), seq, None, 8, sp_mode="ring")
    blocks = 2 * (2 * tokens * 8 * 128) * 2 + 2 * (2 * tokens * 8 * 128) * 4  # bf16 K/V, fp32 dK/dV: pairs
    assert ring["streams"]["long"]["activations"] == long[(False, 1)] + blocks
    assert student_activation_bytes(shape, tokens, "bf16", True) == long[(False, 1)]


def test_max_context_for_llama3_8b_reaches_2m(tmp_path):
    """scripts/plan.py --max-context --json for Llama-3-8B LongReD on 8 x H100 (FSDP2) on nodes of 1 TiB: at
    least 2M tokens with offloaded checkpoints and a tiled MLP (the 2M recipe), under 1M without them."""
    path, _, model = _llama3(tmp_path, "longred-2m-abf-sp8")
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, os.path.join(ROOT, "scripts", "plan.py"), path, f"model.path={model}"]
    flags = ["--accelerate-config", "recipes/accelerate/fsdp2.yaml", "--max-context", "--json", "--host-ram",
             "1TiB"]
    proc = subprocess.run(command + flags, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["max_context"] >= 2 * 1024 * 1024, result["max_context"]
    assert result["fits"] and result["max_context_sequence_parallel"] == 8
    assert result["savers"] == {"offload_activations": True, "tiled_mlp": 14,
                                "sequence_parallel_mode": "ulysses"}
    plain = subprocess.run(command + ["parallel.offload_activations=false", "parallel.tiled_mlp=1"] + flags,
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["max_context"] < 1024 * 1024
