"""Dynamic batching: merge concurrent requests for one layer into batches.

[callers] -> submit() -> queue -> (take_batch policy) -> runner.run_batch(x [T, H]) -> split -> [callers]

A request larger than `max_batch_tokens` is cut into chunks that travel as separate entries; the
caller may pin them to one routing table (a batch only ever holds entries of one pin).
When the router is idle a batch leaves at once (no added latency); requests that arrive while
`max_inflight_batches` batches are in flight wait and form the next batch, which is where
cross-request batching pays. `max_wait_ms` > 0 additionally holds a batch open for stragglers.

Two lanes, each with `max_inflight_batches` slots: a caller with no batch in flight sends its
next entry in the express lane, so a flooding caller (whose batches fill the main lane) cannot
make the others wait behind its batches; in either lane callers take turns (`take_batch`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from collections import deque
from typing import Any, Protocol

import torch

from protos.errors import QueueFullError
from router_service.config import BatchingConfig

__all__ = ["BatchRunner", "LayerBatcher", "first_of_idle", "take_batch"]


def take_batch(queued: list[tuple[str, int]], max_batch_tokens: int) -> list[int]:
    """Which queued entries (caller, tokens), by index, form the next batch: callers take turns
    (each caller's entries in its own order), at least one entry, then while the next in turn fits
    in `max_batch_tokens`. One caller with many requests queued cannot hold the others behind all
    of them. Pure policy."""
    turns: dict[str, collections.deque[int]] = {}
    for index, (caller, _) in enumerate(queued):
        turns.setdefault(caller, collections.deque()).append(index)
    taken, total = [], 0
    while turns:
        for caller in list(turns):
            index = turns[caller].popleft()
            if taken and total + queued[index][1] > max_batch_tokens:
                return taken
            taken.append(index)
            total += queued[index][1]
            if not turns[caller]:
                del turns[caller]
    return taken


def first_of_idle(callers: list[str], busy: set[str]) -> list[int]:
    """Indices of the first queued entry of each caller not in `busy` (callers with a batch in
    flight): what the express lane may take. Pure policy."""
    seen, first = set(busy), []
    for index, caller in enumerate(callers):
        if caller not in seen:
            seen.add(caller)
            first.append(index)
    return first


@dataclasses.dataclass
class _Entry:
    x: torch.Tensor                 # [t, H]
    future: asyncio.Future
    caller: str = ""                # who sent it (the gRPC peer): callers take turns
    token_ids: torch.Tensor | None = None  # [t] int64, for a layer that picks experts by token id
    pin: Any = None                 # the routing table a chunked request's chunks are all served by


class BatchRunner(Protocol):
    """What runs the batches (the Router)."""

    async def run_batch(self, layer: int, x: torch.Tensor, parts: list[slice], token_ids: torch.Tensor | None,
                        table: Any = None) -> tuple[list[torch.Tensor | BaseException], int]:
        """x [T, H], token_ids [T] or None, `table`: the entries' pin (None: the one in force).
        Returns (one result or exception per part, the batch's tag: the epoch that served it)."""

    def observe_batch(self, num_tokens: int, num_requests: int) -> None:
        """A batch of `num_tokens` from `num_requests` queue entries leaves."""


class LayerBatcher:
    """Batches of one layer, run by `runner`. Token ids travel with their rows: every request of a
    layer has them, or none does."""

    def __init__(self, runner: BatchRunner, layer: int, config: BatchingConfig, max_queue_tokens: int):
        self._runner, self._layer = runner, layer
        self._config = config
        self._max_queue_tokens = max_queue_tokens
        self._queue: deque[_Entry] = deque()
        self._queued_tokens = 0
        self._wakeup = asyncio.Event()
        slots = config.max_inflight_batches if config.enabled else 1 << 30
        self._free = {"main": slots, "express": slots}  # free batch slots per lane
        self._busy: collections.Counter[str] = collections.Counter()  # caller -> its batches in flight
        self._worker = asyncio.get_running_loop().create_task(self._loop())
        self._tasks: set[asyncio.Task] = set()

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    async def submit(self, x: torch.Tensor, caller: str = "", token_ids: torch.Tensor | None = None,
                     pin: Any = None) -> tuple[torch.Tensor, int]:
        """x: [T, H] from `caller`, token_ids: [T] or None, `pin`: what its chunks' batches are served
        by (given to the runner). Returns (the layer's output [T, H], the batch's tag; the newest of
        its chunks' tags when the request was split); raises what the batch raised for it."""
        if self._queued_tokens + x.shape[0] > self._max_queue_tokens:
            raise QueueFullError(f"router queue full: {self._queued_tokens} tokens queued, "
                                 f"max_queue_tokens={self._max_queue_tokens}")
        loop = asyncio.get_running_loop()
        step = self._config.max_batch_tokens
        chunks = _chunks(x, step)
        id_chunks = [None] * len(chunks) if token_ids is None else _chunks(token_ids, step)
        entries = [_Entry(chunk, loop.create_future(), caller, ids, pin)
                   for chunk, ids in zip(chunks, id_chunks, strict=True)]
        lane = self._idle_lane(caller) if len(entries) == 1 else None
        if lane is not None:  # nothing queued and a slot free: it is the next batch, run here
            self._take(lane, entries)
            await self._run(entries, lane)
            return entries[0].future.result()
        self._queue.extend(entries)
        self._queued_tokens += x.shape[0]
        self._wakeup.set()
        try:
            results = await asyncio.gather(*(e.future for e in entries))
        finally:
            for e in entries:
                e.future.cancel()  # a no-op for done futures; marks abandoned chunks to be skipped
        if len(results) == 1:
            return results[0]
        return torch.cat([out for out, _ in results]), max(tag for _, tag in results)

    def _idle_lane(self, caller: str) -> str | None:
        """With nothing queued, the lane a request of `caller` would leave in at once (None: it queues):
        what the loop would do, without its round trip."""
        if self._queue:
            return None
        if self._free["express"] and caller not in self._busy:
            return "express"
        holds_open = self._config.enabled and self._config.max_wait_ms > 0
        return "main" if self._free["main"] and not holds_open else None

    def _take(self, lane: str, batch: list[_Entry]) -> None:
        """A slot of `lane` for `batch`; its callers count as busy until it is done."""
        self._free[lane] -= 1
        self._busy.update({e.caller for e in batch})

    async def close(self) -> None:
        self._worker.cancel()
        for task in list(self._tasks):
            task.cancel()

    async def _loop(self) -> None:
        while True:
            lane = self._free_lane()
            if lane is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._free[lane] -= 1
            if lane == "main" and self._config.enabled and self._config.max_wait_ms > 0:
                await self._hold_open()
            batch = self._pop_batch(lane == "express")
            self._free[lane] += 1
            if not batch:
                continue
            self._take(lane, batch)  # now, so the next batch's lane sees its callers busy
            task = asyncio.get_running_loop().create_task(self._run(batch, lane))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _free_lane(self) -> str | None:
        """The lane the next batch leaves in: express when a caller with nothing in flight is
        queued and that lane has a slot; else main when it has one; None: wait."""
        if not self._queue:
            return None
        if self._free["express"] and any(e.caller not in self._busy for e in self._queue):
            return "express"
        return "main" if self._free["main"] else None

    async def _hold_open(self) -> None:
        deadline = time.monotonic() + self._config.max_wait_ms / 1e3
        while self._queued_tokens < self._config.max_batch_tokens and (left := deadline - time.monotonic()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                break

    def _pop_batch(self, express: bool) -> list[_Entry]:
        limit = self._config.max_batch_tokens if self._config.enabled else 0
        queued = list(self._queue)  # deque indexing is O(n): index a list once
        eligible = first_of_idle([e.caller for e in queued], set(self._busy)) if express else list(range(len(queued)))
        eligible = [i for i in eligible if queued[i].pin is queued[eligible[0]].pin] if eligible else eligible
        chosen = [eligible[i] for i in take_batch([(queued[i].caller, queued[i].x.shape[0]) for i in eligible], limit)]
        taken = set(chosen)
        batch = [queued[i] for i in chosen]
        self._queue = deque(e for i, e in enumerate(queued) if i not in taken)
        self._queued_tokens -= sum(e.x.shape[0] for e in batch)
        return [e for e in batch if not e.future.done()]  # callers gone (cancelled, deadline) are skipped

    async def _run(self, batch: list[_Entry], lane: str) -> None:
        try:
            sizes = [e.x.shape[0] for e in batch]
            x = batch[0].x if len(batch) == 1 else torch.cat([e.x for e in batch])
            bounds = [0, *itertools.accumulate(sizes)]
            parts = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
            self._runner.observe_batch(x.shape[0], len(batch))
            try:
                results, tag = await self._runner.run_batch(self._layer, x, parts, _joined([e.token_ids for e in batch]),
                                                            batch[0].pin)
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                results, tag = [exc] * len(batch), 0
            for entry, result in zip(batch, results):
                if entry.future.done():
                    continue
                if isinstance(result, BaseException):
                    entry.future.set_exception(result)
                else:
                    entry.future.set_result((result, tag))
        finally:
            self._busy -= collections.Counter({e.caller for e in batch})  # -= drops callers left at 0
            self._free[lane] += 1
            self._wakeup.set()


def _chunks(t: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
    """t split along its first dim into chunks of `step` rows (itself when it fits one: no torch op)."""
    return (t,) if t.shape[0] <= step else torch.split(t, step)


def _joined(token_ids: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The entries' token ids [T] in batch order; None when none has them (ValueError when only some do)."""
    if all(ids is None for ids in token_ids):
        return None
    if any(ids is None for ids in token_ids):
        raise ValueError("a batch mixes requests with token ids and requests without")
    return token_ids[0] if len(token_ids) == 1 else torch.cat(token_ids)
