"""What routers count and report: token copies per expert over a sliding window, co-activated expert
pairs weighted by age (the autoscaler and the placement optimiser follow these)."""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable, Mapping

import torch

__all__ = ["LoadWindow", "PairRates", "coactivation_counts"]


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


def coactivation_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens that picked both experts of each pair: counts [E, E] int64, counts[a, b] for a < b
    (zero on and below the diagonal).

    ids: [T, k] int, the experts each token picked (distinct within a row)."""
    k = ids.shape[1]
    ordered = ids.sort(dim=1).values.long()                       # [T, k]
    first, second = torch.triu_indices(k, k, offset=1)            # the k(k-1)/2 pairs of a row
    codes = ordered[:, first] * num_experts + ordered[:, second]  # [T, k(k-1)/2]
    return torch.bincount(codes.flatten(), minlength=num_experts * num_experts).view(num_experts, num_experts)


class PairRates:
    """Tokens/s that picked both experts of each pair, per layer: counts weighted by exp(-age /
    window_s), divided by window_s, so a steady rate reads as itself. One dense [E, E] tensor per
    layer: adding a batch is a bincount, whatever the number of pairs. The caller passes the clock."""

    def __init__(self, num_experts: int, window_s: float = 30.0):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.num_experts, self.window_s = num_experts, window_s
        self._counts: dict[int, tuple[float, torch.Tensor]] = {}  # layer -> (time of last add, [E, E])

    def add(self, now: float, layer: int, ids: torch.Tensor) -> None:
        """ids: [T, k], the experts each token of one batch of `layer` picked."""
        if ids.shape[1] < 2:
            return
        counts = coactivation_counts(ids, self.num_experts).float()
        if layer in self._counts:
            counts += self._decayed(now, layer)
        self._counts[layer] = (now, counts)

    def rates(self, now: float, per_layer: int, min_rate: float = 1e-3) -> dict[tuple[int, int, int], float]:
        """{(layer, a, b): tokens/s} of the busiest `per_layer` pairs of each layer (at least min_rate)."""
        out = {}
        for layer in self._counts:
            rate = self._decayed(now, layer).flatten() / self.window_s
            top = rate.topk(min(per_layer, rate.numel()))
            for value, code in zip(top.values.tolist(), top.indices.tolist()):
                if value >= min_rate:
                    out[(layer, code // self.num_experts, code % self.num_experts)] = value
        return out

    def _decayed(self, now: float, layer: int) -> torch.Tensor:
        stamp, counts = self._counts[layer]
        return counts * math.exp(-max(now - stamp, 0.0) / self.window_s)
