"""benchmarks/gpu_check.py runs end to end on a CPU with the flash-attn stand-in (tests/flash_standin), as it
will on a GPU: every part reports, a failing part does not stop the others, and the report is on disk after
each part."""

import json
import os
import subprocess
import sys

import pytest

from ..conftest import FLASH_STANDIN
from .test_train import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _run(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([FLASH_STANDIN, ROOT]), "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--out", str(out), *args], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    return printed


@pytest.mark.slow
@pytest.mark.bf16  # the flash path computes in bf16 (flash-attn takes fp16/bf16 only)
def test_every_part_runs_on_the_cpu_through_the_flash_path(tmp_path):
    report = _run(tmp_path, "--attention", "flash_attention_2", "--seq", "512", "--loss-tokens", "1024",
                  "--steps", "2")
    assert report["flash_attn"] is True
    for part in ("attention", "loss", "train", "layout", "zero3_precision", "sequence_parallel",
                 "restoration", "long_context_memory", "sharded_state"):
        assert report[part]["status"] == "ok", (part, report[part])
    kernels = report["attention"]["implementations"]
    assert kernels["flash_attention_2"]["layout"] == "one row + offsets"
    assert kernels["flash_attention_2"]["logit_rel_err"] < 0.05  # bf16 against the fp32 dense mask
    assert report["train"]["attention"] == "flash_attention_2" and report["layout"]["flattened"]
    assert report["sequence_parallel"]["sizes"]["2"]["loss_rel_diff_vs_one_process"] < 3e-2
    assert report["sequence_parallel"]["sizes"]["ring_2"]["loss_rel_diff_vs_one_process"] < 3e-2
    # Part 7: the shipped SmolLM2 recipes and spec (tiny overrides on a CPU), Long CPT and LongReD for the
    # same budget, then scripts/evaluate.py on both exports against the original.
    restoration = report["restoration"]
    assert restoration["long_cpt"]["tokens"] == restoration["longred"]["tokens"] > 0
    for method in ("long_cpt", "longred"):
        figures = restoration[method]
        for key in ("short_nll_gap", "long_nll_beyond", "passkey_accuracy/1024", "passkey_accuracy/2048",
                    "tokens_per_s"):
            assert key in figures, (method, key)
    assert "short_gap_recovered" in restoration
    memory = report["long_context_memory"]["sizes"]["8192"]
    assert memory["offload+tiled"]["measured_bytes"] < 0.6 * memory["plain"]["measured_bytes"]
    assert memory["offload"]["host_bytes"] == 8 * 8192 * 64 * 4  # every layer's fp32 input on the host


def test_a_failing_part_is_reported_and_the_rest_still_run(tmp_path):
    report = _run(tmp_path, "--part", "45", "--attention", "no_such_attention")
    assert report["layout"]["status"] == "failed" and "no_such_attention" in report["layout"]["error"]
    assert "\n" not in report["layout"]["error"]
    assert report["zero3_precision"]["status"] == "ok"
    assert "attention" not in report and "train" not in report


def test_the_sharded_load_and_dcp_checkpoint_part_runs_on_the_cpu(tmp_path):
    """Part 9 at --sharded-size tiny (a CPU's default): the same calls as on CUDA, gloo instead of NCCL."""
    report = _run(tmp_path, "--part", "9")
    part = report["sharded_state"]
    assert part["status"] == "ok", part
    assert part["backend"] == "gloo" and part["parameters"] > 1e6
    assert part["sharded_equals_whole"] and part["inv_freq_rebuilt"]
    assert part["reloaded_weights_bit_equal"] and part["reloaded_adamw_bit_equal"]
    assert part["dcp_save"]["files"] == ["model/.metadata", "model/__0_0.distcp", "optimizer/.metadata",
                                         "optimizer/__0_0.distcp"]
    # fp32 weights + AdamW's two moments: 12 bytes a parameter (plus metadata and the 0-dim steps)
    assert 12 * part["parameters"] <= part["dcp_save"]["bytes_written"] < 13 * part["parameters"]
    for step in ("sharded_load", "whole_load", "dcp_save", "dcp_load"):
        figures = part[step]
        assert figures["seconds"] > 0 and figures["peak_host_rss_mb"] > 0, (step, figures)
        assert figures["host_rss_added_mb"] >= 0 and figures["max_memory_allocated_mb"] is None
    assert "attention" not in report and "zero3_precision" not in report
