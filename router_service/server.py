"""The router's gRPC server: `ExpertMesh` (Forward, GetInfo), `MeshAdmin`, grpc.health.v1 and
server reflection, all on one grpc.aio port.

Bad client input gets INVALID_ARGUMENT naming the field and what was expected; a full queue gets
RESOURCE_EXHAUSTED; a failed expert group gives UNAVAILABLE to the callers whose tokens it held.
The server keeps serving through all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from protos.errors import InvalidRequestError, MeshError, UnavailableError, one_line
from protos import expert_mesh_pb2 as pb
from protos.serving import (BUDGETED_SERVER_OPTIONS, BudgetedServer, ByteBudget, add_service, bearer_token, bind,
                            status_of)
from protos.wire import DTYPES, TOKEN_DTYPES, from_proto, to_proto
from router_service.router import Router

__all__ = ["RouterServer", "check_rows", "check_shape", "check_token_ids", "check_token_shape", "info_of",
           "validate_forward"]

logger = logging.getLogger(__name__)

# Bytes a Forward holds in the router per byte of its body, at its peak: the body, its parsed
# message, the batch, the rows sent to groups (k = 2 copies per token) and their answers, the
# output and the serialized reply. Measured by tests/integration/test_flood.py, one 4 MB Forward
# at a time: 47-76 MB of peak RSS over idle (the top under a loaded machine), so 12 to 19; 16
# with its bound (the budget + 20%) holds the worst seen. 12 was exceeded once in a full suite run.
FORWARD_FOOTPRINT = 16.0

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["ExpertMesh"].full_name,
    pb.DESCRIPTOR.services_by_name["MeshAdmin"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


def validate_forward(request: pb.ForwardRequest, moe_layers: tuple[int, ...], hidden_size: int,
                     max_request_tokens: int,
                     vocab_sizes: Mapping[int, int] = MappingProxyType({})) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode and check a ForwardRequest; returns (hidden as [T, H], token_ids [T] int64 for a
    layer that picks experts by token id, else None). `vocab_sizes`: such layer -> its number of
    token ids. The shape is checked before any byte is decoded. Raises InvalidRequestError."""
    shape = list(request.hidden.shape)
    check_shape(request.layer, shape, moe_layers, hidden_size)
    x = from_proto(request.hidden, "hidden").reshape(-1, hidden_size)
    check_rows(x, shape, max_request_tokens)
    if request.layer not in vocab_sizes:
        return x, None  # token ids are not needed here (and ignored if sent)
    if not request.HasField("token_ids"):
        raise InvalidRequestError(f"token_ids are needed for layer {request.layer}: it picks experts by token id")
    check_token_shape(list(request.token_ids.shape), shape[:-1])
    ids = from_proto(request.token_ids, "token_ids", dtypes=TOKEN_DTYPES).reshape(-1)
    return x, check_token_ids(ids, vocab_sizes[request.layer])


def check_shape(layer: int, shape: list[int], moe_layers: tuple[int, ...], hidden_size: int) -> None:
    """The layer is an MoE layer and hidden's `shape` is [T, H] or [B, S, H]."""
    if layer not in moe_layers:
        raise InvalidRequestError(f"layer {layer} is not an MoE layer; the MoE layers are {list(moe_layers)}")
    if len(shape) not in (2, 3):
        raise InvalidRequestError(f"hidden.shape must be [T, {hidden_size}] or [B, S, {hidden_size}], got {shape}")
    if shape[-1] != hidden_size:
        raise InvalidRequestError(f"hidden.shape[-1] must be the hidden size {hidden_size}, got {shape[-1]}")


def check_rows(x: torch.Tensor, shape: list[int], max_request_tokens: int) -> None:
    """x [T, H] (hidden of `shape`, flattened): at least one token, at most max_request_tokens, finite."""
    if x.shape[0] == 0:
        raise InvalidRequestError(f"hidden holds no token (shape {shape})")
    if x.shape[0] > max_request_tokens:
        raise InvalidRequestError(f"hidden holds {x.shape[0]} tokens, more than max_request_tokens={max_request_tokens}")
    if not torch.isfinite(x).all():
        raise InvalidRequestError("hidden contains NaN or Inf")


def check_token_shape(shape: list[int], leading: list[int]) -> None:
    if shape != leading:
        raise InvalidRequestError(f"token_ids.shape must be hidden's leading dims {leading}, got {shape}")


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids [T] int64 of a hash-routed layer's request, each < vocab_size; returns them."""
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise InvalidRequestError(f"token_ids must be in [0, {vocab_size}) (the vocabulary), got {low}..{high}")
    return ids


class AdminBackend(Protocol):
    """Where MeshAdmin calls go (the controller). Reads return {ok, report} and mutating calls
    {ok, message, epoch}; a refusal is {ok: False, message, denied}."""

    async def read(self, verb: str, token: str | None) -> dict: ...

    async def scale(self, token: str, layer: int, expert: int, replicas: int) -> dict: ...

    async def set_autoscale(self, token: str, enabled: bool) -> dict: ...

    async def swap(self, token: str, layer: int, experts: list[int], source: str) -> dict: ...

    async def rebalance(self, token: str, dry_run: bool) -> dict: ...


class _ExpertMeshService:
    def __init__(self, server: "RouterServer"):
        self.server = server

    async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        return await self.server.forward(request, context)

    async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.InfoResponse:
        return self.server.info()


class _AdminService:
    """MeshAdmin on the router's port, forwarded to the controller. The token travels as
    `authorization: Bearer <token>` metadata; the request's `token` field still works (deprecated)."""

    def __init__(self, server: "RouterServer"):
        self.server = server

    async def _call(self, context, method: str, *args):
        """One call to the controller; its failures become a short gRPC status, not a traceback."""
        if self.server.admin is None:
            raise UnavailableError("this router has no controller attached")
        try:
            return await getattr(self.server.admin, method)(*args)
        except MeshError:
            raise  # the controller gone (UnavailableError, from ControllerAdmin) or its typed error
        except Exception as exc:  # noqa: BLE001 - reported to the caller; the router keeps serving
            logger.exception("MeshAdmin %s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"controller {method} failed: {one_line(exc)}")

    async def _read(self, context, verb: str, request) -> bytes:
        reply = await self._call(context, "read", verb, _token(request, context))
        await _refused(reply, context)
        return reply["report"]

    async def _change(self, context, method: str, request, *args) -> pb.AdminReply:
        reply = await self._call(context, method, _token(request, context), *args)
        await _refused(reply, context)
        return pb.AdminReply(ok=True, message=reply["message"], epoch=reply["epoch"],
                             change_id=reply.get("change_id", ""))

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return pb.StatusReply(snapshot=await self._read(context, "status", request))

    async def Placement(self, request: pb.PlacementRequest, context) -> pb.PlacementReply:
        return pb.PlacementReply(report=await self._read(context, "placement", request))

    async def Scale(self, request: pb.ScaleRequest, context) -> pb.AdminReply:
        return await self._change(context, "scale", request, request.layer, request.expert, request.replicas)

    async def Swap(self, request: pb.SwapRequest, context) -> pb.AdminReply:
        return await self._change(context, "swap", request, request.layer, list(request.experts), request.source_dir)

    async def Autoscale(self, request: pb.AutoscaleRequest, context) -> pb.AdminReply:
        return await self._change(context, "set_autoscale", request, request.enabled)

    async def Rebalance(self, request: pb.RebalanceRequest, context) -> pb.AdminReply:
        return await self._change(context, "rebalance", request, request.dry_run)


def _token(request, context) -> str | None:
    """The bearer token of the call's metadata, else the request's deprecated `token` field."""
    bearer = bearer_token(context)
    if bearer is not None:
        return bearer
    return getattr(request, "token", "") or None


async def _refused(reply: dict, context) -> None:
    """A refusal from the controller -> the status code it means."""
    if not reply["ok"]:
        code = grpc.StatusCode.PERMISSION_DENIED if reply.get("denied") else grpc.StatusCode.INVALID_ARGUMENT
        await context.abort(grpc.StatusCode[reply["code"]] if "code" in reply else code, reply["message"])


class RouterServer:
    """One grpc.aio server in front of a Router."""

    def __init__(self, router: Router, admin: AdminBackend | None = None, metrics=None):
        self.router = router
        self.admin = admin
        self.metrics = metrics
        self.health = HealthServicer()
        self.layers_ok: set[int] = set()
        self.port = 0
        spec, config = router.spec, router.config
        limit = config.max_message_bytes(spec.hidden_size)
        self.budget = ByteBudget(config.inflight_bytes(spec.hidden_size, FORWARD_FOOTPRINT), limit, FORWARD_FOOTPRINT)
        self._server = grpc.aio.server(options=[("grpc.max_send_message_length", limit),
                                                ("grpc.max_receive_message_length", limit),
                                                *BUDGETED_SERVER_OPTIONS],
                                       maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        add_service(self._server, "ExpertMesh", _ExpertMeshService(self), budget=self.budget)
        add_service(self._server, "MeshAdmin", _AdminService(self), budget=self.budget)
        budgeted = BudgetedServer(self._server, self.budget)  # health and reflection within the budget too
        health_pb2_grpc.add_HealthServicer_to_server(self.health, budgeted)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(SERVICE_NAMES),
                                                                   budgeted)

    async def start(self) -> int:
        config = self.router.config
        self.port = bind(self._server, f"{config.host}:{config.port}", config.tls)
        if self.port == 0:
            raise OSError(f"cannot bind the router to {config.host}:{config.port}")
        await self._server.start()
        await self.refresh_health()
        return self.port

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
        await self.router.close()

    # -- health --------------------------------------------------------------------------------

    def is_serving(self) -> bool:
        table = self.router.table
        return (table is not None and not table.missing_experts()
                and self.layers_ok >= set(self.router.spec.moe_layers))

    async def refresh_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.is_serving() else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES[:2]):
            await self.health.set(name, status)

    async def warm_up(self, num_tokens: int = 4) -> None:
        """One Forward per MoE layer through the real path; health turns SERVING when all pass."""
        generator = torch.Generator().manual_seed(0)
        for layer in self.router.spec.moe_layers:
            x = torch.randn(num_tokens, self.router.spec.hidden_size, generator=generator)
            vocab_size = self.router.vocab_sizes.get(layer)
            token_ids = None if vocab_size is None else torch.randint(0, vocab_size, (num_tokens,), generator=generator)
            try:
                await self.router.forward(layer, x, token_ids=token_ids)
                self.layers_ok.add(layer)
            except Exception as exc:  # noqa: BLE001 - reported through health, retried on the next table
                logger.warning("warm-up of layer %d failed: %s", layer, exc)
                self.layers_ok.discard(layer)
        await self.refresh_health()

    # -- RPCs ----------------------------------------------------------------------------------

    async def forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            spec, config = self.router.spec, self.router.config
            x, token_ids = validate_forward(request, spec.moe_layers, spec.hidden_size, config.max_request_tokens,
                                            self.router.vocab_sizes)
            decoded = time.perf_counter()
            out, epoch = await self.router.forward(request.layer, x, context.peer(), token_ids)
            routed = time.perf_counter()
            reply = pb.ForwardResponse(epoch=epoch)
            to_proto(out.reshape(tuple(request.hidden.shape)), reply.hidden)
            stages = self.router.stage_s
            stages["decode"] += decoded - start
            stages["router"] += routed - decoded
            stages["encode"] += time.perf_counter() - routed
            stages["forwards"] += 1
            self.layers_ok.add(request.layer)
            return reply
        except asyncio.CancelledError:  # deadline passed or the caller went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = status_of(exc) or grpc.StatusCode.INTERNAL
            raise
        finally:
            if self.metrics is not None:
                layer = str(request.layer) if request.layer in self.router.spec.moe_layers else "other"
                self.metrics.observe_request(layer, code.name, (time.perf_counter() - start) * 1e3)

    def info(self) -> pb.InfoResponse:
        return info_of(self.router)


def info_of(router: Router) -> pb.InfoResponse:
    """What GetInfo says of the model `router` serves and of its table in force."""
    spec, table = router.spec, router.table
    versions = {}
    if table is not None:
        for layer, experts in table.layers.items():
            for expert, copies in enumerate(experts):
                if copies:
                    versions[f"{layer}/{expert}"] = copies[0].version
    return pb.InfoResponse(model_type=spec.model_type, config_hash=spec.config_hash(),
                           moe_layers=list(spec.moe_layers), hidden_size=spec.hidden_size,
                           dtypes=list(DTYPES), weight_versions=versions,
                           max_request_tokens=router.config.max_request_tokens,
                           epoch=table.epoch if table else 0)
