"""ZeRO-3 computes in the recipe's dtype on a GPU.

DeepSpeed's engine forward (`autocast_if_enabled`, deepspeed/runtime/torch_autocast.py) switches OFF an outer
autocast that `torch.is_autocast_enabled()` reports (CUDA's, on a GPU) unless the config has a
`torch_autocast` section. On a CPU that no-argument call reads CUDA's state, so the trainer's CPU autocast
passes through untouched and CPU tests never saw it. Here a one-process engine runs its forward under an
outer autocast with that call answering for the CPU, as it answers for CUDA on a GPU: without the section
(the config we used to generate) the student computes in fp32; with it, in bf16, and gradients are still
communicated in fp32.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = r"""
import json, os, sys
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from distill.config import OptimConfig
from distill.optim.optimizer import make_optimizer
from distill.parallel import zero3
from distill.testing import tiny_config

dist.init_process_group("gloo", rank=0, world_size=1)
outer = torch.is_autocast_enabled
torch.is_autocast_enabled = lambda *a: outer(*a) if a else outer("cpu")  # as CUDA's state reads on a GPU
result = {}
for name, dtype in (("none", None), ("bf16", torch.bfloat16)):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=64, hidden_size=32, num_layers=1,
                                                         num_heads=2, num_kv_heads=1), dtype=torch.float32)
    optimizer = make_optimizer(model, OptimConfig(), sharded=True)
    engine = zero3.wrap_student(model, optimizer, 1.0, persistence_threshold=0, autocast=dtype)
    seen = {}
    proj = engine.module.model.layers[0].mlp.up_proj
    proj.register_forward_hook(lambda m, a, out: seen.update(dtype=str(out.dtype),
                                                              inside=torch.is_autocast_enabled("cpu")))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's autocast around the forward
        out = engine(input_ids=torch.randint(0, 64, (1, 8)), use_cache=False)
    from deepspeed.runtime.torch_autocast import get_all_comm_dtypes
    result[name] = {**seen, "engine_autocast": engine.torch_autocast_enabled(),
                    "comm_dtypes": sorted(str(d) for d in get_all_comm_dtypes(engine.module.parameters()))}
print(json.dumps(result))
"""


@pytest.mark.slow
def test_zero3_student_computes_in_the_recipe_dtype():
    pytest.importorskip("deepspeed", reason="ZeRO-3 needs deepspeed (pip install --no-build-isolation "
                                            "deepspeed)")
    env = {**os.environ, "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29571", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Without a torch_autocast section the engine switched the outer autocast off: fp32 on a GPU.
    assert result["none"] == {"dtype": "torch.float32", "inside": False, "engine_autocast": False,
                              "comm_dtypes": ["torch.float32"]}
    # With it, the student computes in bf16 inside the engine; gradients still travel in fp32.
    assert result["bf16"] == {"dtype": "torch.bfloat16", "inside": True, "engine_autocast": True,
                              "comm_dtypes": ["torch.float32"]}


def test_ds_config_carries_the_compute_dtype():
    import torch

    from distill.parallel.zero3 import ds_config

    assert "torch_autocast" not in ds_config(1.0)
    assert "torch_autocast" not in ds_config(1.0, autocast=torch.float32)
    assert ds_config(1.0, autocast=torch.bfloat16)["torch_autocast"] == {
        "enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds_config(1.0, autocast=torch.float16)["torch_autocast"]["dtype"] == "float16"


CACHE_WORKER = r"""
import json
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from distill.config import OptimConfig
from distill.optim.optimizer import make_optimizer
from distill.parallel import zero3
from distill.testing import tiny_config
from distill.train.loop import _autocast

dist.init_process_group("gloo", rank=0, world_size=1)
outer = torch.is_autocast_enabled
torch.is_autocast_enabled = lambda *a: outer(*a) if a else outer("cpu")  # as CUDA's state reads on a GPU
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(tiny_config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                                     num_kv_heads=1), dtype=torch.float32)
optimizer = make_optimizer(model, OptimConfig(), sharded=True)
engine = zero3.wrap_student(model, optimizer, 1.0, persistence_threshold=0, autocast=torch.bfloat16)
seen = []
for layer in engine.module.model.layers:
    layer.mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append(
        {"dtype": str(out.dtype), "autocast": torch.is_autocast_enabled("cpu"),
         "cache": torch.is_autocast_cache_enabled()}))
ids = torch.randint(0, 64, (1, 8))
result = {}
for mode in ("zero3", "fsdp2", "replicated"):
    seen.clear()
    with _autocast(torch.device("cpu"), torch.bfloat16, mode)():  # the context the loop builds for `mode`
        logits = engine(input_ids=ids, use_cache=False).logits
    result[mode] = {"hooks": list(seen), "logits": logits.float().sum().item(),
                    "cache_after": torch.is_autocast_cache_enabled()}
print(json.dumps(result))
"""


@pytest.mark.slow
def test_zero3_autocast_keeps_no_weight_copies():
    """Autocast caches a bf16 cast of every fp32 weight it touches until its region ends; under ZeRO-3 each
    cast is of the gathered full weight, so the cache held a whole bf16 model on every GPU. The loop's
    context for ZeRO-3 turns the cache off, and it stays off inside DeepSpeed's own autocast region (the
    engine's `torch_autocast` re-enters autocast, inheriting the cache setting); the other modes keep it.
    The logits are the same either way (a cast is a cast)."""
    pytest.importorskip("deepspeed", reason="ZeRO-3 needs deepspeed")
    env = {**os.environ, "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29572", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CACHE_WORKER], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["zero3"]["hooks"] == [{"dtype": "torch.bfloat16", "autocast": True, "cache": False}] * 2
    for mode in ("fsdp2", "replicated"):
        assert result[mode]["hooks"] == [{"dtype": "torch.bfloat16", "autocast": True, "cache": True}] * 2
    assert result["zero3"]["logits"] == result["fsdp2"]["logits"]
    assert all(r["cache_after"] for r in result.values())  # the process-wide setting is restored
