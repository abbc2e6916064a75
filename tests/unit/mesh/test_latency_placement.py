"""Placement by measured latency: pure policy on made-up measurements (no Ray)."""

from __future__ import annotations

import itertools
import random

import pytest

from cluster.cli import format_placement
from mesh.placement import group_latency, group_loads, pick_groups, placement_cost, placement_moves, plan_placement

LINKS = {"nodes": ["n0", "n1", "far"],
         "rtt_ms": [[0.5, 1.0, 30.0], [1.0, 0.5, 30.0], [30.0, 30.0, 0.5]], "mbps": [[1e3] * 3] * 3}


def test_group_latency_is_the_mean_rtt_from_the_routers_nodes():
    latency = group_latency({"g0": "n0", "g1": "n1", "g2": "far"}, ["n0", "n1"], LINKS)
    assert latency == {"g0": 0.75, "g1": 0.75, "g2": 30.0}
    with pytest.raises(ValueError, match="no router"):
        group_latency({"g0": "n0"}, [], LINKS)


def test_hot_experts_leave_the_far_group_and_cost_drops():
    assignment = {"g0": {0: [2, 3]}, "g1": {0: [4, 5]}, "far": {0: [0, 1]}}
    latency = {"g0": 1.0, "g1": 1.0, "far": 30.0}
    load = {(0, 0): 100.0, (0, 1): 80.0, (0, 2): 1.0, (0, 3): 60.0, (0, 4): 2.0, (0, 5): 50.0}
    new = plan_placement(assignment, latency, load, balance=1.0)
    assert set(new["far"][0]) == {2, 4}  # the two coldest experts
    # at balance 0.5 (cap 146.5 tokens/s per group) the near groups cannot take 290: expert 5 stays far
    assert set(plan_placement(assignment, latency, load, balance=0.5)["far"][0]) == {2, 5}
    assert placement_cost(new, latency, load) < placement_cost(assignment, latency, load) / 5
    assert {g: len(a[0]) for g, a in new.items()} == {"g0": 2, "g1": 2, "far": 2}  # memory unchanged


def test_balance_bound_keeps_a_near_group_from_taking_everything():
    assignment = {"near": {0: [1]}, "far": {0: [0]}}
    latency = {"near": 1.0, "far": 2.0}
    load = {(0, 0): 100.0, (0, 1): 0.0}
    assert plan_placement(assignment, latency, load, balance=0.5) == assignment  # 100 > 1.5 x mean 50
    assert plan_placement(assignment, latency, load, balance=1.0) == {"near": {0: [0]}, "far": {0: [1]}}


def test_copies_split_load_and_never_share_a_group():
    # expert 0 has two copies (g0, far); a swap may not bring a second copy of 0 into g0
    assignment = {"g0": {0: [0, 2]}, "far": {0: [0, 1]}}
    latency = {"g0": 1.0, "far": 10.0}
    load = {(0, 0): 100.0, (0, 1): 40.0, (0, 2): 10.0}
    new = plan_placement(assignment, latency, load, balance=2.0)
    assert new == {"g0": {0: [0, 1]}, "far": {0: [0, 2]}}
    assert placement_moves(assignment, new) == ([(0, 1, "g0"), (0, 2, "far")], [(0, 1, "far"), (0, 2, "g0")])


def test_equal_latency_noise_or_no_load_changes_nothing():
    assignment = {"a": {0: [0, 1], 1: [2]}, "b": {0: [2, 3], 1: [0]}}
    assert plan_placement(assignment, {"a": 1.0, "b": 1.0}, {(0, 0): 5.0}) == assignment
    assert plan_placement(assignment, {"a": 1.4, "b": 1.0}, {(0, 0): 5.0}) == assignment  # within min_gap
    assert plan_placement(assignment, {"a": 1.4, "b": 1.0}, {(0, 0): 5.0}, balance=1.0, min_gap=0.2) != assignment
    assert plan_placement(assignment, {"a": 1.0, "b": 9.0}, {}) == assignment
    assert placement_moves(assignment, assignment) == ([], [])


@pytest.mark.parametrize("seed", range(5))
def test_random_plans_never_raise_cost_nor_break_invariants(seed):
    rng = random.Random(seed)
    groups = [f"g{k}" for k in range(4)]
    assignment = {g: {0: [], 1: []} for g in groups}
    for layer, expert in itertools.product([0, 1], range(8)):
        for g in rng.sample(groups, rng.choice([1, 1, 2])):
            assignment[g][layer].append(expert)
    latency = {g: rng.uniform(0.5, 20) for g in groups}
    load = {(layer, e): rng.expovariate(1 / 50) for layer in (0, 1) for e in range(8)}
    new = plan_placement(assignment, latency, load, balance=0.3)
    assert placement_cost(new, latency, load) <= placement_cost(assignment, latency, load) + 1e-9
    for g in groups:
        for layer in (0, 1):
            assert len(new[g][layer]) == len(set(new[g][layer])) == len(assignment[g][layer])
    for layer in (0, 1):  # every expert keeps its number of copies
        before = sorted(e for g in groups for e in assignment[g][layer])
        assert sorted(e for g in groups for e in new[g][layer]) == before


def test_format_placement_shows_matrix_groups_and_costs():
    report = {"links": LINKS, "router_nodes": ["n0"], "load_source": "tokens since start",
              "groups": {"m/group-0": {"node": "n0", "latency_ms": 0.5}, "m/group-1": {"node": "far", "latency_ms": 30.0}},
              "current": {"assignment": {"m/group-0": {"0": [1]}, "m/group-1": {"0": [0]}}, "cost": 251.0,
                          "mean_latency_ms": 25.1},
              "proposed": {"assignment": {"m/group-0": {"0": [0]}, "m/group-1": {"0": [1]}}, "cost": 54.0,
                           "mean_latency_ms": 5.4},
              "adds": [[0, 0, "m/group-0"], [0, 1, "m/group-1"]], "removes": []}
    text = format_placement(report)
    assert "   30.00" in text and "m/group-1" in text and "L0:0  -> L0:1" in text
    assert "current 251.0, proposed 54.0 ms x tokens/s" in text
    assert "current 25.10 ms, proposed 5.40 ms (2 copies move" in text


def test_pick_groups_adds_to_the_least_loaded_and_removes_from_the_most_loaded():
    assignment = {"a": {0: [0, 1]}, "b": {0: [2]}, "c": {0: [0, 3]}, "d": {0: [4]}}
    load = {(0, 0): 100.0, (0, 1): 10.0, (0, 2): 80.0, (0, 3): 5.0, (0, 4): 1.0}
    assert group_loads(assignment, load) == {"a": 60.0, "b": 80.0, "c": 55.0, "d": 1.0}
    assert pick_groups(assignment, load, 0, 0, 2) == ["d", "b"]   # never a group that holds expert 0
    assert pick_groups(assignment, load, 0, 0, -1) == ["a"]       # the busier holder loses its copy
    assert pick_groups(assignment, load, 0, 4, 5) == ["c", "a", "b"]  # at most the groups without one
    assert pick_groups({"x": {}, "y": {}}, {}, 0, 0, 1) == ["x"]  # no load: by copies, then name
