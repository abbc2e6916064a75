"""Latency probes: one small Ray actor per node that echoes over gRPC and measures its links.

Each probe serves `MeshProbe.Echo` on its node and, asked to, times echoes to every probe (its own
included): RTT is the median of small echoes, bandwidth is a 1 MiB payload's size over its median
time less the RTT. The controller gathers the rows into the node x node matrices that placement
optimises; nothing else feeds it link costs.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc

from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos.serving import TLSConfig, add_service, bind, channel, require_secret, secret_metadata

__all__ = ["LINKS_EVERY_S", "PROBE_TIMEOUT_S", "LatencyProbe", "ProbeEcho", "ProbeFleet", "link_matrix"]

PROBE_TIMEOUT_S = 60.0  # a latency probe starts, or measures every link, within this (a pending one fails the plan)
LINKS_EVERY_S = 10.0  # links measured at most this often (Placement, rebalance): each measurement loads every node

ECHO_BYTES = 64
BANDWIDTH_BYTES = 1 << 20
_OPTIONS = [("grpc.max_receive_message_length", 4 * BANDWIDTH_BYTES)]


class ProbeEcho:
    """The MeshProbe service of a node's probe: the payload's first ECHO_BYTES back, with the node id."""

    def __init__(self, node_id: str):
        self.node_id = node_id

    async def Echo(self, request: pb.PingRequest, context) -> pb.PingReply:
        return pb.PingReply(payload=request.payload[:ECHO_BYTES], group=self.node_id)


class LatencyProbe:
    """Ray actor body, pinned to one node by the controller (`<mesh>/probe-<node id[:12]>`).
    `echo_class`: what serves its echoes (an emulated far node's answers late: cluster/links.py)."""

    echo_class = ProbeEcho

    def __init__(self):
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = ray.util.get_node_ip_address()
        self._server: grpc.aio.Server | None = None
        self.endpoint = ""
        self._metadata: tuple = ()
        self._tls: TLSConfig | None = None

    async def start(self, secret: str, tls: dict | None = None) -> tuple[str, str]:
        """Serve Echo on this node to callers with the mesh's `secret`, over mutual TLS when `tls`
        (internal_tls, as the groups' ports: probes call each other with it); returns (node id,
        "ip:port")."""
        if self._server is None:
            self._server = grpc.aio.server(options=_OPTIONS, maximum_concurrent_rpcs=16)
            add_service(self._server, "MeshProbe", self.echo_class(self.node_id), require_secret(secret))
            self._metadata = secret_metadata(secret)
            self._tls = TLSConfig(**tls) if tls else None
            port = bind(self._server, f"{self.host}:0", self._tls)
            await self._server.start()
            self.endpoint = f"{self.host}:{port}"
        return self.node_id, self.endpoint

    async def measure(self, endpoints: list[str], pings: int = 7, transfers: int = 3) -> list[tuple[float, float]]:
        """(RTT ms, bandwidth MB/s) from this node to each endpoint, in order."""
        return [await self._measure_one(e, pings, transfers) for e in endpoints]

    async def _measure_one(self, endpoint: str, pings: int, transfers: int) -> tuple[float, float]:
        async with channel(endpoint, self._tls, _OPTIONS) as link:
            stub = pb_grpc.MeshProbeStub(link)

            def echo(request, timeout):
                return stub.Echo(request, timeout=timeout, metadata=self._metadata)

            await echo(pb.PingRequest(payload=b"w"), timeout=30)  # connect outside the timing
            rtt_s = await _median_call(echo, b"x" * ECHO_BYTES, pings)
            bulk_s = await _median_call(echo, b"x" * BANDWIDTH_BYTES, transfers)
        return rtt_s * 1e3, BANDWIDTH_BYTES / max(bulk_s - rtt_s, 1e-6) / 1e6


async def _median_call(echo, payload: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await echo(pb.PingRequest(payload=payload), timeout=30)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def link_matrix(nodes: list[str], rows: list[list[tuple[float, float]]]) -> dict:
    """{"nodes", "rtt_ms" [from][to], "mbps" [from][to]} from each node's measure() row."""
    return {"nodes": nodes, "rtt_ms": [[round(r, 3) for r, _ in row] for row in rows],
            "mbps": [[round(b, 1) for _, b in row] for row in rows]}


class ProbeFleet:
    """The latency probes of mesh `name` (one LatencyProbe actor per live node, `<name>/probe-<node>`,
    started on first use, dropped with their node) and the link matrix they measure: at most once
    per LINKS_EVERY_S (each measurement loads every node), sooner the last one. `probe_class`:
    LatencyProbe or a subclass (None: LatencyProbe)."""

    def __init__(self, name: str, probe_class: type | None = None):
        self.name = name
        self.probe_class = probe_class or LatencyProbe
        self.probes: dict[str, object] = {}  # node id -> LatencyProbe handle
        self._links: tuple[float, dict] | None = None  # (when, link matrix) of the last measurement

    async def links(self, secret: str, tls: dict | None) -> dict:
        """{"nodes", "rtt_ms" [from][to], "mbps" [from][to]}: every probe in turn times echoes to every probe."""
        from mesh.handles import alive_nodes

        nodes = sorted(n["NodeID"] for n in alive_nodes())
        if self._links is not None and time.monotonic() - self._links[0] < LINKS_EVERY_S \
                and sorted(self._links[1]["nodes"]) == nodes:
            return self._links[1]
        nodes, endpoints = await self._start(secret, tls)
        rows = [await asyncio.wait_for(self.probes[n].measure.remote(endpoints), PROBE_TIMEOUT_S)
                for n in nodes]  # one at a time: no cross-talk
        self._links = (time.monotonic(), link_matrix(nodes, rows))
        return self._links[1]

    def kill(self) -> None:
        """Kill this mesh's probe on every live node, by name: an earlier incarnation of the
        controller may have started them."""
        from mesh.handles import alive_nodes, kill_named

        for node in (n["NodeID"] for n in alive_nodes()):
            kill_named(f"{self.name}/probe-{node[:12]}")

    async def _start(self, secret: str, tls: dict | None) -> tuple[list[str], list[str]]:
        """A serving probe on every live node; returns (node ids, their probes' endpoints), in one order."""
        import ray

        from mesh.handles import NAMESPACE, alive_nodes, pinning

        nodes = [n["NodeID"] for n in alive_nodes()]
        self.probes = {n: p for n, p in self.probes.items() if n in nodes}
        for node in nodes:
            if node not in self.probes:
                self.probes[node] = ray.remote(self.probe_class).options(
                    name=f"{self.name}/probe-{node[:12]}", namespace=NAMESPACE, lifetime="detached",
                    num_cpus=0, get_if_exists=True, **pinning(node)).remote()
        started = await asyncio.wait_for(asyncio.gather(*(self.probes[n].start.remote(secret, tls) for n in nodes)),
                                         PROBE_TIMEOUT_S)
        return nodes, [endpoint for _, endpoint in started]
