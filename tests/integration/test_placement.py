"""Placement by measured latency on heterogeneous links.

Ray cannot run across network namespaces here (no CAP_NET_ADMIN for `tc netem`), so a far host is
emulated: in a mesh started with cluster/links.py's EmulatedLinks, a node added with the label
`expert-mesh.io/link-delay-ms=60` answers every gRPC call 60 ms late (expert groups and probes
alike). The probes measure that; the
optimiser sees only their matrix. Under load whose tokens all pick experts held on the far node
(among others), `mesh rebalance` must move them off it and the measured mean Forward latency drop.
"""

from __future__ import annotations

import statistics
import time

import grpc
import msgpack
import pytest
import torch

from cluster.cli import format_placement
from experts import MoELayer
from experts.builtin import build_model, save_checkpoint
from cluster.links import EmulatedLinks
from experts.links import LINK_DELAY_LABEL
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from router_service import MeshClient
from tests.integration.mesh_helpers import FP32_TOL, Load, load_gate, rel_err
from protos.errors import PlacementError

TOKEN = "placement-token"
DELAY_MS = 60  # well above the mesh's own latency on a busy 2-core machine (8-25 ms)
SMALL = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=1, num_local_experts=8, num_experts_per_tok=2)


@pytest.fixture(scope="module", params=["grpc", "collective"])
def far_mesh(request, ray_cluster, meshes, tmp_path_factory):
    path = tmp_path_factory.mktemp("placement") / "mixtral"
    save_checkpoint(build_model("mixtral", seed=3, **SMALL), path)
    far = ray_cluster.add_node(num_cpus=2, labels={LINK_DELAY_LABEL: str(DELAY_MS)})
    ray_cluster.wait_for_nodes()
    transport = request.param
    mesh = meshes.get(path, key=f"placement-{transport}", group_factory=EmulatedLinks(), groups={"num_groups": 4},
                      admin_token=TOKEN, drain_s=0.3,
                      placement_balance=1.0, router={"load_window_s": 30, "transport": transport})
    yield mesh, path, far.node_id
    meshes.stop(f"placement-{transport}")
    ray_cluster.remove_node(far)


def _admin(mesh) -> pb_grpc.MeshAdminStub:
    return pb_grpc.MeshAdminStub(grpc.insecure_channel(mesh.address))


def _held(mesh, node: str) -> set[int]:
    return {e for g in mesh.status()["groups"] if g["node"] == node for e in g["experts"]["0"]}


def _mean_latency_ms(mesh, x: torch.Tensor, calls: int = 40) -> float:
    with MeshClient(mesh.address) as client:
        client.forward(0, x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            client.forward(0, x)
            times.append(time.perf_counter() - start)
    return statistics.mean(times) * 1e3


def test_rebalance_moves_hot_experts_off_the_far_node(far_mesh):
    mesh, path, far = far_mesh
    far_experts = _held(mesh, far)
    assert len(far_experts) == 2
    # hot set: the far node's experts and two more; every token below picks both its experts in it
    hot = sorted(far_experts | set(sorted(set(range(8)) - far_experts)[:2]))
    candidates = torch.randn(20000, SMALL["hidden_size"], generator=torch.Generator().manual_seed(0))
    picks = load_gate(path, 0)(candidates)[1]
    x = candidates[torch.isin(picks, torch.tensor(hot)).all(dim=1)][:16]
    assert len(x) == 16
    ref = MoELayer.from_pretrained(path, layer=0)(x)
    before_ms = _mean_latency_ms(mesh, x)

    bearer = [("authorization", f"Bearer {TOKEN}")]  # an admin token is set: Placement needs it
    reply = _admin(mesh).Placement(pb.PlacementRequest(), metadata=bearer)
    report = msgpack.unpackb(reply.report, strict_map_key=False)
    nodes, rtt = report["links"]["nodes"], report["links"]["rtt_ms"]
    router = nodes.index(report["router_nodes"][0])
    far_rtt = rtt[router][nodes.index(far)]
    assert far_rtt >= DELAY_MS  # the probes measured the far link...
    assert max(r for n, r in zip(nodes, rtt[router]) if n != far) < far_rtt - DELAY_MS / 2  # ...and only it
    assert report["proposed"]["mean_latency_ms"] < report["current"]["mean_latency_ms"] / 2
    assert "expected cost (token load x latency)" in format_placement(report)  # `mesh placement`'s text

    with pytest.raises(grpc.RpcError) as info:
        _admin(mesh).Rebalance(pb.RebalanceRequest(token="wrong"))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with Load(mesh.addresses, x, {"ref": ref}, num_callers=2) as load:
        reply = _admin(mesh).Rebalance(pb.RebalanceRequest(token=TOKEN), timeout=120)
        time.sleep(0.5)
    assert reply.ok and "copies move" in reply.message
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["ref"] > 5, load.lost()
    assert not _held(mesh, far) & set(hot)  # the far node keeps only experts nobody calls
    after_ms = _mean_latency_ms(mesh, x)
    print(f"mean Forward latency: {before_ms:.1f} ms before rebalance, {after_ms:.1f} ms after")
    assert after_ms < before_ms / 2 and before_ms > DELAY_MS
    with MeshClient(mesh.address) as client:
        assert rel_err(client.forward(0, x), ref) <= FP32_TOL


def test_groups_run_only_on_nodes_with_the_labels_asked_for(meshes, zoo):
    """groups.node_labels: every group lands on a node carrying the labels (here Ray's own node-id
    label of the last node) and the mesh answers right; labels no node carries are refused by name."""
    import ray

    path = zoo.checkpoint("mixtral")
    node = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])[-1]
    mesh = meshes.get(path, key="labelled", groups={"num_groups": 2, "node_labels": {"ray.io/node-id": node}})
    assert {g["node"] for g in mesh.status()["groups"]} == {node}
    x = torch.randn(9, 48, generator=torch.Generator().manual_seed(2))
    with MeshClient(mesh.address) as client:
        assert rel_err(client.forward(0, x), MoELayer.from_pretrained(path, layer=0)(x)) <= FP32_TOL
    with pytest.raises(PlacementError, match=r"no live node carries groups.node_labels \{'gpu': 'h200'\}"):
        meshes.get(path, key="unplaceable", groups={"node_labels": {"gpu": "h200"}})
