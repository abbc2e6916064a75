"""How every gRPC server of the mesh takes a call, before its servicer sees it:

    raw bytes -> authorize (the mesh's secret, or nothing) -> byte budget -> parse -> servicer
              -> errors: the one map from the typed errors (experts/errors.py) to gRPC status

A body that does not parse is INVALID_ARGUMENT naming the message type (one log line a minute at
most, never a traceback); a call over the budget of request bytes in flight is RESOURCE_EXHAUSTED
before anything is copied out of its bytes; a call to a worker port without the secret is
UNAUTHENTICATED and runs nothing.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from pathlib import Path
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field

from experts.errors import (InvalidRequestError, PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError,
                            UnavailableError)
from protos import expert_mesh_pb2 as pb

__all__ = ["ByteBudget", "SECRET_KEY", "TLSConfig", "add_service", "bearer_token", "bind", "channel", "require_secret", "same_token",
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


class ByteBudget:
    """Request bytes being decoded or queued on one server, at most `limit` together (a request
    alone is always taken: the message limit already bounds it)."""

    def __init__(self, limit: int):
        self.limit, self.in_use = limit, 0

    @contextlib.contextmanager
    def hold(self, size: int):
        if self.in_use and self.in_use + size > self.limit:
            raise ResourceExhaustedError(f"{self.in_use} request bytes in flight; {size} more would pass "
                                         f"max_inflight_bytes={self.limit}")
        self.in_use += size
        try:
            yield
        finally:
            self.in_use -= size


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
    taken as the module says."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_type = getattr(pb, method.input_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _checked(getattr(servicer, method.name), request_type, authorize, budget),
            request_deserializer=None, response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


def _serialize(message) -> bytes:
    return message.SerializeToString()


def _checked(handler, request_type, authorize, budget: ByteBudget | None):
    name = request_type.DESCRIPTOR.full_name

    async def call(raw: bytes, context):
        try:
            if authorize is not None:
                authorize(context)
            with budget.hold(len(raw)) if budget is not None else contextlib.nullcontext():
                try:
                    request = request_type.FromString(raw)
                except (DecodeError, RuntimeError, ValueError) as exc:
                    _bad_bodies.warning(f"a {name} body did not decode: {exc}")
                    raise InvalidRequestError(f"the request body is not a valid {name} message") from exc
                return await handler(request, context)
        except grpc.aio.AbortError:
            raise  # the servicer chose its status
        except Exception as exc:  # noqa: BLE001 - the server keeps serving
            code = status_of(exc)
            if code is None:
                logger.exception("%s failed", name)
                code = grpc.StatusCode.INTERNAL
            await context.abort(code, str(exc) if code != grpc.StatusCode.INTERNAL else f"{type(exc).__name__}: {exc}")

    return call
