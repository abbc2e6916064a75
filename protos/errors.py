"""Every exception expert-mesh raises on purpose: one root, typed subclasses, in one module at the
bottom of the import graph (it imports only grpc). Each category maps to one gRPC status, in one
place (protos/serving.py `status_of`); a subclass names what went wrong.

    MeshError
      InvalidRequestError      INVALID_ARGUMENT    a request that cannot be served as sent
        WireError                                  a tensor message that does not decode
      UnauthenticatedError     UNAUTHENTICATED     a call without the mesh's secret or a token
      PermissionDeniedError    PERMISSION_DENIED   a token that is not the right one
        AdminError                                 an admin call without the admin token
      ResourceExhaustedError   RESOURCE_EXHAUSTED  over a bound (queued tokens, bytes in flight)
        QueueFullError, ChannelRefusedError
      UnavailableError         UNAVAILABLE         an expert group, the controller or a table is missing
        GroupGoneError                             Ray reports the group's actor dead
        ExpertUnavailableError                     a group did not answer a data-plane call
          ExpertTimeoutError, HedgedError          ... within its deadline / its hedge deadline
        NoRoutingTableError, StepUnavailableError
      StepError                                    a change's step failed (rolled back or carried on)
      UnsupportedModelError, CheckpointError, ConfigError, StateError, PlacementError,
      MeshConflictError, IngressError, MeshClientError       (not request errors)
"""

from __future__ import annotations

import grpc

__all__ = ["AdminError", "ChannelRefusedError", "CheckpointError", "ConfigError", "ExpertTimeoutError",
           "ExpertUnavailableError", "GroupGoneError", "HedgedError", "IngressError", "InvalidRequestError",
           "MeshClientError", "MeshConflictError", "MeshError", "NoRoutingTableError", "PermissionDeniedError",
           "PlacementError", "QueueFullError", "ResourceExhaustedError", "StateError", "StepError",
           "StepUnavailableError", "UnauthenticatedError", "UnavailableError", "UnsupportedModelError", "WireError",
           "one_line"]


class MeshError(Exception):
    """Root of every error expert-mesh raises on purpose."""


class InvalidRequestError(MeshError, ValueError):
    """A request that cannot be served as sent; the message names the field."""


class WireError(InvalidRequestError):
    """A tensor message that cannot be decoded; the message names the field."""


class UnauthenticatedError(MeshError):
    """A call that carries no credentials this server accepts (the mesh's secret, a read token)."""


class PermissionDeniedError(MeshError):
    """A call whose token is not the one that allows it."""


class ResourceExhaustedError(MeshError):
    """A bound is reached (queued tokens, request bytes in flight); the caller should back off."""


class ChannelRefusedError(ResourceExhaustedError):
    """An expert group holds as many collective channels' buffers as its budget allows; the caller's
    slices go over grpc."""


class UnavailableError(MeshError):
    """Something the call needs (an expert group, the controller, a routing table) cannot answer."""


class GroupGoneError(UnavailableError):
    """Ray reports an expert group's actor dead, or no actor goes by its name: evidence of death,
    unlike a call that timed out."""


class UnsupportedModelError(MeshError, ValueError):
    """The checkpoint's architecture or config is not one expert-mesh serves."""


class CheckpointError(MeshError, ValueError):
    """A checkpoint is missing a tensor, has a tensor of the wrong shape, or is unreadable."""


class IngressError(MeshError):
    """The Serve ingress got an error status from the router; the message carries its code."""


# -- raised by the control plane --------------------------------------------------------------------

class AdminError(PermissionDeniedError):
    """An admin call without the right token."""

class PlacementError(MeshError):
    """Expert groups cannot be placed as asked (no node, not enough memory)."""

class ConfigError(MeshError, ValueError):
    """A config file that cannot be used; the message names the field."""

class StateError(MeshError, ValueError):
    """A persisted snapshot that this code cannot read (another schema, missing fields)."""

class StepError(MeshError):
    """A step of a change failed; the change rolled back (before its publish) or carries on."""

class StepUnavailableError(StepError, UnavailableError):
    """A step failed because a group or router did not answer (gone, timed out): worth a retry."""

class MeshConflictError(MeshError):
    """A mesh of that name already runs, with another checkpoint."""


# -- raised on the data path -------------------------------------------------------------------------

class ExpertUnavailableError(UnavailableError):
    """An expert group did not answer (dead, unreachable, timed out)."""

class ExpertTimeoutError(ExpertUnavailableError):
    """An expert group did not answer within the call's deadline (slow or frozen; not known dead)."""

class HedgedError(ExpertUnavailableError):
    """A destination passed its hedge deadline (slow, not known dead): its slice went elsewhere."""

class NoRoutingTableError(UnavailableError):
    """The router has not received a routing table yet (or every copy of an expert is gone)."""

class QueueFullError(ResourceExhaustedError):
    """The router holds more queued tokens than allowed; the caller should back off."""

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


def one_line(error: BaseException) -> str:
    """"Type: message" of an error's cause, last line only: a Ray task error's text carries the whole
    remote traceback, which is no message for an operator."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"
