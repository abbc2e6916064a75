"""Where groups and routers compute (groups.device, router.device), how many groups there are by
default, whether their weights fit, and what a collective channel travels on: pure policies (over
FakeRayNode dicts, the fields `ray.nodes()` gives)."""

from __future__ import annotations

import pytest
import torch

from experts.actor import compute_device, out_of_memory_named
from mesh.config import MeshConfig
from mesh.handles import default_num_groups, gpus_per_group, group_dtype
from mesh.placement import check_memory
from protos.collective import device_id, wire_device
from protos.errors import MeshError, PlacementError
from router_service.config import RouterConfig
from router_service.transport import HostStaging


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


NAMES = ["m/group-0", "m/group-1", "m/group-2"]
GIB = 1 << 30


def test_on_gpus_each_group_must_fit_its_own_gpu_and_the_misfit_is_named():
    placement = ["node-a", "node-a", "node-b"]
    gpu_bytes = {"node-a": 80 * GIB, "node-b": 40 * GIB}
    check_memory(NAMES, [60 * GIB, 60 * GIB, 30 * GIB], placement, gpu_bytes, True, 0.8)  # each fits its own GPU
    with pytest.raises(PlacementError, match=r"expert group m/group-2 needs 33.00 GiB .* 40.00 GiB of a GPU"):
        check_memory(NAMES, [60 * GIB, 60 * GIB, 33 * GIB], placement, gpu_bytes, True, 0.8)


def test_on_hosts_a_nodes_groups_share_its_memory_and_are_named():
    placement = ["node-a", "node-a", "node-b"]
    node_bytes = {"node-a": 100 * GIB, "node-b": 100 * GIB}
    check_memory(NAMES, [40 * GIB, 40 * GIB, 80 * GIB], placement, node_bytes, False, 0.8)
    with pytest.raises(PlacementError, match=r"expert groups m/group-0, m/group-1 on node node-a need 82.00 GiB"):
        check_memory(NAMES, [41 * GIB, 41 * GIB, 0], placement, node_bytes, False, 0.8)


@pytest.mark.parametrize("setting,assigned,device", [
    ("cpu", 1, "cpu"),   # cpu even where Ray gave a GPU
    ("auto", 0, "cpu"),  # auto without a GPU from Ray: the host
])
def test_an_actor_computes_on_the_host_unless_it_has_a_gpu(setting, assigned, device):
    assert compute_device(setting, "router r", assigned) == torch.device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this process sees a GPU")
def test_cuda_where_the_process_sees_no_gpu_is_a_clear_error():
    with pytest.raises(MeshError, match="router m/router-0 was placed to compute on a GPU, but its process sees none"):
        compute_device("cuda", "router m/router-0")
    with pytest.raises(MeshError, match="group m/group-1"):
        compute_device("auto", "group m/group-1", 1)


@pytest.mark.parametrize("router,group,wire,why", [
    ("cuda:GPU-a", "cuda:GPU-b", "cuda", "nccl"),
    ("cuda:GPU-a", "cuda:GPU-a", "cpu", "both ends on one GPU"),  # NCCL refuses two ranks on one device
    ("cpu", "cuda:GPU-b", "cpu", "an end computes on the host"),
    ("cuda:GPU-a", "cpu", "cpu", "an end computes on the host"),
    ("cpu", "cpu", "cpu", "an end computes on the host"),
])
def test_a_channel_is_nccl_only_between_two_distinct_gpus(router, group, wire, why):
    got, reason = wire_device(router, group)
    assert got == wire and why in reason


def test_host_ids_and_rows_on_the_host_pass_as_they_are():
    assert device_id("cpu") == "cpu"
    rows = torch.randn(4, 8)
    with HostStaging().lend("127.0.0.1:1", rows[1:3]) as host:
        assert host.data_ptr() == rows[1:3].data_ptr()  # no copy for rows already on the host


def test_the_router_device_defaults_to_auto_without_a_gpu_share():
    config = RouterConfig()
    assert (config.device, config.num_gpus) == ("auto", 0.0)
    with pytest.raises(ValueError, match="device"):
        RouterConfig(device="tpu")
    with pytest.raises(ValueError, match="num_gpus"):
        RouterConfig(num_gpus=2)


@pytest.mark.parametrize("dtype,device,nodes,held", [
    ("auto", "auto", GPU_NODES, "bfloat16"),  # bf16 on GPUs unless configured
    ("auto", "auto", CPU_NODES, "float32"),
    ("auto", "cpu", GPU_NODES, "float32"),    # on the host of GPU nodes
    ("float32", "cuda", GPU_NODES, "float32"),
    ("bfloat16", "auto", CPU_NODES, "bfloat16"),
])
def test_groups_hold_bf16_on_gpus_unless_configured(dtype, device, nodes, held):
    assert group_dtype(MeshConfig(groups={"dtype": dtype, "device": device}).groups, nodes) == held


def test_a_device_out_of_memory_names_the_group_what_it_loaded_and_the_bytes():
    with pytest.raises(MeshError, match=r"group m/group-3: cuda:0 out of memory loading layer 5 experts \[1, 2\]: "
                                        r"OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"):
        with out_of_memory_named("m/group-3", torch.device("cuda", 0), "layer 5 experts [1, 2]"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
