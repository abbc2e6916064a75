"""Scatter/gather transports behind one whole-batch boundary (as DeepEP's dispatch/combine):

    router: plan_batch -> rows [M, H] sorted by destination, then expert
            -> Transport.dispatch(rows, destinations, out) -> out [M, H] in the same order -> combine

Backends, which combine freely with the rest of the router:
- `GrpcTransport` (default): ExpertWorker.Compute over grpc.aio, tensors as raw bytes;
- `RayTransport`: a method call on the group's Ray actor, tensors through the object store;
- `CollectiveTransport` (router_service/collective.py): torch.distributed send/recv per
  (router, group) channel, gloo for CPU tensors, NCCL for CUDA tensors.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import time
from typing import NamedTuple

import grpc
import torch

from protos.errors import ExpertTimeoutError, ExpertUnavailableError
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos import serving
from protos.serving import TLSConfig, secret_metadata
from protos.wire import decode_into, to_proto
from router_service.routing import Destination

__all__ = ["GrpcTransport", "HostStaging", "Outcome", "RayTransport", "Transport", "make_transport"]

_MAX_MESSAGE = 1 << 30
CHANNEL_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]


class Outcome(NamedTuple):
    """What `dispatch` tells of each destination: why it failed, or how long its answer took."""

    errors: dict[str, BaseException]  # group -> its error (its slice of out left as it was)
    seconds: dict[str, float]         # group -> seconds until its answer (the ones that answered)


class Transport(abc.ABC):
    """The whole-batch boundary: one call sends every destination's slice of a batch plan."""

    async def dispatch(self, layer: int, epoch: int, rows: torch.Tensor, scale: torch.Tensor | None,
                       destinations: list[Destination], out: torch.Tensor,
                       deadlines: list[float | None] | None = None) -> Outcome:
        """rows [M, H] (scale [M] float32 or None) in plan order; every destination computes its
        slice [start, stop) with the table's weight versions and its outputs land in the same
        slice of `out` [M, H]. deadlines: seconds per destination (None: the transport's own
        timeout); one passed fails that destination (the router hedges it elsewhere)."""
        deadlines = deadlines or [None] * len(destinations)
        results = await asyncio.gather(*(_timed(self.send(layer, epoch, rows, scale, d, out, t))
                                         for d, t in zip(destinations, deadlines)), return_exceptions=True)
        return Outcome({d.group: r for d, r in zip(destinations, results) if isinstance(r, BaseException)},
                       {d.group: r for d, r in zip(destinations, results) if not isinstance(r, BaseException)})

    @abc.abstractmethod
    async def send(self, layer: int, epoch: int, rows: torch.Tensor, scale: torch.Tensor | None,
                   dest: Destination, out: torch.Tensor, timeout_s: float | None = None) -> None:
        """One destination of `dispatch`, within `timeout_s` (None: the transport's). Raises
        ExpertUnavailableError when the group cannot answer."""

    def on_table(self, table) -> None:
        """A new routing table is in force (a transport with channels opens and closes them)."""

    async def open(self, groups: list[str], fresh: bool = False) -> None:
        """Channels to `groups` now; `fresh`: replacing any (a transport without channels: nothing)."""

    def to(self, device: torch.device | str) -> None:
        """The router computes on `device` now (a transport whose channels depend on it reopens them)."""

    @property
    def wires(self) -> dict[str, int]:
        """Channels opened, by what they travel on and why (protos.collective.wire_device); none here."""
        return {}

    async def close(self) -> None:
        """Release connections."""


class HostStaging:
    """Where a slice on a GPU crosses the host for grpc: pinned host buffers per destination, grown
    to its largest slice, each lent to one call at a time (batches in flight may share a destination).
    A slice on the host is used as it is."""

    def __init__(self):
        self._free: dict[str, list[torch.Tensor]] = collections.defaultdict(list)  # destination -> uint8 buffers

    @contextlib.contextmanager
    def lend(self, key: str, like: torch.Tensor):
        """A host tensor of like's dtype and shape [n, H]: `like` itself on the host, else a view of
        one of key's pinned buffers (given back on exit)."""
        if like.device.type == "cpu":
            yield like
            return
        nbytes, free = like.numel() * like.element_size(), self._free[key]
        buf = free.pop() if free else torch.empty(0, dtype=torch.uint8)
        if buf.shape[0] < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # CUDA only: not run here
        try:
            yield buf[:nbytes].view(like.dtype).view(like.shape)
        finally:
            free.append(buf)


class GrpcTransport(Transport):
    """ExpertWorker.Compute per destination, every call carrying the mesh's `secret`. Rows on a GPU
    go through one pinned host buffer per destination (`HostStaging`), each way."""

    def __init__(self, secret: str, timeout_s: float = 30.0, tls: TLSConfig | None = None):
        self.segments: collections.Counter[str] = collections.Counter()
        self._staging = HostStaging()
        self._metadata = secret_metadata(secret)
        self._tls = tls
        self._timeout_s = timeout_s
        self._stubs: dict[str, pb_grpc.ExpertWorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, endpoint: str) -> pb_grpc.ExpertWorkerStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            channel = serving.channel(endpoint, self._tls, CHANNEL_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[endpoint] = pb_grpc.ExpertWorkerStub(channel)
        return stub

    async def send(self, layer, epoch, rows, scale, dest, out, timeout_s=None) -> None:
        self.segments["grpc"] += 1
        request = pb.ExpertBatch(layer=layer, experts=dest.experts, counts=dest.counts, epoch=epoch,
                                 versions=dest.versions)
        part, into = rows[dest.start:dest.stop], out[dest.start:dest.stop]
        with self._staging.lend(dest.endpoint, part) as host:
            staged = host is not part
            if staged:
                host.copy_(part)  # blocking, on the stream that made the rows: after their work
            to_proto(host, request.hidden)  # one copy: the slice's bytes
            if scale is not None:
                to_proto(scale[dest.start:dest.stop], request.scale)
            try:
                reply = await self._stub(dest.endpoint).Compute(request, timeout=timeout_s or self._timeout_s,
                                                                metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                kind = ExpertTimeoutError if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else ExpertUnavailableError
                raise kind(f"expert group {dest.group} at {dest.endpoint}: {exc.code().name} {exc.details()}") from exc
            decode_into(reply.hidden, host if staged else into, "ExpertResult.hidden")  # one copy
            if staged:
                into.copy_(host)  # blocking: the buffer is free again once this returns

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._stubs.clear()
        self._channels.clear()


class RayTransport(Transport):
    """Calls `ExpertGroupActor.compute` through Ray; groups are found by name in `namespace`."""

    def __init__(self, namespace: str, timeout_s: float = 30.0):
        self.segments: collections.Counter[str] = collections.Counter()
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._handles: dict[str, object] = {}

    async def send(self, layer, epoch, rows, scale, dest, out, timeout_s=None) -> None:
        import ray

        a, b = dest.start, dest.stop
        self.segments["ray"] += 1
        try:
            handle = self._handles.get(dest.group)
            if handle is None:
                handle = self._handles[dest.group] = ray.get_actor(dest.group, namespace=self._namespace)
            # a slice pickles its whole storage: clone it (one copy) unless it is all of it
            part = rows if (a, b) == (0, rows.shape[0]) else rows[a:b].clone()
            part_scale = None if scale is None else scale[a:b].clone()
            ref = handle.compute.remote(layer, part, list(dest.experts), list(dest.counts), part_scale,
                                        list(dest.versions))
            out[a:b] = await asyncio.wait_for(ref, timeout_s or self._timeout_s)
        except (ray.exceptions.RayError, ValueError, asyncio.TimeoutError) as exc:
            self._handles.pop(dest.group, None)
            kind = ExpertTimeoutError if isinstance(exc, asyncio.TimeoutError) else ExpertUnavailableError
            raise kind(f"expert group {dest.group}: {type(exc).__name__}: {exc}") from exc


async def _timed(call) -> float:
    """Seconds `call` (an awaitable) took."""
    start = time.perf_counter()
    await call
    return time.perf_counter() - start


def make_transport(config, namespace: str, router: str, num_experts: int, max_rows: int,
                   dtype: torch.dtype, secret: str, tls: TLSConfig | None = None, inline: bool = False,
                   device: torch.device | str = "cpu") -> Transport:
    """The transport `config.transport` names (config: RouterConfig); `secret`: the mesh's; `tls`:
    how to reach the groups' ports (internal_tls); `inline`: the collective transport's waits on the
    caller's event loop (a loop that serves one process's calls: CollectiveTransport); `device`: the
    router's (the collective transport's channels to groups on other GPUs are NCCL)."""
    if config.transport == "grpc":
        return GrpcTransport(secret, config.expert_timeout_s, tls)
    if config.transport == "ray":
        return RayTransport(namespace, config.expert_timeout_s)
    if config.transport == "collective":
        from router_service.collective import CollectiveTransport

        return CollectiveTransport(router, namespace, num_experts, max_rows, dtype, secret,
                                   config.collective_timeout_s, config.expert_timeout_s, inline, device)
    raise ValueError(f"transport must be 'grpc', 'ray' or 'collective', got {config.transport!r}")
