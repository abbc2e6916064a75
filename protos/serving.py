"""How every gRPC server of the mesh takes a call, before its servicer sees it:

    call -> authorize (the mesh's secret, or nothing) -> memory budget -> read the body -> parse
         -> servicer -> errors: the one map from the typed errors (protos/errors.py) to gRPC status

A body that does not parse is INVALID_ARGUMENT naming the message type (one log line a minute at
most, never a traceback); a call the memory budget has no room for is RESOURCE_EXHAUSTED before
its body is read (a budgeted server does not pull bodies in ahead of its handlers: see
BUDGETED_SERVER_OPTIONS); a call to a worker port without the secret is UNAUTHENTICATED and runs
nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path
from typing import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field

from protos.errors import (InvalidRequestError, PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError,
                            UnavailableError)
from protos import expert_mesh_pb2 as pb

__all__ = ["BUDGETED_SERVER_OPTIONS", "ByteBudget", "SECRET_KEY", "TLSConfig", "add_service", "bearer_token", "bind", "channel", "require_secret", "same_token",
           "secret_metadata", "status_of", "worker_server"]

logger = logging.getLogger(__name__)

SECRET_KEY = "x-expert-mesh-secret"  # metadata of every call to ExpertWorker and MeshProbe
LOG_EVERY_S = 60.0

STATUS = ((InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
          (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
          (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
          (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
          (UnavailableError, grpc.StatusCode.UNAVAILABLE))


def status_of(error: BaseException) -> grpc.StatusCode | None:
    """The gRPC status of a typed error; None: not one of them (a bug: INTERNAL)."""
    return next((code for kind, code in STATUS if isinstance(error, kind)), None)


# gRPC's BDP probing grows every stream's flow-control window until a whole message is received
# before any handler asks for it (measured: 64 calls of 16 MB that no handler has read yet hold
# ~740 MB); without it an unread call holds at most a few KB. The cost: a large body moves slower
# on one connection (8 MB on loopback: ~0.45 GB/s against ~0.65 with probing, on this noisy
# 2-core machine).
BUDGETED_SERVER_OPTIONS = [("grpc.http2.bdp_probe", 0)]


class ByteBudget:
    """Memory given to the requests on one server, at most `limit` bytes together.

    A request of B bytes is charged `footprint * B`: what it holds while decoded, queued, computed
    and answered. Its body's size is known only once read, so a call first reserves the charge of
    the largest message (`largest` bytes) and shrinks to its own once read. A call is refused when
    the admitted requests leave no room for that reservation; it waits only behind reads in
    progress (which end in moments)."""

    def __init__(self, limit: int, largest: int, footprint: float = 1.0):
        if footprint * largest > limit:
            raise ValueError(f"a memory budget of {limit} bytes cannot take the largest request: {largest} bytes "
                             f"x footprint {footprint} = {int(footprint * largest)}")
        self.limit, self.largest, self.footprint = limit, largest, footprint
        self.held = self.reading = 0  # charges of admitted requests; reservations of reads in progress
        self._changed = asyncio.Condition()

    def charge(self, size: int) -> int:
        return int(self.footprint * size)

    @property
    def in_use(self) -> int:
        return self.held + self.reading

    async def run(self, read: Callable[[], Awaitable[bytes]], use: Callable[[bytes], Awaitable]):
        """`await use(await read())` with the body's charge held (a body has at most `largest`
        bytes); `use` gets the only reference to the body, so it can let it go."""
        reserve = self.charge(self.largest)
        async with self._changed:
            await self._changed.wait_for(lambda: self._refused(reserve) or self.in_use + reserve <= self.limit)
            if self._refused(reserve):
                raise ResourceExhaustedError(f"{self.in_use} bytes of requests in flight; the next one needs "
                                             f"{reserve} more (max_inflight_bytes={self.limit})")
            self.reading += reserve
        charged = 0
        try:
            raw = await read()
            charged = self.charge(len(raw))
            self.held += charged
            self.reading -= reserve
            reserve = 0
            async with self._changed:
                self._changed.notify_all()  # the read's reservation shrank to its charge: room for waiters
            pending = use(raw)
            del raw
            return await pending
        finally:
            async with self._changed:
                self.reading -= reserve
                self.held -= charged
                self._changed.notify_all()

    def _refused(self, reserve: int) -> bool:
        return self.held + reserve > self.limit


def _metadata(context, key: str) -> str | None:
    return next((value for k, value in (context.invocation_metadata() or ()) if k == key), None)


def bearer_token(context) -> str | None:
    """The token of an `authorization: Bearer <token>` header, None without one."""
    value = _metadata(context, "authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def same_token(given: str | bytes | None, expected: str) -> bool:
    """Constant-time comparison of any token bytes (non-ASCII included) with the expected one."""
    if given is None or not expected:
        return False
    raw = given if isinstance(given, bytes) else given.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(raw, expected.encode("utf-8"))


def require_secret(secret: str) -> Callable[[object], None]:
    """authorize(context) for a worker port: the call must carry the mesh's secret."""
    if not secret:
        raise ValueError("a worker port needs the mesh's secret")

    def authorize(context) -> None:
        if not same_token(_metadata(context, SECRET_KEY), secret):
            raise UnauthenticatedError("this port serves the mesh's own routers only: the call carries no "
                                       "valid mesh secret")

    return authorize


def secret_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((SECRET_KEY, secret),)


class _RateLimitedLog:
    def __init__(self):
        self.last, self.dropped = -LOG_EVERY_S, 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S:
            self.dropped += 1
            return
        logger.warning("%s (%d more like it since the last line)", message, self.dropped)
        self.last, self.dropped = now, 0


_bad_bodies = _RateLimitedLog()


WORKER_MAX_MESSAGE = 1 << 30
WORKER_MAX_RPCS = 256  # routers x destinations in flight; beyond it RESOURCE_EXHAUSTED


def worker_server(secret: str, servicer) -> grpc.aio.Server:
    """The grpc.aio server of an expert group's ExpertWorker port (real or simulated): every call
    must carry the mesh's `secret`."""
    options = [("grpc.max_send_message_length", WORKER_MAX_MESSAGE),
               ("grpc.max_receive_message_length", WORKER_MAX_MESSAGE)]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=WORKER_MAX_RPCS)
    add_service(server, "ExpertWorker", servicer, require_secret(secret))
    return server


class TLSConfig(BaseModel):
    """A TLS identity: PEM files on the node that serves (or calls) with it."""

    model_config = ConfigDict(extra="forbid")

    cert: str | None = Field(None, description="PEM certificate chain of this end (servers: required).")
    key: str | None = Field(None, description="PEM private key of `cert`.")
    ca: str | None = Field(None, description=(
        "PEM CA bundle: on a server, clients must present a certificate it signed (mutual TLS); on a "
        "caller, the CA that signed the server's certificate."))
    server_name: str | None = Field(None, description=(
        "Callers: the name the server's certificate must carry (default: the address's host)."))

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(cert, key, ca) bytes; None for a file not given."""
        return tuple(Path(f).read_bytes() if f else None for f in (self.cert, self.key, self.ca))


def bind(server, address: str, tls=None) -> int:
    """Listen on `address` ("host:port"), with TLS when `tls` (a TLSConfig: cert, key, optional ca
    for mutual TLS) is given; returns the port (0: could not bind)."""
    if tls is None:
        return server.add_insecure_port(address)
    cert, key, ca = tls.read()
    if not (cert and key):
        raise ValueError("a TLS server needs both cert and key")
    credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
    return server.add_secure_port(address, credentials)


def channel(address: str, tls=None, options: list | None = None, aio: bool = True):
    """A channel to `address`: plaintext, or TLS checking the server against `tls.ca` (and the name
    `tls.server_name`), presenting `tls.cert`/`tls.key` when given (mutual TLS)."""
    options = list(options or [])
    if tls is None:
        return (grpc.aio.insecure_channel if aio else grpc.insecure_channel)(address, options=options)
    cert, key, ca = tls.read()
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return (grpc.aio.secure_channel if aio else grpc.secure_channel)(address, credentials, options=options)


def add_service(server, service: str, servicer, authorize: Callable[[object], None] | None = None,
                budget: ByteBudget | None = None) -> None:
    """Serve `servicer`'s methods of the expert_mesh.v1 service `service` on `server`, every call
    taken as the module says. With a `budget` (and a server built with BUDGETED_SERVER_OPTIONS) the
    methods are taken as client-streaming ones, the same on the wire, so that the handler runs
    before the body is read."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    as_handler = grpc.unary_unary_rpc_method_handler if budget is None else grpc.stream_unary_rpc_method_handler
    handlers = {}
    for method in descriptor.methods:
        request_type = getattr(pb, method.input_type.name)
        handlers[method.name] = as_handler(_checked(getattr(servicer, method.name), request_type, authorize, budget),
                                           request_deserializer=None,
                                           response_serializer=_serialize if budget is None else None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


def _serialize(message) -> bytes:
    return message.SerializeToString()


async def _read_body(context, name: str) -> bytes:
    raw = await context.read()
    if raw is grpc.aio.EOF:
        raise InvalidRequestError(f"the call carries no {name} message")
    return raw


async def _abort(context, exc: Exception, name: str) -> None:
    """End the call with `exc`'s status (INTERNAL, logged, for an untyped one); the server goes on."""
    code = status_of(exc)
    if code is None:
        logger.exception("%s failed", name)
        code = grpc.StatusCode.INTERNAL
    await context.abort(code, str(exc) if code != grpc.StatusCode.INTERNAL else f"{type(exc).__name__}: {exc}")


def _checked(handler, request_type, authorize, budget: ByteBudget | None):
    name = request_type.DESCRIPTOR.full_name

    def read_body(context) -> Awaitable[bytes]:
        return _read_body(context, name)

    async def parse_and_handle(raw: bytes, context):
        try:
            request = request_type.FromString(raw)
        except (DecodeError, RuntimeError, ValueError) as exc:
            _bad_bodies.warning(f"a {name} body did not decode: {exc}")
            raise InvalidRequestError(f"the request body is not a valid {name} message") from exc
        del raw  # the parsed message holds its own copy
        reply = await handler(request, context)
        # A budgeted reply is serialized while its request's charge is held (its bytes count too).
        return reply if budget is None else reply.SerializeToString()

    async def call(body, context):
        """body: the raw bytes, or (budgeted) the request iterator, left unread: context.read() reads."""
        try:
            if authorize is not None:
                authorize(context)
            if budget is None:
                return await parse_and_handle(body, context)
            del body
            return await budget.run(lambda: read_body(context), lambda raw: parse_and_handle(raw, context))
        except grpc.aio.AbortError:
            raise  # the servicer chose its status
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            await _abort(context, exc, name)

    return call


class _EndOfStream(Exception):
    """A streaming call's client sent its last message."""


class BudgetedServer:
    """Stands for a grpc.aio server in a generated `add_<Service>Servicer_to_server` (grpc's health,
    reflection): every method it registers is taken within `budget`, as `add_service` takes ours.
    Each request message is read only once the budget has room for it; a unary request's charge is
    held while its handler runs, a streamed one's while it is parsed."""

    def __init__(self, server, budget: ByteBudget):
        self.server, self.budget = server, budget

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        """Ignored: generated code registers the same methods through add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        wrapped = {method: _budgeted(handler, f"{service}/{method}", self.budget)
                   for method, handler in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))


def _budgeted(handler, name: str, budget: ByteBudget):
    """`handler` taken as a client-streaming method (the same on the wire), its bodies read within `budget`."""
    serialize = handler.response_serializer

    def parse(raw: bytes):
        try:
            return handler.request_deserializer(raw)
        except (DecodeError, RuntimeError, ValueError) as exc:
            raise InvalidRequestError(f"the request body is not a valid {name} message") from exc

    async def parsed(raw: bytes):
        return parse(raw)

    async def one(context):
        return await budget.run(lambda: _read_body(context, name), parsed)

    if not handler.request_streaming and not handler.response_streaming:
        async def unary(_, context):
            try:
                return await budget.run(lambda: _read_body(context, name),
                                        lambda raw: handler.unary_unary(parse(raw), context))
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the server keeps serving
                await _abort(context, exc, name)
        return grpc.stream_unary_rpc_method_handler(unary, response_serializer=serialize)
    if not handler.request_streaming:  # unary request, streamed replies (health's Watch: context.write)
        async def watch(_, context):
            try:
                request = await one(context)
            except Exception as exc:  # noqa: BLE001 - the server keeps serving
                await _abort(context, exc, name)
            await handler.unary_stream(request, context)
        return grpc.stream_stream_rpc_method_handler(watch, response_serializer=serialize)

    async def read_or_end(context) -> bytes:
        raw = await context.read()
        if raw is grpc.aio.EOF:
            raise _EndOfStream
        return raw

    async def requests(context):  # streamed both ways (reflection): each message within the budget
        while True:
            try:
                yield await budget.run(lambda: read_or_end(context), parsed)
            except _EndOfStream:  # the client ended its stream
                return
            except Exception as exc:  # noqa: BLE001 - the server keeps serving
                await _abort(context, exc, name)

    async def both(_, context):
        async for reply in handler.stream_stream(requests(context), context):
            yield reply
    return grpc.stream_stream_rpc_method_handler(both, response_serializer=serialize)
