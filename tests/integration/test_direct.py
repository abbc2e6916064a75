"""The direct client under change, with the routers' assertions: a hot swap and a scale under its
load (0 failed, 0 wrong, one epoch per answer), a killed group with 2 copies (0 failed), and a
direct client that dies mid-swap (the swap completes once its lease ends). Real 3-node cluster;
both transports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import ray
import torch

from experts import MoELayer
from experts.channel import channel_nbytes
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from router_service import DirectClient
from tests.integration.mesh_helpers import (FP32_TOL, SMALL, Load, rel_err, small_checkpoints, swapped_reference,
                                            wait_for)

TOKEN = "test-token"
LEASE_S = 3.0

# a child process on the cluster: a DirectClient under load, until killed
CHILD = """
import sys, torch
from router_service import DirectClient
client = DirectClient(sys.argv[1], address=sys.argv[2])
print(client.name, flush=True)
x = torch.randn(4, int(sys.argv[3]))
while True:
    client.forward(0, x)
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return small_checkpoints(tmp_path_factory.mktemp("direct"), old=0, new=5)


@pytest.fixture(scope="module", params=["grpc", "collective"])
def transport(request) -> str:
    return request.param


def _admin(mesh) -> pb_grpc.MeshAdminStub:
    return pb_grpc.MeshAdminStub(grpc.insecure_channel(mesh.address))


def _one_epoch_per_kind(load: Load, flip_epoch: int) -> None:
    """Every answer served by an epoch before the flip is the old one, every later one the new."""
    for kind, epoch in load.answers:
        assert kind == ("old" if epoch < flip_epoch else "new"), (kind, epoch, flip_epoch)


@pytest.mark.parametrize("transport", ["collective"])  # the direct client over grpc: the lease test below
def test_scale_and_hot_swap_under_direct_load(meshes, checkpoints, transport):
    old, new = checkpoints["old"], checkpoints["new"]
    mesh = meshes.get(old, key=f"direct-{transport}", admin_token=TOKEN, drain_s=0.2, health_period_s=0.5,
                      direct_lease_s=LEASE_S, router={"transport": transport})
    x = torch.randn(24, SMALL["hidden_size"], generator=torch.Generator().manual_seed(4))
    ref_old, ref_new = MoELayer.from_pretrained(old, layer=0)(x), swapped_reference(old, new, [2, 5], x)
    with DirectClient(mesh.name) as client, Load(None, x, {"old": ref_old, "new": ref_new}, client=client) as load:
        assert _admin(mesh).Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=1, replicas=3)).ok
        assert mesh.status()["copies"]["0/1"] == 3
        time.sleep(1)
        assert _admin(mesh).Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=1, replicas=1)).ok
        reply = _admin(mesh).Swap(pb.SwapRequest(token=TOKEN, layer=0, experts=[2, 5], source_dir=str(new)))
        assert reply.ok
        time.sleep(1.5)
        segments = dict(client._core.router.transport.segments)
        # its load reports reach the controller with its polls: its tokens count in mesh status (and so
        # in autoscale and placement) while its lease lives
        wait_for(lambda: sum(mesh.status()["tokens_per_expert"].values()) >= load.counts["old"] * 24 * 2, 10)
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0, load.lost()
    assert load.counts["old"] > 10 and load.counts["new"] > 10, load.counts
    _one_epoch_per_kind(load, reply.epoch)
    assert segments.get(transport, 0) > 0, segments


def test_a_group_over_its_channel_budget_refuses_a_direct_client_which_goes_over_grpc(meshes, checkpoints):
    """Room for one channel per group (the router's): the direct client's collective channels are
    refused with the reason, its slices go over grpc (counted), and every answer is right."""
    old = checkpoints["old"]
    one_channel = channel_nbytes(SMALL["num_local_experts"], 2048 * 2, SMALL["hidden_size"],  # max_batch_tokens x k
                                 torch.float32)
    mesh = meshes.get(old, key="direct-budget", groups={"channel_budget_bytes": one_channel + 1000},
                      router={"transport": "collective"})
    x = torch.randn(16, SMALL["hidden_size"], generator=torch.Generator().manual_seed(9))
    ref = MoELayer.from_pretrained(old, layer=0)(x)
    groups = {g["name"] for g in mesh.status()["groups"]}
    wait_for(lambda: set(ray.get(mesh.router.__ray_call__.remote(_channels))) == groups, 30)  # the router's first
    with DirectClient(mesh.name, transport="collective") as client:
        transport = client._core.router.transport
        wait_for(lambda: client.forward(0, x) is not None and set(transport.refused) == groups, 30, 0.05)
        for _ in range(10):
            assert rel_err(client.forward(0, x), ref) <= FP32_TOL
        assert "channel_budget_bytes" in next(iter(transport.refused.values()))
        assert not transport.channels and transport.segments["grpc"] >= 10 and not transport.segments["collective"]
    assert set(ray.get(mesh.router.__ray_call__.remote(_channels))) == groups  # the router's channels stand
    meshes.stop("direct-budget")


def _channels(router_actor) -> list[str]:
    return list(router_actor.server.router.transport.channels)


@pytest.mark.parametrize("transport", ["collective"])
def test_killed_group_with_two_copies_loses_nothing_on_a_direct_client(meshes, checkpoints, transport):
    old = checkpoints["old"]
    mesh = meshes.get(old, key=f"direct-failover-{transport}", groups={"replicas": 2}, health_period_s=0.5,
                      router={"transport": transport})
    x = torch.randn(16, SMALL["hidden_size"], generator=torch.Generator().manual_seed(6))
    ref = MoELayer.from_pretrained(old, layer=0)(x)
    with DirectClient(mesh.name) as client, Load(None, x, {"ref": ref}, client=client) as load:
        time.sleep(1)
        before = mesh.status()["epoch"]
        ray.kill(ray.get_actor(f"{mesh.name}/group-0"))
        wait_for(lambda: all(g["alive"] for g in mesh.status()["groups"]) and mesh.status()["epoch"] > before + 1, 90)
        time.sleep(1)
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["ref"] > 20, load.lost()
    meshes.stop(f"direct-failover-{transport}")


def test_a_direct_client_dying_mid_swap_holds_the_drain_until_its_lease_ends(ray_cluster, meshes, checkpoints):
    """A child process's direct client is killed while a swap runs: the swap's drain cannot hear from
    it, so it waits for its lease to end, then completes; this process's direct client, under load
    through it all, loses nothing and sees one epoch per answer."""
    old, new = checkpoints["old"], checkpoints["new"]
    mesh = meshes.get(old, key="direct-lease", admin_token=TOKEN, drain_s=0.2, health_period_s=0.5,
                      direct_lease_s=LEASE_S)
    x = torch.randn(8, SMALL["hidden_size"], generator=torch.Generator().manual_seed(8))
    refs = {"old": MoELayer.from_pretrained(old, layer=0)(x), "new": swapped_reference(old, new, [0, 3], x)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, mesh.name, ray_cluster.address, str(SMALL["hidden_size"])],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        name = child.stdout.readline().strip()
        wait_for(lambda: name in [c["name"] for c in mesh.status()["direct_clients"]], 60)
        with DirectClient(mesh.name) as client, Load(None, x, refs, client=client) as load:
            result = {}
            swap = threading.Thread(target=lambda: result.update(reply=_admin(mesh).Swap(pb.SwapRequest(
                token=TOKEN, layer=0, experts=[0, 3], source_dir=str(new)))))
            child.send_signal(signal.SIGSTOP)  # silent from here: it cannot hear of the swap's epoch (a small
            start = time.monotonic()           # swap can publish before a kill 0.1 s in, and a quick child acks)
            swap.start()
            time.sleep(0.1)
            child.send_signal(signal.SIGKILL)
            swap.join(timeout=LEASE_S + 60)
            took_s = time.monotonic() - start
            time.sleep(0.5)
    finally:
        child.kill()
        child.wait()
    assert result["reply"].ok, result
    assert took_s >= 1.0, took_s  # drain_s is 0.2: it waited for the dead client's lease to end
    assert name not in [c["name"] for c in mesh.status()["direct_clients"]]
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["new"] > 0, load.lost()
    _one_epoch_per_kind(load, result["reply"].epoch)
    meshes.stop("direct-lease")
