"""The project's exceptions: one root, typed subclasses. Each category below maps to one gRPC
status, in one place (protos/serving.py `status_of`); a subclass names what went wrong.

    MeshError
      InvalidRequestError      INVALID_ARGUMENT    a request that cannot be served as sent
        WireError                                  a tensor message that does not decode
      UnauthenticatedError     UNAUTHENTICATED     a call without the mesh's secret or a token
      PermissionDeniedError    PERMISSION_DENIED   a token that is not the right one
      ResourceExhaustedError   RESOURCE_EXHAUSTED  over a bound (queued tokens, bytes in flight)
      UnavailableError         UNAVAILABLE         an expert group or the controller cannot answer
        GroupGoneError                             Ray reports the group's actor dead
      UnsupportedModelError, CheckpointError, IngressError, ...  (not request errors)
"""

from __future__ import annotations

__all__ = ["ChannelRefusedError", "CheckpointError", "GroupGoneError", "IngressError", "InvalidRequestError",
           "MeshError", "PermissionDeniedError",
           "ResourceExhaustedError", "UnauthenticatedError", "UnavailableError", "UnsupportedModelError",
           "WireError", "one_line"]


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


def one_line(error: BaseException) -> str:
    """"Type: message" of an error's cause, last line only: a Ray task error's text carries the whole
    remote traceback, which is no message for an operator."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"
