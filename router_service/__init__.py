"""The data plane: gRPC router, batcher, dispatch and transports, client library."""

from router_service.client import AsyncMeshClient, MeshClient, MeshClientError, MeshInfo, RemoteMoE, patch_model

__all__: list[str] = [
    "AsyncMeshClient",
    "MeshClient",
    "MeshClientError",
    "MeshInfo",
    "RemoteMoE",
    "patch_model",
]
