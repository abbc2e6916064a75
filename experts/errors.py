"""The project's exceptions: one root, typed subclasses."""

from __future__ import annotations

__all__ = ["CheckpointError", "MeshError", "UnsupportedModelError"]


class MeshError(Exception):
    """Root of every error expert-mesh raises on purpose."""


class UnsupportedModelError(MeshError, ValueError):
    """The checkpoint's architecture or config is not one expert-mesh serves."""


class CheckpointError(MeshError, ValueError):
    """A checkpoint is missing a tensor, has a tensor of the wrong shape, or is unreadable."""
