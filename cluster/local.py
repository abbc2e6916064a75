"""Bring a mesh up on a Ray cluster (embedded local one or an existing one) and take it down.

    cluster = start_local_cluster(num_nodes=3)        # ray.cluster_utils.Cluster, N emulated nodes
    ray.init(address=cluster.address, namespace=NAMESPACE)
    mesh = start_mesh(config, model_path)            # controller, groups, router; waits for SERVING
    mesh, created = find_or_start_mesh(config, path)  # the running mesh of that name, or a new one (Serve)
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

from protos.errors import MeshConflictError
from mesh.config import MeshConfig
from mesh.controller import NAMESPACE, MeshController
from mesh.handles import GroupFactory
from router_service.actor import RouterActor

__all__ = ["MeshHandle", "find_or_start_mesh", "start_local_cluster", "start_mesh"]

logger = logging.getLogger(__name__)


RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def start_local_cluster(num_nodes: int = 2, cpus_per_node: int = 2, dashboard: bool = False,
                        metrics_export_port: int | None = None, dashboard_port: int | None = None):
    """A Ray cluster of `num_nodes` emulated nodes on this machine (head included); with `dashboard`,
    the dashboard on 127.0.0.1:`dashboard_port` (default Ray's 8265)."""
    from ray.cluster_utils import Cluster

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    head_args = {"num_cpus": cpus_per_node, "include_dashboard": dashboard}
    if metrics_export_port is not None:
        head_args["metrics_export_port"] = metrics_export_port
    if dashboard_port is not None:
        head_args["dashboard_port"] = dashboard_port
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


def start_mesh(config: MeshConfig, model_path: str | Path, progress: Callable[[str], None] = logger.info,
               group_factory: GroupFactory | None = None) -> MeshHandle:
    """Deploy controller, expert groups and `config.num_routers` routers (on this node); return once
    every router is SERVING. `group_factory`: what runs as a group (default: ExpertGroupFactory, the
    checkpoint's experts; benchmarks pass experts.simulated.SimulatedGroupFactory).

    Needs `ray.init(...)` done. Raises what deployment raised (e.g. PlacementError); raises
    ValueError if a mesh of that name already runs (see `find_or_start_mesh`)."""
    return _bring_up(config, model_path, progress, adopt=False, group_factory=group_factory)[0]


def find_or_start_mesh(config: MeshConfig, model_path: str | Path,
                       progress: Callable[[str], None] = logger.info) -> tuple[MeshHandle, bool]:
    """The mesh named `config.name` if it runs (its controller and routers adopted, missing routers
    started), else a new one as `start_mesh` deploys it. Returns (handle, created): `created` tells
    whether this call made the controller (and so whether the caller owns the mesh).

    What the Serve app's replicas call: a restarted replica finds the mesh its predecessor made.
    Raises MeshError if the running mesh serves another checkpoint."""
    return _bring_up(config, model_path, progress, adopt=True)


def _bring_up(config: MeshConfig, model_path: str | Path, progress: Callable[[str], None],
              adopt: bool, group_factory: GroupFactory | None = None) -> tuple[MeshHandle, bool]:
    import ray

    model_path = str(Path(model_path).resolve())
    here = ray.get_runtime_context().get_node_id()
    pin_here = {"label_selector": {"ray.io/node-id": here}}
    controller = _named_actor(f"{config.name}/controller") if adopt else None
    created = controller is None
    if created:
        controller = ray.remote(MeshController).options(
            name=f"{config.name}/controller", namespace=NAMESPACE, lifetime="detached", num_cpus=0,
            max_restarts=-1, get_if_exists=adopt, **pin_here,
        ).remote(config.model_dump(), model_path, group_factory)
    else:
        _check_same_model(controller, config.name, model_path)
        progress(f"adopting the running mesh {config.name!r}")
    try:
        start = time.perf_counter()
        progress(f"deploying expert groups of {model_path}")
        ray.get(controller.deploy.remote())  # idempotent: a running mesh returns its table
        progress(f"expert groups ready in {time.perf_counter() - start:.1f} s; starting {config.num_routers} router(s)")
        routers, addresses = [], []
        for k in range(config.num_routers):
            router_config = config.router.model_copy(update={"port": config.router.port + k if config.router.port else 0})
            router, address = _start_router(config, router_config, k, model_path, pin_here, adopt)
            if not ray.get(controller.add_router.remote(f"{config.name}/router-{k}")):
                raise RuntimeError(f"router {k} did not become SERVING after warm-up (see the router's log)")
            routers.append(router)
            addresses.append(address)
    except BaseException:
        if created:
            try:
                ray.get(controller.shutdown.remote(), timeout=30)
            finally:
                ray.kill(controller)
        raise
    return MeshHandle(config.name, addresses, controller, routers), created


def _named_actor(name: str):
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _check_same_model(controller, name: str, model_path: str) -> None:
    import msgpack
    import ray

    running = msgpack.unpackb(ray.get(controller.snapshot.remote()), strict_map_key=False)["model"]
    if running != model_path:
        raise MeshConflictError(f"mesh {name!r} already runs {running}, not {model_path}: stop it first "
                                f"(`mesh down --name {name} --address ADDR`) or give this one another name")


def _start_router(config: MeshConfig, router_config, index: int, model_path: str, options: dict,
                  adopt: bool = False):
    """Router `<mesh>/router-<index>` (with `adopt`, the running one of that name) and its address."""
    import ray

    router = ray.remote(RouterActor).options(
        name=f"{config.name}/router-{index}", namespace=NAMESPACE, lifetime="detached", num_cpus=0,
        num_gpus=router_config.num_gpus, max_concurrency=1000, max_restarts=-1, get_if_exists=adopt, **options,
    ).remote(config.name, model_path, router_config.model_dump(), NAMESPACE, config.router_dtype,
             f"{config.name}/controller")
    return router, ray.get(router.start.remote())  # start() is idempotent: an adopted router keeps its port
