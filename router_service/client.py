"""The client library: call the mesh once per MoE layer (`patching` drops it into a transformers model).

    [attention side] --Forward(layer, hidden [T, H])--> [router] --> ... --> hidden [T, H]

- `MeshClient` / `AsyncMeshClient`: Forward and GetInfo over gRPC (sync / grpc.aio), with failover
  between routers: on UNAVAILABLE the same call moves on to the next address (once per address),
  and the address that answered is remembered for the next calls.
- `MeshInfo`: what GetInfo says about the model the mesh serves.

Every failure raises `MeshClientError`, carrying the gRPC status code and its details.

Shape legend: B = batch, S = sequence, T = tokens (B * S), H = hidden.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import torch

from protos.errors import MeshClientError, WireError
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos import serving
from protos.serving import TLSConfig
from protos.wire import DTYPES, TOKEN_DTYPES, from_proto, to_proto

__all__ = ["AsyncMeshClient", "MeshClient", "MeshInfo"]

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


@dataclasses.dataclass(frozen=True)
class MeshInfo:
    """What GetInfo says about the model the mesh serves."""

    model_type: str
    config_hash: str
    moe_layers: tuple[int, ...]
    hidden_size: int
    dtypes: tuple[str, ...]
    weight_versions: Mapping[str, str] = dataclasses.field(hash=False)  # "layer/expert" -> version
    max_request_tokens: int
    epoch: int

    @classmethod
    def from_proto(cls, message: pb.InfoResponse) -> "MeshInfo":
        return cls(model_type=message.model_type, config_hash=message.config_hash,
                   moe_layers=tuple(message.moe_layers), hidden_size=message.hidden_size,
                   dtypes=tuple(message.dtypes), weight_versions=dict(message.weight_versions),
                   max_request_tokens=message.max_request_tokens, epoch=message.epoch)


# ---- request / response helpers shared by the sync and async clients ----

def _invalid(message: str) -> MeshClientError:
    return MeshClientError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    found = [addresses] if isinstance(addresses, str) else list(addresses)
    if not found or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in found):
        raise _invalid(f"addresses must be a 'host:port' string or a non-empty list of them, got {addresses!r}")
    return found


def _check_timeout(timeout_s: float) -> float:
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise _invalid(f"timeout_s must be a positive number, got {timeout_s!r}")
    return float(timeout_s)


def check_call(layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> None:
    """What a client checks before it sends: layer an int; hidden [T, H] or [B, S, H] of a dtype the
    wire carries; token_ids None or an integer tensor of hidden's leading dims. MeshClientError
    INVALID_ARGUMENT naming the field otherwise."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise _invalid(f"layer must be an int, got {layer!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise _invalid(f"hidden must be a [T, H] or [B, S, H] tensor, got {shape}")
    if hidden.dtype not in DTYPES.values():
        raise _invalid(f"hidden.dtype must be one of {', '.join(DTYPES)}, got {hidden.dtype}")
    if token_ids is not None:
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
            kind = token_ids.dtype if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
            raise _invalid(f"token_ids must be an integer tensor, got {kind}")
        if token_ids.shape != hidden.shape[:-1]:
            raise _invalid(f"token_ids must have hidden's leading dims {list(hidden.shape[:-1])}, "
                           f"got {list(token_ids.shape)}")


def _forward_request(layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> pb.ForwardRequest:
    """Validate (check_call) and encode; token_ids are sent as int64."""
    check_call(layer, hidden, token_ids)
    request = pb.ForwardRequest(layer=layer)
    to_proto(hidden, out=request.hidden)
    if token_ids is not None:
        to_proto(token_ids.to(torch.int64), out=request.token_ids, dtypes=TOKEN_DTYPES)
    return request


def _forward_result(response: pb.ForwardResponse, hidden: torch.Tensor, address: str) -> torch.Tensor:
    """Decode the response and check it has the request's shape and dtype."""
    try:
        out = from_proto(response.hidden, field="ForwardResponse.hidden", copy=True)
    except WireError as exc:
        raise MeshClientError(grpc.StatusCode.INTERNAL, str(exc), address) from exc
    if out.shape != hidden.shape or out.dtype != hidden.dtype:
        raise MeshClientError(grpc.StatusCode.INTERNAL,
                              f"the mesh answered {tuple(out.shape)} {out.dtype} to a request of "
                              f"{tuple(hidden.shape)} {hidden.dtype}", address)
    return out


@dataclasses.dataclass
class _Attempt:
    """One try of a call on one address: the driver sets `response`, or `error` when the call raised."""

    index: int
    address: str
    response: Any = None
    error: grpc.RpcError | None = None


class _FailoverClient:
    """What both clients share: the addresses, the timeout, and the one failover loop, `_attempts`.

    Each client drives the loop with its own call, blocking or awaited:

        for attempt in self._attempts():
            try:
                attempt.response = stubs[attempt.index].Forward(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                attempt.error = exc
        return attempt.response, attempt.address  # the loop ended: the call was answered
    """

    def __init__(self, addresses: str | Sequence[str], timeout_s: float):
        self.timeout_s = _check_timeout(timeout_s)
        self._addresses = _parse_addresses(addresses)
        self._current = 0  # the address that answered last
        self._closed = False

    @property
    def address(self) -> str:
        """The address the next call goes to first (the last one that answered)."""
        return self._addresses[self._current]

    def _attempts(self) -> Iterator[_Attempt]:
        """Each address once, the last one that answered first, until one answers (it then goes first
        in the next calls). UNAVAILABLE moves on to the next address; any other error, and the last
        UNAVAILABLE when no address is left, raises as MeshClientError; FAILED_PRECONDITION when closed."""
        if self._closed:
            raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")
        num_addresses = len(self._addresses)
        for step in range(num_addresses):
            index = (self._current + step) % num_addresses
            attempt = _Attempt(index, self._addresses[index])
            yield attempt
            if attempt.error is None:
                if index != self._current:
                    logger.info("switched to router %s", attempt.address)
                self._current = index
                return
            error = MeshClientError.from_rpc(attempt.error, attempt.address)
            if error.code != grpc.StatusCode.UNAVAILABLE or step == num_addresses - 1:
                raise error from attempt.error
            logger.warning("router %s unavailable (%s); trying the next address", attempt.address, error.details)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._addresses!r}, timeout_s={self.timeout_s})"


# ---- clients ----

class MeshClient(_FailoverClient):
    """Blocking client of `expert_mesh.v1.ExpertMesh`; thread-safe, one channel per address.

    Several addresses: on UNAVAILABLE the call is retried on the next one (once per address);
    other errors are raised at once. A deepcopy shares the client (so does a deep-copied model).
    """

    def __init__(self, addresses: str | Sequence[str], timeout_s: float = 30.0, tls: TLSConfig | None = None):
        """`tls`: reach the router over TLS, checking it against `tls.ca` (and `tls.server_name`),
        presenting `tls.cert`/`tls.key` when the router asks for a client certificate."""
        super().__init__(addresses, timeout_s)
        self._channels = [serving.channel(a, tls, CHANNEL_OPTIONS, aio=False) for a in self._addresses]
        self._stubs = [pb_grpc.ExpertMeshStub(c) for c in self._channels]

    def forward(self, layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The MoE layer `layer` applied to hidden [T, H] or [B, S, H]; same shape and dtype, on CPU.
        token_ids ([T] or [B, S], the tokens' ids) are needed by layers that pick experts by token
        id (DeepSeek-V4's hash layers), and ignored by the others."""
        return self.forward_with_epoch(layer, hidden, token_ids)[0]

    def forward_with_epoch(self, layer: int, hidden: torch.Tensor,
                           token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """`forward`, and the epoch of the routing table that served the request."""
        response, address = self._call("Forward", _forward_request(layer, hidden, token_ids))
        return _forward_result(response, hidden, address), response.epoch

    def info(self) -> MeshInfo:
        response, _ = self._call("GetInfo", pb.GetInfoRequest())
        return MeshInfo.from_proto(response)

    def _call(self, method: str, request: Any) -> tuple[Any, str]:
        for attempt in self._attempts():
            try:
                attempt.response = getattr(self._stubs[attempt.index], method)(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                attempt.error = exc
        return attempt.response, attempt.address

    def close(self) -> None:
        self._closed = True
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> "MeshClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __deepcopy__(self, memo: dict) -> "MeshClient":
        return self


class AsyncMeshClient(_FailoverClient):
    """`MeshClient` on grpc.aio: `await forward(...)`, `await info()`, `await close()`.

    Channels are opened on the first call, in the event loop that makes it.
    """

    def __init__(self, addresses: str | Sequence[str], timeout_s: float = 30.0, tls: TLSConfig | None = None):
        super().__init__(addresses, timeout_s)
        self._tls = tls
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[pb_grpc.ExpertMeshStub] = []

    async def forward(self, layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The MoE layer `layer` applied to hidden [T, H] or [B, S, H]; same shape and dtype, on CPU
        (token_ids: as `MeshClient.forward`)."""
        return (await self.forward_with_epoch(layer, hidden, token_ids))[0]

    async def forward_with_epoch(self, layer: int, hidden: torch.Tensor,
                                 token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """`forward`, and the epoch of the routing table that served the request."""
        response, address = await self._call("Forward", _forward_request(layer, hidden, token_ids))
        return _forward_result(response, hidden, address), response.epoch

    async def info(self) -> MeshInfo:
        response, _ = await self._call("GetInfo", pb.GetInfoRequest())
        return MeshInfo.from_proto(response)

    async def _call(self, method: str, request: Any) -> tuple[Any, str]:
        for attempt in self._attempts():
            try:
                attempt.response = await getattr(self._stub(attempt.index), method)(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:  # grpc.aio.AioRpcError is one
                attempt.error = exc
        return attempt.response, attempt.address

    def _stub(self, index: int) -> pb_grpc.ExpertMeshStub:
        if not self._stubs:  # the first call: open the channels in its event loop
            self._channels = [serving.channel(a, self._tls, CHANNEL_OPTIONS) for a in self._addresses]
            self._stubs = [pb_grpc.ExpertMeshStub(c) for c in self._channels]
        return self._stubs[index]

    async def close(self) -> None:
        self._closed = True
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncMeshClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
