"""Placement keeps co-activated experts together, on a real cluster with equal links.

Mixtral-style top-2, 8 experts in 4 groups: group g starts with experts g and g + 4, so each of the
pairs (0, 1), (2, 3), (4, 5), (6, 7) is split over two groups. Tokens that pick exactly one of those
pairs make a single-token Forward send two messages (one per group). After `mesh rebalance` every
pair shares a group and the same Forward sends one; nothing is lost and answers stay exact.
"""

from __future__ import annotations

import time

import grpc
import msgpack
import pytest
import torch

from cluster.cli import format_placement
from experts import MoELayer
from experts.builtin import build_model, save_checkpoint
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from router_service import MeshClient
from tests.integration.mesh_helpers import FP32_TOL, Load, load_gate, load_report, rel_err

TOKEN = "coactivation-token"
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7)]
SMALL = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=1, num_local_experts=8, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def paired(meshes, tmp_path_factory):
    """(mesh, checkpoint path, x [4, H]: one token per pair, each picking exactly that pair)."""
    path = tmp_path_factory.mktemp("coactivation") / "mixtral"
    save_checkpoint(build_model("mixtral", seed=5, **SMALL), path)
    candidates = torch.randn(4000, SMALL["hidden_size"], generator=torch.Generator().manual_seed(1))
    picks = load_gate(path, 0)(candidates)[1].sort(dim=1).values
    x = torch.stack([candidates[(picks == torch.tensor(pair)).all(dim=1)][0] for pair in PAIRS])
    mesh = meshes.get(path, key="coactivation", groups={"num_groups": 4}, admin_token=TOKEN, drain_s=0.3,
                      router={"load_window_s": 60})
    yield mesh, path, x
    meshes.stop("coactivation")


def _single_token_forwards(mesh, x: torch.Tensor, rounds: int = 10) -> tuple[float, float]:
    """(messages to expert groups per Forward, mean ms per Forward), one token per call."""
    before = load_report(mesh)["batches"]
    with MeshClient(mesh.address) as client:
        start = time.perf_counter()
        for _ in range(rounds):
            for token in x:
                client.forward(0, token[None])
        mean_ms = (time.perf_counter() - start) / (rounds * len(x)) * 1e3
    after = load_report(mesh)["batches"]
    return (after["group_calls"] - before["group_calls"]) / (after["batches"] - before["batches"]), mean_ms


def test_rebalance_puts_coactivated_experts_on_one_group(paired):
    mesh, path, x = paired
    held = {g["name"]: set(g["experts"]["0"]) for g in mesh.status()["groups"]}
    assert all(not set(pair) <= experts for pair in PAIRS for experts in held.values())  # every pair split
    ref = MoELayer.from_pretrained(path, layer=0)(x)
    before, before_ms = _single_token_forwards(mesh, x)  # also fills the routers' window: equal pair counts
    assert before == 2.0

    admin = pb_grpc.MeshAdminStub(grpc.insecure_channel(mesh.address))
    bearer = [("authorization", f"Bearer {TOKEN}")]  # an admin token is set: Placement needs it
    reply = admin.Placement(pb.PlacementRequest(), metadata=bearer)
    report = msgpack.unpackb(reply.report, strict_map_key=False)
    # the four pairs, and those of the router's 4-token warm-up: at most 4 of the 44 tokens counted
    assert report["pairs"] >= len(PAIRS)
    assert report["current"]["pairs_kept"] <= 0.1 and report["proposed"]["pairs_kept"] >= 0.9
    assert report["proposed"]["cost"] < 0.6 * report["current"]["cost"]  # one visit per token, not two
    print(format_placement(report))

    with Load(mesh.addresses, x, {"ref": ref}, num_callers=2) as load:
        reply = admin.Rebalance(pb.RebalanceRequest(token=TOKEN), timeout=120)
        time.sleep(0.5)
    assert reply.ok and "copies move" in reply.message, reply.message
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["ref"] > 5, load.lost()
    held = [set(g["experts"]["0"]) for g in mesh.status()["groups"]]
    assert sorted(map(sorted, held)) == [list(pair) for pair in PAIRS]
    after, after_ms = _single_token_forwards(mesh, x)
    print(f"single-token Forward: {before:.2f} -> {after:.2f} messages to expert groups, "
          f"{before_ms:.2f} -> {after_ms:.2f} ms mean (equal links: the latency gain is the mesh's own)")
    assert after == 1.0
    with MeshClient(mesh.address) as client:
        assert rel_err(client.forward(0, x), ref) <= FP32_TOL
