"""The client library: call the mesh once per MoE layer, or drop it into a transformers model.

    [attention side] --Forward(layer, hidden [T, H])--> [router] --> ... --> hidden [T, H]

- `MeshClient` / `AsyncMeshClient`: Forward and GetInfo over gRPC (sync / grpc.aio), with failover
  between routers: on UNAVAILABLE the same call moves on to the next address (once per address),
  and the address that answered is remembered for the next calls.
- `RemoteMoE`: a torch module that stands in for one sparse MoE block and calls the mesh.
- `patch_model`: checks through GetInfo that the mesh serves this model, then swaps every sparse
  MoE block of `model.model.layers` (a composite model's `model.model.language_model.layers`) for a
  `RemoteMoE`.

Every failure raises `MeshClientError`, carrying the gRPC status code and its details.

Shape legend: B = batch, S = sequence, T = tokens (B * S), H = hidden, E = experts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import torch

from experts.errors import MeshError
from experts.spec import BlockOutput, MoESpec, spec_from_config
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos import serving
from protos.serving import TLSConfig
from protos.wire import DTYPES, TOKEN_DTYPES, WireError, from_proto, to_proto

__all__ = ["AsyncMeshClient", "MeshClient", "MeshClientError", "MeshInfo", "RemoteMoE", "patch_model"]

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


class MeshClientError(MeshError):
    """A call to the mesh failed: `code` is a grpc.StatusCode, `details` says why."""

    def __init__(self, code: grpc.StatusCode, details: str, address: str | None = None):
        where = f" (from {address})" if address else ""
        super().__init__(f"{code.name}: {details}{where}")
        self.code, self.details, self.address = code, details, address

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError, address: str) -> "MeshClientError":
        code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
        details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", address)


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


def _forward_request(layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> pb.ForwardRequest:
    """Validate and encode; hidden: [T, H] or [B, S, H] float32/bfloat16/float16; token_ids: None
    or an integer tensor of hidden's leading dims ([T] or [B, S]), sent as int64."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise _invalid(f"layer must be an int, got {layer!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise _invalid(f"hidden must be a [T, H] or [B, S, H] tensor, got {shape}")
    if hidden.dtype not in DTYPES.values():
        raise _invalid(f"hidden.dtype must be one of {', '.join(DTYPES)}, got {hidden.dtype}")
    request = pb.ForwardRequest(layer=layer)
    to_proto(hidden, out=request.hidden)
    if token_ids is not None:
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.is_complex():
            kind = token_ids.dtype if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
            raise _invalid(f"token_ids must be an integer tensor, got {kind}")
        if token_ids.shape != hidden.shape[:-1]:
            raise _invalid(f"token_ids must have hidden's leading dims {list(hidden.shape[:-1])}, "
                           f"got {list(token_ids.shape)}")
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


class _Failover:
    """The addresses in the order to try them: the last one that worked first."""

    def __init__(self, addresses: list[str]):
        self.addresses, self.current = addresses, 0

    def order(self) -> Iterator[int]:
        n = len(self.addresses)
        return ((self.current + i) % n for i in range(n))

    def on_error(self, index: int, error: MeshClientError) -> None:
        if error.code != grpc.StatusCode.UNAVAILABLE:
            raise error
        if len(self.addresses) > 1:
            logger.warning("router %s unavailable (%s); trying the next address", self.addresses[index], error.details)

    def worked(self, index: int) -> None:
        if index != self.current:
            logger.info("switched to router %s", self.addresses[index])
        self.current = index


# ---- clients ----

class MeshClient:
    """Blocking client of `expert_mesh.v1.ExpertMesh`; thread-safe, one channel per address.

    Several addresses: on UNAVAILABLE the call is retried on the next one (once per address);
    other errors are raised at once. A deepcopy shares the client (so does a deep-copied model).
    """

    def __init__(self, addresses: str | Sequence[str], timeout_s: float = 30.0, tls: TLSConfig | None = None):
        """`tls`: reach the router over TLS, checking it against `tls.ca` (and `tls.server_name`),
        presenting `tls.cert`/`tls.key` when the router asks for a client certificate."""
        self.timeout_s = _check_timeout(timeout_s)
        self._failover = _Failover(_parse_addresses(addresses))
        self._channels = [serving.channel(a, tls, CHANNEL_OPTIONS, aio=False) for a in self._failover.addresses]
        self._stubs = [pb_grpc.ExpertMeshStub(c) for c in self._channels]
        self._closed = False

    @property
    def address(self) -> str:
        """The address the next call goes to first (the last one that answered)."""
        return self._failover.addresses[self._failover.current]

    def forward(self, layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The MoE layer `layer` applied to hidden [T, H] or [B, S, H]; same shape and dtype, on CPU.
        token_ids ([T] or [B, S], the tokens' ids) are needed by layers that pick experts by token
        id (DeepSeek-V4's hash layers), and ignored by the others."""
        return self.forward_with_epoch(layer, hidden, token_ids)[0]

    def forward_with_epoch(self, layer: int, hidden: torch.Tensor,
                           token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """`forward`, and the epoch of the routing table that served the request."""
        request = _forward_request(layer, hidden, token_ids)
        response, address = self._call("Forward", request)
        return _forward_result(response, hidden, address), response.epoch

    def info(self) -> MeshInfo:
        response, _ = self._call("GetInfo", pb.GetInfoRequest())
        return MeshInfo.from_proto(response)

    def _call(self, method: str, request: Any) -> tuple[Any, str]:
        if self._closed:
            raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")
        error = None
        for index in self._failover.order():
            address = self._failover.addresses[index]
            try:
                response = getattr(self._stubs[index], method)(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                error = MeshClientError.from_rpc(exc, address)
                error.__cause__ = exc
                self._failover.on_error(index, error)
                continue
            self._failover.worked(index)
            return response, address
        raise error

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

    def __repr__(self) -> str:
        return f"MeshClient({self._failover.addresses!r}, timeout_s={self.timeout_s})"


class AsyncMeshClient:
    """`MeshClient` on grpc.aio: `await forward(...)`, `await info()`, `await close()`.

    Channels are opened on the first call, in the event loop that makes it.
    """

    def __init__(self, addresses: str | Sequence[str], timeout_s: float = 30.0, tls: TLSConfig | None = None):
        self.timeout_s = _check_timeout(timeout_s)
        self._failover = _Failover(_parse_addresses(addresses))
        self._tls = tls
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[pb_grpc.ExpertMeshStub] = []
        self._closed = False

    @property
    def address(self) -> str:
        return self._failover.addresses[self._failover.current]

    async def forward(self, layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The MoE layer `layer` applied to hidden [T, H] or [B, S, H]; same shape and dtype, on CPU
        (token_ids: as `MeshClient.forward`)."""
        request = _forward_request(layer, hidden, token_ids)
        response, address = await self._call("Forward", request)
        return _forward_result(response, hidden, address)

    async def info(self) -> MeshInfo:
        response, _ = await self._call("GetInfo", pb.GetInfoRequest())
        return MeshInfo.from_proto(response)

    async def _call(self, method: str, request: Any) -> tuple[Any, str]:
        if self._closed:
            raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")
        if not self._channels:
            self._channels = [serving.channel(a, self._tls, CHANNEL_OPTIONS) for a in self._failover.addresses]
            self._stubs = [pb_grpc.ExpertMeshStub(c) for c in self._channels]
        error = None
        for index in self._failover.order():
            address = self._failover.addresses[index]
            try:
                response = await getattr(self._stubs[index], method)(request, timeout=self.timeout_s)
            except grpc.RpcError as exc:  # grpc.aio.AioRpcError is one
                error = MeshClientError.from_rpc(exc, address)
                error.__cause__ = exc
                self._failover.on_error(index, error)
                continue
            self._failover.worked(index)
            return response, address
        raise error

    async def close(self) -> None:
        self._closed = True
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncMeshClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncMeshClient({self._failover.addresses!r}, timeout_s={self.timeout_s})"


# ---- transformers integration ----

class RemoteMoE(torch.nn.Module):
    """Stands in for one sparse MoE block of a transformers model; the experts run on the mesh.

    forward(hidden_states [B, S, H]) returns what the replaced block returned (`block_output`, as
    `MoESpec.block_output`): [B, S, H], or the tuple (out, the router's second output or None):
    Llama 4's (out [T, H], logits [T, E]), gpt-oss's (out [B, S, H], top-k scores [T, k]). Their
    decoder layers discard the second element, so None is enough unless a `router` is kept.

    `router`: the original block's router module (optional). When kept it runs locally on every
    call, so that `output_router_logits=True` still records the logits (transformers hooks the
    router modules) and the tuple carries them. Expert weights are never kept. No gradient
    flows through the mesh call.

    `sends_token_ids`: the layer picks experts by token id (DeepSeek-V4's hash layers, whose decoder
    layer calls `mlp(hidden_states, input_ids=input_ids)`): the `input_ids` go with the request.
    """

    def __init__(self, client: MeshClient, layer: int, *, router: torch.nn.Module | None = None,
                 block_output: BlockOutput = "hidden", sends_token_ids: bool = False):
        super().__init__()
        self.client, self.layer = client, layer
        self.router = router
        self.block_output = block_output
        self.sends_token_ids = sends_token_ids

    def forward(self, hidden_states: torch.Tensor,
                input_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states: [B, S, H]; input_ids: [B, S], used by a layer that `sends_token_ids`."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        token_ids = input_ids.cpu() if self.sends_token_ids and input_ids is not None else None
        router_out = None
        if self.router is not None:
            router_out = self.router(flat) if not self.sends_token_ids else self.router(flat, input_ids)
        out = self.client.forward(self.layer, hidden_states, token_ids).to(hidden_states.device)
        if self.block_output == "hidden":
            return out
        # Llama4Router returns (scores, logits), GptOssTopKRouter (logits, scores, ids): the blocks return the second
        out = out.reshape(flat.shape) if self.block_output == "flat_and_router" else out
        return out, None if router_out is None else router_out[1]

    def extra_repr(self) -> str:
        return f"layer={self.layer}, client={self.client!r}"


def _mismatch(spec: MoESpec, info: MeshInfo) -> str | None:
    """What differs between the local model's spec and what the mesh serves, or None."""
    if spec.config_hash() == info.config_hash and tuple(spec.moe_layers) == info.moe_layers:
        return None
    parts = []
    if spec.model_type != info.model_type:
        parts.append(f"model_type {spec.model_type!r} here, {info.model_type!r} on the mesh")
    if tuple(spec.moe_layers) != info.moe_layers:
        parts.append(f"moe_layers {list(spec.moe_layers)} here, {list(info.moe_layers)} on the mesh")
    if spec.hidden_size != info.hidden_size:
        parts.append(f"hidden_size {spec.hidden_size} here, {info.hidden_size} on the mesh")
    parts.append(f"config_hash {spec.config_hash()[:12]} here, {info.config_hash[:12]} on the mesh")
    return "the mesh serves a different model: " + "; ".join(parts)


def _decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """`model.model.layers`, or `model.model.language_model.layers` (the text model of a composite)."""
    inner = getattr(model, "model", None)
    layers = getattr(getattr(inner, "language_model", inner), "layers", None)
    if layers is None:
        raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{type(model).__name__} has no model.layers (or model.language_model.layers) to patch")
    return layers


def patch_model(model: torch.nn.Module, client: MeshClient, keep_router: bool = False) -> int:
    """Replace every sparse MoE block of `model` (in place) with a RemoteMoE calling `client`.

    Checks first, through GetInfo, that the mesh serves this model (same MoE spec hash and MoE
    layers) and accepts its dtype; MeshClientError FAILED_PRECONDITION naming the difference otherwise. `keep_router`
    keeps each block's router module (see RemoteMoE). Returns the number of blocks replaced.
    """
    config = model.config.to_dict()
    try:
        spec = spec_from_config(config)
    except MeshError as exc:
        raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION, f"this model cannot be patched: {exc}") from exc
    info = client.info()
    difference = _mismatch(spec, info)
    dtype_name = str(getattr(model, "dtype", "")).removeprefix("torch.")
    if difference is None and info.dtypes and dtype_name not in info.dtypes:
        difference = f"the model is {dtype_name}; the mesh accepts {', '.join(info.dtypes)}"
    if difference is not None:
        raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION, difference, client.address)
    layers = _decoder_layers(model)
    for i in spec.moe_layers:
        block = getattr(layers[i], spec.block_attr)
        router = None
        if keep_router:
            router = block.router if isinstance(block, RemoteMoE) else getattr(block, spec.gate_attr)
        setattr(layers[i], spec.block_attr, RemoteMoE(client, i, router=router, block_output=spec.block_output,
                                                      sends_token_ids=i in spec.hash_layers))
    logger.info("patched %d MoE blocks of a %s model to call %s", len(spec.moe_layers), spec.model_type, client.address)
    return len(spec.moe_layers)
