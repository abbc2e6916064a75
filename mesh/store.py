"""Where the desired state is persisted: one versioned snapshot per mesh in Ray's GCS key-value store.

`GcsKVStore` is the one place that touches Ray's KV functions (as Ray Serve's own KVStore wraps
them); `StateStore` reads and writes the MeshState snapshot over any object with the same
get / put / delete (unit tests use an in-memory one).
"""

from __future__ import annotations

import logging
from typing import Protocol

from mesh.state import MeshState

__all__ = ["GcsKVStore", "KVStore", "StateStore"]

logger = logging.getLogger(__name__)


class KVStore(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, value: bytes) -> None: ...
    def delete(self, key: str) -> None: ...


class GcsKVStore:
    """Ray's GCS key-value store under the namespace `namespace` (needs ray.init)."""

    def __init__(self, namespace: str):
        self.namespace = namespace

    def get(self, key: str) -> bytes | None:
        from ray.experimental import internal_kv

        return internal_kv._internal_kv_get(key.encode(), namespace=self.namespace)

    def put(self, key: str, value: bytes) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(key.encode(), value, overwrite=True, namespace=self.namespace)

    def delete(self, key: str) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(key.encode(), namespace=self.namespace)


class StateStore:
    """The MeshState snapshot of mesh `name`; `save` refuses to go back to an older revision."""

    def __init__(self, kv: KVStore, name: str):
        self.kv = kv
        self.key = f"expert-mesh/{name}/state"
        self.saved_revision = -1

    def load(self) -> MeshState | None:
        blob = self.kv.get(self.key)
        if blob is None:
            return None
        state = MeshState.decode(blob)
        self.saved_revision = state.revision
        return state

    def save(self, state: MeshState) -> None:
        if state.revision <= self.saved_revision:
            raise ValueError(f"state revision {state.revision} is not newer than the saved {self.saved_revision}")
        self.kv.put(self.key, state.encode())
        self.saved_revision = state.revision

    def delete(self) -> None:
        self.kv.delete(self.key)
