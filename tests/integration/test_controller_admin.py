"""A router's link to the controller (router_service.actor.ControllerAdmin) on the session's real
Ray cluster: the controller gone (no actor by its name, killed) is UnavailableError whatever Ray
error says so; an error the controller raises on purpose comes through as its own type; any other
failure is not dressed up as either."""

from __future__ import annotations

import asyncio

import pytest
import ray

from protos.errors import PermissionDeniedError, UnavailableError
from router_service.actor import ControllerAdmin
from router_service.config import NAMESPACE


@ray.remote
class FakeMeshController:
    """Answers `read` as told: a report, a typed refusal, or a bug."""

    def read(self, verb: str, token):
        if verb == "denied":
            raise PermissionDeniedError("read token missing")
        if verb == "bug":
            raise KeyError("a bug in the controller")
        return {"ok": True, "report": b"state"}


def test_the_controller_gone_is_unavailable_and_its_own_errors_keep_their_type(ray_cluster):
    admin = ControllerAdmin("admin-test/controller", NAMESPACE)
    with pytest.raises(UnavailableError, match="not running"):
        asyncio.run(admin.read("status", None))
    actor = FakeMeshController.options(name="admin-test/controller", namespace=NAMESPACE).remote()
    assert asyncio.run(admin.read("status", None)) == {"ok": True, "report": b"state"}
    with pytest.raises(PermissionDeniedError, match="read token missing"):
        asyncio.run(admin.read("denied", None))
    with pytest.raises(KeyError) as info:
        asyncio.run(admin.read("bug", None))
    assert not isinstance(info.value, (UnavailableError, PermissionDeniedError))
    ray.kill(actor)
    with pytest.raises(UnavailableError):
        asyncio.run(admin.read("status", None))
