"""The data plane: gRPC router, batcher, dispatch and transports, client library."""

from router_service.client import AsyncMeshClient, MeshClient, MeshInfo
from router_service.direct import AsyncDirectClient, DirectClient
from router_service.patching import MoEClient, RemoteMoE, patch_model
from protos.errors import MeshClientError

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
