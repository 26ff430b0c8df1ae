"""The per-step plan: which stream each micro-batch of an optimiser step draws from, and which rows.

The plan is a pure function of (seed, step, data cursors): it does not depend on the number of processes.
Every rank computes the same global list of micro-batches and takes every `world`-th one, so a run
resumed on another number of processes continues the same global data order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from distill.schedules import share_at


def _seed(*parts) -> int:
    """A stable 64-bit seed from strings and ints (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclasses.dataclass
class StreamPlan:
    """What the planner needs to know of one stream."""

    name: str
    rows: int
    seq_len: int
    micro_batch: int
    share: object  # float or ShareScheduleConfig


@dataclasses.dataclass
class MicroBatch:
    stream: str
    rows: list[int]
    index: int  # position in the step's global list (seeds per-micro-batch randomness)


class Mixture:
    """Deterministic, resumable plan of micro-batches over streams.

    Each step gets `tokens_per_step` token slots split between streams by their (scheduled) shares; a
    stream's expected number of micro-batches is rounded stochastically with a seed of (seed, step), so
    the realised token ratio matches the shares over steps. Rows are read in a fresh permutation per
    epoch of each stream; `cursor[stream]` counts the rows consumed so far (the only state).
    """

    def __init__(self, streams: list[StreamPlan], tokens_per_step: int, seed: int):
        self.streams = {s.name: s for s in streams}
        self.tokens_per_step = tokens_per_step
        self.seed = seed
        self.cursor = {s.name: 0 for s in streams}
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cursor": dict(self.cursor), "epoch": {n: self.epoch(n) for n in self.cursor}, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for name in self.cursor:
            self.cursor[name] = int(state["cursor"].get(name, 0))

    def epoch(self, name: str) -> int:
        return self.cursor[name] // self.streams[name].rows

    # -- planning ------------------------------------------------------------------------------------
    def shares(self, step: int) -> dict[str, float]:
        return {name: share_at(step, s.share) for name, s in self.streams.items()}

    def counts(self, step: int) -> dict[str, int]:
        """Micro-batches per stream at this step (stochastic rounding of the expected count)."""
        shares = self.shares(step)
        total = sum(shares.values())
        if total <= 0:
            raise ValueError(f"step {step}: stream shares sum to {total}; at least one must be positive")
        rng = np.random.default_rng(_seed(self.seed, "counts", step))
        counts = {}
        for name, s in self.streams.items():
            expected = shares[name] / total * self.tokens_per_step / (s.micro_batch * s.seq_len)
            whole = math.floor(expected)
            counts[name] = whole + int(rng.random() < expected - whole)
        if sum(counts.values()) == 0:  # a step must train on something: the largest share wins
            counts[max(shares, key=shares.get)] = 1
        return counts

    def _row(self, name: str, k: int) -> int:
        """The k-th row consumed from a stream: a fresh permutation per epoch."""
        n = self.streams[name].rows
        epoch, pos = divmod(k, n)
        key = (name, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            perm = np.random.default_rng(_seed(self.seed, "perm", name, epoch)).permutation(n)
            self._perm_cache = {k2: v for k2, v in self._perm_cache.items() if k2[0] != name}
            self._perm_cache[key] = perm
        return int(perm[pos])

    def plan(self, step: int, advance: bool = True) -> list[MicroBatch]:
        """The global, ordered list of micro-batches of `step`; advances the cursors unless told not to."""
        counts = self.counts(step)
        batches = []
        cursor = dict(self.cursor)
        for name, n in counts.items():
            mb = self.streams[name].micro_batch
            for _ in range(n):
                rows = [self._row(name, cursor[name] + j) for j in range(mb)]
                cursor[name] += mb
                batches.append((name, rows))
        order = np.random.default_rng(_seed(self.seed, "order", step)).permutation(len(batches))
        plan = [MicroBatch(batches[j][0], batches[j][1], i) for i, j in enumerate(order)]
        if advance:
            self.cursor = cursor
        return plan


def shard(plan: list[MicroBatch], rank: int, world: int, cost: dict[str, int] | None = None) -> list[MicroBatch]:
    """This rank's part of the global plan.

    Micro-batches are dealt greedily by token cost (largest first, to the least-loaded rank, ties to the
    lower rank), so ranks finish a step at about the same time; the order inside a rank keeps the plan's.
    The result depends only on the plan and the world size: every rank computes the same assignment.
    """
    if world == 1:
        return list(plan)
    cost = cost or {}
    load = [0] * world
    owner = {}
    for mb in sorted(plan, key=lambda m: (-cost.get(m.stream, 1) * len(m.rows), m.index)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[mb.index] = r
        load[r] += cost.get(mb.stream, 1) * len(mb.rows)
    return [mb for mb in plan if owner[mb.index] == rank]
