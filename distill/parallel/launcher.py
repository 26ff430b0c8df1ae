"""The strategy the launcher asks for: one process, data parallel, FSDP2 or ZeRO-3 (the environment that
`accelerate launch` sets up), with the sequence-parallel degree checked against it."""

from __future__ import annotations

from distill.config import ConfigError
from distill.parallel import fsdp2, zero3
from distill.parallel.base import Processes, Strategy
from distill.parallel.replicated import Replicated


def choose(procs: Processes, gradient_sync: str = "micro_batch", sequence_parallel: int = 1) -> Strategy:
    """The strategy the launcher's environment asks for (one process: always replicated).

    Raises:
        ConfigError: the launcher asked for a mode or an option we do not support (one line).
    """
    try:
        if procs.world == 1:
            strategy = Replicated(procs, gradient_sync)
        elif fsdp2.fsdp_requested():
            strategy = fsdp2.FSDP2(procs, gradient_sync, sequence_parallel)
        elif zero3.zero3_requested():
            strategy = zero3.ZeRO3(procs, gradient_sync)
        else:
            strategy = Replicated(procs, gradient_sync)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if sequence_parallel > 1:
        if strategy.name != "fsdp2":
            raise ConfigError(f"parallel.sequence_parallel: {sequence_parallel} needs the FSDP2 launch "
                              f"(recipes/accelerate/fsdp2.yaml) on several processes; this is "
                              f"{strategy.describe()}")
        if procs.world % sequence_parallel:
            raise ConfigError(f"parallel.sequence_parallel: {sequence_parallel} does not divide the "
                              f"{procs.world} processes")
    return strategy
