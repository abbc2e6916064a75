"""The router's data plane for one model: batch, gate, plan, scatter, gather, combine.

[callers] -> [LayerBatcher] -> [Gate] -> [dispatch: sort by expert] -> [plan per group]
          -> [Transport: scatter/gather] -> [combine] (+ shared experts, computed meanwhile) -> [callers]

Shape legend: T = tokens of a batch, H = hidden, k = experts per token, N = T * k copies.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from pathlib import Path

import torch

from experts import CheckpointReader, Gate, MoESpec, SharedExpert, dispatch
from experts.errors import MeshError
from router_service.batcher import LayerBatcher
from router_service.config import RouterConfig
from router_service.load import LoadWindow, PairShares
from router_service.routing import RoutingTable, expert_segments, plan_dispatch
from router_service.transport import ExpertUnavailableError, Transport

__all__ = ["NoRoutingTableError", "Router"]

logger = logging.getLogger(__name__)


class NoRoutingTableError(MeshError):
    """The router has not received a routing table yet (or every copy of an expert is gone)."""


class Router:
    """Holds the gates and shared experts of every MoE layer; the experts live elsewhere."""

    def __init__(self, model_path: str | Path, config: RouterConfig, transport: Transport,
                 dtype: torch.dtype = torch.float32, metrics=None):
        reader = CheckpointReader(model_path)
        try:
            self.spec: MoESpec = reader.spec
            self.gates = {layer: Gate(self.spec, reader.gate(layer), dtype) for layer in self.spec.moe_layers}
            shared = {layer: reader.shared(layer) for layer in self.spec.moe_layers}
        finally:
            reader.close()
        self.shared = {layer: SharedExpert(self.spec, w, dtype) for layer, w in shared.items() if w is not None}
        self.dtype = dtype
        self.config = config
        self.transport = transport
        self.metrics = metrics
        self.table: RoutingTable | None = None
        self.tokens_per_expert: collections.Counter[tuple[int, int]] = collections.Counter()
        # batches run, queue entries (requests or their chunks) merged into them, their tokens, largest
        # batch, messages sent to expert groups
        self.batch_stats: collections.Counter[str] = collections.Counter()
        self.load = LoadWindow(config.load_window_s)   # (layer, expert) -> token copies
        self.pairs = PairShares(self.spec.num_experts, config.load_window_s)  # co-activated experts
        self._batchers: dict[int, LayerBatcher] = {}
        self._turn = 0
        self.on_group_failure = None  # callable(group name): told when a call to a group fails

    def set_table(self, table: RoutingTable) -> bool:
        """Install `table` unless a newer one is in force (pushes may arrive out of order); returns
        whether it was installed."""
        if self.table is not None and table.epoch < self.table.epoch:
            return False
        self.table = table
        logger.info("routing table epoch %d", table.epoch)
        return True

    @property
    def epoch(self) -> int:
        """Epoch of the table in force (0: none yet)."""
        return self.table.epoch if self.table else 0

    async def forward(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x: [T, H] (already validated). Returns (output [T, H] in x.dtype, epoch of the table)."""
        batcher = self._batchers.get(layer)
        if batcher is None:
            batcher = self._batchers[layer] = LayerBatcher(
                lambda xb, parts, layer=layer: self._run_batch(layer, xb, parts),
                self.config.batching, self.config.max_queue_tokens, self._observe_batch)
        out, epoch = await batcher.submit(x.to(self.dtype))
        return out.to(x.dtype), epoch

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        await self.transport.close()

    def _observe_batch(self, num_tokens: int, num_requests: int) -> None:
        self.batch_stats.update(batches=1, entries=num_requests, tokens=num_tokens)
        self.batch_stats["max_tokens"] = max(self.batch_stats["max_tokens"], num_tokens)
        if self.metrics is not None:
            self.metrics.observe_batch(num_tokens, num_requests)

    async def _run_batch(self, layer: int, x: torch.Tensor,
                         parts: list[slice]) -> tuple[list[torch.Tensor | BaseException], int]:
        """Returns (per caller its output or error, the epoch of the one table that served the batch)."""
        table = self.table  # one table for the whole batch
        if table is None:
            raise NoRoutingTableError("router has no routing table yet")
        # Step 1: shared experts start at once, in a thread, while the routed tokens travel.
        shared = self.shared.get(layer)
        shared_task = asyncio.get_running_loop().run_in_executor(None, shared, x) if shared else None
        # Step 2: gate and sort the token copies by expert.
        weights, ids = self.gates[layer](x)  # [T, k], [T, k]
        tokens = dispatch(self.spec, x, weights, ids)
        self._count_tokens(layer, tokens.counts, ids)
        # Step 3: scatter one contiguous message per group, gather the outputs.
        y, failed_rows = await self._scatter_gather(table, layer, tokens)
        out = tokens.combine(y)  # [T, H]
        if shared_task is not None:
            out = out + await shared_task
        # Step 4: split back per caller; callers whose tokens hit a failed group get its error.
        return self._split(out, parts, tokens, failed_rows), table.epoch

    def _count_tokens(self, layer: int, counts: list[int], ids: torch.Tensor) -> None:
        per_expert = {(layer, expert): count for expert, count in enumerate(counts) if count}
        self.tokens_per_expert.update(per_expert)
        now = time.monotonic()
        self.load.add(now, per_expert)
        self.pairs.add(now, layer, ids)
        if self.metrics is not None:
            self.metrics.observe_tokens(layer, counts)

    async def _scatter_gather(self, table: RoutingTable, layer: int,
                              tokens) -> tuple[torch.Tensor, list[tuple[slice, BaseException]]]:
        """Compute every expert segment on some copy; a group that fails is excluded and its
        segments retried once on the other copies. Returns (y [N, H], segments that failed)."""
        y = torch.empty_like(tokens.rows)
        pending = expert_segments(tokens.counts)
        excluded: dict[str, BaseException] = {}
        for _attempt in range(2):
            plan = plan_dispatch(pending, table.layers[layer], self._turn, frozenset(excluded))
            self._turn += 1
            groups = list(plan.segments)
            self.batch_stats["group_calls"] += len(groups)
            results = await asyncio.gather(
                *(self._call_group(table, layer, g, plan.endpoints[g], plan.segments[g], tokens) for g in groups),
                return_exceptions=True)
            pending = plan.unroutable
            for group, result in zip(groups, results):
                if isinstance(result, BaseException):
                    logger.warning("layer %d: group %s failed: %s", layer, group, result)
                    if self.on_group_failure is not None:
                        self.on_group_failure(group)
                    excluded[group] = result
                    pending = pending + plan.segments[group]
                else:
                    self._place(y, plan.segments[group], result)
            if not pending:
                return y, []
        error = next(iter(excluded.values()), None) or ExpertUnavailableError(
            f"layer {layer}: experts {sorted({e for e, _, _ in pending})} have no live copy")
        for _, start, size in pending:
            y[start:start + size] = 0
        return y, [(slice(start, start + size), error) for _, start, size in pending]

    async def _call_group(self, table, layer, group, endpoint, segments, tokens) -> torch.Tensor:
        slices = [slice(start, start + size) for _, start, size in segments]
        rows = tokens.rows[slices[0]] if len(slices) == 1 else torch.cat([tokens.rows[s] for s in slices])
        scale = None
        if tokens.scale is not None:
            scale = tokens.scale[slices[0]] if len(slices) == 1 else torch.cat([tokens.scale[s] for s in slices])
        experts = [expert for expert, _, _ in segments]
        counts = [size for _, _, size in segments]
        copies = table.layers[layer]
        versions = [next(c.version for c in copies[e] if c.group == group) for e in experts]
        return await self.transport.compute(group, endpoint, layer, rows, experts, counts, scale, table.epoch,
                                            versions)

    @staticmethod
    def _place(y: torch.Tensor, segments: list[tuple[int, int, int]], result: torch.Tensor) -> None:
        offset = 0
        for _, start, size in segments:
            y[start:start + size] = result[offset:offset + size]
            offset += size

    @staticmethod
    def _split(out: torch.Tensor, parts: list[slice], tokens, failed_rows: list) -> list:
        if not failed_rows:
            return [out[p] for p in parts]
        is_failed = torch.zeros(tokens.num_tokens, dtype=torch.bool)
        for rows, _ in failed_rows:
            is_failed[tokens.order[rows] // tokens.top_k] = True
        error = failed_rows[0][1]
        return [error if is_failed[p].any() else out[p] for p in parts]
