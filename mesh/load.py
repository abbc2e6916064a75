"""Load aggregation: what the routers counted, summed over them (tokens, tokens/s, co-activated pairs/s)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import msgpack

__all__ = ["Load", "aggregate_load", "by_name"]


class Load(NamedTuple):
    """Per (layer, expert) or (layer, a, b) with a < b, summed over the routers."""
    tokens: dict[tuple[int, int], int]           # token copies since start
    rates: dict[tuple[int, int], float]          # token copies/s over the load window
    pairs: dict[tuple[int, int, int], float]     # tokens/s that picked both a and b (share x tokens/s)


def _add(totals: dict, key: tuple, value: float) -> None:
    totals[key] = totals.get(key, 0) + value


def aggregate_load(reports: list[bytes], top_k_of: Callable[[int], int]) -> Load:
    """Routers' `load_report()` blobs -> Load. A router's pairs/s: the share of its tokens that
    picked both, times its tokens/s of the layer (its copies/s over the layer's top-k, `top_k_of`)."""
    load = Load({}, {}, {})
    for data in (msgpack.unpackb(r) for r in reports):
        tokens_per_s: dict[int, float] = {}  # this router's tokens (not copies) per layer
        for layer, expert, count in data["tokens"]:
            _add(load.tokens, (layer, expert), count)
        for layer, expert, rate in data["rates"]:
            _add(load.rates, (layer, expert), rate)
            tokens_per_s[layer] = tokens_per_s.get(layer, 0.0) + rate / top_k_of(layer)
        for layer, a, b, share in data["pairs"]:
            _add(load.pairs, (layer, a, b), share * tokens_per_s.get(layer, 0.0))
    return load


def by_name(per_expert: dict[tuple[int, int], float]) -> dict[str, float]:
    """(layer, expert) keys as "layer/expert", the snapshot's (msgpack and JSON) form."""
    return {f"{layer}/{expert}": value for (layer, expert), value in per_expert.items()}
