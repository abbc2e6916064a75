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
    """Starts meshes (one per (checkpoint, config) key); each is stopped when the test module that
    started it ends (an idle mesh still runs its health rounds: a dozen left running took most of
    the 2 cores from the modules after them), the rest at the end of the session."""

    def __init__(self):
        self.meshes = {}
        self.modules: dict[str, str] = {}  # key -> the test module that started it
        self._started = 0  # names are never reused, even after stop()

    def get(self, model_path, key: str | None = None, group_factory=None, **config):
        """The mesh of `key`, started at its first call (`group_factory`: mesh.handles.GroupFactory)."""
        key = key or str(model_path)
        if key not in self.meshes:
            name = f"t{self._started}"
            self._started += 1
            config.setdefault("router", {}).setdefault("port", 0)
            self.meshes[key] = start_mesh(MeshConfig(name=name, **config), model_path, group_factory=group_factory)
            self.modules[key] = _MODULE
        return self.meshes[key]

    def stop(self, key: str) -> None:
        self.modules.pop(key, None)
        self.meshes.pop(key).stop()

    def stop_module(self, module: str) -> None:
        for key in [k for k, m in self.modules.items() if m == module]:
            self.stop(key)

    def stop_all(self) -> None:
        for key in list(self.meshes):
            self.stop(key)


_FACTORY: MeshFactory | None = None
_MODULE = ""  # the test module running now


@pytest.fixture(scope="session")
def meshes(ray_cluster):
    global _FACTORY
    _FACTORY = MeshFactory()
    yield _FACTORY
    _FACTORY.stop_all()


@pytest.fixture(autouse=True, scope="module")
def _meshes_end_with_their_module(request):
    global _MODULE
    _MODULE = request.module.__name__
    yield
    if _FACTORY is not None:
        _FACTORY.stop_module(request.module.__name__)
