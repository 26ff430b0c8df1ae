"""Hybrid sharding (HSDP, `parallel.replicate`) and sharded checkpoints across world sizes, on gloo.

One LongReD recipe of the tiny model, trained:
- on one process (the reference);
- on 4 processes as a 2 x 2 mesh (`parallel.replicate: 2`: shards within pairs of ranks, replicas across);
- as two "nodes" of 2 processes each, `accelerate launch --num_machines 2 --machine_rank R` on this host, the
  way scripts/slurm/train.sbatch launches nodes, with the replicas across the nodes;
and the 4-process run's sharded checkpoint is resumed on 2 processes (flat FSDP2: the DCP files reshard).
Every run's loss per step equals the reference's within 1e-4, and its weights within 1e-5.
"""

import os
import shutil
import subprocess
import sys

import pytest

from distill.testing import checkpoint_weights
from distill.train.metrics import read_metrics

from .test_train import ROOT, recipe, write

STEPS = 3
FSDP2 = os.path.join(ROOT, "recipes", "accelerate", "fsdp2.yaml")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}


def _command(recipe_path: str, processes: int, port: int, *overrides: str, machines: int = 1,
             rank: int = 0) -> list[str]:
    nodes = ["--num_machines", str(machines), "--machine_rank", str(rank), "--main_process_ip",
             "127.0.0.1"] if machines > 1 else []
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2, "--num_processes",
            str(processes), *nodes, "--main_process_port", str(port), "-m", "distill.train", recipe_path,
            *overrides]


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, built_data):
    from distill.train import loop as train

    root = tmp_path_factory.mktemp("hsdp")
    cfg = recipe(tiny_llama, built_data, root / "one", "longred", steps=STEPS)
    cfg["train"].update({"save_every": 1, "keep_last": 5, "export": True})
    path = write(cfg, root / "r.yaml")
    assert train.main([path]) == 0
    hybrid = subprocess.run(_command(path, 4, 29571, f"run.output_dir={root / 'hybrid'}",
                                     "parallel.replicate=2"),
                            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    _check(hybrid)
    nodes = [subprocess.Popen(_command(path, 4, 29572, f"run.output_dir={root / 'nodes'}",
                                       "parallel.replicate=2", machines=2, rank=rank),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
             for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, out[-2000:] + err[-4000:]
    resumed = root / "resumed"
    shutil.copytree(root / "hybrid", resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    two = subprocess.run(_command(path, 2, 29573, f"run.output_dir={resumed}"), capture_output=True,
                         text=True, env=_env(), cwd=ROOT, timeout=600)
    _check(two)
    return {"one": root / "one", "hybrid": root / "hybrid", "nodes": root / "nodes", "resumed": resumed,
            "hybrid_log": hybrid.stderr + hybrid.stdout, "resumed_log": two.stderr + two.stdout}


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


def _weights(run) -> dict:
    return checkpoint_weights(str(run / "checkpoints" / f"step-{STEPS}"))


def _assert_same_training(run, reference) -> None:
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-4)
    got, want = _weights(run), _weights(reference)
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5


@pytest.mark.slow
def test_hybrid_sharding_2x2_equals_one_process(runs):
    assert "FSDP2 hybrid (HSDP): student sharded over groups of 2 processes and replicated 2 times" in \
        runs["hybrid_log"]
    # The models were built on the meta device: after `to_empty` RoPE's inv_freq (in no file) was rebuilt
    # from the recipe, which the start-up check compares with our own RoPE math (it stops the run if not).
    assert "sharded load: each rank read its part of" in runs["hybrid_log"]
    assert "rope: inv_freq matches our formulas" in runs["hybrid_log"]
    _assert_same_training(runs["hybrid"], runs["one"])
    step = runs["hybrid"] / "checkpoints" / f"step-{STEPS}"
    shards = sorted(os.listdir(step / "model"))
    assert shards == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]  # every rank wrote its part


@pytest.mark.slow
def test_two_nodes_on_one_host_equal_one_process(runs):
    _assert_same_training(runs["nodes"], runs["one"])


@pytest.mark.slow
def test_a_four_process_checkpoint_resumes_on_two(runs):
    assert "saved on 4 processes, now 2" in runs["resumed_log"]
    _assert_same_training(runs["resumed"], runs["one"])
    assert [r["step"] for r in read_metrics(runs["resumed"] / "metrics.jsonl")] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_the_sharded_export_streams_the_model_one_process_exports(runs):
    """The HSDP run's export (gathered one tensor at a time, written shard by shard by rank 0) is the model
    the one-process run exports from its whole state dict."""
    import json

    from safetensors.torch import load_file

    got = load_file(str(runs["hybrid"] / "final" / "model.safetensors"))
    want = load_file(str(runs["one"] / "final" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5
    configs = [json.loads((runs[r] / "final" / "config.json").read_text()) for r in ("hybrid", "one")]
    assert configs[0] == configs[1]
