"""One real 3-node Ray cluster for the whole session, and meshes started on it on demand."""

from __future__ import annotations

import socket

import pytest

from cluster.local import start_local_cluster, start_mesh
from mesh.config import MeshConfig
from mesh.controller import NAMESPACE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """ray.cluster_utils.Cluster with 3 nodes (head + 2), connected; `.metrics_port` exports metrics."""
    import ray

    metrics_port = _free_port()
    cluster = start_local_cluster(num_nodes=3, metrics_export_port=metrics_port)
    cluster.metrics_port = metrics_port
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


class MeshFactory:
    """Starts meshes (one per (checkpoint, config) key) and stops them at the end of the session."""

    def __init__(self):
        self.meshes = {}
        self._started = 0  # names are never reused, even after stop()

    def get(self, model_path, key: str | None = None, **config):
        key = key or str(model_path)
        if key not in self.meshes:
            name = f"t{self._started}"
            self._started += 1
            config.setdefault("router", {}).setdefault("port", 0)
            self.meshes[key] = start_mesh(MeshConfig(name=name, **config), model_path)
        return self.meshes[key]

    def stop(self, key: str) -> None:
        self.meshes.pop(key).stop()

    def stop_all(self) -> None:
        for mesh in self.meshes.values():
            mesh.stop()
        self.meshes.clear()


@pytest.fixture(scope="session")
def meshes(ray_cluster):
    factory = MeshFactory()
    yield factory
    factory.stop_all()
