"""Ring attention (distill.parallel.ring): 2 and 4 CPU processes (gloo) against 1 process; its settings."""

import os
import sys

import pytest
import torch

from distill.config import ConfigError, load_recipe
from distill.parallel.ulysses import check_heads, split_streams
from distill.testing import make_tiny_model, run_workers, tiny_config

from .test_train import ROOT, recipe, train_cli, write


def _launch(world: int, out: str, port: str, model_dir: str | None = None) -> dict:
    return run_workers(os.path.join(ROOT, "tests", "integration", "ring_worker.py"), world, port,
                       [out, *([model_dir] if model_dir else [])], out, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ring_equals_one_process_on_a_document_crossing_shard_edges(tmp_path, tokenizer_dir, world):
    """The attention alone (4 query heads over 4, 2 and 1 key/value heads; documents from offsets, from
    gathered positions, and in tiles of 3 query rows x 5 keys): output and dq, dk, dv equal dense masked
    SDPA over the whole row. Then a tiny Llama with 2 heads and 1 key/value head (4 ranks: more ranks than
    heads, which Ulysses refuses): hidden states, summed LM loss and summed gradients equal the unsplit row's;
    a forward outside `on` stays off the ring. With 4 processes the same for Ulysses x ring (2 x 2)."""
    model = make_tiny_model(str(tmp_path / "model"), "llama", tokenizer_dir=tokenizer_dir, num_heads=2,
                            num_kv_heads=1)
    result = _launch(world, str(tmp_path / "out.json"), str(29600 + world), model)
    assert result["world"] == world
    cases = {f"kv{h}_{s}" for h in (4, 2, 1) for s in ("offsets", "positions", "tiled")}
    # With 4 processes also Ulysses x ring (2 x 2): the all-to-all inside pairs, the ring across them.
    parts = [("attention", "model")] + ([("hybrid_attention", "hybrid_model")] if world == 4 else [])
    assert set(result) == {"world", *(name for pair in parts for name in pair)}
    for attention, model in parts:
        assert set(result[attention]) == cases
        for case, diffs in result[attention].items():  # [out, dq, dk, dv]
            assert max(diffs) < 1e-5, (attention, case, diffs)
        model_result = result[model]
        assert model_result["heads"] < world or world == 2
        assert model_result["state_diff"] < 1e-5, model_result
        total, reference = model_result["loss"]
        assert total == pytest.approx(reference, rel=1e-6)
        assert model_result["grad_diff"] <= 1e-5 * model_result["grad_scale"], model_result
        layers = model_result["layers"]
        assert model_result["calls"] == {"long": layers} and model_result["calls_inside"] == layers


@pytest.mark.slow
def test_hybrid_through_the_trainer_equals_one_process(tmp_path, tiny_llama, built_data):
    """FSDP2 on 4 processes with Ulysses x ring (2 x 2) on the long stream, gradient checkpointing (the
    recompute splits again): every logged loss and the gradient norm equal one process, step by step."""
    from distill.train import loop as train
    from distill.train.metrics import read_metrics

    cfg = recipe(tiny_llama, built_data, tmp_path / "one", "longred", steps=2)
    cfg["model"]["gradient_checkpointing"] = True
    path = write(cfg, tmp_path / "r.yaml")
    assert train.main([path]) == 0
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                os.path.join(ROOT, "recipes", "accelerate", "fsdp2.yaml"), "--num_processes", "4",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29671"]
    proc = train_cli(path, f"run.output_dir={tmp_path / 'hybrid'}", "parallel.sequence_parallel=4",
                     "parallel.sequence_parallel_mode=hybrid", "parallel.ring_degree=2", launcher=launcher,
                     env_extra={"ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sequence parallel (hybrid) over groups of 4" in proc.stderr
    got, want = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("hybrid", "one"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want):
        keys = {k for k in w if k.startswith("loss")} | {"grad_norm"}
        assert keys <= set(g) and "loss/long/lm" in keys
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["step"], key)


def test_zigzag_slices_cover_the_row_once(tmp_path):
    """piece/whole/token_index without a process group: rank i holds chunks i and 2S-1-i, whole() inverts."""
    from distill.parallel.ring import RingParallel

    row = torch.arange(24)[None]  # (1, 24): 2S = 6 chunks of 4 with S = 3
    rings = []
    for rank in range(3):
        ring = RingParallel.__new__(RingParallel)  # no groups needed for the layout
        ring.size, ring.index = 3, rank
        rings.append(ring)
    pieces = [r.piece(row) for r in rings]
    assert pieces[0].tolist() == [[0, 1, 2, 3, 20, 21, 22, 23]]
    assert pieces[2].tolist() == [[8, 9, 10, 11, 12, 13, 14, 15]]
    assert torch.equal(rings[0].whole(pieces), row)
    for r, p in zip(rings, pieces):
        assert torch.equal(r.token_index(r.index, 8, "cpu"), p[0])
    with pytest.raises(ValueError, match="do not cut into 2 x 3 equal chunks"):
        rings[0].piece(torch.arange(21)[None])


def test_ring_settings_are_checked(tmp_path, tiny_llama, built_data):
    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "longred")
    seq = {"long": 1024, "short": 256, "s2l": 256}
    assert load_recipe(write(cfg, tmp_path / "a.yaml")).parallel.sequence_parallel_mode == "ulysses"
    cfg["parallel"] = {"sequence_parallel": 2, "sequence_parallel_mode": "ring"}
    assert split_streams(load_recipe(write(cfg, tmp_path / "b.yaml")), seq) == {"long": 2}
    cfg["parallel"] = {"sequence_parallel": 1024, "sequence_parallel_mode": "ring"}  # S slices, not 2S chunks
    with pytest.raises(ConfigError, match=r"^streams.long: a micro-batch of 1024 tokens does not cut into "
                                          r"the 2 x 1024 equal chunks of ring's zigzag layout$"):
        split_streams(load_recipe(write(cfg, tmp_path / "c.yaml")), seq)
    # Ring takes degrees Ulysses cannot: more ranks than heads, or not dividing them.
    check_heads(tiny_config(num_heads=4, num_kv_heads=2), 8, "ring")
    check_heads(tiny_config(num_heads=4, num_kv_heads=2), 3, "ring")
    with pytest.raises(ConfigError, match="sequence_parallel_mode: ring takes any degree"):
        check_heads(tiny_config(num_heads=4, num_kv_heads=2), 8)
    # Hybrid: the Ulysses degree S / R must divide the heads; R is free.
    check_heads(tiny_config(num_heads=4, num_kv_heads=2), 16, "hybrid", 4)
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel / parallel.ring_degree: 8 must "
                                          r"divide the 4 attention heads"):
        check_heads(tiny_config(num_heads=4, num_kv_heads=2), 16, "hybrid", 2)
    cfg["parallel"] = {"sequence_parallel": 4, "sequence_parallel_mode": "hybrid", "ring_degree": 2}
    assert split_streams(load_recipe(write(cfg, tmp_path / "e.yaml")), seq) == {"long": 4}
    for parallel, message in [
        ({"sequence_parallel": 4, "sequence_parallel_mode": "hybrid", "ring_degree": 3},
         "parallel.ring_degree: hybrid needs 1 < ring_degree < sequence_parallel (4) and dividing it, got 3"),
        ({"sequence_parallel": 4, "sequence_parallel_mode": "hybrid"},
         "parallel.ring_degree: hybrid needs 1 < ring_degree < sequence_parallel (4) and dividing it, got 1"),
        ({"sequence_parallel": 4, "sequence_parallel_mode": "ring", "ring_degree": 2},
         "parallel.ring_degree: only with sequence_parallel_mode: hybrid, got 2")]:
        cfg["parallel"] = parallel
        with pytest.raises(ConfigError) as err:
            load_recipe(write(cfg, tmp_path / "f.yaml"))
        assert str(err.value) == message
    cfg["parallel"] = {"sequence_parallel": 2, "sequence_parallel_mode": "zigzag"}
    bad = write(cfg, tmp_path / "d.yaml")
    with pytest.raises(ConfigError) as err:
        load_recipe(bad)
    assert str(err.value) == ("parallel.sequence_parallel_mode: 'zigzag' is not allowed; allowed: 'ulysses', "
                              "'ring', 'hybrid'")
    proc = train_cli(bad)  # the command line: one line, exit 2, no traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "parallel.sequence_parallel_mode: 'zigzag' is not allowed" in proc.stderr.strip().splitlines()[-1]
