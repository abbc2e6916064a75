"""A simulated device: an expert group whose compute takes the time a cost model gives, asleep.

For benchmarks of the control plane (skew, replication, swaps, restores) with many devices on a
small machine: the process imports neither torch nor the checkpoint's weights, so dozens fit on 2
cores. Never used by correctness tests: its outputs are its inputs.

It takes part in changes as bookkeeping: experts loaded or staged from a checkpoint get the version
its bytes hash to (experts/safetensors.py streams them), the model's own experts the version
"simulated"; stage, commit and release move those versions as a real group moves weights. It holds
no weights to probe, so a mesh of simulated devices swaps with `swap_probe_experts: 0`.

    time(batch) = latency_ms / 1e3 + 6 * H * I * rows / (tflops * 1e12)

(three GEMMs of 2 * H * I FLOPs per token copy). A device runs one batch at a time, as a GPU stream
does, so a hot device queues work and replicas on other devices take it away.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from dataclasses import dataclass

import grpc

from protos.collector import settle_gc
from protos.errors import InvalidRequestError
from experts.links import emulated_delay_s, serve_delay
from experts.safetensors import CheckpointLayout  # torch-free; imported with the process, not at its first swap
from protos import expert_mesh_pb2 as pb
from protos.serving import TLSConfig, bind, worker_server

__all__ = ["CostModel", "SimulatedGroupActor", "SimulatedGroupFactory"]


@dataclass(frozen=True)
class CostModel:
    hidden_size: int
    intermediate_size: int
    tflops: float = 1.0       # device throughput
    latency_ms: float = 0.2   # fixed cost of a batch (launch, synchronisation)

    def seconds(self, rows: int) -> float:
        return self.latency_ms / 1e3 + 6 * self.hidden_size * self.intermediate_size * rows / (self.tflops * 1e12)


class _Device:
    def __init__(self, name: str, cost: CostModel, held: dict[int, set[int]], delay_s: float):
        self.name, self.cost, self.held, self.delay_s = name, cost, held, delay_s
        self.busy = asyncio.Lock()  # one batch at a time
        self.tokens_served: collections.Counter[tuple[int, int]] = collections.Counter()
        self.compute_s = 0.0

    async def Compute(self, request: pb.ExpertBatch, context) -> pb.ExpertResult:
        missing = [e for e in request.experts if e not in self.held.get(request.layer, set())]
        if missing or sum(request.counts) != (request.hidden.shape[0] if request.hidden.shape else -1):
            raise InvalidRequestError(f"group {self.name}: layer {request.layer} experts {missing} not held, "
                                      f"or counts {list(request.counts)} do not sum to the rows")
        seconds = self.cost.seconds(sum(request.counts))
        async with self.busy:
            await asyncio.sleep(seconds)
        self.compute_s += seconds
        for expert, count in zip(request.experts, request.counts):
            self.tokens_served[(request.layer, expert)] += count
        await serve_delay(self.delay_s)
        return pb.ExpertResult(hidden=request.hidden)

    async def Ping(self, request: pb.PingRequest, context) -> pb.PingReply:
        await serve_delay(self.delay_s)
        return pb.PingReply(payload=request.payload, group=self.name)


MODEL_VERSION = "simulated"  # the version of the experts a simulated device starts with


def source_checksums(source: str, layer: int, experts: list[int]) -> list[str]:
    """sha256 of the stored bytes of `experts` of `layer` in checkpoint `source`, one expert at a time."""
    layout = CheckpointLayout(source)
    try:
        return [layout.checksum(layer, e) for e in experts]
    finally:
        layout.close()


class SimulatedGroupActor:
    """Ray actor body with the controller-facing methods of ExpertGroupActor."""

    def __init__(self, name: str, assignment: dict[int, list[int]], cost: CostModel):
        self.name = name
        self.device = _Device(name, cost, {int(layer): set(e) for layer, e in assignment.items()},
                              emulated_delay_s())
        self.versions = {(int(layer), e): MODEL_VERSION for layer, experts in assignment.items() for e in experts}
        self.staged: dict[int, dict[int, str]] = {}  # layer -> expert -> checksum of its staged bytes
        self._server: grpc.aio.Server | None = None
        self.endpoint = ""
        self.started = time.time()

    async def start(self, host: str = "", secret: str = "", tls: dict | None = None) -> str:
        import ray

        if self._server is None:
            host = host or ray.util.get_node_ip_address()
            self._server = worker_server(secret, self.device)
            port = bind(self._server, f"{host}:0", TLSConfig(**tls) if tls else None)
            await self._server.start()
            self.endpoint = f"{host}:{port}"
            settle_gc()
        return self.endpoint

    def ping(self) -> str:
        return self.name

    async def load_experts(self, layer: int, experts: list[int], source: str | None = None) -> list[str]:
        versions = ([c[:12] for c in await asyncio.to_thread(source_checksums, source, layer, experts)]
                    if source else [MODEL_VERSION] * len(experts))
        self.device.held.setdefault(layer, set()).update(experts)
        self.versions.update({(layer, e): v for e, v in zip(experts, versions)})
        return versions

    def release_experts(self, layer: int, experts: list[int]) -> None:
        self.device.held.get(layer, set()).difference_update(experts)
        for expert in experts:
            self.versions.pop((layer, expert), None)

    async def stage_experts(self, layer: int, experts: list[int], source: str, probed: list[int], probe) -> dict:
        """Hot swap, step 1, as bookkeeping: the checksums of `experts` in `source` become their staged
        versions. No weights, so no probe output (None)."""
        experts = sorted(experts)
        checksums = await asyncio.to_thread(source_checksums, source, layer, experts)
        self.staged[layer] = dict(zip(experts, checksums))
        return {"versions": [c[:12] for c in checksums], "checksums": checksums, "probe": None}

    def commit_staged(self, layer: int) -> None:
        self.versions.update({(layer, e): c[:12] for e, c in self.staged.pop(layer, {}).items()})

    def unstage(self, layer: int) -> None:
        self.staged.pop(layer, None)

    def info(self) -> dict:
        import ray

        held = {layer: sorted(e) for layer, e in self.device.held.items()}
        return {"name": self.name, "node_id": ray.get_runtime_context().get_node_id(), "endpoint": self.endpoint,
                "pid": os.getpid(), "experts": held,
                "versions": {l: [self.versions[(l, e)] for e in experts] for l, experts in held.items()},
                "staged": {l: {e: c[:12] for e, c in staged.items()} for l, staged in self.staged.items()},
                "nbytes": 0, "compute_s": self.device.compute_s,
                "tokens_served": [[l, e, n] for (l, e), n in self.device.tokens_served.items()]}


@dataclass(frozen=True)
class SimulatedGroupFactory:
    """Simulated devices as a mesh's expert groups, for benchmarks: hand one to
    `cluster.local.start_mesh(..., group_factory=...)` (mesh.handles.GroupFactory). Each group
    holds no weights, so the memory check counts none, and asks Ray for no GPU."""

    tflops: float = 1.0      # device throughput the cost model assumes
    latency_ms: float = 0.2  # fixed cost of one batch on a device
    probe_class = None       # the nodes' latency probes: mesh.probes.LatencyProbe

    def expert_bytes(self, spec, dtype: str, on_gpu: bool, fp8_block: tuple[int, int] | None) -> int:
        return 0

    def create(self, name: str, options: dict, own: dict[int, list[int]], model_path: str, spec, groups):
        import ray

        cost = CostModel(spec.expert_width, spec.intermediate_size, self.tflops, self.latency_ms)
        return ray.remote(SimulatedGroupActor).options(**options).remote(name, own, cost)
