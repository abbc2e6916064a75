"""The expert-group actor body (as a plain object, no Ray): concurrent copy changes lose nothing."""

from __future__ import annotations

import asyncio

import torch

from experts import MoELayer
from experts.actor import ExpertGroupActor


def test_concurrent_loads_of_one_layer_all_land(zoo):
    path = zoo.checkpoint("mixtral")
    actor = ExpertGroupActor("g", str(path), {1: [0]})

    async def load_three():
        return await asyncio.gather(*(actor.load_experts(1, [e]) for e in (2, 3, 5)))

    versions = asyncio.run(load_three())
    assert actor.info()["experts"][1] == [0, 2, 3, 5] and all(len(v) == 1 for v in versions)
    x = torch.randn(8, MoELayer.from_pretrained(path, layer=1).spec.hidden_size)
    out = actor.server_impl.compute_sync(1, x, [0, 2, 3, 5], [2, 2, 2, 2], None)
    ref = MoELayer.from_pretrained(path, layer=1).experts.forward(1, x, [0, 2, 3, 5], [2, 2, 2, 2])
    assert torch.allclose(out, ref, atol=1e-6)
    actor.release_experts(1, [2, 5])
    assert actor.info()["experts"][1] == [0, 3]
