"""What routers count and report: token copies per expert over a sliding window, and which experts
are picked together (the autoscaler and the placement optimiser follow these)."""

from __future__ import annotations

import collections
import math
from collections.abc import Hashable, Mapping

import torch

__all__ = ["LoadWindow", "PairShares", "TokenTally", "coactivation_counts"]


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


class PairShares:
    """Share of a layer's tokens that picked both experts of each pair, recent batches weighted more
    (weight exp(-age / window_s)). The share says which experts go together; the volume comes from
    the token rates (`LoadWindow`), so the two never disagree about the window. One dense [E, E]
    tensor per layer: adding a batch is a bincount, whatever the number of pairs. The caller passes
    the clock."""

    def __init__(self, num_experts: int, window_s: float = 30.0):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.num_experts, self.window_s = num_experts, window_s
        self._counts: dict[int, tuple[float, float, torch.Tensor]] = {}  # layer -> (last add, tokens, [E, E])

    def add(self, now: float, layer: int, ids: torch.Tensor) -> None:
        """ids: [T, k], the experts each token of one batch of `layer` picked."""
        if ids.shape[1] < 2 or ids.shape[0] == 0:
            return
        tokens, counts = float(ids.shape[0]), coactivation_counts(ids, self.num_experts).float()
        if layer in self._counts:
            stamp, old_tokens, old_counts = self._counts[layer]
            decay = math.exp(-max(now - stamp, 0.0) / self.window_s)
            tokens, counts = tokens + decay * old_tokens, counts + decay * old_counts
        self._counts[layer] = (now, tokens, counts)

    def shares(self, per_layer: int, min_share: float = 1e-4) -> dict[tuple[int, int, int], float]:
        """{(layer, a, b): share of the layer's tokens} of the `per_layer` commonest pairs of each layer
        (at least min_share)."""
        out = {}
        for layer, (_, tokens, counts) in self._counts.items():
            top = (counts.flatten() / tokens).topk(min(per_layer, counts.numel()))
            for value, code in zip(top.values.tolist(), top.indices.tolist()):
                if value >= min_share:
                    out[(layer, code // self.num_experts, code % self.num_experts)] = value
        return out


class TokenTally:
    """What batches routed, accumulated on the hot path into tensors allocated once per layer
    (copies per expert) and a list of the batches' picks; `take` hands them over and resets, off
    the hot path (the router flushes on its load report and on a timer, so the list stays short)."""

    def __init__(self, layers: list[int], num_experts: int, device: torch.device | str = "cpu"):
        # [E] per layer, on the router's device (where the batches' counts are)
        self.counts = {layer: torch.zeros(num_experts, dtype=torch.int64, device=device) for layer in layers}
        self.ids: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}               # [T, k] per batch

    def add(self, layer: int, counts: torch.Tensor, ids: torch.Tensor) -> None:
        """counts: [E] copies per expert of one batch; ids: [T, k] its picks."""
        self.counts[layer] += counts
        self.ids[layer].append(ids)

    def take(self) -> dict[int, tuple[list[int], torch.Tensor]]:
        """{layer: (copies per expert, picks [sum T, k] on the host)} of the layers that routed anything since
        the last take."""
        out = {}
        for layer, picks in self.ids.items():
            if picks:
                out[layer] = (self.counts[layer].tolist(), (torch.cat(picks) if len(picks) > 1 else picks[0]).cpu())
                self.counts[layer].zero_()
                self.ids[layer] = []
        return out
