"""The routing table routers serve from, and the dispatch plan built from it for one batch.

The control plane pushes a versioned table (epoch; layer -> expert -> copies); a router never asks
the controller on the hot path, and one request is served by exactly one table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import msgpack
import torch

from protos.collector import paused_gc

__all__ = ["BatchPlan", "Copy", "Destination", "DispatchPlan", "RoutingTable", "expert_segments",
           "plan_batch", "plan_dispatch"]


class Copy(NamedTuple):
    """One physical copy of an expert: which group hosts it, where to reach it, its weight version.
    A tuple: a V3 table holds 30k of them, built and compared at every epoch."""

    group: str
    endpoint: str
    version: str


@dataclasses.dataclass(frozen=True)
class RoutingTable:
    epoch: int
    layers: dict[int, list[list[Copy]]]   # layer -> expert -> copies (at least one per live expert)

    @functools.cached_property
    def _encoded(self) -> bytes:
        """msgpack {"epoch", "groups": [[group, endpoint], ...], "layers": {layer: [[[group index,
        version], ...] per expert]}}: each group named once, not once per copy. Encoded once per table."""
        index: dict[tuple[str, str], int] = {}
        layers = {layer: [[(index.setdefault((c.group, c.endpoint), len(index)), c.version) for c in copies]
                          for copies in experts] for layer, experts in self.layers.items()}
        return msgpack.packb({"epoch": self.epoch, "groups": list(index), "layers": layers})

    def encode(self) -> bytes:
        return self._encoded

    @classmethod
    def decode(cls, blob: bytes) -> "RoutingTable":
        with paused_gc():
            data = msgpack.unpackb(blob, strict_map_key=False)
            groups = [(str(group), str(endpoint)) for group, endpoint in data["groups"]]
            layers = {int(layer): [[Copy(*groups[g], version) for g, version in copies] for copies in experts]
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
                  excluded: frozenset[str] = frozenset(), slow: dict[str, tuple] | None = None) -> DispatchPlan:
    """Assign each segment's rows to its expert's copies: split evenly (contiguous chunks) across
    the copies not in `excluded` (groups that just failed). `turn` rotates which copy gets the
    larger chunk so that remainders spread over time. An expert whose every copy is excluded goes
    to the one copy in `slow` (excluded groups that were only slow: group -> a sort key, e.g.
    (ejected, deadlines missed in a row)) that sorts first, if any. Pure policy."""
    endpoints: dict[str, str] = {}
    planned: dict[str, list[tuple[int, int, int]]] = {}
    unroutable = []
    slow = slow or {}
    for expert, start, count in segments:
        options = [c for c in copies[expert] if c.group not in excluded]
        rescue = [c for c in copies[expert] if c.group in slow]
        options = options or ([min(rescue, key=lambda c: (slow[c.group], c.group))] if rescue else [])
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


@dataclasses.dataclass(frozen=True)
class Destination:
    """One group's share of a batch: rows [start, stop) of the plan, its experts ascending with
    their row counts, and the weight version the table names for each."""

    group: str
    endpoint: str
    start: int
    stop: int
    experts: tuple[int, ...]
    counts: tuple[int, ...]
    versions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """Token copies sorted once by destination group, then expert.

    order: [M] int64 flat copy index (token * k + j) of each planned row; every destination's rows
    are one contiguous slice. unroutable: [U] flat copy indices whose expert has no usable copy."""

    order: torch.Tensor
    destinations: list[Destination]
    unroutable: torch.Tensor


def plan_batch(order: torch.Tensor, counts: list[int], copies: list[list[Copy]], turn: int = 0,
               excluded: frozenset[str] = frozenset(), slow: dict[str, tuple] | None = None) -> BatchPlan:
    """The whole-batch plan from copies sorted by expert (`order` [N], `counts` per expert, as
    `align_tokens` gives them): `plan_dispatch` picks each segment's copies, then the copy indices
    are regrouped by destination (indices only; no row moves here). Pure policy."""
    dispatch = plan_dispatch(expert_segments(counts), copies, turn, excluded, slow)
    pieces, destinations, start = [], [], 0
    for group, segments in dispatch.segments.items():
        pieces += [order[s:s + n] for _, s, n in segments]
        size = sum(n for _, _, n in segments)
        experts = tuple(e for e, _, _ in segments)
        versions = tuple(next(c.version for c in copies[e] if c.group == group) for e in experts)
        destinations.append(Destination(group, dispatch.endpoints[group], start, start + size, experts,
                                        tuple(n for _, _, n in segments), versions))
        start += size
    empty = order[:0]
    return BatchPlan(torch.cat(pieces) if pieces else empty, destinations,
                     torch.cat([order[s:s + n] for _, s, n in dispatch.unroutable]) if dispatch.unroutable else empty)
