"""The mesh changing shape under continuous load: scale, autoscale, hot swap, failures, controller
restart, router failover, admin token. Real 3-node cluster (a 4th node is added, then removed)."""

from __future__ import annotations

import shutil
import time

import grpc
import pytest
import ray
import torch
from safetensors.torch import load_file, save_file

from experts import MoELayer, load_spec
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from tests.integration.mesh_helpers import (SMALL, Load, load_gate, rel_err, small_checkpoints, swapped_reference,
                                            wait_for)

TOKEN = "test-token"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """old and new weights of one small Mixtral, and `new` with a NaN in expert 2 (corrupted)."""
    root = tmp_path_factory.mktemp("elastic")
    old, new = small_checkpoints(root, old=0, new=5).values()
    bad = root / "bad"
    shutil.copytree(new, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.block_sparse_moe.experts.2.w1.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return old, new, bad


def _admin(mesh) -> pb_grpc.MeshAdminStub:
    return pb_grpc.MeshAdminStub(grpc.insecure_channel(mesh.address))


@pytest.fixture(scope="module", params=["grpc", "collective"])
def transport(request) -> str:
    """Every test of this module runs over both transports, with the same assertions."""
    return request.param


@pytest.fixture(scope="module")
def elastic(meshes, checkpoints, transport):
    old = checkpoints[0]
    mesh = meshes.get(old, key=f"elastic-{transport}", admin_token=TOKEN, num_routers=2, drain_s=0.5,
                      health_period_s=0.5, router={"load_window_s": 3, "transport": transport})
    x = torch.randn(24, SMALL["hidden_size"], generator=torch.Generator().manual_seed(4))
    return mesh, x, MoELayer.from_pretrained(old, layer=0)(x)


def test_admin_calls_without_the_token_are_refused(elastic):
    mesh, _, _ = elastic
    for token in ("", "wrong"):
        with pytest.raises(grpc.RpcError) as info:
            _admin(mesh).Scale(pb.ScaleRequest(token=token, layer=0, expert=1, replicas=2))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:
        _admin(mesh).Autoscale(pb.AutoscaleRequest(token="", enabled=True))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert mesh.status()["copies"]["0/1"] == 1


def test_scale_up_and_down_under_load(elastic):
    mesh, x, ref = elastic
    with Load(mesh.addresses, x, {"ref": ref}) as load:
        reply = _admin(mesh).Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=1, replicas=3))
        assert reply.ok and mesh.status()["copies"]["0/1"] == 3
        holders = [g["name"] for g in mesh.status()["groups"] if 1 in g["experts"]["0"]]
        assert len(holders) == 3
        before = _served_by(holders)
        time.sleep(2)
        split = {name: n - before[name] for name, n in _served_by(holders).items()}
        assert all(n > 0 for n in split.values()), split  # the hot expert's tokens go to all 3 copies
        assert _admin(mesh).Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=1, replicas=1)).ok
        time.sleep(1)
    assert mesh.status()["copies"]["0/1"] == 1
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["ref"] > 10, load.lost()


def _served_by(groups: list[str]) -> dict[str, int]:
    """Tokens of expert 1 of layer 0 each group computed since it started."""
    infos = ray.get([ray.get_actor(g).info.remote() for g in groups])
    return {g: sum(n for layer, expert, n in info["tokens_served"] if (layer, expert) == (0, 1))
            for g, info in zip(groups, infos)}


def test_autoscale_follows_skew_and_back(elastic, checkpoints):
    mesh, _, _ = elastic
    old = checkpoints[0]
    candidates = torch.randn(4000, SMALL["hidden_size"], generator=torch.Generator().manual_seed(11))
    hot = candidates[(load_gate(old, 0)(candidates)[1] == 4).any(dim=1)][:48]  # every token picks expert 4
    ref = MoELayer.from_pretrained(old, layer=0)(hot)
    controller = mesh.controller
    ray.get(controller.__ray_call__.remote(_set_autoscale_target, 200.0))
    assert _admin(mesh).Autoscale(pb.AutoscaleRequest(token=TOKEN, enabled=True)).ok
    try:
        with Load(mesh.addresses, hot, {"ref": ref}) as load:
            # rebalance_experts plans the layer: EPLB's slots, as many copies on every group
            wait_for(lambda: _hot_and_even(mesh.status(), "0/4"), timeout_s=60)
        assert load.counts["failed"] == 0 and load.counts["wrong"] == 0, load.lost()
        wait_for(lambda: mesh.status()["copies"]["0/4"] == 1, timeout_s=60)  # skew over: copies removed
        assert set(mesh.status()["copies"].values()) == {1}  # 6 experts on 3 groups: 2 slots each
    finally:
        _admin(mesh).Autoscale(pb.AutoscaleRequest(token=TOKEN, enabled=False))


def _hot_and_even(status: dict, key: str) -> bool:
    """The expert `key` has copies to spare and every group holds as many copies of layer 0."""
    return status["copies"][key] >= 2 and len({len(g["experts"]["0"]) for g in status["groups"]}) == 1


def _set_autoscale_target(controller, target: float) -> None:
    controller.config.autoscale.target_tokens_per_s = target
    controller.config.autoscale.period_s = 0.5


def test_hot_swap_under_load_and_corrupted_checkpoint_rejected(elastic, checkpoints):
    mesh, x, ref_old = elastic
    old, new, bad = checkpoints
    ref_new = swapped_reference(old, new, [2, 5], x)
    assert rel_err(ref_new, ref_old) > 1e-2
    versions_before = _versions(mesh)
    with Load(mesh.addresses, x, {"old": ref_old, "new": ref_new}) as load:
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as info:
            _admin(mesh).Swap(pb.SwapRequest(token=TOKEN, layer=0, experts=[2, 5], source_dir=str(bad)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in info.value.details()
        assert load.snapshot()["new"] == 0  # traffic untouched by the rejected swap
        epoch = mesh.status()["epoch"]
        reply = _admin(mesh).Swap(pb.SwapRequest(token=TOKEN, layer=0, experts=[2, 5], source_dir=str(new)))
        assert reply.ok and reply.epoch == epoch + 1  # one epoch flips both experts
        flipped = len(load.last)
        time.sleep(1.5)
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0, load.lost()
    assert load.counts["new"] > 0
    assert set(load.last[flipped:]) == {"new"}  # after the flip, every answer is the new one
    changed = {key for key, v in _versions(mesh).items() if v != versions_before[key]}
    assert {expert for _, expert in changed} == {2, 5}


def _versions(mesh) -> dict[tuple[str, int], str]:
    """(group, expert) -> weight version of layer 0, from the controller's status."""
    return {(g["name"], e): v for g in mesh.status()["groups"]
            for e, v in zip(g["experts"]["0"], g["versions"]["0"])}


@pytest.mark.parametrize("transport", ["collective"])  # over grpc: the fault matrix's (e), (i) and (j)
def test_killed_copy_and_removed_node_lose_nothing_with_two_copies(ray_cluster, meshes, checkpoints, transport):
    old = checkpoints[0]
    node = ray_cluster.add_node(num_cpus=2)
    ray_cluster.wait_for_nodes()
    mesh = meshes.get(old, key=f"failover-{transport}", groups={"replicas": 2, "num_groups": 4}, health_period_s=0.5,
                      router={"transport": transport},
                      num_routers=2)
    x = torch.randn(16, SMALL["hidden_size"], generator=torch.Generator().manual_seed(6))
    ref = MoELayer.from_pretrained(old, layer=0)(x)
    spec = load_spec(old)
    with Load(mesh.addresses, x, {"ref": ref}) as load:
        before = _endpoint(mesh, "group-0")
        ray.kill(ray.get_actor(f"{mesh.name}/group-0"))
        # restored = a new incarnation serves (the controller may not have noticed the kill yet)
        wait_for(lambda: _endpoint(mesh, "group-0") != before and _restored(mesh, 4, spec.num_experts, 2), 90)
        victims = [g["name"] for g in mesh.status()["groups"] if g["node"] == node.node_id]
        assert victims, "a group was placed on the added node"
        ray_cluster.remove_node(node, allow_graceful=False)
        wait_for(lambda: _restored(mesh, 4, spec.num_experts, 2, avoid=node.node_id), timeout_s=120)
        for expert in range(spec.num_experts):  # the restored group went where no other copy was
            nodes = [g["node"] for g in mesh.status()["groups"] if expert in g["experts"]["0"]]
            assert len(set(nodes)) == 2, (expert, nodes)
        ray.kill(mesh.routers[0])  # one of two routers dies: clients fail over to the other
        time.sleep(2)
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["ref"] > 20, load.lost()
    meshes.stop(f"failover-{transport}")


def _status_or_none(mesh) -> dict | None:
    try:
        return mesh.status()
    except ray.exceptions.RayError:  # the controller is restarting
        return None


def _endpoint(mesh, group: str) -> str:
    return next(g["endpoint"] for g in mesh.status()["groups"] if g["name"] == f"{mesh.name}/{group}")


def _restored(mesh, num_groups: int, num_experts: int, copies: int, avoid: str | None = None) -> bool:
    status = mesh.status()
    live = [g for g in status["groups"] if g["alive"] and g["node"] != avoid]
    return len(live) == num_groups and all(status["copies"][f"0/{e}"] == copies for e in range(num_experts))


@pytest.mark.parametrize("transport", ["collective"])  # over grpc: the fault matrix's controller kills
def test_controller_restart_keeps_traffic_and_state(meshes, checkpoints, transport):
    old = checkpoints[0]
    mesh = meshes.get(old, key=f"restart-{transport}", admin_token=TOKEN, router={"transport": transport})
    x = torch.randn(8, SMALL["hidden_size"], generator=torch.Generator().manual_seed(8))
    ref = MoELayer.from_pretrained(old, layer=0)(x)
    assert _admin(mesh).Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=0, replicas=2)).ok
    before = mesh.status()
    with Load(mesh.addresses, x, {"ref": ref}) as load:
        ray.kill(mesh.controller, no_restart=False)  # Ray restarts it; it adopts the mesh from GCS
        time.sleep(1)
        after = wait_for(lambda: _status_or_none(mesh), timeout_s=60)
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["ref"] > 5, load.lost()
    assert after["epoch"] > before["epoch"]
    assert after["copies"] == before["copies"] and after["copies"]["0/0"] == 2
    assert [g["experts"] for g in after["groups"]] == [g["experts"] for g in before["groups"]]
