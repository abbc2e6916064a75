"""The project's exceptions: one root, typed subclasses."""

from __future__ import annotations

__all__ = ["CheckpointError", "MeshError", "UnsupportedModelError", "one_line"]


class MeshError(Exception):
    """Root of every error expert-mesh raises on purpose."""


class UnsupportedModelError(MeshError, ValueError):
    """The checkpoint's architecture or config is not one expert-mesh serves."""


class CheckpointError(MeshError, ValueError):
    """A checkpoint is missing a tensor, has a tensor of the wrong shape, or is unreadable."""


def one_line(error: BaseException) -> str:
    """"Type: message" of an error's cause, last line only: a Ray task error's text carries the whole
    remote traceback, which is no message for an operator."""
    cause = getattr(error, "cause", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"
