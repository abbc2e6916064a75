"""The collective transport: torch.distributed send/recv over one 2-rank process group per
(router, group) channel, one code path: NCCL with device buffers where both ends compute on distinct
GPUs (rows go GPU to GPU; torch orders each send after the work on the current stream, and a wait
orders the stream after the receive), else gloo with host buffers (rows on a GPU are copied into
the request buffer: they cross the host). `protos.collective.wire_device` decides, from what each
end tells of its device. The wire contract is protos/collective.py; the group's end is
experts/channel.py.

Rendezvous goes through Ray: the router hosts a TCPStore on its node (port 0: the OS picks) and
asks the group actor, by a Ray call, to join it under a channel id with 128 random bits that only
that call carries. Nothing for the user to set. The gloo / NCCL traffic itself is neither
authenticated nor encrypted (README, Security).

    open      -> the reconciler's "connect" step: channels to the groups that gain copies (anew to
                 a restarted group) before the first table that routes to them
    set_table -> open a channel to every group the table names that has none (in the background;
                 until it is up, that group's slices go over grpc, counted as such) -> close the
                 ones no table names, 10 s later
    dispatch  -> one hop to the transport's thread per batch (a direct client's: none, inline): every
                 destination's request (one message: header, rows, scale) posted at once, then
                 each reply's outputs into the batch's output slice, all within one deadline of
                 `timeout_s`. A failed or timed-out channel is dropped and a new one opened.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import itertools
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from protos.errors import ChannelRefusedError, ExpertTimeoutError, ExpertUnavailableError
from protos.collective import (SPLIT_MIN_BYTES, check_status, device_id, exact_counts, header_nbytes, pack_header,
                               pack_request, process_group, reply_nbytes, request_nbytes, status_nbytes, unpack_reply,
                               wire_device)
from router_service.routing import Destination, RoutingTable
from router_service.transport import GrpcTransport, Outcome, Transport

__all__ = ["Channel", "CollectiveTransport"]

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 30.0
REOPEN_AFTER_S = 1.0  # a group whose channel failed is not asked again sooner
REFUSED_RETRY_S = 30.0  # a group that refused a channel (its budget) is asked again this much later
CLOSE_GRACE_S = 10.0  # a channel outlives the last table naming its group by this (batches in flight)


class Channel:
    """The router's end of one channel: its process group and its request and reply buffers, grown
    to the largest batch sent so far (its waits run in the transport's thread)."""

    def __init__(self, group: str, pg, store, num_experts: int, timeout_s: float,
                 device: torch.device = torch.device("cpu")):
        self.group, self.pg, self.store = group, pg, store
        self.num_experts, self.device = num_experts, device
        self.exact = exact_counts(device)  # every request split (NCCL: equal counts at both ends)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.request = torch.empty(0, dtype=torch.uint8, device=device)
        self.reply = torch.empty(status_nbytes(), dtype=torch.uint8, device=device)

    def call(self, layer: int, epoch: int, rows: torch.Tensor, scale: torch.Tensor | None, dest: Destination,
             out: torch.Tensor, timeout_s: float | None = None) -> None:
        """One destination's slice out, its outputs into out[start:stop] (blocking: never on the event loop)."""
        self.finish(self.post(layer, epoch, rows, scale, dest, out), dest, out, timeout_s)

    def post(self, layer: int, epoch: int, rows: torch.Tensor, scale: torch.Tensor | None, dest: Destination,
             out: torch.Tensor) -> list:
        """The request (rows [start, stop), scale) sent and its reply's receives posted, at once: one
        message each way, or split for large rows (straight into out[start:stop])."""
        a, b = dest.start, dest.stop
        rows, scale = rows[a:b], None if scale is None else scale[a:b]
        hidden, dtype = rows.shape[1], rows.dtype
        if self._is_split(rows):
            self.request = _at_least(self.request, header_nbytes(self.num_experts))
            header = pack_header(self.request, self.num_experts, layer, epoch, dest.experts, dest.counts,
                                 dest.versions, b - a, scale is not None, True)
            sends, receives = [header, rows, scale], [self.reply[:status_nbytes()], out[a:b]]
        else:
            self.request = _at_least(self.request, request_nbytes(self.num_experts, b - a, hidden, dtype))
            self.reply = _at_least(self.reply, reply_nbytes(b - a, hidden, dtype))
            sends = [pack_request(self.request, self.num_experts, layer, epoch, dest.experts, dest.counts,
                                  dest.versions, rows, scale)]
            receives = [self.reply[:reply_nbytes(b - a, hidden, dtype)]]
        return ([self.pg.send([t], 1, 0) for t in sends if t is not None]
                + [self.pg.recv([t], 1, 0) for t in receives])

    def finish(self, posted: list, dest: Destination, out: torch.Tensor, timeout_s: float | None = None) -> None:
        """Wait for what `post` posted, then the outputs into out[start:stop] (a split reply is there
        already); ValueError when the group answered with an error. Every wait bounded by
        `timeout_s` (default the channel's)."""
        timeout = self.timeout if timeout_s is None else datetime.timedelta(seconds=max(timeout_s, 1e-3))
        for work in posted:
            work.wait(timeout)
        a, b = dest.start, dest.stop
        if self._is_split(out[a:b]):  # the outputs came straight into out[a:b]
            check_status(self.reply, b - a)
        else:
            out[a:b] = unpack_reply(self.reply, b - a, out.shape[1], out.dtype)

    def _is_split(self, rows: torch.Tensor) -> bool:
        """Whether `rows` travel split (protos/collective.py): always over NCCL, else from SPLIT_MIN_BYTES
        where they are on the channel's device (rows on a GPU over gloo cross the host in the buffer)."""
        return self.exact or (rows.device == self.device and rows.numel() * rows.element_size() >= SPLIT_MIN_BYTES)

    def close(self) -> None:
        self.pg = self.store = None


def _at_least(buf: torch.Tensor, nbytes: int) -> torch.Tensor:
    """`buf`, or a new buffer of `nbytes` when it is smaller (a batch larger than any before)."""
    return buf if buf.shape[0] >= nbytes else torch.empty(nbytes, dtype=torch.uint8, device=buf.device)


def exchange(calls: list[tuple[Channel, Destination, float | None]], layer: int, epoch: int, rows: torch.Tensor,
             scale: torch.Tensor | None, out: torch.Tensor, timeout_s: float) -> Outcome:
    """Every destination's slice posted at once, then each answer awaited, all within one deadline of
    `timeout_s` (a frozen group costs the batch one timeout, not one per group) and each within its
    own deadline where it has one (seconds from the post). Blocking: runs in the transport's thread."""
    start = time.monotonic()
    errors, seconds, posted = {}, {}, {}
    for channel, dest, _ in calls:
        try:
            posted[dest.group] = channel.post(layer, epoch, rows, scale, dest, out)
        except Exception as exc:  # noqa: BLE001 - a broken channel: that destination failed
            errors[dest.group] = exc
    for channel, dest, deadline in calls:
        if dest.group in posted:
            limit = min(timeout_s, deadline or timeout_s)
            try:
                channel.finish(posted[dest.group], dest, out, limit - (time.monotonic() - start))
                seconds[dest.group] = time.monotonic() - start
            except Exception as exc:  # noqa: BLE001 - timed out, broken, or the group's error (ValueError)
                late = not isinstance(exc, ValueError) and time.monotonic() - start >= limit
                errors[dest.group] = TimeoutError(str(exc)) if late else exc
    return Outcome(errors, seconds)


class CollectiveTransport(Transport):
    """Channels to the groups of the table in force; grpc for a group until its channel is up.
    `segments` counts the slices sent per transport ("collective", "grpc")."""

    def __init__(self, router: str, namespace: str, num_experts: int, max_rows: int, dtype: torch.dtype,
                 secret: str, timeout_s: float = 2.0, grpc_timeout_s: float = 30.0, inline: bool = False,
                 device: torch.device | str = "cpu"):
        self.router, self.namespace = router, namespace
        self.device = torch.device(device)  # the router's: channels to groups on other GPUs are NCCL (wire_device)
        self._wires: collections.Counter[str] = collections.Counter()  # channels opened, by wire_device's reason
        # `inline`: exchanges on the event loop's own thread, for a loop that serves one process's
        # calls (a direct client's): a batch waits for its groups (at most its deadline) with no
        # thread hop, and other calls queue meanwhile. Else on the transport's thread, so that the
        # loop (a router's gRPC port) keeps serving. Either way one thread: no two exchanges overlap
        self.inline = inline
        self.num_experts, self.max_rows, self.dtype = num_experts, max_rows, dtype
        self.timeout_s = timeout_s
        self.fallback = GrpcTransport(secret, grpc_timeout_s)
        self.channels: dict[str, Channel] = {}
        self.segments: collections.Counter[str] = collections.Counter()
        self._opening: dict[str, asyncio.Task] = {}
        self._failed_at: dict[str, float] = {}
        self.refused: dict[str, str] = {}  # group -> why it refused this caller a channel (the last time)
        self._abandoned: set[asyncio.Future] = set()  # rendezvous left to time out after a refusal
        self._named: set[str] = set()  # groups the table in force names
        self._ids = itertools.count()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"collective-{router}")  # every channel's waits

    def on_table(self, table: RoutingTable) -> None:
        """Open channels to the groups `table` names; close the ones it no longer names once the
        batches planned on older tables are done (CLOSE_GRACE_S)."""
        self._named = set(table.groups())
        for group in self._named:
            self._open_soon(group)
        loop = asyncio.get_running_loop()
        for group in [g for g in self.channels if g not in self._named]:
            loop.call_later(CLOSE_GRACE_S, self._close_unnamed, group)

    async def open(self, groups: list[str], fresh: bool = False) -> None:
        """Channels to `groups`, waiting for any being opened (one channel per group, ever: an open
        in flight is joined, not doubled); `fresh`: anew (the groups were restarted: their old
        channels, and any opened meanwhile, reach the dead incarnation)."""
        if fresh:
            await asyncio.gather(*(self._opening[g] for g in groups if g in self._opening), return_exceptions=True)
            for group in groups:
                channel = self.channels.pop(group, None)
                if channel is not None:
                    channel.close()
                self._failed_at.pop(group, None)
        await asyncio.gather(*(self._opening.get(g) or self._start_open(g) for g in groups if g not in self.channels),
                             return_exceptions=True)

    @property
    def wires(self) -> dict[str, int]:
        return dict(self._wires)

    def to(self, device: torch.device | str) -> None:
        """The router computes on `device` now: channels are opened anew for it (grpc meanwhile)."""
        if torch.device(device) == self.device:
            return
        self.device = torch.device(device)
        for group, channel in list(self.channels.items()):
            self._drop(group, channel)
            self._failed_at.pop(group, None)
            self._open_soon(group)

    def _close_unnamed(self, group: str) -> None:
        if group not in self._named and group in self.channels:
            self.channels.pop(group).close()

    async def dispatch(self, layer, epoch, rows, scale, destinations, out, deadlines=None) -> Outcome:
        """The destinations with a channel in one `exchange` on the transport's thread (one thread hop
        per batch), the others over grpc meanwhile (their channels opened in the background)."""
        deadlines = deadlines or [None] * len(destinations)
        calls = [(self.channels[d.group], d, t) for d, t in zip(destinations, deadlines) if d.group in self.channels]
        others = [(d, t) for d, t in zip(destinations, deadlines) if d.group not in self.channels]
        for dest, _ in others:
            self._open_soon(dest.group)
        for kind, num_slices in (("collective", len(calls)), ("grpc", len(others))):
            if num_slices:  # counted as sent; a failed one is taken back (_failed)
                self.segments[kind] += num_slices
        if self.inline:  # the exchange blocks the loop, then grpc: one thread, so no two exchanges overlap
            exchanged = exchange(calls, layer, epoch, rows, scale, out, self.timeout_s)
            grpc_sent = (await self.fallback.dispatch(layer, epoch, rows, scale, [d for d, _ in others], out,
                                                      [t for _, t in others]) if others else Outcome({}, {}))
        else:
            exchanged, grpc_sent = await asyncio.gather(
                asyncio.get_running_loop().run_in_executor(self._thread, exchange, calls, layer, epoch, rows, scale,
                                                           out, self.timeout_s),
                self.fallback.dispatch(layer, epoch, rows, scale, [d for d, _ in others], out, [t for _, t in others]),
                return_exceptions=True)
        if isinstance(exchanged, BaseException):  # the thread itself failed: every channel's slice did
            exchanged = Outcome({d.group: exchanged for _, d, _ in calls}, {})
        if isinstance(grpc_sent, BaseException):
            grpc_sent = Outcome({d.group: grpc_sent for d, _ in others}, {})
        # each failed slice decided once, before any await: closed under the batch (a table moved
        # on, a reopen) -> resent over grpc; else failed (a channel closed later is still reported)
        closed, errors = [], {}
        for channel, d, t in calls:
            if d.group in exchanged.errors:
                if channel.pg is None:
                    closed.append((d, t))
                else:
                    errors[d.group] = self._failed(channel, d, exchanged.errors[d.group])
        if closed:
            self.segments.update(collective=-len(closed), grpc=len(closed))
            resent = await self.fallback.dispatch(layer, epoch, rows, scale, [d for d, _ in closed], out,
                                                  [t for _, t in closed])
            grpc_sent = Outcome({**grpc_sent.errors, **resent.errors}, {**grpc_sent.seconds, **resent.seconds})
        return Outcome({**errors, **grpc_sent.errors}, {**grpc_sent.seconds, **exchanged.seconds})

    def _failed(self, channel: Channel, dest: Destination, error: BaseException) -> ExpertUnavailableError:
        """A destination that failed on its channel; a channel that timed out or broke is dropped (a
        group that answered with an error keeps it)."""
        self.segments["collective"] -= 1
        if not isinstance(error, ValueError):
            self._drop(dest.group, channel)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        kind = ExpertTimeoutError if isinstance(error, TimeoutError) else ExpertUnavailableError
        return kind(f"expert group {dest.group} (collective): {reason}")

    async def send(self, layer, epoch, rows, scale, dest, out, timeout_s=None) -> None:
        errors = (await self.dispatch(layer, epoch, rows, scale, [dest], out, [timeout_s])).errors
        if errors:
            raise errors[dest.group]

    def _drop(self, group: str, channel: Channel) -> None:
        if self.channels.get(group) is channel:
            del self.channels[group]
        channel.close()
        self._failed_at[group] = time.monotonic()

    def _open_soon(self, group: str) -> None:
        if group in self.channels or group in self._opening:
            return
        if time.monotonic() - self._failed_at.get(group, -1e9) < REOPEN_AFTER_S:
            return
        self._start_open(group)

    def _start_open(self, group: str) -> asyncio.Task:
        """The one open of `group`'s channel in flight (registered, so that no second one starts)."""
        task = asyncio.get_running_loop().create_task(self._open(group))
        self._opening[group] = task
        task.add_done_callback(lambda _t, g=group: self._opening.pop(g, None))
        return task

    async def _open(self, group: str) -> None:
        import ray
        import torch.distributed as dist

        try:
            actor = ray.get_actor(group, namespace=self.namespace)
            wire, why = wire_device(device_id(self.device), await asyncio.wait_for(actor.device_id.remote(),
                                                                                   OPEN_TIMEOUT_S))
            local = self.device if wire == "cuda" else torch.device("cpu")  # this end's buffers and backend
            host = ray.util.get_node_ip_address()
            store = dist.TCPStore(host, 0, 2, is_master=True, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=OPEN_TIMEOUT_S))
            channel_id = f"{self.router}/{group}/{next(self._ids)}/{secrets.token_hex(16)}"  # told by a Ray call only
            joined = actor.open_channel.remote(channel_id, self.router, host, store.port, self.max_rows,
                                               _dtype_name(self.dtype), wire)
            joining = asyncio.ensure_future(asyncio.wait_for(joined, OPEN_TIMEOUT_S))
            forming = asyncio.ensure_future(asyncio.to_thread(
                process_group, dist.PrefixStore(channel_id + "/", store), 0, local, OPEN_TIMEOUT_S))
            await asyncio.wait([joining, forming], return_when=asyncio.FIRST_EXCEPTION)
            if joining.done() and joining.exception() is not None:  # refused: the rendezvous would wait in vain
                self._abandoned.add(forming)  # it times out on its own (close cancels the wait for it)
                forming.add_done_callback(self._abandoned.discard)
                forming.add_done_callback(lambda f: f.cancelled() or f.exception())  # nothing to log
                raise joining.exception()
            pg = await forming
            await joining
            old = self.channels.get(group)
            if old is not None:
                old.close()
            self.channels[group] = Channel(group, pg, store, self.num_experts, self.timeout_s, local)
            self._wires[why] += 1
            logger.info("collective channel to %s open (%s; %s)", group, channel_id, why)
        except ChannelRefusedError as exc:  # over the group's budget: grpc for this caller, asked again later
            self._failed_at[group] = time.monotonic() + REFUSED_RETRY_S
            self.refused[group] = str(getattr(exc, "cause", exc))  # a RayTaskError carries the group's error
            logger.warning("collective channel to %s refused (grpc instead): %s", group, self.refused[group])
        except Exception as exc:  # noqa: BLE001 - grpc carries its traffic; tried again later
            self._failed_at[group] = time.monotonic()
            logger.warning("collective channel to %s not opened (grpc meanwhile): %r", group, exc)

    async def close(self) -> None:
        for task in [*self._opening.values(), *self._abandoned]:
            task.cancel()
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        self._thread.shutdown(wait=False)
        await self.fallback.close()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
