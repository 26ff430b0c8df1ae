"""Ulysses sequence parallelism (distill.parallel.ulysses): 2 CPU processes (gloo) against 1 process."""

import os

import pytest

from distill.config import ConfigError, load_recipe
from distill.parallel.ulysses import check_heads, split_streams
from distill.testing import make_tiny_model, run_workers, tiny_config

from .test_train import ROOT, recipe, write


def _launch(model_dir: str, out: str, port: str) -> dict:
    return run_workers(os.path.join(ROOT, "tests", "integration", "sequence_worker.py"), 2, port,
                       [model_dir, out], out, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_two_ranks_equal_one_on_a_document_crossing_the_shard_edge(tmp_path, tokenizer_dir, kv_heads):
    """Forward (hidden states), LM loss and gradients of a packed row split over 2 ranks equal the unsplit
    row's; with one key/value head (GQA with S > KV heads) too. Forwards outside `on` make no all-to-all."""
    model = make_tiny_model(str(tmp_path / "model"), "llama", tokenizer_dir=tokenizer_dir, num_heads=4,
                            num_kv_heads=kv_heads)
    result = _launch(model, str(tmp_path / "out.json"), str(29580 + kv_heads))
    assert result["world"] == 2
    assert result["state_diff"] < 1e-5, result
    total, reference = result["loss"]
    assert total == pytest.approx(reference, rel=1e-6)
    assert result["grad_diff"] <= 1e-5 * result["grad_scale"], result
    # Each layer's attention: one entry inside `on`; the teacher-like forward after it: none.
    assert result["calls"] == {"long": result["layers"]} and result["calls_inside"] == result["layers"]


def test_sequence_parallel_settings_are_checked(tmp_path, tiny_llama, built_data):
    cfg = recipe(tiny_llama, built_data, tmp_path / "run", "longred")
    seq = {"long": 1024, "short": 256, "s2l": 256}
    assert split_streams(load_recipe(write(cfg, tmp_path / "a.yaml")), seq) == {}
    cfg["parallel"] = {"sequence_parallel": 2}
    assert split_streams(load_recipe(write(cfg, tmp_path / "b.yaml")), seq) == {"long": 2}
    cfg["parallel"] = {"sequence_parallel": 3}
    with pytest.raises(ConfigError, match=r"streams.long: a micro-batch of 1024 tokens does not split into "
                                          r"parallel.sequence_parallel 3 equal slices"):
        split_streams(load_recipe(write(cfg, tmp_path / "c.yaml")), seq)
    cfg["parallel"] = {"sequence_parallel": 2}
    cfg["streams"]["long"]["objectives"] = {"lm": 1.0, "kl": 1.0}
    with pytest.raises(ConfigError, match="streams.long.objectives: a sequence-parallel stream trains on lm"):
        split_streams(load_recipe(write(cfg, tmp_path / "d.yaml")), seq)
    check_heads(tiny_config(num_heads=4, num_kv_heads=2), 2)
    check_heads(tiny_config(num_heads=4, num_kv_heads=1), 4)
    with pytest.raises(ConfigError, match="must divide the 4 attention heads"):
        check_heads(tiny_config(num_heads=4, num_kv_heads=2), 8)
