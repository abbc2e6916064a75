"""The routing table routers serve from, and the dispatch plan built from it for one batch.

The control plane pushes a versioned table (epoch; layer -> expert -> copies); a router never asks
the controller on the hot path, and one request is served by exactly one table.
"""

from __future__ import annotations

import dataclasses

import msgpack

__all__ = ["Copy", "DispatchPlan", "RoutingTable", "expert_segments", "plan_dispatch"]


@dataclasses.dataclass(frozen=True)
class Copy:
    """One physical copy of an expert: which group hosts it, where to reach it, its weight version."""

    group: str
    endpoint: str
    version: str


@dataclasses.dataclass(frozen=True)
class RoutingTable:
    epoch: int
    layers: dict[int, list[list[Copy]]]   # layer -> expert -> copies (at least one per live expert)

    def encode(self) -> bytes:
        return msgpack.packb({"epoch": self.epoch, "layers": {
            layer: [[dataclasses.astuple(c) for c in copies] for copies in experts]
            for layer, experts in self.layers.items()}})

    @classmethod
    def decode(cls, blob: bytes) -> "RoutingTable":
        data = msgpack.unpackb(blob, strict_map_key=False)
        layers = {int(layer): [[Copy(*c) for c in copies] for copies in experts]
                  for layer, experts in data["layers"].items()}
        return cls(int(data["epoch"]), layers)

    def groups(self) -> dict[str, str]:
        """group name -> endpoint, for every group that holds a copy."""
        return {c.group: c.endpoint for experts in self.layers.values() for copies in experts for c in copies}

    def missing_experts(self) -> list[tuple[int, int]]:
        """(layer, expert) pairs with no copy: requests touching them cannot be served."""
        return [(layer, e) for layer, experts in self.layers.items() for e, copies in enumerate(experts) if not copies]


@dataclasses.dataclass
class DispatchPlan:
    """Per destination group: the row segments of the expert-sorted batch it computes.

    segments[group] = [(expert, start_row, num_rows), ...] in ascending expert order;
    unroutable: segments whose expert has no usable copy.
    """

    endpoints: dict[str, str]
    segments: dict[str, list[tuple[int, int, int]]]
    unroutable: list[tuple[int, int, int]]


def expert_segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start_row, num_rows) of every expert with rows, for rows sorted by expert."""
    segments, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            segments.append((expert, start, count))
        start += count
    return segments


def plan_dispatch(segments: list[tuple[int, int, int]], copies: list[list[Copy]], turn: int = 0,
                  excluded: frozenset[str] = frozenset()) -> DispatchPlan:
    """Assign each segment's rows to its expert's copies: split evenly (contiguous chunks) across
    the copies not in `excluded` (groups that just failed). `turn` rotates which copy gets the
    larger chunk so that remainders spread over time. Pure policy."""
    endpoints: dict[str, str] = {}
    planned: dict[str, list[tuple[int, int, int]]] = {}
    unroutable = []
    for expert, start, count in segments:
        options = [c for c in copies[expert] if c.group not in excluded]
        if not options:
            unroutable.append((expert, start, count))
            continue
        base, extra = divmod(count, len(options))
        offset = start
        for i in range(len(options)):
            copy = options[(i + turn) % len(options)]
            size = base + (1 if i < extra else 0)
            if size:
                endpoints[copy.group] = copy.endpoint
                planned.setdefault(copy.group, []).append((expert, offset, size))
                offset += size
    return DispatchPlan(endpoints, planned, unroutable)
