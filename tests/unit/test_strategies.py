"""The launcher's environment picks one strategy, once; the strategies' own configuration."""

import pytest

from distill.parallel.fsdp2 import fsdp_requested, reshard_after_forward_requested
from distill.parallel.zero3 import ds_config, zero3_requested


def test_fsdp_requested_reads_the_launcher_environment(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_requested()
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version"):
        fsdp_requested()
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert not reshard_after_forward_requested()
    monkeypatch.delenv("FSDP_RESHARD_AFTER_FORWARD")
    assert reshard_after_forward_requested()


def test_zero3_requested_reads_the_launcher_environment(monkeypatch):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
                "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    assert not zero3_requested()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    assert zero3_requested()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ValueError, match="zero_stage"):
        zero3_requested()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json")
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        zero3_requested()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    with pytest.raises(ValueError, match="offload_optimizer_device"):
        zero3_requested()


def test_ds_config_is_zero3_without_gradient_accumulation():
    cfg = ds_config(max_grad_norm=1.0)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 1.0 and cfg["zero_allow_untested_optimizer"]
    assert ds_config(0.0)["gradient_clipping"] == 0.0
    assert "gradient_clipping" not in ds_config(train=False)
    # Reduce-scatters and all-gathers overlap the backward (DeepSpeed runs them on side streams).
    assert cfg["zero_optimization"]["overlap_comm"] is True


class _Procs:
    def __init__(self, world):
        self.world, self.rank, self.is_main = world, 0, True


@pytest.mark.parametrize("env, world, name", [
    ({}, 1, "replicated"),
    ({"ACCELERATE_USE_FSDP": "true"}, 1, "replicated"),  # one process: nothing to shard over
    ({}, 2, "replicated"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, 2, "fsdp2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, 2, "zero3"),
])
def test_choose_picks_one_strategy_from_the_launcher(monkeypatch, env, world, name):
    from distill.parallel.launcher import choose

    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    strategy = choose(_Procs(world))
    assert strategy.name == name
    assert strategy.aligned == strategy.sharded == (name != "replicated")


def test_choose_refuses_an_unsupported_launch_in_one_line(monkeypatch):
    from distill.config import ConfigError
    from distill.parallel.launcher import choose

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_config.fsdp_version: 1 is not supported; allowed: 2"):
        choose(_Procs(2))


def test_every_mode_defines_the_whole_interface():
    import inspect

    from distill.parallel.base import Strategy
    from distill.parallel.fsdp2 import FSDP2
    from distill.parallel.replicated import Replicated
    from distill.parallel.zero3 import ZeRO3

    assert inspect.isabstract(Strategy)
    for mode in (Replicated, FSDP2, ZeRO3):
        assert not inspect.isabstract(mode), f"{mode.__name__} leaves {sorted(mode.__abstractmethods__)}"
