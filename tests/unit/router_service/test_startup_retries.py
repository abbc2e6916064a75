"""A start-up that failed is tried again by the next caller, not answered with the same failure
forever: the router actor's start (the controller was restarting) and the controller's recovery
(the GCS was busy)."""

from __future__ import annotations

import asyncio
import types

import pytest

from mesh.controller import MeshController
from router_service.actor import RouterActor


def _flaky(result):
    calls = []

    async def run():
        calls.append(len(calls))
        if len(calls) == 1:
            raise ConnectionError("the controller is restarting")
        return result

    return run, calls


def test_a_router_whose_start_failed_starts_on_the_next_call():
    actor = RouterActor("m", "/nowhere", {}, "ns")
    actor._start, calls = _flaky("127.0.0.1:5000")

    async def main():
        with pytest.raises(ConnectionError):
            await actor.start()
        assert await actor.start() == "127.0.0.1:5000"
        assert await actor.start() == "127.0.0.1:5000"  # once started, started

    asyncio.run(main())
    assert len(calls) == 2


def test_a_controller_whose_recovery_failed_recovers_on_the_next_call():
    recover, calls = _flaky(True)
    controller = types.SimpleNamespace(_recovering=None, _recover=recover,
                                       rec=types.SimpleNamespace(epoch=7))

    async def main():
        with pytest.raises(ConnectionError):
            await MeshController.ready(controller)
        assert await MeshController.ready(controller) == 7
        assert await MeshController.ready(controller) == 7

    asyncio.run(main())
    assert len(calls) == 2
