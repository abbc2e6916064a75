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
    address: str                 # router "host:port"
    controller: object
    router: object

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
    """Deploy controller, expert groups and one router (on this node); return once SERVING.

    Needs `ray.init(...)` done. Raises what deployment raised (e.g. PlacementError)."""
    import ray

    model_path = str(Path(model_path).resolve())
    here = ray.get_runtime_context().get_node_id()
    pin_here = {"label_selector": {"ray.io/node-id": here}}
    controller = ray.remote(MeshController).options(
        name=f"{config.name}/controller", namespace=NAMESPACE, lifetime="detached", num_cpus=0, **pin_here,
    ).remote(config.model_dump(), model_path)
    try:
        start = time.perf_counter()
        progress(f"deploying expert groups of {model_path}")
        ray.get(controller.deploy.remote())
        progress(f"expert groups ready in {time.perf_counter() - start:.1f} s; starting the router")
        router_name = f"{config.name}/router-0"
        router = ray.remote(RouterActor).options(
            name=router_name, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_concurrency=1000,
            **pin_here,
        ).remote(config.name, model_path, config.router.model_dump(), NAMESPACE, config.router_dtype,
                 f"{config.name}/controller")
        address = ray.get(router.start.remote())
        if not ray.get(controller.add_router.remote(router_name)):
            raise RuntimeError("router did not become SERVING after warm-up (see the router's log)")
    except BaseException:
        try:
            ray.get(controller.shutdown.remote(), timeout=30)
        finally:
            ray.kill(controller)
        raise
    return MeshHandle(config.name, address, controller, router)
