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


def test_a_forward_at_any_moment_of_a_commit_finds_the_versions_it_asks_for(zoo, monkeypatch):
    """Commit is one assignment of the new layer: a forward that runs while it builds (here: from
    inside it, as another thread could) computes with the staged weights it names, and afterwards
    with the same weights as current ones."""
    from experts.checkpoint import CheckpointReader
    from experts.group import LayerExperts

    path = zoo.checkpoint("mixtral")
    group = ExpertGroupActor("g", str(path), {1: [0, 2, 3]}).server_impl.group
    reader = CheckpointReader(path)
    new = reader.experts(1, [2])
    reader.close()
    new.w_down.mul_(2.0)  # new weights: expert 2 answers twice as much
    new = type(new)(new.experts, new.w_gate_up, new.w_down, ["f" * 64], new.b_gate_up, new.b_down)
    group.stage(1, new)
    versions = [group.version(1, 0), group.staged[1].version(2), group.version(1, 3)]
    x = torch.randn(3, group.spec.hidden_size)
    expected = group.forward(1, x, [0, 2, 3], [1, 1, 1], None, versions)
    seen = []
    build = LayerExperts.from_weights.__func__

    def build_and_forward(cls, weights, dtype=None, device=None):
        seen.append(group.forward(1, x, [0, 2, 3], [1, 1, 1], None, versions))  # mid-commit
        return build(cls, weights, dtype, device)

    monkeypatch.setattr(LayerExperts, "from_weights", classmethod(build_and_forward))
    group.commit(1)
    monkeypatch.undo()
    assert seen and all(torch.equal(out, expected) for out in seen)
    assert torch.equal(group.forward(1, x, [0, 2, 3], [1, 1, 1], None, versions), expected)
    assert 1 not in group.staged
