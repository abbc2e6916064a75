"""Where groups compute (groups.device) and how many there are by default: pure policies over Ray's
node list (FakeRayNode dicts, the fields `ray.nodes()` gives)."""

from __future__ import annotations

import pytest

from mesh.config import MeshConfig
from mesh.handles import default_num_groups, gpus_per_group
from protos.errors import PlacementError


def FakeRayNode(gpus: int = 0) -> dict:
    resources = {"CPU": 8.0, **({"GPU": float(gpus)} if gpus else {})}
    return {"NodeID": f"node-{gpus}", "Alive": True, "Resources": resources}


CPU_NODES = [FakeRayNode(), FakeRayNode()]
GPU_NODES = [FakeRayNode(8), FakeRayNode(8)]


@pytest.mark.parametrize("device,nodes,gpus,groups", [
    ("auto", CPU_NODES, 0, 2),   # auto without a GPU: the host, one group per node
    ("auto", GPU_NODES, 1, 16),  # auto with GPUs: one GPU each, one group per GPU
    ("cpu", GPU_NODES, 0, 2),    # cpu on GPU nodes: no GPU reserved
    ("cuda", GPU_NODES, 1, 16),
])
def test_a_group_reserves_a_gpu_only_where_it_computes_on_one(device, nodes, gpus, groups):
    assert gpus_per_group(device, nodes) == gpus
    assert default_num_groups(device, nodes) == groups


def test_cuda_without_a_gpu_is_refused_by_name():
    with pytest.raises(PlacementError, match="groups.device is cuda"):
        gpus_per_group("cuda", CPU_NODES)


def test_the_device_defaults_to_auto_and_refuses_others():
    assert MeshConfig().groups.device == "auto"
    with pytest.raises(ValueError, match="device"):
        MeshConfig(groups={"device": "tpu"})
