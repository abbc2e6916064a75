"""Who may call the mesh's admin verbs, and what a call replies. The router's MeshAdmin service
(router_service/server.py) turns these replies into gRPC: `code` names the status of a refusal.

    mutating verbs (scale, swap, autoscale, rebalance): the admin token, always
    reading verbs (status, placement): open while no token is configured; once the read or the
        admin token is, one of them
"""

from __future__ import annotations

import os

import grpc

from protos.errors import AdminError, MeshError
from protos.serving import same_token, status_of

__all__ = ["AdminAuth", "accepted", "refused"]


class AdminAuth:
    """The admin and read tokens of a mesh: the config's, unless EXPERT_MESH_ADMIN_TOKEN /
    EXPERT_MESH_READ_TOKEN in the controller's environment override them."""

    def __init__(self, admin_token: str | None, read_token: str | None):
        self._admin, self._read = admin_token, read_token

    @property
    def admin_token(self) -> str:
        return os.environ.get("EXPERT_MESH_ADMIN_TOKEN") or self._admin or ""

    @property
    def read_token(self) -> str:
        return os.environ.get("EXPERT_MESH_READ_TOKEN") or self._read or ""

    def check_admin(self, token: str | bytes | None) -> None:
        """AdminError unless `token` is the admin token (and there is one)."""
        if not self.admin_token:
            raise AdminError("no admin token is configured (admin_token or EXPERT_MESH_ADMIN_TOKEN): "
                             "mutating calls are refused")
        if not same_token(token, self.admin_token):
            raise AdminError("admin token missing or wrong")

    def check_read(self, token: str | bytes | None) -> None:
        """AdminError if a token is configured and `token` is neither the read nor the admin token
        (Placement makes every probe time echoes to every other: not for any caller)."""
        read, admin = self.read_token, self.admin_token
        if (read or admin) and not ((read and same_token(token, read)) or (admin and same_token(token, admin))):
            raise AdminError("read or admin token missing or wrong (a token is configured: Status and Placement "
                             "need the read token or the admin token)")


def accepted(message: str, epoch: int, change_id: str) -> dict:
    """A mutating call carried out (`change_id` "" when nothing needed to change)."""
    return {"ok": True, "message": message, "epoch": epoch, "change_id": change_id}


def refused(verb: str, error: AdminError | MeshError | ValueError, epoch: int) -> dict:
    """A mutating call refused, nothing changed: its gRPC code (a plan the mesh refuses is the
    caller's to fix: INVALID_ARGUMENT) and whether the token was the reason."""
    code = status_of(error) or grpc.StatusCode.INVALID_ARGUMENT
    return {"ok": False, "message": f"{verb} refused, nothing changed: {error}", "epoch": epoch, "code": code.name,
            "denied": isinstance(error, AdminError)}
