"""A flood the router has no memory for, on a real 3-node Ray cluster: 84 concurrent valid
Forwards, each just under max_request_tokens and together 4x router.max_inflight_bytes. The
router's peak RSS over its idle baseline stays within that budget plus 20%, the calls it has no
room for get RESOURCE_EXHAUSTED, and every answer it gives equals MoELayer's.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
import ray
import torch

from experts import MoELayer
from experts.builtin import build_model, save_checkpoint
from router_service import AsyncMeshClient
from tests.integration.mesh_helpers import FP32_TOL, rel_err
from protos.errors import MeshClientError

HIDDEN, MAX_TOKENS, FLOOD = 1024, 1024, 84
BUDGET = 80 << 20  # FORWARD_FOOTPRINT x the largest message (5 MiB); 84 requests of 4 MB (1000 tokens x 1024 x fp32) are over 4x this


@pytest.fixture(scope="module")
def flooded_mesh(meshes, tmp_path_factory):
    model = build_model("mixtral", seed=3, hidden_size=HIDDEN, intermediate_size=64, num_local_experts=4,
                        num_experts_per_tok=2, num_hidden_layers=1)
    path = save_checkpoint(model, tmp_path_factory.mktemp("flood") / "mixtral")
    mesh = meshes.get(path, key="flood", router={"max_request_tokens": MAX_TOKENS, "max_inflight_bytes": BUDGET})
    return mesh, MoELayer.from_pretrained(path, layer=0)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak since the last reset) of a process on this machine, in MB."""
    with open(f"/proc/{pid}/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status if line.startswith(("VmRSS", "VmHWM"))}


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS


async def flood(address: str, xs: list[torch.Tensor]) -> list:
    client = AsyncMeshClient(address, timeout_s=120)
    try:
        return await asyncio.gather(*(client.forward(0, x) for x in xs), return_exceptions=True)
    finally:
        await client.close()


def test_a_flood_stays_within_the_memory_budget_and_every_answer_is_right(flooded_mesh):
    mesh, local = flooded_mesh
    pid = ray.get(mesh.router.__ray_call__.remote(lambda self: os.getpid()))
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(MAX_TOKENS - 24, HIDDEN, generator=generator) for _ in range(FLOOD)]
    assert sum(x.numel() * 4 for x in xs) >= 4 * BUDGET
    asyncio.run(flood(mesh.address, xs[:1]))  # the router's first large request: its idle baseline after
    reset_peak(pid)
    idle = memory_mb(pid)["VmRSS"]
    answers = asyncio.run(flood(mesh.address, xs))
    growth = memory_mb(pid)["VmHWM"] - idle
    served = [(x, out) for x, out in zip(xs, answers) if isinstance(out, torch.Tensor)]
    refused = [out for out in answers if not isinstance(out, torch.Tensor)]
    print(f"flood: {len(served)} served, {len(refused)} refused; router RSS {idle:.0f} MB idle, "
          f"+{growth:.0f} MB at peak (budget {BUDGET >> 20} MB)")
    assert growth <= 1.2 * BUDGET / 2**20, growth
    assert served and refused
    for error in refused:
        assert isinstance(error, MeshClientError) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        assert "max_inflight_bytes" in error.details
    for x, out in served:
        assert rel_err(out, local(x)) <= FP32_TOL
    # the router serves on, right
    (out,) = asyncio.run(flood(mesh.address, xs[:1]))
    assert rel_err(out, local(xs[0])) <= FP32_TOL
