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

from experts import CheckpointReader, Gate, MoESpec, SharedExpert
from experts.errors import MeshError
from kernels import align_tokens, combine
from router_service.batcher import LayerBatcher
from router_service.config import RouterConfig
from router_service.load import LoadWindow, PairShares
from router_service.routing import RoutingTable, plan_batch
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
        self.transport.on_table(table)
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
        # Step 2: gate; token copies sorted by expert (indices only).
        weights, ids = self.gates[layer](x)  # [T, k], [T, k]
        order, counts, _ = align_tokens(ids, self.spec.num_experts)  # [N], [E]
        counts = counts.tolist()
        self._count_tokens(layer, counts, ids)
        # Step 3: one plan for the batch, every destination one slice; the transport sends them all.
        y, order, failed = await self._scatter_gather(table, layer, x, weights, ids, order, counts)
        # Step 4: un-permute, weight and reduce in one pass.
        out = combine(y, order, None if self.spec.gate_on_input else weights, x.shape[0])  # [T, H]
        if shared_task is not None:
            out = out + await shared_task
        # Step 5: split back per caller; callers whose tokens hit a failed group get its error.
        return self._split(out, parts, failed), table.epoch

    def _count_tokens(self, layer: int, counts: list[int], ids: torch.Tensor) -> None:
        per_expert = {(layer, expert): count for expert, count in enumerate(counts) if count}
        self.tokens_per_expert.update(per_expert)
        now = time.monotonic()
        self.load.add(now, per_expert)
        self.pairs.add(now, layer, ids)
        if self.metrics is not None:
            self.metrics.observe_tokens(layer, counts)

    async def _scatter_gather(self, table: RoutingTable, layer: int, x: torch.Tensor, weights: torch.Tensor,
                              ids: torch.Tensor, order: torch.Tensor, counts: list[int]):
        """Compute every token copy on some copy of its expert; the copies of a group that fails
        are retried once on the others (that group excluded). Returns (y [N, H], order [N]: the
        flat copy index of each row of y, failed: [(flat copy indices, error)] of copies that
        found no live copy (their rows of y are zero))."""
        plan = plan_batch(order, counts, table.layers[layer], self._turn)
        self._turn += 1
        y, errors = await self._send(table, layer, x, weights, plan)
        if not errors and not plan.unroutable.numel():
            return y, plan.order, []
        # Retry once: the copies of failed destinations and unroutable ones, failed groups excluded.
        is_kept = torch.ones(plan.order.shape[0], dtype=torch.bool)
        for d in plan.destinations:
            if d.group in errors:
                is_kept[d.start:d.stop] = False
        retry = torch.cat([plan.order[~is_kept], plan.unroutable])
        flat_ids = ids.reshape(-1)[retry]
        retry = retry[torch.argsort(flat_ids, stable=True)]
        retry_counts = torch.bincount(flat_ids, minlength=self.spec.num_experts).tolist()
        second = plan_batch(retry, retry_counts, table.layers[layer], self._turn, frozenset(errors))
        y2, errors2 = await self._send(table, layer, x, weights, second, excluded=errors)
        errors = {**errors, **errors2}
        failed = [(second.order[d.start:d.stop], errors2[d.group]) for d in second.destinations if d.group in errors2]
        if second.unroutable.numel():
            error = next(iter(errors.values()), None) or ExpertUnavailableError(
                f"layer {layer}: experts {sorted(set(ids.reshape(-1)[second.unroutable].tolist()))} have no live copy")
            failed.append((second.unroutable, error))
        for d in second.destinations:
            if d.group in errors2:
                y2[d.start:d.stop] = 0
        unrouted = y.new_zeros(second.unroutable.shape[0], y.shape[1])
        return (torch.cat([y[is_kept], y2, unrouted]), torch.cat([plan.order[is_kept], second.order, second.unroutable]),
                failed)

    async def _send(self, table: RoutingTable, layer: int, x: torch.Tensor, weights: torch.Tensor, plan,
                    excluded: dict | None = None) -> tuple[torch.Tensor, dict[str, BaseException]]:
        """Rows of the plan (one gather of x), out through the transport; returns (y, {group: error})."""
        k = self.spec.top_k
        rows = x[plan.order // k]  # [M, H], destinations contiguous
        scale = weights.reshape(-1)[plan.order].float() if self.spec.gate_on_input else None
        y = torch.empty_like(rows)
        self.batch_stats["group_calls"] += len(plan.destinations)
        errors = await self.transport.dispatch(layer, table.epoch, rows, scale, plan.destinations, y)
        for group, error in errors.items():
            logger.warning("layer %d: group %s failed: %s", layer, group, error)
            if self.on_group_failure is not None:
                self.on_group_failure(group)
        return y, errors

    def _split(self, out: torch.Tensor, parts: list[slice], failed: list) -> list:
        """Per caller (rows `parts` of out [T, H]) its output, or the error of a failed copy of its tokens."""
        if not failed:
            return [out[p] for p in parts]
        is_failed = torch.zeros(out.shape[0], dtype=torch.bool)
        for copies, _ in failed:
            is_failed[copies // self.spec.top_k] = True
        error = failed[0][1]
        return [error if is_failed[p].any() else out[p] for p in parts]
