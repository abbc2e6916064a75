"""The hedging policy with a fake clock: deadlines from each group's own p99, clamped; larger
slices than seen are not hedged; the budget bounds hedges; ejection backs off."""

from __future__ import annotations

from router_service.config import HedgeConfig
from router_service.hedging import Hedging


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _warm(h: Hedging, group: str, seconds: float, n: int = 20, rows: int = 8) -> None:
    for _ in range(n):
        h.answered(group, seconds, rows)


def test_the_deadline_is_three_times_the_groups_p99_within_its_clamp():
    h = Hedging(HedgeConfig())
    assert h.deadline_s("g0", 8) is None  # no calls seen yet
    _warm(h, "g0", 0.002, n=19)
    assert h.deadline_s("g0", 8) is None  # fewer than min_samples
    _warm(h, "g0", 0.040, n=1)
    assert abs(h.deadline_s("g0", 8) - 0.120) < 1e-9  # p99 of 20 calls is their slowest
    _warm(h, "g1", 0.001)
    assert h.deadline_s("g1", 8) == 0.050  # at least min_ms
    _warm(h, "g2", 0.400)
    assert h.deadline_s("g2", 8) == 0.500  # at most max_ms
    assert h.deadline_s("g1", 9) is None  # a larger slice than its calls carried


def test_hedges_spend_a_budget_that_calls_refill():
    h = Hedging(HedgeConfig(budget=0.05, eject_after=100))
    _warm(h, "g0", 0.01)  # 20 calls: the budget holds 1 + 20 x 0.05 = 2 hedges
    h.missed("g0")
    h.missed("g0")
    assert h.deadline_s("g0", 8) is None  # spent
    _warm(h, "g0", 0.01)
    assert h.deadline_s("g0", 8) is not None


def test_a_group_that_keeps_missing_is_ejected_for_longer_each_time():
    clock = FakeClock()
    h = Hedging(HedgeConfig(eject_after=3, eject_s=5.0, budget=1.0), clock)
    _warm(h, "g0", 0.01)
    for _ in range(3):
        h.missed("g0")
    assert h.ejected() == {"g0"} and h.ejections == 1
    clock.now = 5.1
    assert h.ejected() == frozenset()
    for _ in range(3):
        h.missed("g0")
    assert h.ejected() == {"g0"}
    clock.now = 5.1 + 9.9
    assert h.ejected() == {"g0"}  # 10 s this time
    clock.now = 5.1 + 10.1
    assert h.ejected() == frozenset()


def test_a_group_that_just_missed_is_avoided_for_one_deadline_until_it_answers():
    clock = FakeClock()
    h = Hedging(HedgeConfig(eject_after=3), clock)
    _warm(h, "g0", 0.01)  # deadline: 3 x 10 ms, at least 50 ms
    _warm(h, "g1", 0.01)
    h.missed("g0")
    assert h.avoided() == {"g0"} and h.ejected() == frozenset()  # avoided, not ejected
    clock.now = 0.049
    assert h.avoided() == {"g0"}
    clock.now = 0.051
    assert h.avoided() == frozenset()  # one deadline later it is tried again
    h.missed("g0")
    h.answered("g0", 0.01, 8)
    assert h.avoided() == frozenset() and h.misses("g0") == 0  # an answer ends it at once
