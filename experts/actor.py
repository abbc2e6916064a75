"""The expert-group Ray actor: hosts an ExpertGroup on one node and serves it over gRPC
(`ExpertWorker`, the default fast path) and as a Ray method (`compute`, the `ray` transport).

Shapes: N = token copies sent to this group (sorted by expert), H = hidden.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time

import grpc
import torch

from protos.collector import settle_gc
from protos.errors import ChannelRefusedError, InvalidRequestError, MeshError, one_line
from experts.group import ExpertGroup
from experts.memory import keep_freed_memory
from experts.quantized import fp8_on
from protos import expert_mesh_pb2 as pb
from protos.serving import TLSConfig, bind, worker_server
from protos.wire import DTYPES, from_proto, to_proto

__all__ = ["ExpertGroupActor", "ExpertGroupServer", "compute_device", "out_of_memory_named"]

logger = logging.getLogger(__name__)

INLINE_MAX_MACS = 1 << 22  # rows * H * I below this: compute on the event loop (~1 ms of work at most)
BULK_MIN_MACS = 1 << 28    # from this (~100 rows at H=1024, I=2816): the group's one bulk thread


def validate_batch(request: pb.ExpertBatch,
                   hidden_size: int) -> tuple[torch.Tensor, torch.Tensor | None, list[int], list[int]]:
    """(rows [N, H], scale [N] or None, experts, counts) of an ExpertBatch, checked as Forward
    checks its input; which experts and versions the group holds, ExpertGroup.forward checks.
    InvalidRequestError names the field."""
    rows = from_proto(request.hidden, "ExpertBatch.hidden")
    if rows.dim() != 2 or rows.shape[1] != hidden_size:
        raise InvalidRequestError(f"ExpertBatch.hidden must be [N, {hidden_size}], got {list(rows.shape)}")
    experts, counts = list(request.experts), list(request.counts)
    if len(counts) != len(experts) or any(c < 0 for c in counts) or sum(counts) != rows.shape[0]:
        raise InvalidRequestError(f"ExpertBatch.counts {counts[:16]} must be one non-negative count per expert "
                                  f"({len(experts)}) summing to the {rows.shape[0]} rows")
    scale = None
    if request.scale.dtype:
        scale = from_proto(request.scale, "ExpertBatch.scale")
        if tuple(scale.shape) != (rows.shape[0],):
            raise InvalidRequestError(f"ExpertBatch.scale must be [{rows.shape[0]}], got {list(scale.shape)}")
    if not torch.isfinite(rows).all() or (scale is not None and not torch.isfinite(scale).all()):
        raise InvalidRequestError("ExpertBatch.hidden or .scale contains NaN or Inf")
    return rows, scale, experts, counts


class ExpertGroupServer:
    """Serves one ExpertGroup; the compute runs in a thread so the event loop keeps receiving."""

    def __init__(self, name: str, group: ExpertGroup):
        self.name = name
        self.group = group
        self.tokens_served: collections.Counter[tuple[int, int]] = collections.Counter()
        self.compute_s = 0.0
        self.stage_s: collections.Counter[str] = collections.Counter()  # Compute's decode / compute / encode, calls
        self._bulk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"bulk-{name}")

    def compute_sync(self, layer: int, rows: torch.Tensor, experts: list[int], counts: list[int],
                     scale: torch.Tensor | None, versions: list[str] | None = None) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.group.forward(layer, rows, experts, counts, scale, versions).to(rows.dtype)  # the sender's
        self.compute_s += time.perf_counter() - start
        served = self.tokens_served
        for expert, count in zip(experts, counts):
            served[(layer, expert)] += count
        return out

    async def compute(self, layer, rows, experts, counts, scale, versions=None) -> torch.Tensor:
        """Small batches run inline (a thread hop costs more than they do); larger ones in a thread,
        so the event loop keeps receiving while torch computes; bulk ones (from BULK_MIN_MACS) one
        at a time in the group's bulk thread, so a small call shares the cores with one of them, not
        with every bulk call in flight (torch's own threads already spread one over the cores)."""
        macs = rows.numel() * self.group.spec.intermediate_size
        if macs < INLINE_MAX_MACS:
            return self.compute_sync(layer, rows, experts, counts, scale, versions)
        if macs >= BULK_MIN_MACS:
            return await asyncio.get_running_loop().run_in_executor(self._bulk, self.compute_sync, layer, rows,
                                                                    experts, counts, scale, versions)
        return await asyncio.to_thread(self.compute_sync, layer, rows, experts, counts, scale, versions)

    async def Compute(self, request: pb.ExpertBatch, context) -> pb.ExpertResult:
        start = time.perf_counter()
        rows, scale, experts, counts = validate_batch(request, self.group.spec.expert_width)
        decoded = time.perf_counter()
        try:
            out = await self.compute(request.layer, rows, experts, counts, scale, list(request.versions) or None)
        except (KeyError, ValueError) as exc:  # a layer, expert or version this group does not hold
            raise InvalidRequestError(f"group {self.name}: {exc}") from exc
        computed = time.perf_counter()
        reply = pb.ExpertResult()
        to_proto(out, reply.hidden)
        stage_s = self.stage_s
        stage_s["decode"] += decoded - start
        stage_s["compute"] += computed - decoded
        stage_s["encode"] += time.perf_counter() - computed
        stage_s["calls"] += 1
        return reply

    async def Ping(self, request: pb.PingRequest, context) -> pb.PingReply:
        return pb.PingReply(payload=request.payload, group=self.name)


def compute_device(device: str, who: str, num_assigned_gpus: int = 1) -> torch.device:
    """The device an actor (`who`: "group x", "router x") computes on: "cuda", the GPU Ray assigned it
    (the first CUDA device it may see); "cpu", the host; "auto", cuda where Ray assigned it a GPU
    (`num_assigned_gpus`), else the host. MeshError when cuda is asked and this process sees no GPU."""
    if device == "cpu" or (device == "auto" and not num_assigned_gpus):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise MeshError(f"{who} was placed to compute on a GPU, but its process sees none "
                        "(CUDA_VISIBLE_DEVICES, or a torch build without CUDA)")
    return torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def out_of_memory_named(name: str, device: torch.device, what: str):
    """A device out of memory inside as a MeshError naming the group, what it was loading (`what`)
    and the bytes asked for (torch's message)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise MeshError(f"group {name}: {device} out of memory loading {what}: {one_line(exc)}") from exc


def load_group(name: str, model_path: str, assignment: dict[int, list[int]], dtype: torch.dtype | None,
               device: torch.device) -> ExpertGroup:
    """The group's experts from the checkpoint onto `device` (out_of_memory_named)."""
    with out_of_memory_named(name, device, f"layers {sorted(assignment)} ({sum(map(len, assignment.values()))} "
                                           f"experts)"):
        return ExpertGroup.from_checkpoint(model_path, assignment, dtype, device=device)


def _finite(t: torch.Tensor) -> torch.Tensor:
    """Which values of t are finite; float8_e4m3fn has no Inf and one NaN pattern (S.1111.111)."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8) & 0x7F != 0x7F
    return torch.isfinite(t)


class ExpertGroupActor:
    """Ray actor body (wrapped with ray.remote by the controller, which sets placement and name).
    `server_class`: what serves its group (a bench's subclass may echo instead of computing)."""

    server_class = ExpertGroupServer

    def __init__(self, name: str, model_path: str, assignment: dict[int, list[int]], dtype: str = "float32",
                 torch_threads: int = 0, channel_budget_bytes: int = 1 << 30, device: str = "cpu"):
        keep_freed_memory()
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.name = name
        self.model_path = model_path
        group = load_group(name, model_path, assignment, DTYPES[dtype], compute_device(device, f"group {name}"))
        self.server_impl = self.server_class(name, group)
        self._server: grpc.aio.Server | None = None
        self.endpoint = ""
        self._changing = threading.Lock()  # copies are added, staged and released from worker threads
        self._channels: dict = {}  # router -> ChannelWorker (collective transport)
        self.channel_budget_bytes = channel_budget_bytes  # their buffers (request and reply), together, at most
        logger.info("group %s holds %s", name, {k: v.experts for k, v in group.layers.items()})

    async def start(self, host: str = "", secret: str = "", tls: dict | None = None) -> str:
        """Start the ExpertWorker server on this node, for callers with the mesh's `secret` (with
        TLS when `tls`: a TLSConfig as a dict); returns its "ip:port"."""
        import ray

        host = host or ray.util.get_node_ip_address()
        self._server = worker_server(secret, self.server_impl)
        port = bind(self._server, f"{host}:0", TLSConfig(**tls) if tls else None)
        await self._server.start()
        self.endpoint = f"{host}:{port}"
        settle_gc()
        return self.endpoint

    async def compute(self, layer: int, rows: torch.Tensor, experts: list[int], counts: list[int],
                      scale: torch.Tensor | None = None, versions: list[str] | None = None) -> torch.Tensor:
        return await self.server_impl.compute(layer, rows, experts, counts, scale, versions)

    def ping(self) -> str:
        return self.name

    def device_id(self) -> str:
        """The group's device as a collective channel's router weighs it (protos.collective.wire_device)."""
        from protos.collective import device_id

        return device_id(self.server_impl.group.device)

    async def open_channel(self, channel_id: str, router: str, host: str, port: int, max_rows: int,
                           dtype: str, wire: str = "cpu") -> None:
        """Collective transport: join the channel `channel_id` whose store the router `router`
        hosts at host:port, and serve it from a thread (buffers for `max_rows` rows of `dtype`, on
        the group's GPU where `wire` is "cuda" (NCCL), else on the host (gloo)). A new channel from
        the same router replaces its old one."""
        from experts.channel import ChannelWorker, channel_nbytes

        group = self.server_impl.group
        spec = group.spec
        self._check_channel_budget(router, channel_nbytes(spec.num_experts, max_rows, spec.expert_width, DTYPES[dtype]))
        worker = ChannelWorker(channel_id, host, port, self.channel_compute(), spec.num_experts,
                               spec.expert_width, DTYPES[dtype], max_rows, self.server_impl.stage_s,
                               group.device if wire == "cuda" else torch.device("cpu"))
        await asyncio.to_thread(worker.connect)
        old = self._channels.pop(router, None)
        if old is not None:
            old.close()
        self._channels[router] = worker
        worker.start()

    def channel_compute(self):
        """What a collective channel runs per batch (experts/channel.py's Compute): the server's
        compute_sync (a subclass may wrap it: cluster/links.py's emulated far node)."""
        return self.server_impl.compute_sync

    def _check_channel_budget(self, router: str, nbytes: int) -> None:
        """ChannelRefusedError when a channel of `nbytes` would take the channels' buffers past the
        budget (closed channels and the one `router` replaces no longer count)."""
        self._channels = {r: w for r, w in self._channels.items() if not w.closed.is_set()}
        held = sum(w.nbytes for r, w in self._channels.items() if r != router)
        if held + nbytes > self.channel_budget_bytes:
            raise ChannelRefusedError(
                f"group {self.name} refuses a collective channel to {router}: its buffers ({nbytes} bytes) "
                f"beside the {len(self._channels)} channels held ({held} bytes) would pass groups.channel_budget_bytes "
                f"({self.channel_budget_bytes}); that caller's slices go over grpc")

    def echo(self, payload):
        """Returns `payload` as received: the `ray` transport's raw round trip (bench_mesh)."""
        return payload

    async def load_experts(self, layer: int, experts: list[int], source: str | None = None) -> list[str]:
        """Load more expert copies of `layer` from the checkpoint at `source` (default: the model's)
        beside what is served; returns their versions. A probe batch runs through them first (warm-up)."""

        def load():
            group = self.server_impl.group
            with out_of_memory_named(self.name, group.device, f"layer {layer} experts {sorted(experts)}"):
                weights = self._read(layer, experts, source)
                with self._changing:
                    group.add_experts(layer, weights)
            probe = torch.zeros(len(experts), group.spec.expert_width)
            with torch.inference_mode():
                group.forward(layer, probe, sorted(experts), [1] * len(experts))
            return [group.version(layer, e) for e in experts]

        return await asyncio.to_thread(load)

    def _read(self, layer: int, experts: list[int], source: str | None):
        from experts.checkpoint import CheckpointReader

        group = self.server_impl.group
        reader = CheckpointReader(source or self.model_path, dtype=group.dtype, keep_fp8=fp8_on(group.device))
        try:
            if reader.spec != group.spec:
                raise ValueError(f"checkpoint {source} is not the same architecture as the served model")
            weights = reader.experts(layer, experts, group.device)  # one at a time onto the device
        finally:
            reader.close()
        parts = [t for t in (weights.w_gate_up, weights.w_down, weights.b_gate_up, weights.b_down) if t is not None]
        parts += [weights.scales.gate_up, weights.scales.down] if weights.scales else []
        finite = torch.stack([_finite(t.flatten(1)).all(dim=1) for t in parts]).all(dim=0)  # [n]
        if not finite.all():
            bad = [e for e, ok in zip(weights.experts, finite.tolist()) if not ok]
            raise ValueError(f"checkpoint {source or self.model_path}: layer {layer} experts {bad} have NaN or Inf "
                             f"weights")
        return weights

    async def stage_experts(self, layer: int, experts: list[int], source: str, probed: list[int],
                            probe: torch.Tensor | None) -> dict:
        """Hot swap, step 1: load new weights of `experts` from `source` beside the current ones and
        run `probe` [len(probed) * n, H] (n rows per expert of `probed`, a sample of `experts`,
        ascending) through them. Returns {"versions", "checksums" (of `experts`, ascending), "probe":
        outputs [len(probed) * n, H] or None}; nothing is served yet."""

        def stage():
            group = self.server_impl.group
            with out_of_memory_named(self.name, group.device, f"layer {layer} experts {sorted(experts)}"):
                weights = self._read(layer, experts, source)
                with self._changing:
                    group.stage(layer, weights)
            staged = group.staged[layer]
            versions = [staged.version(e) for e in sorted(experts)]
            out = None
            if probed:
                per_expert = probe.shape[0] // len(probed)
                with torch.inference_mode():
                    out = group.forward(layer, probe, probed, [per_expert] * len(probed), None,
                                        [staged.version(e) for e in probed])
            return {"versions": versions, "checksums": [staged.checksums[staged.slot[e]] for e in sorted(experts)],
                    "probe": out}

        return await asyncio.to_thread(stage)

    def commit_staged(self, layer: int) -> None:
        """Hot swap, last step (after the flip and the drain): staged weights become current."""
        with self._changing:
            self.server_impl.group.commit(layer)

    def unstage(self, layer: int) -> None:
        """Hot swap rolled back: drop the staged weights."""
        with self._changing:
            self.server_impl.group.unstage(layer)

    def release_experts(self, layer: int, experts: list[int]) -> None:
        """Drop copies whose traffic the controller has already moved away."""
        with self._changing:
            self.server_impl.group.remove_experts(layer, experts)

    def info(self) -> dict:
        import ray

        group = self.server_impl.group
        return {
            "name": self.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "endpoint": self.endpoint,
            "pid": os.getpid(),
            "experts": {layer: held.experts for layer, held in group.layers.items()},
            "versions": {layer: [group.version(layer, e) for e in held.experts] for layer, held in group.layers.items()},
            "staged": {layer: {e: staged.version(e) for e in staged.experts} for layer, staged in group.staged.items()},
            "nbytes": group.nbytes(),
            "device": str(group.device),
            "bytes_read": group.bytes_read,
            "tokens_served": [[layer, expert, n] for (layer, expert), n in self.server_impl.tokens_served.items()],
            "compute_s": self.server_impl.compute_s,
            "stage_s": dict(self.server_impl.stage_s),
        }
