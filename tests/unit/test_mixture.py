"""The per-step plan: shares in tokens, determinism, independence of the number of processes, resume."""

import pytest

from distill.config import ShareScheduleConfig
from distill.data.mixture import MicroBatch, Mixture, StreamPlan, shard, shard_aligned


def _mixture(seed=0, shares=(4, 3, 1)):
    return Mixture([StreamPlan("long", 50, 1024, 2, float(shares[0])),
                    StreamPlan("short", 200, 256, 8, float(shares[1])),
                    StreamPlan("s2l", 80, 256, 8, float(shares[2]))], tokens_per_step=16384, seed=seed)


def test_token_ratio_matches_shares_over_steps():
    m = _mixture()
    tokens = {"long": 0, "short": 0, "s2l": 0}
    for step in range(400):
        for mb in m.plan(step):
            tokens[mb.stream] += len(mb.rows) * m.streams[mb.stream].seq_len
    total = sum(tokens.values())
    assert abs(tokens["long"] / total - 4 / 8) < 0.02
    assert abs(tokens["short"] / total - 3 / 8) < 0.02
    assert abs(tokens["s2l"] / total - 1 / 8) < 0.02


def test_plan_is_deterministic_and_epochs_cover_every_row():
    a, b = _mixture(), _mixture()
    seen = []
    for step in range(60):
        pa, pb = a.plan(step), b.plan(step)
        assert [(x.stream, x.rows) for x in pa] == [(x.stream, x.rows) for x in pb]
        seen += [r for mb in pa if mb.stream == "long" for r in mb.rows]
    first_epoch = seen[:50]
    assert sorted(first_epoch) == list(range(50))
    assert _mixture(seed=1).plan(0) != _mixture(seed=0).plan(0)


def test_resume_from_state_continues_the_same_order():
    full = _mixture()
    plans = [full.plan(s) for s in range(20)]
    first = _mixture()
    for s in range(8):
        first.plan(s)
    resumed = _mixture()
    resumed.load_state_dict(first.state_dict())
    for s in range(8, 20):
        assert [(x.stream, x.rows) for x in resumed.plan(s)] == [(x.stream, x.rows) for x in plans[s]]


def test_sharding_partitions_the_global_plan_for_any_world():
    plan = _mixture().plan(3)
    cost = {"long": 1024, "short": 256, "s2l": 256}
    for world in (1, 2, 3, 4):
        parts = [shard(plan, r, world, cost) for r in range(world)]
        assert all(not s.is_dummy and s.fetch is s.micro_batch for part in parts for s in part)
        indices = sorted(s.micro_batch.index for part in parts for s in part)
        assert indices == list(range(len(plan)))
        loads = [sum(cost[s.stream] * len(s.fetch.rows) for s in part) for part in parts]
        assert max(loads) - min(loads) <= max(cost.values()) * 2


def test_scheduled_share_moves_the_mix():
    m = Mixture([StreamPlan("long", 50, 512, 1,
                            ShareScheduleConfig(name="linear", start=0.0, end=1.0, steps=10)),
                 StreamPlan("short", 50, 512, 1, 1.0)], tokens_per_step=4096, seed=0)
    assert m.counts(0)["long"] == 0
    assert m.counts(20)["long"] == 4 and m.counts(20)["short"] == 4


# ---------------------------------------------------------------------------------------------------
# streams present on only some steps keep their weight on average
# ---------------------------------------------------------------------------------------------------
def _effective_weights(m: Mixture, steps: int) -> dict[str, float]:
    """Average over steps of the factor each stream's losses carry (0 on steps without it): what its
    configured weight is multiplied by in the long run."""
    total = dict.fromkeys(m.streams, 0.0)
    for step in range(steps):
        counts, presence = m.counts(step), m.presence(step)
        for name in m.streams:
            if counts[name] > 0:
                total[name] += presence[name]
    return {n: v / steps for n, v in total.items()}


def test_sparse_streams_keep_their_configured_weight_over_steps():
    """The demo's LongReD mix: 2048 token slots per step at 4 : 3 : 1 gives long 1, short 0.75 and s2l
    0.25 micro-batches per step. Dividing each present stream by its own tokens only, short counted ~0.75
    and s2l ~0.25 of their weights (hidden 15 → ~11, s2l 10 → ~2.5); the presence factor restores 1."""
    m = Mixture([StreamPlan("long", 500, 1024, 1, 4.0), StreamPlan("short", 500, 256, 4, 3.0),
                 StreamPlan("s2l", 500, 256, 4, 1.0)], tokens_per_step=2048, seed=0)
    assert m.expected(0) == pytest.approx({"long": 1.0, "short": 0.75, "s2l": 0.25})
    assert m.sparse_streams() == pytest.approx({"short": 0.75, "s2l": 0.25})
    assert m.presence(0) == pytest.approx({"long": 1.0, "short": 1 / 0.75, "s2l": 4.0})
    effective = _effective_weights(m, 4000)
    assert effective["long"] == 1.0
    assert effective["short"] == pytest.approx(1.0, abs=0.03)
    assert effective["s2l"] == pytest.approx(1.0, abs=0.08)


def test_presence_accounts_for_the_forced_micro_batch():
    """When no stream draws a micro-batch the largest share gets one: its presence probability is higher
    than its expected count, and the factor follows, so its weight still holds on average."""
    m = Mixture([StreamPlan("a", 500, 256, 4, 3.0), StreamPlan("b", 500, 256, 4, 1.0)], tokens_per_step=512,
                seed=0)
    assert m.expected(0) == pytest.approx({"a": 0.375, "b": 0.125})
    assert m.presence(0)["a"] == pytest.approx(1 / (0.375 + 0.625 * 0.875))
    effective = _effective_weights(m, 6000)
    assert effective == pytest.approx({"a": 1.0, "b": 1.0}, abs=0.1)


# ---------------------------------------------------------------------------------------------------
# the aligned plan of sharded modes
# ---------------------------------------------------------------------------------------------------
def _plan():
    streams = ["short", "long", "long", "s2l", "long", "short", "long", "long"]
    return [MicroBatch(name, [10 * i, 10 * i + 1], i) for i, name in enumerate(streams)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_aligned_plan_same_kinds_every_real_batch_once(world):
    plan = _plan()
    per_rank = [shard_aligned(plan, r, world) for r in range(world)]
    kinds = [[s.stream for s in slots] for slots in per_rank]
    assert all(k == kinds[0] for k in kinds), kinds  # same sequence of kinds on every rank
    assert kinds[0] == sorted(kinds[0])  # ordered by stream name
    real = sorted(s.micro_batch.index for slots in per_rank for s in slots if not s.is_dummy)
    assert real == list(range(len(plan)))  # every micro-batch trained on exactly once
    for slots in per_rank:
        for s in slots:
            assert s.fetch.stream == s.stream  # a dummy reads rows of its own stream
            assert s.is_dummy or s.fetch is s.micro_batch
    counts = {n: sum(mb.stream == n for mb in plan) for n in {mb.stream for mb in plan}}
    assert len(per_rank[0]) == sum(-(-c // world) for c in counts.values())  # padded to a multiple of world


def test_aligned_plan_round_robin_and_padding():
    slots = shard_aligned(_plan(), 1, 2)
    # long has 5 (indices 1, 2, 4, 6, 7): rank 1 gets the 2nd and 4th, then a dummy; s2l's one goes to rank 0
    assert [(s.stream, None if s.is_dummy else s.micro_batch.index) for s in slots] == [
        ("long", 2), ("long", 6), ("long", None), ("s2l", None), ("short", 5)]
    assert slots[2].fetch.index == 1 and slots[3].fetch.index == 3  # stand-ins: the stream's first
    with pytest.raises(ValueError):
        shard_aligned(_plan(), 2, 2)
