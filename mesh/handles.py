"""Ray actors behind the reconciler's handles (mesh/reconciler.py): expert groups, routers, and
the launcher that starts groups pinned to nodes."""

from __future__ import annotations

import logging
from typing import NamedTuple, Protocol

from protos.errors import GroupGoneError, PlacementError, UnavailableError, one_line
from mesh.config import MeshConfig
from router_service.config import NAMESPACE

__all__ = ["ExpertGroupFactory", "GpuInfo", "GroupFactory", "NAMESPACE", "RayGroup", "RayLauncher", "RayRouter",
           "alive_nodes", "default_num_groups", "group_dtype", "gpus_per_group", "has_labels", "kill_named", "pinning"]

logger = logging.getLogger(__name__)


def alive_nodes(labels: dict[str, str] | None = None) -> list[dict]:
    """Ray's live nodes (those carrying all of `labels`, when given), the head first, then by node id."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"] and has_labels(n.get("Labels") or {}, labels or {})]
    return sorted(nodes, key=lambda n: (not n.get("IsHeadNode", False), n["NodeID"]))


def has_labels(node_labels: dict[str, str], wanted: dict[str, str]) -> bool:
    """Whether a node's labels include every `wanted` key with its value. Pure policy."""
    return all(node_labels.get(key) == value for key, value in wanted.items())


def gpus_per_group(device: str, nodes: list[dict]) -> int:
    """GPUs each group reserves: 1 where it computes on one (`device` cuda, or auto on nodes with
    GPUs), else 0. PlacementError for cuda where no node has a GPU. Pure policy."""
    has_gpus = any(n["Resources"].get("GPU", 0) > 0 for n in nodes)
    if device == "cuda" and not has_gpus:
        raise PlacementError("groups.device is cuda, but no live node of groups.node_labels has a GPU")
    return int(device != "cpu" and has_gpus)


def group_dtype(groups, nodes: list[dict]) -> str:
    """The dtype groups hold their experts in (groups: GroupsConfig): its `dtype`, or for auto
    bfloat16 where they compute on GPUs (per `gpus_per_group`), else float32. Pure policy."""
    if groups.dtype != "auto":
        return groups.dtype
    return "bfloat16" if gpus_per_group(groups.device, nodes) else "float32"


def default_num_groups(device: str, nodes: list[dict]) -> int:
    """One group per GPU where the groups compute on GPUs (per `gpus_per_group`), else one per node. Pure policy."""
    if gpus_per_group(device, nodes):
        return sum(int(n["Resources"].get("GPU", 0)) for n in nodes)
    return len(nodes)


def pinning(node_id: str) -> dict:
    """Actor options that pin to `node_id`: a label selector on Ray's node-id label."""
    return {"label_selector": {"ray.io/node-id": node_id}}


class RayGroup:
    """An expert-group actor (ExpertGroupActor or SimulatedGroupActor). Ray's word that it is gone
    becomes GroupGoneError, an actor Ray cannot reach now UnavailableError (mesh/health.py tells
    them apart from a timeout); the group's own errors come through as they are."""

    def __init__(self, actor):
        self.actor = actor

    async def _call(self, method: str, *args):
        import ray

        try:
            return await getattr(self.actor, method).remote(*args)
        except ray.exceptions.ActorDiedError as exc:
            raise GroupGoneError(f"Ray reports the actor dead: {one_line(exc)}") from exc
        except ray.exceptions.RayActorError as exc:  # ActorUnavailableError: unreachable for now
            raise UnavailableError(f"Ray cannot reach the actor now: {one_line(exc)}") from exc

    async def info(self) -> dict:
        return await self._call("info")

    async def load(self, layer: int, experts: list[int], source: str | None) -> list[str]:
        return await self._call("load_experts", layer, experts, source)

    async def release(self, layer: int, experts: list[int]) -> None:
        await self._call("release_experts", layer, experts)

    async def stage(self, layer: int, experts: list[int], source: str, probed: list[int], probe) -> dict:
        return await self._call("stage_experts", layer, experts, source, probed, probe)

    async def commit(self, layer: int) -> None:
        await self._call("commit_staged", layer)

    async def unstage(self, layer: int) -> None:
        await self._call("unstage", layer)

    def kill(self) -> None:
        _kill(self.actor)


class RayRouter:
    def __init__(self, actor):
        self.actor = actor

    async def load_report(self, pairs: bool) -> bytes:
        return await self.actor.load_report.remote(pairs)

    async def node_id(self) -> str:
        return await self.actor.node_id.remote()

    async def stop(self) -> None:
        await self.actor.stop.remote()

    def kill(self) -> None:
        _kill(self.actor)

    async def epoch(self) -> int:
        return await self.actor.epoch.remote()

    async def set_table(self, blob: bytes) -> bool:
        return await self.actor.set_table.remote(blob)

    async def start(self, port: int | None = None) -> str:
        return await self.actor.start.remote(port)

    async def open_channels(self, groups: list[str], fresh: bool) -> None:
        await self.actor.open_channels.remote(groups, fresh)


class GroupFactory(Protocol):
    """What runs on a mesh's nodes: its expert groups (ExpertGroupFactory; a bench's simulated
    devices, experts.simulated.SimulatedGroupFactory; cluster.links.EmulatedLinks' far nodes) and,
    with `probe_class`, the latency probe of each node (None: mesh.probes.LatencyProbe)."""

    probe_class: type | None

    def expert_bytes(self, spec, dtype: str, on_gpu: bool, fp8_block: tuple[int, int] | None) -> int:
        """Memory one expert copy takes where its group holds it: on a GPU (`fp8_block`: block fp8
        kept as stored there) or its node's host (0: none, the memory check passes)."""

    def create(self, name: str, options: dict, own: dict[int, list[int]], model_path: str, spec, groups):
        """A new Ray actor `name` (`options`: name, pinning, lifetime...) holding the model's own
        experts `own` ({layer: experts}), with the controller-facing methods of ExpertGroupActor;
        `groups`: the mesh's GroupsConfig."""


class GpuInfo(NamedTuple):
    """One GPU of a node, measured before the groups take its GPUs (`RayLauncher.measure_gpus`)."""

    memory_bytes: int
    capability: tuple[int, int]


def _measure_gpu() -> GpuInfo:  # CUDA only: not run here
    import torch

    props = torch.cuda.get_device_properties(0)
    return GpuInfo(props.total_memory, (props.major, props.minor))


class ExpertGroupFactory:
    """Expert groups that hold the checkpoint's weights and compute (experts/actor.py), on the GPU
    Ray gives each where `groups.device` says (`gpus_per_group`). `actor_class`: ExpertGroupActor or
    a subclass of it; `probe_class`: LatencyProbe or a subclass of it (None: LatencyProbe)."""

    def __init__(self, actor_class: type | None = None, probe_class: type | None = None):
        self.actor_class, self.probe_class = actor_class, probe_class

    def expert_bytes(self, spec, dtype: str, on_gpu: bool, fp8_block: tuple[int, int] | None) -> int:
        import torch

        from experts.group import expert_nbytes

        return expert_nbytes(spec, getattr(torch, dtype), on_gpu, fp8_block)

    def create(self, name: str, options: dict, own: dict[int, list[int]], model_path: str, spec, groups):
        import ray

        from experts.actor import ExpertGroupActor

        nodes = alive_nodes(groups.node_labels)
        num_gpus = gpus_per_group(groups.device, nodes)
        return ray.remote(self.actor_class or ExpertGroupActor).options(num_gpus=num_gpus, **options).remote(
            name, model_path, own, group_dtype(groups, nodes), groups.torch_threads, groups.channel_budget_bytes,
            "cuda" if num_gpus else "cpu")


class RayLauncher:
    """Starts expert-group actors `<mesh>/group-<k>` (detached, pinned) and finds actors by name."""

    def __init__(self, config: MeshConfig, model_path: str, spec, factory: GroupFactory | None = None):
        self.config, self.model_path, self.spec = config, model_path, spec
        self.factory = factory or ExpertGroupFactory()
        self.secret = ""  # the mesh's data-plane secret: the controller sets it (deploy, adoption)

    def expert_bytes(self, gpu: GpuInfo | None = None) -> int:
        """Memory one expert copy takes on `gpu` (block fp8 stays fp8 where it has fp8), or on its node's host."""
        fp8_block = self._fp8_block() if gpu is not None and gpu.capability >= (8, 9) else None
        return self.factory.expert_bytes(self.spec, self.dtype(), gpu is not None, fp8_block)

    def dtype(self) -> str:
        """The dtype the groups hold their experts in (group_dtype, over the live nodes)."""
        return group_dtype(self.config.groups, alive_nodes(self.config.groups.node_labels))

    def _fp8_block(self) -> tuple[int, int] | None:
        from experts.checkpoint import CheckpointReader

        reader = CheckpointReader(self.model_path, keep_fp8=True)
        try:
            return reader.fp8_block(self.spec.moe_layers[0])
        finally:
            reader.close()

    async def measure_gpus(self, nodes: list[str], timeout_s: float = 60.0) -> dict[str, GpuInfo]:
        """Per node, one of its GPUs as a short Ray task on a sliver of it sees it (before the groups
        take the GPUs). PlacementError naming the nodes where none was free within `timeout_s`."""
        import asyncio

        import ray

        measure = ray.remote(num_cpus=0, num_gpus=0.01)(_measure_gpu)
        refs = [measure.options(**pinning(node)).remote() for node in nodes]
        try:
            return dict(zip(nodes, await asyncio.wait_for(asyncio.gather(*refs), timeout_s)))
        except asyncio.TimeoutError:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise PlacementError(f"could not measure the GPUs of nodes {[n[:12] for n in nodes]} within "
                                 f"{timeout_s:.0f} s (no GPU free for a moment?); groups.device cpu places by host "
                                 f"memory") from None

    def alive_nodes(self) -> list[str]:
        """The live nodes groups may run on (groups.node_labels)."""
        return [n["NodeID"] for n in alive_nodes(self.config.groups.node_labels)]

    def find_group(self, name: str) -> RayGroup | None:
        actor = _named(name)
        return None if actor is None else RayGroup(actor)

    def find_router(self, name: str) -> RayRouter | None:
        actor = _named(name)
        return None if actor is None else RayRouter(actor)

    async def start_group(self, name: str, node: str, loads: list[tuple[int, list[int], str | None]]) -> RayGroup:
        """Create group `name` on `node`: the model's experts in its constructor, swapped-in ones
        (`source` not None) loaded from their checkpoints after; returns once it serves."""
        kill_named(name)  # hung, or a leftover: the name must be free
        groups = self.config.groups
        own = {}
        for layer, experts, source in loads:
            if source is None:
                own.setdefault(layer, []).extend(experts)
        options = dict(name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=groups.num_cpus,
                       max_concurrency=64, **pinning(node))
        actor = self.factory.create(name, options, own, self.model_path, self.spec, groups)
        for layer, experts, source in loads:
            if source is not None:
                await actor.load_experts.remote(layer, experts, source)
        tls = self.config.internal_tls
        await actor.start.remote(secret=self.secret, tls=tls.model_dump() if tls else None)
        return RayGroup(actor)


def _named(name: str):
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def kill_named(name: str) -> None:
    """Kill the actor `name` of the mesh's namespace, if there is one."""
    actor = _named(name)
    if actor is not None:
        _kill(actor)


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor)
    except Exception:  # noqa: BLE001 - already gone
        pass
