"""Emulated far nodes for tests and benchmarks on one machine, injected through the group factory
(mesh.handles.GroupFactory): nothing of it runs in a mesh of real groups.

    cluster.local.start_mesh(config, path, group_factory=EmulatedLinks())

On a node with the Ray label `expert-mesh.io/link-delay-ms=<d>` (experts/links.py), every gRPC call
an expert group or a latency probe serves answers d ms late, and a collective channel's reply
leaves d ms after its compute; elsewhere they serve as a mesh's own.
"""

from __future__ import annotations

import time

from experts.actor import ExpertGroupActor, ExpertGroupServer
from experts.links import emulated_delay_s, serve_delay
from mesh.handles import ExpertGroupFactory
from mesh.probes import LatencyProbe, ProbeEcho

__all__ = ["DelayedGroupActor", "DelayedProbe", "EmulatedLinks"]


class DelayedGroupServer(ExpertGroupServer):
    """An expert group's gRPC service, every answer held for the node's delay."""

    def __init__(self, name, group):
        super().__init__(name, group)
        self.delay_s = emulated_delay_s()

    async def Compute(self, request, context):
        reply = await super().Compute(request, context)
        await serve_delay(self.delay_s)
        return reply

    async def Ping(self, request, context):
        await serve_delay(self.delay_s)
        return await super().Ping(request, context)


class DelayedGroupActor(ExpertGroupActor):
    """An expert group whose gRPC answers and collective replies leave its node's delay late."""

    server_class = DelayedGroupServer

    def channel_compute(self):
        compute, delay_s = super().channel_compute(), self.server_impl.delay_s

        def delayed(*args):
            out = compute(*args)
            time.sleep(delay_s)  # the channel's own thread: nothing else waits on it
            return out

        return delayed if delay_s > 0 else compute


class DelayedEcho(ProbeEcho):
    def __init__(self, node_id: str):
        super().__init__(node_id)
        self.delay_s = emulated_delay_s()

    async def Echo(self, request, context):
        await serve_delay(self.delay_s)
        return await super().Echo(request, context)


class DelayedProbe(LatencyProbe):
    """A latency probe whose echoes answer its node's delay late."""

    echo_class = DelayedEcho


class EmulatedLinks(ExpertGroupFactory):
    """Real expert groups and probes, with the delays of their nodes' link-delay labels."""

    def __init__(self):
        super().__init__(DelayedGroupActor, DelayedProbe)
