"""The data plane: gRPC router, batcher, dispatch and transports, client library."""

from router_service.client import AsyncMeshClient, MeshClient, MeshClientError, MeshInfo
from router_service.direct import AsyncDirectClient, DirectClient
from router_service.patching import MoEClient, RemoteMoE, patch_model

__all__: list[str] = [
    "AsyncDirectClient",
    "DirectClient",
    "AsyncMeshClient",
    "MeshClient",
    "MeshClientError",
    "MeshInfo",
    "MoEClient",
    "RemoteMoE",
    "patch_model",
]
