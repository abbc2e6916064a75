"""What routers count and report: token copies per expert and co-activated expert pairs, over a
sliding window (the autoscaler and the placement optimiser follow these)."""

from __future__ import annotations

import collections
from collections.abc import Hashable, Mapping

import torch

__all__ = ["LoadWindow", "coactivated_pairs"]


class LoadWindow:
    """Counts per key (e.g. (layer, expert)) in the last `window_s` seconds. The caller passes the
    clock (`now`, seconds), so the class is pure and testable with a fake clock."""

    def __init__(self, window_s: float = 30.0, bucket_s: float = 1.0):
        if window_s <= 0 or bucket_s <= 0 or bucket_s > window_s:
            raise ValueError(f"need 0 < bucket_s <= window_s, got bucket_s={bucket_s}, window_s={window_s}")
        self.window_s, self.bucket_s = window_s, bucket_s
        self._buckets: collections.deque[tuple[int, collections.Counter]] = collections.deque()

    def add(self, now: float, counts: Mapping[Hashable, int]) -> None:
        """counts: what one batch added per key."""
        index = int(now // self.bucket_s)
        if not self._buckets or self._buckets[-1][0] != index:
            self._buckets.append((index, collections.Counter()))
        self._buckets[-1][1].update({key: n for key, n in counts.items() if n})
        self._expire(now)

    def rates(self, now: float) -> dict:
        """Per second of each key seen in the window."""
        self._expire(now)
        total: collections.Counter = collections.Counter()
        for _, bucket in self._buckets:
            total.update(bucket)
        return {key: count / self.window_s for key, count in total.items()}

    def _expire(self, now: float) -> None:
        oldest = int((now - self.window_s) // self.bucket_s)
        while self._buckets and self._buckets[0][0] <= oldest:
            self._buckets.popleft()


def coactivated_pairs(ids: torch.Tensor, num_experts: int) -> dict[tuple[int, int], int]:
    """Tokens that picked both experts of each pair: {(a, b): tokens} with a < b.

    ids: [T, k] int, the experts each token picked (distinct within a row)."""
    num_tokens, k = ids.shape
    if k < 2 or num_tokens == 0:
        return {}
    ordered = ids.sort(dim=1).values.long()                   # [T, k]
    first, second = torch.triu_indices(k, k, offset=1)        # the k(k-1)/2 pairs of a row
    codes = ordered[:, first] * num_experts + ordered[:, second]  # [T, k(k-1)/2]
    pair_codes, counts = codes.flatten().unique(return_counts=True)
    return {(int(c) // num_experts, int(c) % num_experts): int(n) for c, n in zip(pair_codes, counts)}
