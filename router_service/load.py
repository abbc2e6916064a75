"""Tokens per expert over a sliding window: what routers report and the autoscaler follows."""

from __future__ import annotations

import collections

__all__ = ["LoadWindow"]


class LoadWindow:
    """Token copies per (layer, expert) in the last `window_s` seconds. The caller passes the
    clock (`now`, seconds), so the class is pure and testable with a fake clock."""

    def __init__(self, window_s: float = 30.0, bucket_s: float = 1.0):
        if window_s <= 0 or bucket_s <= 0 or bucket_s > window_s:
            raise ValueError(f"need 0 < bucket_s <= window_s, got bucket_s={bucket_s}, window_s={window_s}")
        self.window_s, self.bucket_s = window_s, bucket_s
        self._buckets: collections.deque[tuple[int, collections.Counter]] = collections.deque()

    def add(self, now: float, layer: int, counts: list[int]) -> None:
        """counts: token copies per expert of `layer` in one batch."""
        index = int(now // self.bucket_s)
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append((index, collections.Counter()))
        bucket = self._buckets[-1][1]
        for expert, count in enumerate(counts):
            if count:
                bucket[(layer, expert)] += count
        self._expire(now)

    def rates(self, now: float) -> dict[tuple[int, int], float]:
        """Tokens per second of each (layer, expert) seen in the window."""
        self._expire(now)
        total: collections.Counter = collections.Counter()
        for _, bucket in self._buckets:
            total.update(bucket)
        return {key: count / self.window_s for key, count in total.items()}

    def _expire(self, now: float) -> None:
        oldest = int((now - self.window_s) // self.bucket_s)
        while self._buckets and self._buckets[0][0] <= oldest:
            self._buckets.popleft()
