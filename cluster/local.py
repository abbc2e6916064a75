"""Bring a mesh up on a Ray cluster (embedded local one or an existing one) and take it down.

    cluster = start_local_cluster(num_nodes=3)        # ray.cluster_utils.Cluster, N emulated nodes
    ray.init(address=cluster.address, namespace=NAMESPACE)
    mesh = start_mesh(config, model_path)            # controller, groups, router; waits for SERVING
    ...  MeshClient(mesh.address) ...
    mesh.stop()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable

from mesh.config import MeshConfig
from mesh.controller import NAMESPACE, MeshController
from router_service.actor import RouterActor

__all__ = ["MeshHandle", "start_local_cluster", "start_mesh"]

logger = logging.getLogger(__name__)

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def start_local_cluster(num_nodes: int = 2, cpus_per_node: int = 2, dashboard: bool = False,
                        metrics_export_port: int | None = None):
    """A Ray cluster of `num_nodes` emulated nodes on this machine (head included)."""
    from ray.cluster_utils import Cluster

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    head_args = {"num_cpus": cpus_per_node, "include_dashboard": dashboard}
    if metrics_export_port is not None:
        head_args["metrics_export_port"] = metrics_export_port
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    for _ in range(num_nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    return cluster


@dataclasses.dataclass
class MeshHandle:
    name: str
    addresses: list[str]         # routers' "host:port"
    controller: object
    routers: list[object]

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def router(self) -> object:
        return self.routers[0]

    def status(self) -> dict:
        import msgpack
        import ray

        return msgpack.unpackb(ray.get(self.controller.snapshot.remote()), strict_map_key=False)

    def stop(self) -> None:
        import ray

        try:
            ray.get(self.controller.shutdown.remote(), timeout=30)
        finally:
            ray.kill(self.controller)


def start_mesh(config: MeshConfig, model_path: str | Path,
               progress: Callable[[str], None] = logger.info) -> MeshHandle:
    """Deploy controller, expert groups and `config.num_routers` routers (on this node); return once
    every router is SERVING.

    Needs `ray.init(...)` done. Raises what deployment raised (e.g. PlacementError)."""
    import ray

    model_path = str(Path(model_path).resolve())
    here = ray.get_runtime_context().get_node_id()
    pin_here = {"label_selector": {"ray.io/node-id": here}}
    controller = ray.remote(MeshController).options(
        name=f"{config.name}/controller", namespace=NAMESPACE, lifetime="detached", num_cpus=0,
        max_restarts=-1, **pin_here,
    ).remote(config.model_dump(), model_path)
    try:
        start = time.perf_counter()
        progress(f"deploying expert groups of {model_path}")
        ray.get(controller.deploy.remote())
        progress(f"expert groups ready in {time.perf_counter() - start:.1f} s; starting {config.num_routers} router(s)")
        routers, addresses = [], []
        for k in range(config.num_routers):
            router_config = config.router.model_copy(update={"port": config.router.port + k if config.router.port else 0})
            router, address = _start_router(config, router_config, k, model_path, pin_here)
            if not ray.get(controller.add_router.remote(f"{config.name}/router-{k}")):
                raise RuntimeError(f"router {k} did not become SERVING after warm-up (see the router's log)")
            routers.append(router)
            addresses.append(address)
    except BaseException:
        try:
            ray.get(controller.shutdown.remote(), timeout=30)
        finally:
            ray.kill(controller)
        raise
    return MeshHandle(config.name, addresses, controller, routers)


def _start_router(config: MeshConfig, router_config, index: int, model_path: str, options: dict):
    import ray

    router = ray.remote(RouterActor).options(
        name=f"{config.name}/router-{index}", namespace=NAMESPACE, lifetime="detached", num_cpus=0,
        max_concurrency=1000, **options,
    ).remote(config.name, model_path, router_config.model_dump(), NAMESPACE, config.router_dtype,
             f"{config.name}/controller")
    return router, ray.get(router.start.remote())
