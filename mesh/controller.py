"""The controller: the one owner of the expert-group actors and of the routing table.

deploy():  assignment policy -> group actors pinned to nodes -> endpoints -> table (epoch 1)
           -> pushed to every router.
health:    groups pinged every `health_period_s`; a dead group's copies leave the table
           (epoch + 1), routers get the new table.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack

from experts import load_spec
from experts.actor import ExpertGroupActor
from experts.errors import MeshError
from mesh.config import MeshConfig
from mesh.placement import initial_assignment, spread_groups
from router_service.routing import Copy, RoutingTable

__all__ = ["MeshController", "NAMESPACE", "PlacementError"]

logger = logging.getLogger(__name__)

NAMESPACE = "expert-mesh"
_BYTES = {"float32": 4, "bfloat16": 2}


class PlacementError(MeshError):
    """Expert groups cannot be placed as asked (no node, not enough memory)."""


def _alive_nodes() -> list[dict]:
    import ray

    return sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: (not n.get("IsHeadNode", False), n["NodeID"]))


def _pinning(node_id: str) -> dict:
    """Actor options that pin to `node_id`: a label selector on Ray's node-id label."""
    return {"label_selector": {"ray.io/node-id": node_id}}


class MeshController:
    """Ray actor body; created by the CLI (or the Serve app) as `<mesh>/controller`, detached."""

    def __init__(self, config: dict, model_path: str):
        self.config = MeshConfig(**config)
        self.model_path = model_path
        self.spec = load_spec(model_path)
        self.groups: dict[str, dict] = {}          # name -> info (node, endpoint, experts, versions, alive)
        self.handles: dict[str, object] = {}
        self.routers: dict[str, object] = {}
        self.table = RoutingTable(0, {})
        self.started_at = time.time()
        self._health_task: asyncio.Task | None = None

    # -- deployment ------------------------------------------------------------------------------

    async def deploy(self) -> bytes:
        """Create every expert group, wait until all serve, build the first table; returns it."""
        import ray

        nodes = _alive_nodes()
        num_groups = self.config.groups.num_groups or len(nodes)
        assignment = initial_assignment(list(self.spec.moe_layers), self.spec.num_experts, num_groups,
                                        self.config.groups.replicas)
        placement = spread_groups(num_groups, [n["NodeID"] for n in nodes])
        self._check_memory(assignment, placement, nodes)
        has_gpus = any(n["Resources"].get("GPU", 0) > 0 for n in nodes)
        actor_class = ray.remote(ExpertGroupActor)
        for k, (experts, node_id) in enumerate(zip(assignment, placement)):
            name = f"{self.config.name}/group-{k}"
            self.handles[name] = actor_class.options(
                name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=self.config.groups.num_cpus,
                num_gpus=1 if has_gpus else 0, max_concurrency=64, **_pinning(node_id),
            ).remote(name, self.model_path, experts, self.config.groups.dtype, self.config.groups.torch_threads)
            self.groups[name] = {"node": node_id, "experts": experts, "alive": True}
        endpoints = await asyncio.gather(*(h.start.remote() for h in self.handles.values()))
        infos = await asyncio.gather(*(h.info.remote() for h in self.handles.values()))
        for name, endpoint, info in zip(self.handles, endpoints, infos):
            self.groups[name].update(endpoint=endpoint, versions=info["versions"], nbytes=info["nbytes"])
        self.table = self._build_table(epoch=1)
        self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        return self.table.encode()

    def _check_memory(self, assignment: list[dict], placement: list[str], nodes: list[dict]) -> None:
        spec, groups = self.spec, self.config.groups
        per_expert = 3 * spec.hidden_size * spec.intermediate_size * _BYTES[groups.dtype] * 2  # + packed copy
        memory = {n["NodeID"]: n["Resources"].get("memory", 0) for n in nodes}
        need: dict[str, int] = {}
        for experts, node in zip(assignment, placement):
            need[node] = need.get(node, 0) + per_expert * sum(len(v) for v in experts.values())
        for node, nbytes in need.items():
            allowed = memory[node] * groups.memory_fraction
            if nbytes > allowed:
                raise PlacementError(
                    f"expert groups on node {node[:12]} need {nbytes / 2**30:.2f} GiB of weights, more than "
                    f"memory_fraction={groups.memory_fraction} of its {memory[node] / 2**30:.2f} GiB Ray memory; "
                    f"add nodes or groups, or lower groups.replicas")

    def _build_table(self, epoch: int) -> RoutingTable:
        layers: dict[int, list[list[Copy]]] = {l: [[] for _ in range(self.spec.num_experts)] for l in self.spec.moe_layers}
        for name, group in self.groups.items():
            if not group["alive"]:
                continue
            for layer, experts in group["experts"].items():
                for expert, version in zip(experts, group["versions"][layer]):
                    layers[layer][expert].append(Copy(name, group["endpoint"], version))
        return RoutingTable(epoch, layers)

    # -- routers ---------------------------------------------------------------------------------

    async def add_router(self, name: str) -> bool:
        """Register the router actor `name`; push the current table. Returns whether it serves."""
        import ray

        handle = ray.get_actor(name, namespace=NAMESPACE)
        self.routers[name] = handle
        return await handle.set_table.remote(self.table.encode())

    async def _push_table(self) -> None:
        blob = self.table.encode()
        results = await asyncio.gather(*(r.set_table.remote(blob) for r in self.routers.values()),
                                       return_exceptions=True)
        for name, result in zip(list(self.routers), results):
            if isinstance(result, Exception):
                logger.warning("router %s did not take epoch %d: %s", name, self.table.epoch, result)

    # -- health ----------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_period_s)
            await self.check_health()

    async def check_health(self) -> None:
        names = [n for n, g in self.groups.items() if g["alive"]]
        results = await asyncio.gather(*(asyncio.wait_for(self.handles[n].ping.remote(), 5.0) for n in names),
                                       return_exceptions=True)
        dead = [n for n, r in zip(names, results) if isinstance(r, BaseException)]
        if dead:
            for name in dead:
                logger.warning("expert group %s is dead: removing its copies", name)
                self.groups[name]["alive"] = False
            self.table = self._build_table(self.table.epoch + 1)
            await self._push_table()

    # -- status ----------------------------------------------------------------------------------

    async def snapshot(self) -> bytes:
        """msgpack state: groups (name, node, endpoint, experts per layer, versions, alive),
        routers, and tokens per expert since start (summed over the routers' load reports)."""
        reports = await asyncio.gather(*(r.load_report.remote() for r in self.routers.values()),
                                       return_exceptions=True)
        tokens: dict[str, int] = {}
        for report in reports:
            if isinstance(report, bytes):
                for layer, expert, count in msgpack.unpackb(report)["tokens"]:
                    key = f"{layer}/{expert}"
                    tokens[key] = tokens.get(key, 0) + count
        groups = [{"name": n, "node": g["node"], "endpoint": g.get("endpoint", ""), "alive": g["alive"],
                   "experts": {str(l): e for l, e in g["experts"].items()},
                   "versions": {str(l): v for l, v in g.get("versions", {}).items()}} for n, g in self.groups.items()]
        return msgpack.packb({
            "mesh": self.config.name, "model": self.model_path, "model_type": self.spec.model_type,
            "epoch": self.table.epoch, "uptime_s": time.time() - self.started_at,
            "groups": groups, "routers": list(self.routers), "tokens_per_expert": tokens,
        })

    async def shutdown(self) -> None:
        """Stop the routers and kill every group this controller started."""
        import ray

        if self._health_task is not None:
            self._health_task.cancel()
        await asyncio.gather(*(r.stop.remote() for r in self.routers.values()), return_exceptions=True)
        for handle in [*self.routers.values(), *self.handles.values()]:
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
