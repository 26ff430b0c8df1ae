"""The planner's ring-attention terms against measurement on the CPU: 2 processes (gloo), the long stream's
packed 1024-token row split with `parallel.sequence_parallel_mode: ring` over S = 2, bf16 autocast; and what
the planner answers for a model whose heads Ulysses cannot split."""

import json
import os
import subprocess
import sys

from transformers import AutoConfig

from distill.config import load_recipe
from distill.plan import (
    Shape,
    plan,
    recipe_seq_lens,
    residual_bytes,
    ring_blocks_bytes,
    saved_forward_bytes,
    sequence_parallel_problem,
)

from .test_train import ROOT, recipe, write


def test_ring_terms_match_saved_tensors_and_blocks_in_flight(tmp_path, tiny_llama, built_data):
    """Per rank: what the long stream's student forward saves for backward (T/S tokens) within ±15% of the
    planner, and the peak of the key/value blocks (and, in backward, the dK/dV accumulators) the ring holds
    in flight inside one attention call within ±15% of `ring_blocks_bytes`; the planner's long-stream
    activations are their sum."""
    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "long_cpt", steps=1)
    cfg["model"]["dtype"] = "bfloat16"
    cfg["mix"]["tokens_per_step"] = 1024  # one row: one micro-batch over the group of 2
    cfg["train"]["export"] = False
    cfg["parallel"] = {"sequence_parallel": 2, "sequence_parallel_mode": "ring"}
    path = write(cfg, tmp_path / "ring.yaml")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "ACCELERATE_USE_CPU": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "measured"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(ROOT, "recipes", "accelerate", "fsdp2.yaml"), "--num_processes", "2",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29681",
           os.path.join(ROOT, "tests", "integration", "ring_plan_worker.py"), path, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    recipe_cfg = load_recipe(path)
    shape = Shape.from_config(AutoConfig.from_pretrained(tiny_llama))
    seq = recipe_seq_lens(recipe_cfg)
    tokens = seq["long"] // 2
    saved = saved_forward_bytes(shape, tokens, "autocast", False)
    # Under autocast the keys leave RoPE in the fp32 residual's dtype (and stacking promotes the values):
    # the blocks travel in fp32, as `residual_bytes` has it; the dK/dV accumulators are fp32 in any regime.
    blocks = ring_blocks_bytes(shape, tokens, residual_bytes("autocast"))
    key_values = 2 * (2 * tokens * shape.kv_heads * shape.head_dim) * residual_bytes("autocast")
    planned = plan(recipe_cfg, shape, "fsdp2", 2, 2**40, seq, sequence_parallel=2, on_gpu=False)
    assert planned["savers"]["sequence_parallel_mode"] == "ring"
    assert planned["streams"]["long"]["activations"] == int(saved + blocks)
    for measured in ranks:
        assert measured["tokens"] == [tokens] * shape.layers and measured["dtypes"] == ["torch.float32"]
        for got in measured["saved"]["long"]:
            assert abs(saved / got - 1) <= 0.15, (saved, got)
        assert len(measured["backward_peaks"]) == shape.layers
        for got in measured["backward_peaks"]:
            assert abs(blocks / got - 1) <= 0.15, (blocks, got)
        for got in measured["forward_peaks"]:  # the key/value pair alone
            assert abs(key_values / got - 1) <= 0.15, (key_values, got)


SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "num_hidden_layers": 30, "vocab_size": 49152, "tie_word_embeddings": True,
                "max_position_embeddings": 8192, "rope_theta": 100000.0}


def test_plan_follows_the_sequence_parallel_mode(tmp_path):
    """SmolLM2-135M (9 heads, 3 key/value heads), a 256K row on 8 x 16 GiB: S = 2 is refused under Ulysses
    (2 does not divide the heads) and no degree it accepts fits (only S = 1); ring takes S = 2, the smallest
    that fits, and its peak carries the blocks in flight on top of Ulysses' split."""
    model = tmp_path / "smollm2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMOLLM2_135M))
    shape = Shape.from_config(AutoConfig.for_model(**SMOLLM2_135M))
    assert "2 must divide the 9 attention heads" in sequence_parallel_problem(shape, 8, 2)
    assert sequence_parallel_problem(shape, 8, 2, "ring") is None
    assert sequence_parallel_problem(shape, 8, 3, "ring") == "3 does not divide the 8 processes"
    env = {**os.environ, "PYTHONPATH": ROOT}
    results = {}
    for mode in ("ulysses", "ring"):
        command = [sys.executable, os.path.join(ROOT, "scripts", "plan.py"),
                   "recipes/smollm2-135m/long_cpt-32k-abf.yaml", f"model.path={model}",
                   "streams.long.seq_len=262144", f"streams.long.data={tmp_path / 'not-built'}",
                   "parallel.sequence_parallel=2",
                   f"parallel.sequence_parallel_mode={mode}", "--accelerate-config",
                   "recipes/accelerate/fsdp2.yaml", "--gpu", "16GiB", "--json"]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        results[mode] = json.loads(proc.stdout)
    ulysses, ring = results["ulysses"], results["ring"]
    assert ulysses["savers"]["sequence_parallel_mode"] == "ulysses"
    assert "2 must divide the 9 attention heads" in ulysses["sequence_parallel_problem"]
    assert ulysses["min_sequence_parallel"] is None
    assert ring["savers"]["sequence_parallel_mode"] == "ring"
    assert ring["sequence_parallel_problem"] is None and ring["fits"]
    assert ring["min_sequence_parallel"] == 2
    tokens = 262144 // 2
    blocks = ring_blocks_bytes(shape, tokens, 2)  # FSDP2 bf16 on a GPU: the blocks travel in bf16
    long = {m: r["streams"]["long"]["activations"] for m, r in results.items()}
    assert long["ring"] == long["ulysses"] + blocks
    assert ring["peak_by_savers"]["ulysses"] == ulysses["peak_bytes"]


def test_the_planner_takes_a_hybrid_degree_by_the_trainers_rule(tmp_path):
    """Hybrid S = 6 with ring_degree 2 on SmolLM2's 9 heads / 3 key/value heads: Ulysses splits the heads
    3 ways, which the trainer accepts (`check_heads`), and so does the planner, by the same rule. Checking the
    heads against S = 6 itself (the planner's rule before) refused it; ring_degree 3 leaves a Ulysses degree
    of 2, which both refuse."""
    from distill.parallel.ulysses import check_heads

    config = AutoConfig.for_model(**SMOLLM2_135M)
    shape = Shape.from_config(config)
    check_heads(config, 6, "hybrid", 2)  # the trainer accepts it
    assert sequence_parallel_problem(shape, 12, 6, "hybrid", 2) is None
    assert "2 must divide the 9 attention heads" in sequence_parallel_problem(shape, 12, 6, "hybrid", 3)
    model = tmp_path / "smollm2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMOLLM2_135M))
    command = [sys.executable, os.path.join(ROOT, "scripts", "plan.py"),
               "recipes/smollm2-135m/long_cpt-32k-abf.yaml", f"model.path={model}",
               f"streams.long.data={tmp_path / 'not-built'}", "parallel.sequence_parallel=6",
               "parallel.sequence_parallel_mode=hybrid", "parallel.ring_degree=2", "--accelerate-config",
               "recipes/accelerate/fsdp2.yaml", "--gpus", "12", "--json"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sequence_parallel_problem"] is None
