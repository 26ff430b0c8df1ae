"""Hub ids resolve through the Hugging Face cache, offline, for training, scripts/evaluate.py and
scripts/merge.py alike: a tiny model is put into a temporary hub cache under a fake repo id
(`distill.testing.fill_hub_cache`) and every tool is given the id with HF_HUB_OFFLINE=1."""

import json
import os
import subprocess
import sys

import pytest

from distill.testing import fill_hub_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = "tiny-org/tiny-llama"

# One process for every tool: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when imported, so they are
# set in its environment before anything imports it; each script runs through its own main().
CHECK = r"""
import importlib.util, json, os, sys
import torch
from distill.config import ModelConfig, RopeConfig
from distill.model.load import load_student, load_teacher
from transformers import AutoTokenizer

repo, local, out, short = sys.argv[1:5]

def script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.environ["PYTHONPATH"], "scripts",
                                                                       name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# Training: model.path as the trainer loads it (the student with its extended RoPE, the teacher, tokenizer).
cfg = ModelConfig(path=repo, dtype="float32")
student = load_student(cfg, RopeConfig(method="abf", theta=1.0e5, target_length=512))
teacher = load_teacher(None, cfg)
reference = load_teacher(None, ModelConfig(path=local, dtype="float32"))
same = all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), reference.state_dict().values()))
report = {"train_weights_equal": same and all(
    torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), reference.state_dict().values())),
    "train_theta": student.config.rope_parameters["rope_theta"],
    "tokenizer": len(AutoTokenizer.from_pretrained(repo))}
report["evaluate"] = script("evaluate").main([
    "--model", repo, "--teacher", repo, "--short-data", short, "--original-length", "128",
    "--max-rows", "2", "--passkey-samples", "0", "--out", os.path.join(out, "eval")])
report["merge"] = script("merge").main([
    "interpolate", "--original", repo, "--extended", local, "--alpha", "0.5", "--out",
    os.path.join(out, "merged"), "--quiet"])
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_llama):
    home = tmp_path_factory.mktemp("hf_home")
    fill_hub_cache(str(home / "hub"), REPO, tiny_llama)
    return home


def _offline(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2", "HF_HOME": str(home),
            "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1"}


def test_hub_id_resolves_offline_for_training_evaluate_and_merge(hub, tiny_llama, built_data, tmp_path):
    """On main, evaluate.py said "--teacher meta-llama/...: no such directory" and merge.py "not a model
    directory (no config.json)" for a hub id that training loads."""
    proc = subprocess.run([sys.executable, "-c", CHECK, REPO, tiny_llama, str(tmp_path), built_data["root"]],
                          capture_output=True, text=True, env=_offline(hub), cwd=tmp_path, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[0][len("REPORT "):])
    assert report["train_weights_equal"] and report["train_theta"] == 1.0e5 and report["tokenizer"] == 1000
    assert report["evaluate"] == 0 and report["merge"] == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert record["model"] == REPO and record["teacher"] == REPO  # recorded as given
    assert record["figures"]["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)  # the same model twice
    merged = tmp_path / "merged" / "alpha-0.5"
    # Both inputs are the same weights: the interpolation is that model again.
    from safetensors.torch import load_file

    want = load_file(os.path.join(tiny_llama, "model.safetensors"))
    got = load_file(merged / "model.safetensors")
    assert want.keys() == got.keys() and all((want[k] - got[k]).abs().max() < 1e-6 for k in want)
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()


@pytest.mark.parametrize("script, argv", [
    ("evaluate", ["--model", "tiny-org/not-cached", "--short-data", "."]),
    ("merge", ["interpolate", "--original", "tiny-org/not-cached", "--extended", "{local}", "--alpha", "0.5",
               "--out", "out", "--quiet"]),
])
def test_uncached_hub_id_offline_is_one_line(hub, tiny_llama, tmp_path, script, argv):
    argv = [a.format(local=tiny_llama) for a in argv]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"{script}.py"), *argv],
                          capture_output=True, text=True, env=_offline(hub), cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "tiny-org/not-cached" in lines[0] and "hub id" in lines[0]
    assert not (tmp_path / "out").exists()


def test_evaluate_attention_defaults_to_the_memory_safe_backend():
    """evaluate.py --attention defaulted to sdpa, whose packed-row mask is a dense T×T tensor per row (at
    128K: 16 GiB of booleans per row); the default is now auto: flash_attention_2 on CUDA with flash-attn,
    else the per-document sdpa_varlen."""
    import importlib.util

    from distill.model.load import resolve_attention

    path = os.path.join(ROOT, "scripts", "evaluate.py")
    spec = importlib.util.spec_from_file_location("evaluate_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(["--model", "m", "--short-data", "d"])
    assert args.attention == "auto"
    assert resolve_attention(args.attention, "cpu", "llama") == "sdpa_varlen"
