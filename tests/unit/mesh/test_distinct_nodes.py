"""Copies of an expert on distinct nodes: at DeepSeek-V3's shape (64 groups on 8 nodes, 256
experts) a node's loss must never take every copy of an expert; scale adds copies on new nodes
first, and what cannot be kept apart is reported."""

from __future__ import annotations

import collections

import pytest

from mesh.placement import copy_offsets, initial_assignment, pick_groups, shared_nodes, spread_groups

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
