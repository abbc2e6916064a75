"""The wire contract: expert_mesh.proto and its generated modules (regenerate: make protos)."""

from protos import expert_mesh_pb2, expert_mesh_pb2_grpc

__all__ = ["expert_mesh_pb2", "expert_mesh_pb2_grpc"]
