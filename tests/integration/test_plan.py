"""The memory planner: parameter counts from config.json, activation bytes calibrated against saved-tensor
accounting of the trainer's own student forward (±15%), state bytes, and the command line."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from distill.config import ConfigError, load_recipe
from distill.plan import (
    GiB,
    Shape,
    cosine_loss_bytes,
    host_bytes,
    memory_problem,
    plan,
    plan_with_sequence_parallel,
    recipe_seq_lens,
    saved_forward_bytes,
)
from distill.testing import tiny_config
from distill.train.spans import SavedTensorBytes
from distill.train.step import StreamObjectives

from .test_train import ROOT, recipe, write

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
"""Meta-Llama-3-8B's config.json (the values the planner reads)."""


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("mistral", False),
                                        ("qwen2", False)])
def test_parameter_count_from_the_config_alone(arch, tied):
    config = tiny_config(arch, vocab_size=300, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                         intermediate_size=100)
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config)
    shape = Shape.from_config(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())


def test_llama3_8b_counts():
    shape = Shape.from_config(AutoConfig.for_model(**LLAMA3_8B))
    assert shape.params == 8_030_261_248  # Meta-Llama-3-8B


@pytest.mark.parametrize("dtype, checkpointing", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_activation_estimate_matches_saved_tensors(tmp_path, tiny_llama, built_data, dtype, checkpointing):
    """Predicted student activations per micro-batch within ±15% of what the trainer's forward saves."""
    from distill.train.loop import run

    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "longred", steps=1)
    cfg["model"].update({"dtype": dtype, "gradient_checkpointing": checkpointing})
    cfg["train"]["export"] = False
    recipe_cfg = load_recipe(write(cfg, tmp_path / "r.yaml"))
    recorder = SavedTensorBytes()
    assert run(recipe_cfg, spans=recorder) == 0
    shape = Shape.from_config(AutoConfig.from_pretrained(tiny_llama))
    regime = "autocast" if dtype == "bfloat16" else "fp32"
    seq_lens = recipe_seq_lens(recipe_cfg)
    assert set(recorder.bytes) == {"long", "short", "s2l"}
    for name, measured in recorder.bytes.items():
        tokens = recipe_cfg.streams[name].micro_batch * seq_lens[name]
        predicted = saved_forward_bytes(shape, tokens, regime, checkpointing)
        for got in measured:
            assert abs(predicted / got - 1) <= 0.15, (name, predicted, got)


def test_cosine_loss_estimate_matches_saved_tensors(tmp_path, tiny_llama, built_data):
    """What the hidden-state cosine saves for backward (fp32 copies of both sides' states at the loss-bearing
    tokens) within ±15% of the planner's 8 bytes per token per hidden unit per state."""
    from distill.train.loop import run

    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "longred", steps=1)
    cfg["model"]["dtype"] = "bfloat16"
    cfg["streams"]["short"]["objectives"].pop("kl")
    cfg["train"]["export"] = False
    recipe_cfg = load_recipe(write(cfg, tmp_path / "r.yaml"))
    recorder = SavedTensorBytes()
    real_tokens = {}  # the loss-bearing tokens of each micro-batch (the planner counts every slot: a bound)
    original = StreamObjectives.losses

    def losses(self, strategy, batch, *args, **kwargs):
        real_tokens.setdefault(self.name, []).append(int(batch["real"].sum()))
        return original(self, strategy, batch, *args, **kwargs)

    StreamObjectives.losses = losses
    try:
        assert run(recipe_cfg, spans=recorder) == 0
    finally:
        StreamObjectives.losses = original
    shape = Shape.from_config(AutoConfig.from_pretrained(tiny_llama))
    seq_lens = recipe_seq_lens(recipe_cfg)
    for name, states in (("short", 2), ("s2l", 1)):  # layers [1, last] and [last]
        slots = recipe_cfg.streams[name].micro_batch * seq_lens[name]
        assert len(recorder.loss_bytes[name]) == len(real_tokens[name]) > 0
        for got, real in zip(recorder.loss_bytes[name], real_tokens[name]):
            predicted = cosine_loss_bytes(shape, real, states)
            assert abs(predicted / got - 1) <= 0.15, (name, predicted, got)
            assert got <= 1.15 * cosine_loss_bytes(shape, slots, states)  # what the plan counts: all slots


HOST_PROBE = """
import gc, json, sys
from distill.config import ModelConfig, RopeConfig
from distill.model.load import load_student, load_teacher

def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

path, warm = sys.argv[1], sys.argv[2]
rope = RopeConfig(method="abf", theta=1e5, target_length=1024)
# Warm up on a small model: every module the loaders touch is imported before the measurement.
load_student(ModelConfig(path=warm, dtype="float32"), rope)
load_teacher(warm, ModelConfig(path=warm, dtype="bfloat16"))
gc.collect()
base = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
student = load_student(ModelConfig(path=path, dtype="float32"), rope)  # as a sharded run loads on the host
teacher = load_teacher(path, ModelConfig(path=path, dtype="bfloat16"))
print(json.dumps({"peak": kib("VmHWM") - base}))
"""


def test_host_memory_estimate_matches_peak_rss(tmp_path, tiny_llama, tokenizer_dir):
    """Every rank holds the fp32 student and the bf16 teacher on the host before the strategy lays them out:
    the planner's host bytes per rank within ±15% of the peak RSS that loading adds (a ~39M-parameter Llama,
    big enough that the models dwarf the allocator's noise)."""
    from distill.testing import make_tiny_model

    model = make_tiny_model(str(tmp_path / "model"), "llama", vocab_size=8000, hidden_size=512, num_layers=8,
                            num_heads=8, num_kv_heads=2)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", HOST_PROBE, model, tiny_llama], capture_output=True,
                          text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    shape = Shape.from_config(AutoConfig.from_pretrained(model))
    predicted = host_bytes(shape, shape, 2)
    assert shape.params > 30_000_000
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)
    # One process on this machine: the set-up's peak on its device is the same two whole models.
    from distill.plan import setup_bytes

    assert setup_bytes(shape, shape, "replicated", 1, 2) == predicted


def test_set_up_fits_where_training_does(tmp_path):
    """The set-up's GPU peak (shards plus one unit in flight; no gradients or optimiser yet) stays below the
    training peak for the 8B recipes, and the host memory per node is reported: a rank loads only its shard
    of the fp32 student and the bf16 teacher (6 bytes x 8.03B / 8), not whole models."""
    for name in ("longred-32k-abf", "longred-128k-abf"):
        cfg, shape = _llama3_recipe(tmp_path, name)
        for mode in ("fsdp2", "zero3"):
            result = plan(cfg, shape, mode, 8, 80 * GiB, recipe_seq_lens(cfg))
            assert result["setup_peak_bytes"] < result["peak_bytes"]
            assert result["host_bytes_per_node"] == 8 * result["host_bytes_per_rank"]
            assert result["host"]["per_rank"]["load"] >= 6 * shape.params / 8
            assert result["host_bytes_per_rank"] < (8 if mode == "fsdp2" else 10) * GiB
            assert result["checkpoint_bytes"] == 12 * shape.params  # fp32 weights + AdamW: ~96 GB


def test_collective_timeout_follows_the_step_and_one_ranks_write_not_the_model_size(tmp_path):
    """3 x the longer of one step (the budget's, at MFU 0.4) and one rank's share of the checkpoint written at
    parallel.checkpoint_write_gb_per_s, at least 10 minutes; parallel.collective_timeout_s wins."""
    from distill.plan import collective_timeout, collective_timeout_s, run_budget

    cfg, shape = _llama3_recipe(tmp_path, "longred-32k-abf")
    seq = recipe_seq_lens(cfg)
    sharded = collective_timeout(cfg, shape, None, "fsdp2", 8, seq, 989)
    assert sharded["write_s"] == pytest.approx(12 * shape.params / 8 / 0.2e9)  # ~60 s: 12 GB a rank
    assert sharded["step_s"] == pytest.approx(run_budget(cfg, shape, None, 8, seq, 0.4, 989)["step_s"])
    assert sharded["seconds"] == 600 and "one step" in sharded["reason"]  # 3 x 60 s, raised to the floor
    assert collective_timeout(cfg, shape, None, "replicated", 8, seq, 989)["write_s"] == pytest.approx(
        8 * sharded["write_s"])  # rank 0 writes it all
    assert collective_timeout(cfg, shape, None, "fsdp2", 8, seq, None)["step_s"] is None  # unknown peak
    slow, _ = _llama3_recipe(tmp_path, "longred-32k-abf", **{"parallel.checkpoint_write_gb_per_s": 0.01})
    assert collective_timeout(slow, shape, None, "zero3", 8, seq, 989)["seconds"] == pytest.approx(
        3 * 12 * shape.params / 8 / 0.01e9)  # ~20 min
    fixed, _ = _llama3_recipe(tmp_path, "longred-32k-abf", **{"parallel.collective_timeout_s": 90})
    assert collective_timeout(fixed, shape, None, "fsdp2", 8, seq, 989)["seconds"] == 90
    # 70B on 32 ranks: each writes 26 GB; the old rule (rank 0 writing 847 GB, twice) gave 8,466 s.
    seventy = Shape(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8, head_dim=128,
                    vocab=128256, tied=False)
    big = collective_timeout(cfg, seventy, None, "fsdp2", 32, seq, 989)
    assert big["seconds"] == 600 and 100 < big["write_s"] < 160 and 60 < big["step_s"] < 150
    assert collective_timeout_s(None, 250.0) == 750 and collective_timeout_s(300.0, 10.0) == 900


def test_state_bytes_match_the_live_objects(tmp_path, tiny_llama, built_data):
    from distill.train.loop import run

    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "long_cpt", steps=1)
    cfg["train"]["export"] = False
    code, live = run(load_recipe(write(cfg, tmp_path / "r.yaml")), return_state=True)
    assert code == 0
    student, optimizer = live["student"], live["optimizer"]
    weights = sum(p.numel() * p.element_size() for p in student.parameters())
    # one gradient (freed after the step) + AdamW's two moments, fp32 like the weights
    grads_and_moments = 4 * weights
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
                  if k in ("exp_avg", "exp_avg_sq"))
    shape = Shape.from_config(AutoConfig.from_pretrained(tiny_llama))
    seq = recipe_seq_lens(load_recipe(write(cfg, tmp_path / "r.yaml")))
    planned = plan(load_recipe(write(cfg, tmp_path / "r.yaml")), shape, "replicated", 1, 10 * GiB,
                   seq)["breakdown"]
    assert planned["student_weights"] == weights
    assert planned["optimizer_state"] == moments
    assert (planned["student_weights"] + planned["student_gradients"] + planned["optimizer_state"]
            == grads_and_moments)


def _llama3_recipe(tmp_path, name: str, **overrides) -> object:
    model = tmp_path / "llama3-8b"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    lens = {"long": 131072 if "128k" in name else 32768, "short": 1024, "s2l": 8192}
    cfg = load_recipe(os.path.join(ROOT, "recipes", "llama3-8b", f"{name}.yaml"),
                      [f"model.path={model}"] + [f"streams.{s}.seq_len={n}" for s, n in lens.items()
                                                 if s in ("long",) or "longred" in name or "mix" in name]
                      + [f"{k}={v}" for k, v in overrides.items()])
    return cfg, Shape.from_config(AutoConfig.for_model(**LLAMA3_8B))


def test_what_fits_for_llama3_8b(tmp_path):
    """DDP never fits a 7-8B model (16 bytes per parameter before activations); FSDP2 fits LongReD 32K on
    8 x H100; 128K needs an H200 or sequence parallelism."""
    cfg, shape = _llama3_recipe(tmp_path, "longred-32k-abf")
    seq = recipe_seq_lens(cfg)
    h100, h200 = 79.1 * GiB, 139.8 * GiB
    ddp = plan(cfg, shape, "replicated", 8, h100, seq)
    assert not ddp["fits"] and (ddp["breakdown"]["student_weights"] + ddp["breakdown"]["optimizer_state"]
                                > 80 * GiB)
    fsdp = plan_with_sequence_parallel(cfg, shape, "fsdp2", 8, h100, seq)
    assert fsdp["fits"] and fsdp["min_sequence_parallel"] == 1 and 40 * GiB < fsdp["peak_bytes"] < 65 * GiB
    cfg128, _ = _llama3_recipe(tmp_path, "longred-128k-abf")
    seq128 = recipe_seq_lens(cfg128)
    on_h100 = plan_with_sequence_parallel(cfg128, shape, "fsdp2", 8, h100, seq128)
    assert not on_h100["fits"] and on_h100["min_sequence_parallel"] == 2
    assert plan(cfg128, shape, "fsdp2", 8, h200, seq128)["fits"]
    line = memory_problem(cfg128, shape, None, "fsdp2", 8, h100, seq128, "NVIDIA H100 80GB HBM3")
    assert line.startswith("the run needs ~") and "NVIDIA H100 80GB HBM3 has 79.1 GiB" in line
    assert "parallel.skip_memory_check: true" in line and "sequence parallelism over 2 ranks" in line
    assert memory_problem(cfg128, shape, None, "fsdp2", 8, h200, seq128) is None


def test_row_lengths_come_from_data_or_recipe(tmp_path, tiny_llama, built_data):
    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "longred")
    assert recipe_seq_lens(load_recipe(write(cfg, tmp_path / "a.yaml"))) == {"long": 1024, "short": 256,
                                                                              "s2l": 256}
    cfg["streams"]["short"]["seq_len"] = 512
    with pytest.raises(ConfigError, match=r"streams.short.seq_len: 512, but .* was built with rows of 256"):
        recipe_seq_lens(load_recipe(write(cfg, tmp_path / "b.yaml")))
    cfg["streams"]["short"]["data"] = str(tmp_path / "not-built")
    cfg["streams"]["short"]["seq_len"] = None
    with pytest.raises(ConfigError, match=r"streams.short.seq_len: the data .* is not built yet"):
        recipe_seq_lens(load_recipe(write(cfg, tmp_path / "c.yaml")))


def test_plan_command_line(tmp_path):
    model = tmp_path / "llama3-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    args = [sys.executable, os.path.join(ROOT, "scripts", "plan.py"),
            "recipes/llama3-8b/longred-32k-abf.yaml", f"model.path={model}", "streams.long.seq_len=32768",
            "streams.short.seq_len=1024", "streams.s2l.seq_len=8192", "--accelerate-config",
            "recipes/accelerate/fsdp2.yaml"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([*args, "--json", "--gpu", "h200-141gb"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"peak_bytes", "fits", "min_sequence_parallel", "breakdown"} <= set(result)
    assert result["fits"] and result["mode"] == "fsdp2" and result["world"] == 8
    assert {"student_weights", "optimizer_state", "teacher_weights", "overhead"} <= set(result["breakdown"])
    text = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert text.returncode == 0 and "peak" in text.stdout and "fits" in text.stdout
    bad = subprocess.run([*args, "--gpu", "h1000"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120, check=False)
    assert (bad.returncode == 2 and bad.stderr.startswith("error: --gpu 'h1000'")
            and "Traceback" not in bad.stderr)
