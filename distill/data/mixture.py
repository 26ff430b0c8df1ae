"""The per-step plan: which stream each micro-batch of an optimiser step draws from, and which rows.

The plan is a pure function of (seed, step, data cursors): it does not depend on the number of processes.
Every rank computes the same global list of micro-batches and takes its part of it (`shard`, or
`shard_aligned` when every rank must run the same sequence of stream kinds), so a run resumed on another
number of processes continues the same global data order.

A stream whose token share is less than one micro-batch per step is absent from some steps. Its loss is
divided by the tokens of the steps it is present in, so each of those steps gives it its full weight and
the others none: `Mixture.presence` gives the factor (1 / the probability of being present) that keeps its
configured weight on average over steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

from distill.schedules import share_at


def stable_seed(*parts) -> int:
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
        return {"cursor": dict(self.cursor), "epoch": {n: self.epoch(n) for n in self.cursor},
                "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            import logging

            logging.getLogger(__name__).warning(
                "resuming with run.seed %s where the checkpoint's data order used %s: the rest of this epoch "
                "follows another permutation (some rows repeat, others are skipped)", self.seed,
                state["seed"])
        for name in self.cursor:
            self.cursor[name] = int(state["cursor"].get(name, 0))

    def epoch(self, name: str) -> int:
        return self.cursor[name] // self.streams[name].rows

    # -- planning ------------------------------------------------------------------------------------
    def shares(self, step: int) -> dict[str, float]:
        return {name: share_at(step, s.share) for name, s in self.streams.items()}

    def expected(self, step: int) -> dict[str, float]:
        """Expected micro-batches per stream at this step: its share of the step's token slots over the
        token slots of one of its micro-batches."""
        shares = self.shares(step)
        total = sum(shares.values())
        if total <= 0:
            raise ValueError(f"step {step}: stream shares sum to {total}; at least one must be positive")
        return {name: shares[name] / total * self.tokens_per_step / (s.micro_batch * s.seq_len)
                for name, s in self.streams.items()}

    def counts(self, step: int) -> dict[str, int]:
        """Micro-batches per stream at this step (stochastic rounding of the expected count)."""
        expected = self.expected(step)
        rng = np.random.default_rng(stable_seed(self.seed, "counts", step))
        counts = {}
        for name in self.streams:
            whole = math.floor(expected[name])
            counts[name] = whole + int(rng.random() < expected[name] - whole)
        if sum(counts.values()) == 0:  # a step must train on something: the largest share wins
            counts[max(expected, key=expected.get)] = 1
        return counts

    def presence(self, step: int) -> dict[str, float]:
        """Per stream, the factor on its losses at this step that keeps its configured weight on average.

        A stream expecting e ≥ 1 micro-batches is in every step: 1. One expecting e < 1 is present with
        probability p = e (plus, for the largest share, the chance that no stream drew a micro-batch, when
        `counts` gives it one); its losses are divided by its own tokens of the step, so multiplying them by
        1 / p where present gives E[weight] = p · (1 / p) · weight = weight. (Without it, a stream at
        e = 0.25 counted a quarter of its configured weight.) A pure function of the step.
        """
        expected = self.expected(step)
        largest = max(expected, key=expected.get)
        none_drawn = math.prod(1.0 - e for e in expected.values()) if max(expected.values()) < 1.0 else 0.0
        factors = {}
        for name, e in expected.items():
            p = min(1.0, e) + (none_drawn if name == largest else 0.0)
            factors[name] = 1.0 / p if p > 0.0 else 1.0
        return factors

    def sparse_streams(self, step: int = 0) -> dict[str, float]:
        """Streams expecting fewer than one micro-batch per step (at `step`): {name: expected count}."""
        return {n: e for n, e in self.expected(step).items() if 0.0 < e < 1.0}

    def _row(self, name: str, k: int) -> int:
        """The k-th row consumed from a stream: a fresh permutation per epoch."""
        n = self.streams[name].rows
        epoch, pos = divmod(k, n)
        key = (name, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            perm = np.random.default_rng(stable_seed(self.seed, "perm", name, epoch)).permutation(n)
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
        order = np.random.default_rng(stable_seed(self.seed, "order", step)).permutation(len(batches))
        plan = [MicroBatch(batches[j][0], batches[j][1], i) for i, j in enumerate(order)]
        if advance:
            self.cursor = cursor
        return plan


@dataclasses.dataclass(frozen=True)
class Slot:
    """One micro-batch a rank runs in a step.

    `micro_batch` is None for a dummy (`shard_aligned`): the rank still runs `stream`'s forward and backward
    (the collectives must match the other ranks') on the rows of `fetch` (a real micro-batch of the same
    stream, trained on by another rank), with every loss multiplied by 0 and no tokens counted.
    """

    stream: str
    micro_batch: MicroBatch | None
    fetch: MicroBatch  # the rows to read: `micro_batch` itself, or a stand-in for a dummy
    part: int = 0
    """Sequence parallelism: which of the group's slices of the micro-batch this rank runs (0 otherwise)."""

    @property
    def is_dummy(self) -> bool:
        return self.micro_batch is None


def shard(plan: list[MicroBatch], rank: int, world: int, cost: dict[str, int] | None = None) -> list[Slot]:
    """This rank's part of the global plan.

    Micro-batches are dealt greedily by token cost (largest first, to the least-loaded rank, ties to the
    lower rank), so ranks finish a step at about the same time; the order inside a rank keeps the plan's.
    The result depends only on the plan and the world size: every rank computes the same assignment.
    """
    if world == 1:
        return [Slot(mb.stream, mb, mb) for mb in plan]
    cost = cost or {}
    load = [0] * world
    owner = {}
    for mb in sorted(plan, key=lambda m: (-cost.get(m.stream, 1) * len(m.rows), m.index)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[mb.index] = r
        load[r] += cost.get(mb.stream, 1) * len(mb.rows)
    return [Slot(mb.stream, mb, mb) for mb in plan if owner[mb.index] == rank]


def shard_aligned(plan: list[MicroBatch], rank: int, world: int,
                  split: dict[str, int] | None = None) -> list[Slot]:
    """This rank's micro-batches, in the same sequence of kinds on every rank.

    Each stream's micro-batches (in plan order) are dealt round-robin; a stream's list is padded with
    dummies to a multiple of `world`, so every rank gets the same count per stream; slots are ordered by
    stream name then position. Depends only on (plan, world): every rank computes the same assignment.
    A stream in `split` ({stream: S}, sequence parallelism) is dealt to groups of S consecutive ranks
    instead: every rank of a group gets the same micro-batch, with `part` = its place in the group.

    Every global micro-batch is real on exactly one rank (one group). A dummy's stand-in is the first
    micro-batch of its stream in the plan. The caller, for a dummy slot: fetch `slot.fetch.rows`, count no
    tokens, run the same forward/backward as for a real one with `loss * 0.0` (or every loss sum times 0),
    and add nothing to the logged loss sums. (0 × a finite loss gives exactly zero gradients; a non-finite
    one is non-finite on the rank owning those rows too, so the step is skipped either way.)
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world {world}")
    split = split or {}
    by_stream: dict[str, list[MicroBatch]] = {}
    for mb in plan:
        by_stream.setdefault(mb.stream, []).append(mb)
    mine = []
    for name in sorted(by_stream):
        batches = by_stream[name]
        size = split.get(name, 1)
        units, unit = world // size, rank // size  # groups of `size` ranks deal like ranks
        padded = -(-len(batches) // units) * units
        for k in range(unit, padded, units):
            mb = batches[k] if k < len(batches) else None
            mine.append(Slot(name, mb, mb if mb is not None else batches[0], rank % size))
    return mine
