"""Scatter/gather transports: how one destination's rows reach an expert group and come back.

One interface, several backends that combine freely with the rest of the router:
- `GrpcTransport` (default): ExpertWorker.Compute over grpc.aio, tensors as raw bytes;
- `RayTransport`: a method call on the group's Ray actor, tensors through the object store.
A collective backend (torch.distributed all_to_all over NCCL/gloo) fits the same interface.
"""

from __future__ import annotations

import abc

import grpc
import torch

from experts.errors import MeshError
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos.wire import from_proto, to_proto

__all__ = ["ExpertUnavailableError", "GrpcTransport", "RayTransport", "Transport", "make_transport"]

_MAX_MESSAGE = 1 << 30
CHANNEL_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]


class ExpertUnavailableError(MeshError):
    """An expert group did not answer (dead, unreachable, timed out)."""


class Transport(abc.ABC):
    @abc.abstractmethod
    async def compute(self, group: str, endpoint: str, layer: int, rows: torch.Tensor, experts: list[int],
                      counts: list[int], scale: torch.Tensor | None, epoch: int,
                      versions: list[str] | None = None) -> torch.Tensor:
        """Send rows [N, H] (sorted by expert) to `group`, to be computed with the weight
        `versions` of the routing table; returns its outputs [N, H].
        Raises ExpertUnavailableError when the group cannot answer."""

    async def close(self) -> None:
        """Release connections."""


class GrpcTransport(Transport):
    def __init__(self, timeout_s: float = 30.0):
        self._timeout_s = timeout_s
        self._stubs: dict[str, pb_grpc.ExpertWorkerStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def _stub(self, endpoint: str) -> pb_grpc.ExpertWorkerStub:
        stub = self._stubs.get(endpoint)
        if stub is None:
            channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
            self._channels.append(channel)
            stub = self._stubs[endpoint] = pb_grpc.ExpertWorkerStub(channel)
        return stub

    async def compute(self, group, endpoint, layer, rows, experts, counts, scale, epoch, versions=None):
        request = pb.ExpertBatch(layer=layer, experts=experts, counts=counts, epoch=epoch, versions=versions or [])
        to_proto(rows, request.hidden)
        if scale is not None:
            to_proto(scale.float(), request.scale)
        try:
            reply = await self._stub(endpoint).Compute(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise ExpertUnavailableError(f"expert group {group} at {endpoint}: {exc.code().name} "
                                         f"{exc.details()}") from exc
        return from_proto(reply.hidden, "ExpertResult.hidden")

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._stubs.clear()
        self._channels.clear()


class RayTransport(Transport):
    """Calls `ExpertGroupActor.compute` through Ray; groups are found by name in `namespace`."""

    def __init__(self, namespace: str, timeout_s: float = 30.0):
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._handles: dict[str, object] = {}

    async def compute(self, group, endpoint, layer, rows, experts, counts, scale, epoch, versions=None):
        import asyncio

        import ray

        try:
            handle = self._handles.get(group)
            if handle is None:
                handle = self._handles[group] = ray.get_actor(group, namespace=self._namespace)
            ref = handle.compute.remote(layer, rows, experts, counts, scale, versions)
            return await asyncio.wait_for(ref, self._timeout_s)
        except (ray.exceptions.RayError, ValueError, asyncio.TimeoutError) as exc:
            self._handles.pop(group, None)
            raise ExpertUnavailableError(f"expert group {group}: {type(exc).__name__}: {exc}") from exc


def make_transport(kind: str, namespace: str, timeout_s: float) -> Transport:
    if kind == "grpc":
        return GrpcTransport(timeout_s)
    if kind == "ray":
        return RayTransport(namespace, timeout_s)
    raise ValueError(f"transport must be 'grpc' or 'ray', got {kind!r}")
