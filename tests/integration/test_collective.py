"""The collective transport (gloo here; NCCL needs GPUs) on the session's real 3-node cluster:
every MoE layer of four families equals the in-process MoELayer, no slice falls back to grpc
after warm-up, and a killed or frozen group costs at most the timeout."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import pytest
import ray
import torch

from cluster.local import start_mesh
from experts import MoELayer, load_spec
from mesh.config import MeshConfig
from mesh.handles import NAMESPACE
from router_service import MeshClient
from tests.integration.mesh_helpers import FP32_TOL, rel_err
from protos.errors import MeshClientError

# The channel moves rows of H whatever the family: one plain family and the one that scales its
# inputs (Llama 4); every family's math is checked over grpc (test_mesh.py).
FAMILIES = ["mixtral", "llama4", "nemotron_h"]  # nemotron_h: latent rows on the wire, L != H
TIMEOUT_S = 1.0
COLLECTIVE = {"transport": "collective", "collective_timeout_s": TIMEOUT_S, "port": 0}


def segments(mesh) -> dict[str, int]:
    return msgpack.unpackb(ray.get(mesh.router.load_report.remote()))["segments"]


def wait_for_channels(mesh, layer: int, x: torch.Tensor, timeout_s: float = 30.0) -> None:
    """Until a Forward goes out over collective only (the channels opened in the background)."""
    deadline = time.time() + timeout_s
    with MeshClient(mesh.address) as client:
        while time.time() < deadline:
            before = segments(mesh)
            client.forward(layer, x)
            after = segments(mesh)
            if after.get("grpc", 0) == before.get("grpc", 0) and after.get("collective", 0) > before.get("collective", 0):
                return
            time.sleep(0.2)
    raise AssertionError(f"collective channels not up within {timeout_s} s: {segments(mesh)}")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_moe_layer_over_collective_equals_the_in_process_layer(ray_cluster, zoo, family):
    path = zoo.checkpoint(family)
    spec = load_spec(path)
    mesh = start_mesh(MeshConfig(name=f"coll-{family}", router=COLLECTIVE), path)
    try:
        x = torch.randn(21, spec.hidden_size, generator=torch.Generator().manual_seed(1))
        wait_for_channels(mesh, spec.moe_layers[0], x)
        before = segments(mesh)
        with MeshClient(mesh.address) as client:
            for layer in spec.moe_layers:
                ref = MoELayer.from_pretrained(path, layer=layer)(x)
                assert rel_err(client.forward(layer, x), ref) <= FP32_TOL, (family, layer)
                assert rel_err(client.forward(layer, x[:1]), ref[:1]) <= FP32_TOL, (family, layer)
        after = segments(mesh)
        assert after.get("grpc", 0) == before.get("grpc", 0), after  # nothing fell back after warm-up
        assert after["collective"] > before.get("collective", 0)
        wires = msgpack.unpackb(ray.get(mesh.router.load_report.remote()))["wires"]
        assert wires == {"gloo: an end computes on the host": 3}, wires  # CPU groups: gloo, one channel each
    finally:
        mesh.stop()


def _group_pid(mesh, index: int) -> int:
    return ray.get(ray.get_actor(f"{mesh.name}/group-{index}", namespace=NAMESPACE).info.remote())["pid"]


@pytest.fixture(scope="module")
def two_copies(ray_cluster, zoo):
    """Mixtral over collective, every expert on two of three groups; callers warmed up."""
    path = zoo.checkpoint("mixtral")
    mesh = start_mesh(MeshConfig(name="coll-two", groups={"replicas": 2}, health_period_s=0.5, router=COLLECTIVE), path)
    spec = load_spec(path)
    x = torch.randn(16, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    wait_for_channels(mesh, spec.moe_layers[0], x)
    yield mesh, path, x
    mesh.stop()


def test_a_group_killed_or_frozen_mid_traffic_costs_no_caller_with_two_copies(two_copies):
    from tests.integration.mesh_helpers import Load

    mesh, path, x = two_copies
    layer = load_spec(path).moe_layers[0]
    ref = MoELayer.from_pretrained(path, layer=layer)(x)
    assert layer == 0  # Load sends to layer 0
    with Load(mesh.addresses, x, {"ref": ref}) as load:
        time.sleep(1)
        pid = _group_pid(mesh, 1)
        os.kill(pid, signal.SIGSTOP)  # frozen: its channel times out, its slices go to the other copies
        time.sleep(2.5)
        os.kill(pid, signal.SIGCONT)
        time.sleep(1)
        ray.kill(ray.get_actor(f"{mesh.name}/group-0", namespace=NAMESPACE))  # killed mid-traffic
        time.sleep(3)
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["ref"] > 20, load.lost()


def test_with_one_copy_a_frozen_group_fails_its_callers_within_the_timeout_and_nobody_hangs(ray_cluster, zoo):
    path = zoo.checkpoint("mixtral")
    spec = load_spec(path)
    mesh = start_mesh(MeshConfig(name="coll-one", router=COLLECTIVE), path)
    try:
        x = torch.randn(16, spec.hidden_size, generator=torch.Generator().manual_seed(3))
        layer = spec.moe_layers[0]
        wait_for_channels(mesh, layer, x)
        ref = MoELayer.from_pretrained(path, layer=layer)(x)
        pid = _group_pid(mesh, 1)
        os.kill(pid, signal.SIGSTOP)
        try:
            with MeshClient(mesh.address, timeout_s=30) as client:
                start = time.perf_counter()
                with pytest.raises(MeshClientError) as info:
                    client.forward(layer, x)  # 16 tokens x top-2 over 3 groups: some need group 1
                elapsed = time.perf_counter() - start
        finally:
            os.kill(pid, signal.SIGCONT)
        assert info.value.code.name == "UNAVAILABLE" and elapsed <= TIMEOUT_S + 1.0, (info.value, elapsed)
        deadline = time.time() + 20
        with MeshClient(mesh.address, timeout_s=30) as client:
            while True:  # the next request once the group answers again succeeds
                try:
                    out = client.forward(layer, x)
                    break
                except MeshClientError:
                    assert time.time() < deadline, "no request succeeded after the group came back"
                    time.sleep(0.2)
        assert rel_err(out, ref) <= FP32_TOL
    finally:
        mesh.stop()
