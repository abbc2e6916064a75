"""The router's data plane for one model: batch, gate, plan, scatter, gather, combine.

[callers] -> [LayerBatcher] -> [Gate] -> [dispatch: sort by expert] -> [plan per group]
          -> [Transport: scatter/gather] -> [combine] (+ shared experts, computed meanwhile) -> [callers]

Shape legend: T = tokens of a batch, H = hidden, k = experts per token, N = T * k copies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import msgpack
import torch

from experts import (CheckpointReader, Gate, GateWeights, Latent, LatentWeights, MoESpec, SharedExpert, SharedWeights,
                     split_shared)
from protos.errors import ExpertTimeoutError, ExpertUnavailableError, HedgedError, NoRoutingTableError
from kernels import align_tokens, combine
from router_service.batcher import LayerBatcher
from router_service.config import RouterConfig
from router_service.hedging import Hedging
from router_service.load import LoadWindow, PairShares, TokenTally
from router_service.routing import RoutingTable, plan_batch
from router_service.transport import Transport

__all__ = ["LARGE_BATCH_ELEMENTS", "Router", "RouterWeights"]

logger = logging.getLogger(__name__)

LARGE_BATCH_ELEMENTS = 1 << 18  # T x H from which gating, the row gather and combine run in a thread
PAIRS_PER_EXPERT = 4  # co-activated pairs reported per layer: this many times its number of experts
RETRIES = 2  # sends after the first for copies whose group failed: three groups tried at most


@dataclasses.dataclass(frozen=True)
class RouterWeights:
    """What a router holds of a model: its spec, every MoE layer's gate, and the shared experts and
    latent projections (Nemotron-H) of the layers that have them. Read from a checkpoint, or handed
    over (the controller gives them to a direct client whose node cannot read the checkpoint)."""

    spec: MoESpec
    gates: dict[int, GateWeights]
    shared: dict[int, SharedWeights]
    latent: dict[int, LatentWeights] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "RouterWeights":
        reader = CheckpointReader(path, dtype=dtype)
        try:
            layers = reader.spec.moe_layers
            shared = {layer: reader.shared(layer) for layer in layers}
            latent = {layer: reader.latent(layer) for layer in layers}
            return cls(reader.spec, {layer: reader.gate(layer) for layer in layers},
                       {layer: w for layer, w in shared.items() if w is not None},
                       {layer: w for layer, w in latent.items() if w is not None})
        finally:
            reader.close()


class Router:
    """Holds the gates and shared experts of every MoE layer; the experts live elsewhere. Run by the
    router actor behind its gRPC port, and by a DirectClient in its caller's process. Gate, plan and
    combine run on `device` (the rows go to the groups from there: transport.py)."""

    def __init__(self, weights: RouterWeights, config: RouterConfig, transport: Transport,
                 dtype: torch.dtype = torch.float32, metrics=None, device: torch.device | str = "cpu"):
        self.spec: MoESpec = weights.spec
        self.weights = weights
        self.dtype = dtype
        self.config = config
        self.transport = transport
        self.to(device)
        # layers that pick experts by token id (DeepSeek-V4) -> token ids their table covers
        self.vocab_sizes = {layer: gate.vocab_size for layer, gate in self.gates.items() if gate.vocab_size}
        self.metrics = metrics
        self.hedging = Hedging(config.hedging)
        self.table: RoutingTable | None = None
        self.tokens_per_expert: collections.Counter[tuple[int, int]] = collections.Counter()
        # batches run, queue entries (requests or their chunks) merged into them, their tokens, largest
        # batch, messages sent to expert groups
        self.batch_stats: collections.Counter[str] = collections.Counter()
        self.load = LoadWindow(config.load_window_s)   # (layer, expert) -> token copies
        self.pairs = PairShares(self.spec.num_scored, config.load_window_s)  # co-activated experts
        self._batchers: dict[int, LayerBatcher] = {}
        self.inflight: collections.Counter[int] = collections.Counter()  # epoch -> batches and pinned requests
        self._turn = 0
        self.on_group_failure = None  # callable(group name): told when a call to a group fails
        # seconds spent per stage since start (gate, plan, dispatch, combine; the server adds
        # decode, router, encode): bench_mesh's breakdown of one Forward
        self.stage_s: collections.Counter[str] = collections.Counter()

    def to(self, device: torch.device | str) -> None:
        """Gates, shared experts, latent projections and the token tally onto `device`, before the first
        batch: the router computes there (a DirectClient moves it once, to its first caller's device)."""
        weights, dtype, self.device = self.weights, self.dtype, torch.device(device)
        self.gates = {layer: Gate(self.spec, w, dtype, self.device) for layer, w in weights.gates.items()}
        self.shared = {layer: SharedExpert(self.spec, w, dtype, self.device) for layer, w in weights.shared.items()}
        self.latent = {layer: Latent(w, dtype, self.device) for layer, w in weights.latent.items()}
        self.tally = TokenTally(list(self.spec.moe_layers), self.spec.num_scored, self.device)  # flush_counts
        self.transport.to(self.device)

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

    @property
    def oldest_inflight(self) -> int:
        """The oldest epoch a batch in flight (or a chunked request) is served by; 0: none in flight."""
        return min(self.inflight, default=0)

    async def forward(self, layer: int, x: torch.Tensor, caller: str = "",
                      token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """x: [T, H] (already validated) from `caller` (callers take turns in a batch); token_ids: [T]
        int64, for a layer in `vocab_sizes` (validated). Returns (output [T, H] in x.dtype, epoch of
        the table; on x's device). A request larger than one batch is served in chunks, all by the table
        in force now. The router computes on its own device: x comes there and its answer goes back."""
        batcher = self._batchers.get(layer)
        if batcher is None:
            batcher = self._batchers[layer] = LayerBatcher(self, layer, self.config.batching,
                                                           self.config.max_queue_tokens)
        ids = token_ids.to(self.device) if layer in self.vocab_sizes else None
        rows = x.to(self.device, self.dtype)
        if x.shape[0] <= self.config.batching.max_batch_tokens or self.table is None:
            out, epoch = await batcher.submit(rows, caller, ids)
            return out.to(x.device, x.dtype), epoch
        pinned = self.table
        with self._in_flight(pinned.epoch):
            out, epoch = await batcher.submit(rows, caller, ids, pinned)
        return out.to(x.device, x.dtype), epoch

    @contextlib.contextmanager
    def _in_flight(self, epoch: int):
        self.inflight[epoch] += 1
        try:
            yield
        finally:
            self.inflight[epoch] -= 1
            if not self.inflight[epoch]:
                del self.inflight[epoch]

    async def close(self) -> None:
        for batcher in self._batchers.values():
            await batcher.close()
        await self.transport.close()

    def observe_batch(self, num_tokens: int, num_requests: int) -> None:
        """The batcher's news of a batch leaving (BatchRunner)."""
        self.batch_stats.update(batches=1, entries=num_requests, tokens=num_tokens)
        self.batch_stats["max_tokens"] = max(self.batch_stats["max_tokens"], num_tokens)
        if self.metrics is not None:
            self.metrics.observe_batch(num_tokens, num_requests)

    async def run_batch(self, layer: int, x: torch.Tensor, parts: list[slice], token_ids: torch.Tensor | None,
                        table: RoutingTable | None = None) -> tuple[list[torch.Tensor | BaseException], int]:
        """One batch (BatchRunner): x [T, H], token_ids [T] or None, served by `table` (a chunked
        request's) or the table in force. Returns (per caller its output or error, the epoch of the
        one table that served the batch)."""
        table = table or self.table  # one table for the whole batch
        if table is None:
            raise NoRoutingTableError("router has no routing table yet")
        with self._in_flight(table.epoch):
            return await self._run_batch(table, layer, x, parts, token_ids)

    async def _run_batch(self, table: RoutingTable, layer: int, x: torch.Tensor, parts: list[slice],
                         token_ids: torch.Tensor | None) -> tuple[list[torch.Tensor | BaseException], int]:
        # Step 1: gate; token copies sorted by expert (indices only). A large batch's math runs in
        # a thread, so that health, admin and small requests are not held behind it.
        is_large = x.numel() >= LARGE_BATCH_ELEMENTS
        start = time.perf_counter()
        weights, ids, order, counts = await self._off_loop(is_large, self._gate, layer, x, token_ids)
        weights, shared_weights = split_shared(weights, ids)  # the shared experts' weights: Inkling's gate
        # Step 2: shared experts start at once, in a thread, while the routed tokens travel.
        shared = self.shared.get(layer)
        shared_task = (asyncio.get_running_loop().run_in_executor(None, shared, x, shared_weights) if shared
                       else None)
        self.tally.add(layer, counts, ids)  # on the event loop, as flush_counts: no lost counts
        counts = counts.tolist()
        self.stage_s["gate"] += time.perf_counter() - start
        # Step 3: one plan for the batch, every destination one slice; the transport sends them all
        # (the rows of z: the tokens, or their latent projection, Nemotron-H's). Identity experts'
        # copies (sorted last) never leave: each is its token.
        latent = self.latent.get(layer)
        z = x if latent is None else latent.into(x)  # [T, H] or [T, L]
        num_experts = self.spec.num_experts
        routed = sum(counts[:num_experts])
        y, sent, failed = await self._scatter_gather(table, layer, z, weights, ids, order[:routed],
                                                     counts[:num_experts], is_large)
        if routed < order.shape[0]:
            y, sent = torch.cat([y, z[order[routed:] // ids.shape[1]]]), torch.cat([sent, order[routed:]])
        # Step 4: un-permute, weight and reduce in one pass.
        start = time.perf_counter()
        out = await self._off_loop(is_large, combine, y, sent, None if self.spec.gate_on_input else weights,
                                   x.shape[0])  # [T, H] ([T, L] latent)
        if latent is not None:
            out = latent.out_of(out)
        if shared_task is not None:
            out = out + await shared_task
        self.stage_s["combine"] += time.perf_counter() - start
        # Step 5: split back per caller; callers whose tokens hit a failed group get its error.
        return self._split(out, parts, failed, ids.shape[1]), table.epoch

    def _gate(self, layer: int, x: torch.Tensor, token_ids: torch.Tensor | None):
        """(weights [T, k] or [T, k + S] (`Gate`), ids [T, k], order [N] copies sorted by expert, counts
        [E] per expert)."""
        weights, ids = self.gates[layer](x, token_ids)
        order, counts, _ = align_tokens(ids, self.spec.num_scored)
        return weights, ids, order, counts

    @staticmethod
    async def _off_loop(is_large: bool, fn, *args):
        return await asyncio.to_thread(fn, *args) if is_large else fn(*args)

    def flush_counts(self) -> None:
        """Move what the tally accumulated into tokens per expert, the load window, the pair shares
        and the metrics (the load report and a timer call this; never the hot path). Identity experts'
        copies are no expert's load: only the real experts' counts go on."""
        now = time.monotonic()
        for layer, (counts, ids) in self.tally.take().items():
            counts = counts[:self.spec.num_experts]
            per_expert = {(layer, expert): count for expert, count in enumerate(counts) if count}
            self.tokens_per_expert.update(per_expert)
            self.load.add(now, per_expert)
            self.pairs.add(now, layer, ids)
            if self.metrics is not None:
                self.metrics.observe_tokens(layer, counts)

    async def _scatter_gather(self, table: RoutingTable, layer: int, x: torch.Tensor, weights: torch.Tensor,
                              ids: torch.Tensor, order: torch.Tensor, counts: list[int], is_large: bool = False):
        """Compute every token copy on some copy of its expert; the copies of a group that fails
        are retried on the others, every group that failed this batch excluded, up to RETRIES times
        (a node's groups die one after another: a retry may meet the next). Returns (y [N, H],
        order [N]: the flat copy index of each row of y, failed: [(flat copy indices, error)] of
        copies that found no live copy (their rows of y are zero))."""
        first = plan = plan_batch(order, counts, table.layers[layer], self._turn,
                                  self._ejected(table.layers[layer], counts))
        self._turn += 1
        y, errors = await self._send(table, layer, x, weights, plan, is_large=is_large)
        if not errors and not plan.unroutable.numel():
            return y, plan.order, []
        failed_groups, kept_y, kept_order = dict(errors), [], []
        for attempt in range(RETRIES + 1):
            is_kept = torch.ones(plan.order.shape[0], dtype=torch.bool, device=plan.order.device)
            for d in plan.destinations:
                if d.group in errors:
                    is_kept[d.start:d.stop] = False
            kept_y.append(y[is_kept])
            kept_order.append(plan.order[is_kept])
            pending = torch.cat([plan.order[~is_kept], plan.unroutable])
            if not pending.numel() or attempt == RETRIES:
                break
            flat_ids = ids.reshape(-1)[pending]
            pending = pending[torch.argsort(flat_ids, stable=True)]
            pending_counts = torch.bincount(flat_ids, minlength=self.spec.num_experts).tolist()
            ejected = self.hedging.ejected()
            slow = {g: (g in ejected, self.hedging.misses(g)) for g, e in failed_groups.items()
                    if isinstance(e, HedgedError)}
            plan = plan_batch(pending, pending_counts, table.layers[layer], self._turn, frozenset(failed_groups), slow)
            y, errors = await self._send(table, layer, x, weights, plan, excluded=failed_groups)
            failed_groups.update(errors)
        failed = [(plan.order[d.start:d.stop], errors[d.group]) for d in plan.destinations if d.group in errors]
        if plan.unroutable.numel():
            failed += self._blame(plan.unroutable, first, failed_groups, ids, layer)
        return (torch.cat([*kept_y, y.new_zeros(pending.shape[0], y.shape[1])]), torch.cat([*kept_order, pending]),
                failed)

    def _ejected(self, copies: list[list], counts: list[int]) -> frozenset[str]:
        """The groups hedging avoids (ejected, or just missed a deadline), unless that leaves an expert of
        this batch without a copy."""
        ejected = self.hedging.avoided()
        if ejected and any(n and all(c.group in ejected for c in copies[e]) for e, n in enumerate(counts)):
            return frozenset()
        return ejected

    @staticmethod
    def _blame(copies: torch.Tensor, plan, errors: dict[str, BaseException], ids: torch.Tensor,
               layer: int) -> list[tuple[torch.Tensor, BaseException]]:
        """The copies (flat indices) left with no live copy after the retry, grouped by who failed
        them: the group of the first plan that failed them, else (no copy at all) ExpertUnavailableError."""
        is_left = torch.zeros(ids.numel(), dtype=torch.bool, device=ids.device)
        is_left[copies] = True
        failed = []
        for d in plan.destinations:
            if d.group in errors:
                mine = plan.order[d.start:d.stop]
                failed.append((mine[is_left[mine]], errors[d.group]))
                is_left[mine] = False
        if is_left.any():
            rest = is_left.nonzero().reshape(-1)
            failed.append((rest, ExpertUnavailableError(
                f"layer {layer}: experts {sorted(set(ids.reshape(-1)[rest].tolist()))} have no live copy")))
        return [(c, e) for c, e in failed if c.numel()]

    async def _send(self, table: RoutingTable, layer: int, x: torch.Tensor, weights: torch.Tensor, plan,
                    excluded: dict | None = None, is_large: bool = False) -> tuple[torch.Tensor, dict[str, BaseException]]:
        """Rows of the plan (one gather of x), out through the transport; returns (y, {group: error}).
        A first send hedges (router_service/hedging.py): a destination past its deadline fails here
        and goes to other copies with the retry."""
        start = time.perf_counter()
        rows = await self._off_loop(is_large, torch.index_select, x, 0, plan.order // weights.shape[1])  # [M, H]
        scale = weights.reshape(-1)[plan.order].float() if self.spec.gate_on_input else None
        y = torch.empty_like(rows)
        self.batch_stats["group_calls"] += len(plan.destinations)
        deadlines = None if excluded is not None else self._deadlines(table.layers[layer], plan.destinations)
        sent = time.perf_counter()
        self.stage_s["plan"] += sent - start
        errors, seconds = await self.transport.dispatch(layer, table.epoch, rows, scale, plan.destinations, y,
                                                        deadlines)
        self.stage_s["dispatch"] += time.perf_counter() - sent
        for d in plan.destinations:  # the transport's contract; its slice of y is garbage otherwise
            if d.group not in seconds and d.group not in errors:
                logger.error("layer %d: the transport returned neither an answer nor an error for %s", layer, d.group)
                errors[d.group] = ExpertUnavailableError(f"expert group {d.group}: no answer from the transport")
        for d, deadline in zip(plan.destinations, deadlines or [None] * len(plan.destinations)):
            if d.group in seconds:
                self.hedging.answered(d.group, seconds[d.group], d.stop - d.start)
            elif deadline is not None and isinstance(errors.get(d.group), ExpertTimeoutError):
                ejected = self.hedging.missed(d.group)  # slow, not known dead: the retry takes its slice elsewhere
                self.batch_stats.update(hedges=1, ejections=int(ejected))
                if self.metrics is not None:
                    self.metrics.observe_hedge(d.group, ejected)
                errors[d.group] = HedgedError(f"expert group {d.group} passed its {deadline * 1e3:.0f} ms deadline: "
                                              f"{errors.get(d.group)}")
                logger.info("layer %d: %s; hedged", layer, errors[d.group])
                continue
            if d.group in errors:
                logger.warning("layer %d: group %s failed: %s", layer, d.group, errors[d.group])
                if self.on_group_failure is not None:
                    self.on_group_failure(d.group)
        return y, errors

    def _deadlines(self, copies: list[list], destinations: list) -> list[float | None]:
        """Per destination its hedge deadline, where every one of its experts has a copy elsewhere."""
        return [self.hedging.deadline_s(d.group, d.stop - d.start)
                if all(any(c.group != d.group for c in copies[e]) for e in d.experts) else None
                for d in destinations]

    async def flush_forever(self, period_s: float) -> None:
        """flush_counts every `period_s` (off the hot path), until cancelled."""
        while True:
            await asyncio.sleep(period_s)
            try:
                self.flush_counts()
            except Exception:  # noqa: BLE001 - logged; the next flush tries again
                logger.exception("flushing token counts failed")

    def load_report(self, pairs: bool = True) -> bytes:
        """msgpack {"tokens": [[layer, expert, count since start], ...],
                    "rates": [[layer, expert, tokens/s over the load window], ...],
                    "pairs": [[layer, a, b, share of the layer's tokens that picked both a < b], ...],
                    "batches": {"batches", "entries", "tokens", "max_tokens", "group_calls", "hedges",
                                "ejections"} since start,
                    "segments": {transport: destination slices sent over it} since start,
                    "wires": {what a channel travels on and why: channels opened} (collective's),
                    "stage_s": {stage: seconds spent in it since start; "forwards": Forwards served}}
        (entries: requests, or their chunks, merged into the batches; group_calls: messages sent to
        expert groups; hedges: slices cancelled past their deadline and sent elsewhere; ejections:
        groups ejected from routing for missing deadlines). Pairs: the commonest PAIRS_PER_EXPERT x
        num_experts of each layer, recent batches weighted more (exp(-age / load_window_s)); an
        empty list unless `pairs`."""
        self.flush_counts()
        now = time.monotonic()
        tokens = [[layer, expert, n] for (layer, expert), n in self.tokens_per_expert.items()]
        rates = [[layer, expert, r] for (layer, expert), r in self.load.rates(now).items()]
        per_layer = PAIRS_PER_EXPERT * self.spec.num_experts
        real = self.spec.num_experts  # pairs with an identity expert are no placement's concern
        shares = {key: share for key, share in (self.pairs.shares(per_layer) if pairs else {}).items()
                  if key[2] < real}
        return msgpack.packb({"tokens": tokens, "rates": rates,
                              "pairs": [[layer, a, b, share] for (layer, a, b), share in shares.items()],
                              "batches": dict(self.batch_stats), "segments": dict(self.transport.segments),
                              "wires": self.transport.wires,
                              "stage_s": dict(self.stage_s)})

    @staticmethod
    def _split(out: torch.Tensor, parts: list[slice], failed: list, top_k: int) -> list:
        """Per caller (rows `parts` of out [T, H]) its output, or the error of the group that failed
        its tokens (the first such failure of its rows; `failed` holds flat copy indices, `top_k`
        per token)."""
        if not failed:
            return [out[p] for p in parts]
        failure = torch.full((out.shape[0],), len(failed), dtype=torch.int64, device=out.device)  # [T]: into failed
        for index in reversed(range(len(failed))):
            failure[failed[index][0] // top_k] = index
        first = [int(failure[p].min()) for p in parts]
        return [failed[i][1] if i < len(failed) else out[p] for p, i in zip(parts, first)]
