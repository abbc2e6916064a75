"""The controller's scale and autoscale plans, as pure functions of the live groups' holdings."""

from __future__ import annotations

import copy

from mesh.autoscale import autoscaled
from mesh.placement import scaled

NODES = {"a": "n0", "b": "n0", "c": "n1", "d": "n1"}


def _holders(plan, layer, expert):
    return sorted(g for g, held in plan.items() if expert in held.get(layer, []))


def test_scaled_adds_on_a_node_without_a_copy_and_never_removes_the_last_live_one():
    live = {"a": {0: [0, 1]}, "b": {0: [2]}, "c": {0: [3]}, "d": {0: [1]}}
    before = copy.deepcopy(live)
    up = scaled(live, {}, 0, 0, 2, named=1, nodes=NODES)
    assert live == before  # the live holdings are not changed in place
    assert _holders(up, 0, 0) == ["a", "c"]  # n1 had none: the new copy goes there (c: a tie with d, by name)
    down = scaled(up, {}, 0, 0, 1, named=2, nodes=NODES)
    assert len(_holders(down, 0, 0)) == 1
    assert _holders(scaled(live, {}, 0, 0, 1, named=3, nodes=NODES), 0, 0) == ["a"]  # the last live copy stays


def test_autoscaled_gives_a_hot_expert_copies_and_keeps_slots_equal():
    live = {g: {0: [k, k + 4]} for k, g in enumerate("abcd")}  # 8 experts, one copy each, 2 slots per group
    counts = {(0, e): 1 for e in range(8)}
    rates = {(0, 0): 400.0, **{(0, e): 10.0 for e in range(1, 8)}}
    before = copy.deepcopy(live)
    plan = autoscaled(live, counts, rates, target_per_copy=100.0, max_copies=4, hysteresis=0.25, num_experts=8,
                      nodes=NODES)
    assert live == before
    holders = _holders(plan, 0, 0)
    assert len(holders) == 4 and len({NODES[g] for g in holders}) == 2  # 4 copies, on both nodes
    assert all(any(e in held[0] for held in plan.values()) for e in range(8))  # no expert lost
    assert len({len(held[0]) for held in plan.values()}) == 1  # equal slots per group
    assert autoscaled(live, counts, {k: 10.0 for k in counts}, 100.0, 4, 0.25, 8, NODES) == live  # nothing hot
