"""Copies of an expert on distinct nodes: at DeepSeek-V3's shape (64 groups on 8 nodes, 256
experts) a node's loss must never take every copy of an expert; scale adds copies on new nodes
first, and what cannot be kept apart is reported."""

from __future__ import annotations

import collections

import pytest

from mesh.placement import (copy_offsets, group_loads, initial_assignment, pick_groups, placement_cost, plan_placement,
                            replicate_layer, scale_count, shared_nodes, spread_groups)

NODES = [f"n{k}" for k in range(8)]


def _holders(groups: list[dict[int, list[int]]], layer: int) -> dict[int, list[int]]:
    holders = collections.defaultdict(list)
    for k, held in enumerate(groups):
        for expert in held.get(layer, []):
            holders[expert].append(k)
    return holders


@pytest.mark.parametrize("num_groups,num_nodes,replicas", [(64, 8, 2), (64, 8, 3), (32, 4, 2), (8, 8, 8), (6, 3, 2)])
def test_initial_copies_of_every_expert_sit_on_distinct_nodes_and_groups_stay_even(num_groups, num_nodes, replicas):
    layers = [3, 4, 60]
    groups = initial_assignment(layers, 256, num_groups, replicas, num_nodes=num_nodes)
    node_of = spread_groups(num_groups, NODES[:num_nodes] + [f"m{k}" for k in range(num_nodes - len(NODES))])
    for layer in layers:
        for expert, holders in _holders(groups, layer).items():
            assert len(holders) == replicas and len(set(holders)) == replicas
            assert len({node_of[g] for g in holders}) == replicas, (layer, expert, holders)
        sizes = [len(g.get(layer, [])) for g in groups]
        assert max(sizes) - min(sizes) <= 1


def test_without_nodes_copies_still_spread_as_before():
    assert copy_offsets(64, 2, 64) == [0, 32]
    assert copy_offsets(64, 2, 8) == [0, 33]  # 32 would share group 0's node


def test_more_replicas_than_nodes_keeps_distinct_groups():
    groups = initial_assignment([0], 16, 8, 4, num_nodes=2)
    assert all(len(set(h)) == 4 for h in _holders(groups, 0).values())


def test_scale_counts_the_copies_of_dead_groups_and_keeps_a_live_one():
    assert scale_count(3, named=2, live=1) == 1   # the dead holder comes back: one more makes 3, not two
    assert scale_count(2, named=4, live=3) == -2
    assert scale_count(1, named=2, live=1) == 0   # the only live copy stays until the dead one is back
    assert scale_count(2, named=2, live=2) == 0


def test_scale_puts_a_new_copy_on_a_node_without_one():
    nodes = {f"g{k}": NODES[k % 8] for k in range(64)}
    assignment = {g: {0: []} for g in nodes}
    assignment["g0"][0] = [5]
    load = {(0, e): 1.0 for e in range(256)}
    assignment["g9"][0] = list(range(10, 30))  # g8 (node n0) is the least loaded but shares g0's node
    gained = pick_groups(assignment, load, 0, 5, 7, nodes)
    assert len({nodes[g] for g in gained} | {"n0"}) == 8  # 8 copies, 8 nodes
    assignment["g8"][0] = [5]
    assert nodes[pick_groups(assignment, load, 0, 5, -1, nodes)[0]] == "n0"  # the doubled node gives one up


def test_copies_sharing_a_node_are_reported_only_when_the_nodes_could_keep_them_apart():
    nodes = {"g0": "n0", "g1": "n0", "g2": "n1"}
    assert shared_nodes({(0, 1): ["g0", "g1"], (0, 2): ["g0", "g2"], (0, 3): ["g0", "g1", "g2"]}, nodes) == [(0, 1)]


def _v3_groups(replicas: int) -> tuple[dict[str, dict[int, list[int]]], dict[str, str]]:
    """64 groups on 8 nodes holding layer 3's 256 experts, `replicas` copies each, spread as mesh up does."""
    names = [f"group-{k}" for k in range(64)]
    nodes = dict(zip(names, spread_groups(64, NODES)))
    return dict(zip(names, initial_assignment([3], 256, 64, replicas, num_nodes=8))), nodes


def _copies(assignment: dict[str, dict[int, list[int]]], layer: int) -> dict[tuple[int, int], list[str]]:
    copies = collections.defaultdict(list)
    for group, held in assignment.items():
        for expert in held.get(layer, []):
            copies[(layer, expert)].append(group)
    return dict(copies)


@pytest.mark.parametrize("replicas", [2, 3])
def test_autoscale_replans_a_skewed_layer_with_every_experts_copies_on_distinct_nodes(replicas):
    assignment, nodes = _v3_groups(replicas)
    load = {(3, e): (400.0 if e < 16 else 1.0) for e in range(256)}  # 16 hot experts want 8 copies each
    total = 256 * replicas + 16 * 6
    eplb = replicate_layer(assignment, 3, load, total, 256, max_copies=8)
    assert shared_nodes(_copies(eplb, 3), nodes), "the test needs a plan that EPLB alone leaves crowded"
    plan = replicate_layer(assignment, 3, load, total, 256, max_copies=8, nodes=nodes)
    copies = _copies(plan, 3)
    assert shared_nodes(copies, nodes) == []
    assert sorted(len(c) for c in copies.values()) == sorted(len(c) for c in _copies(eplb, 3).values())
    assert {len(held[3]) for held in plan.values()} == {len(held[3]) for held in eplb.values()}  # slots kept
    loads = group_loads(plan, load)
    eplb_loads = group_loads(eplb, load)
    assert max(loads.values()) <= 1.25 * max(eplb_loads.values())  # balance near EPLB's


@pytest.mark.parametrize("replicas", [2, 3])
def test_rebalance_by_latency_never_brings_two_copies_onto_one_node(replicas):
    assignment, nodes = _v3_groups(replicas)
    latency = {g: (0.2 if nodes[g] in ("n0", "n1") else 2.0) for g in assignment}  # two near nodes
    load = {(3, e): float(256 - e) for e in range(256)}
    free = plan_placement(assignment, latency, load, balance=3.0)
    assert shared_nodes(_copies(free, 3), nodes), "the test needs a plan that crowds without the rule"
    plan = plan_placement(assignment, latency, load, balance=3.0, nodes=nodes)
    assert plan != assignment  # hot copies still move to the near nodes
    assert shared_nodes(_copies(plan, 3), nodes) == []
    assert placement_cost(plan, latency, load) < placement_cost(assignment, latency, load)
