"""The per-step plan: shares in tokens, determinism, independence of the number of processes, resume."""

from distill.config import ShareScheduleConfig
from distill.mixture import Mixture, StreamPlan, shard


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
        indices = sorted(mb.index for part in parts for mb in part)
        assert indices == list(range(len(plan)))
        loads = [sum(cost[mb.stream] * len(mb.rows) for mb in part) for part in parts]
        assert max(loads) - min(loads) <= max(cost.values()) * 2


def test_scheduled_share_moves_the_mix():
    m = Mixture([StreamPlan("long", 50, 512, 1, ShareScheduleConfig(name="linear", start=0.0, end=1.0, steps=10)),
                 StreamPlan("short", 50, 512, 1, 1.0)], tokens_per_step=4096, seed=0)
    assert m.counts(0)["long"] == 0
    assert m.counts(20)["long"] == 4 and m.counts(20)["short"] == 4
