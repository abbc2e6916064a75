"""Hedged dispatch with ejection: a pure policy over the times of each group's calls.

A destination whose group has answered `min_samples` calls gets a deadline of factor x the p99 of
its last `window` calls, clamped to [min_ms, max_ms] ("The Tail at Scale"), when its slice is no
larger than the largest those calls carried (a larger one may take longer on its own merit);
both are taken again every REFRESH_EVERY answers, not on every batch.
Past it the slice is cancelled and sent to another copy of each of its experts (the router's
retry), so a frozen group costs its callers one deadline, not the transport's timeout. Hedges
spend a budget that calls refill (`budget` per call, as Envoy's and Finagle's retry budgets), so a
slow mesh does not double its own load. A group that misses `eject_after` deadlines in a row is
ejected from routing for `eject_s`, doubling while it keeps missing (Envoy's outlier ejection),
wherever its experts have another copy. Before that, a group that missed a deadline and has not
answered since is avoided by new batches for one deadline (`avoided()`): batches queued behind the
one that missed would otherwise each meet the frozen group and wait a deadline of their own.
"""

from __future__ import annotations

import collections
import math
import time

from router_service.config import HedgeConfig

__all__ = ["Hedging"]

MAX_EJECT_S = 60.0
MAX_BUDGET = 10.0  # hedges saved up at most
REFRESH_EVERY = 10  # a group's deadline is taken again from its window every this many answers


class Hedging:
    def __init__(self, config: HedgeConfig, clock=time.monotonic):
        self.config, self.clock = config, clock
        self._times: dict[str, collections.deque[tuple[float, int]]] = {}  # group -> (seconds, rows) of calls
        self._limits: dict[str, tuple[float, int]] = {}  # group -> (deadline, most rows), derived from _times
        self._answers: collections.Counter[str] = collections.Counter()   # calls answered, per group
        self._missed: collections.Counter[str] = collections.Counter()       # deadlines missed in a row
        self._ejected: dict[str, tuple[float, float]] = {}                   # group -> (until, period)
        self._avoid_until: dict[str, float] = {}  # group -> end of the avoidance after a miss
        self._budget = 1.0
        self.hedges = self.ejections = 0

    def deadline_s(self, group: str, rows: int) -> float | None:
        """The deadline of a slice of `rows` rows to `group`; None: not hedged (too few calls seen,
        a slice larger than they carried, hedging off, or the budget spent)."""
        limits = self._limits.get(group)
        if not self.config.enabled or limits is None or self._budget < 1 or rows > limits[1]:
            return None
        return limits[0]

    def _refresh(self, group: str) -> None:
        """The group's deadline and most rows, from its window (once it holds min_samples calls)."""
        calls = self._times[group]
        if len(calls) < self.config.min_samples:
            return
        times = sorted(t for t, _ in calls)
        p99 = times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)]
        deadline = min(max(self.config.factor * p99, self.config.min_ms / 1e3), self.config.max_ms / 1e3)
        self._limits[group] = (deadline, max(r for _, r in calls))

    def answered(self, group: str, seconds: float, rows: int) -> None:
        """A call to `group` answered in `seconds`: its times, the budget refilled, its misses cleared."""
        window = self._times.setdefault(group, collections.deque(maxlen=self.config.window))
        window.append((seconds, rows))
        self._answers[group] += 1
        if group not in self._limits or self._answers[group] % REFRESH_EVERY == 0:  # off the per-batch path
            self._refresh(group)
        self._budget = min(MAX_BUDGET, self._budget + self.config.budget)
        self._missed.pop(group, None)
        self._avoid_until.pop(group, None)
        if self._ejected.get(group, (math.inf, 0.0))[0] <= self.clock():
            del self._ejected[group]  # back and answering: the next ejection starts from eject_s again

    def missed(self, group: str) -> bool:
        """A slice to `group` passed its deadline and went elsewhere: a hedge spent; after
        eject_after in a row the group is ejected (returns whether this miss ejected it)."""
        self.hedges += 1
        self._budget -= 1
        self._missed[group] += 1
        deadline = self._limits.get(group, (self.config.max_ms / 1e3, 0))[0]
        self._avoid_until[group] = self.clock() + deadline
        if self._missed[group] >= self.config.eject_after:
            _, period = self._ejected.get(group, (0.0, self.config.eject_s / 2))
            period = min(2 * period, MAX_EJECT_S)
            self._ejected[group] = (self.clock() + period, period)
            self._missed[group] = 0
            self.ejections += 1
            return True
        return False

    def misses(self, group: str) -> int:
        """Deadlines `group` missed in a row."""
        return self._missed.get(group, 0)

    def ejected(self) -> frozenset[str]:
        """Groups out of routing now (each stays out only where its experts have another copy)."""
        now = self.clock()
        return frozenset(g for g, (until, _) in self._ejected.items() if until > now)

    def avoided(self) -> frozenset[str]:
        """The ejected groups, and those within one deadline of a miss they have not answered since."""
        now = self.clock()
        return self.ejected() | frozenset(g for g, until in self._avoid_until.items() if until > now)
