"""Placement by measured latency and co-activation: pure policy on made-up measurements (no Ray)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from cluster.cli import format_placement
from mesh.placement import (group_latency, group_loads, initial_assignment, latency_tiers, pairs_kept, pick_groups,
                            placement_cost, placement_moves, plan_placement)

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


def test_latency_tiers_merge_links_within_the_gap():
    tiers = latency_tiers({"a": 1.0, "b": 1.4, "c": 1.6, "far": 30.0}, min_gap=0.5)
    assert tiers == {"a": 1.2, "b": 1.2, "c": 1.6, "far": 30.0}  # c is over 1.5 x a, the tier's lowest
    assert latency_tiers({"a": 1.0, "b": 1.4}, min_gap=0.2) == {"a": 1.0, "b": 1.4}


def _visits_of_sampled_tokens(assignment, latency, picks, layer=0):
    """ms of group visits per token, exactly: every choice of one copy per picked expert (uniform,
    independent, as the router picks), each distinct group touched counted once."""
    holders = {e: [g for g, held in assignment.items() if e in held.get(layer, [])] for e in range(8)}
    total = 0.0
    for token in picks:
        choices = list(itertools.product(*(holders[e] for e in token)))
        total += sum(sum(latency[g] for g in set(choice)) for choice in choices) / len(choices)
    return total


@pytest.mark.parametrize("seed", range(4))
def test_cost_is_the_group_visits_of_top2_tokens(seed):
    rng = random.Random(seed)
    groups = ["g0", "g1", "g2"]
    assignment = {g: {0: []} for g in groups}
    for e in range(8):  # one or two copies per expert
        for g in rng.sample(groups, rng.choice([1, 2])):
            assignment[g][0].append(e)
    latency = {g: rng.uniform(0.5, 10) for g in groups}
    picks = [tuple(rng.sample(range(8), 2)) for _ in range(300)]
    load = {(0, e): float(sum(e in t for t in picks)) for e in range(8)}
    pairs = {}
    for a, b in picks:
        key = (0, min(a, b), max(a, b))
        pairs[key] = pairs.get(key, 0.0) + 1.0
    cost = placement_cost(assignment, latency, load, pairs, top_k=2)
    assert cost == pytest.approx(_visits_of_sampled_tokens(assignment, latency, picks), rel=1e-12)
    assert placement_cost(assignment, latency, load) >= cost  # without pairs: one visit per copy


def test_top_k_tokens_on_one_group_cost_one_visit():
    assignment = {"g0": {0: [0, 1, 2, 3]}, "g1": {0: [4, 5, 6, 7]}}
    latency = {"g0": 2.0, "g1": 5.0}
    picks = [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 2, 3)]
    load = {(0, e): float(sum(e in t for t in picks)) for e in range(8)}
    pairs = {(0, a, b): float(sum(a in t and b in t for t in picks)) for a, b in itertools.combinations(range(8), 2)}
    pairs = {k: v for k, v in pairs.items() if v}
    assert placement_cost(assignment, latency, load, pairs, top_k=4) == pytest.approx(2.0 + 5.0 + 2.0)
    assert pairs_kept(assignment, pairs) == 1.0


def test_coactivated_experts_come_together_on_equal_links():
    # tokens pick (0, 1) or (2, 3); each pair starts split over the two groups
    assignment = {"g0": {0: [0, 2]}, "g1": {0: [1, 3]}}
    latency = {"g0": 1.0, "g1": 1.2}  # one tier: only co-activation can move anything
    load = {(0, e): 50.0 for e in range(4)}
    pairs = {(0, 0, 1): 50.0, (0, 2, 3): 50.0}
    new = plan_placement(assignment, latency, load, pairs=pairs)
    assert sorted(map(sorted, (new["g0"][0], new["g1"][0]))) == [[0, 1], [2, 3]]
    assert pairs_kept(assignment, pairs) == 0.0 and pairs_kept(new, pairs) == 1.0
    assert placement_cost(new, latency, load, pairs) < 0.6 * placement_cost(assignment, latency, load, pairs)
    assert plan_placement(assignment, latency, load) == assignment  # without pair counts nothing moves


def _sampled(num_experts: int, top_k: int, num_groups: int, inside: int, seed: int = 0):
    """(load, pairs) of 2000 tokens: each picks `inside` experts of one of num_groups clusters
    (scattered over the expert ids) and the rest at random; inside=0: independent experts."""
    rng = random.Random(seed)
    ids = list(range(num_experts))
    rng.shuffle(ids)
    size = num_experts // num_groups
    load, pairs = {}, {}
    for _ in range(2000):
        cluster = rng.randrange(num_groups)
        first = rng.sample(ids[cluster * size:(cluster + 1) * size], inside)
        token = first + rng.sample([e for e in range(num_experts) if e not in first], top_k - inside)
        for e in token:
            load[(0, e)] = load.get((0, e), 0.0) + 1.0
        for a, b in itertools.combinations(sorted(token), 2):
            pairs[(0, a, b)] = pairs.get((0, a, b), 0.0) + 1.0
    return load, pairs


@pytest.mark.parametrize("num_experts,top_k,num_groups", [(8, 2, 4), (64, 8, 8)])
def test_pairs_of_independent_experts_move_nothing_and_clusters_come_together(num_experts, top_k, num_groups):
    assignment = {f"g{k}": held for k, held in enumerate(initial_assignment([0], num_experts, num_groups))}
    latency = dict.fromkeys(assignment, 1.0)
    for seed in range(3):  # sampling noise in the pair counts is not worth a move
        load, pairs = _sampled(num_experts, top_k, num_groups, inside=0, seed=seed)
        assert plan_placement(assignment, latency, load, pairs=pairs, top_k=top_k) == assignment
    load, pairs = _sampled(num_experts, top_k, num_groups, inside=max(2, top_k * 3 // 4))
    new = plan_placement(assignment, latency, load, pairs=pairs, top_k=top_k)
    assert pairs_kept(new, pairs) > pairs_kept(assignment, pairs) + 0.3
    assert placement_cost(new, latency, load, pairs, top_k) < 0.75 * placement_cost(assignment, latency, load, pairs, top_k)


def test_coactivation_does_not_break_the_balance_bound():
    # the hot pair (0, 1) together would carry 200 of 220 tokens/s on one group: over 1.5 x mean 110
    assignment = {"g0": {0: [0, 2]}, "g1": {0: [1, 3]}}
    latency = {"g0": 1.0, "g1": 1.0}
    load = {(0, 0): 100.0, (0, 1): 100.0, (0, 2): 10.0, (0, 3): 10.0}
    pairs = {(0, 0, 1): 100.0, (0, 2, 3): 10.0}
    assert plan_placement(assignment, latency, load, balance=0.5, pairs=pairs) == assignment
    together = plan_placement(assignment, latency, load, balance=1.0, pairs=pairs)
    assert pairs_kept(together, pairs) == 1.0


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
    pairs = {(layer, a, b): rng.expovariate(1 / 20) for layer in (0, 1) for a, b in itertools.combinations(range(8), 2)
             if rng.random() < 0.3}
    tiers = latency_tiers(latency, 0.5)  # the planner's latencies: its cost never rises in them
    new = plan_placement(assignment, latency, load, balance=0.3, pairs=pairs)
    assert placement_cost(new, tiers, load, pairs) <= placement_cost(assignment, tiers, load, pairs) + 1e-9
    loads, cap = group_loads(new, load), 1.3 * sum(load.values()) / len(groups)
    assert all(loads[g] <= max(cap, before) + 1e-9 for g, before in group_loads(assignment, load).items())
    for g in groups:
        for layer in (0, 1):
            assert len(new[g][layer]) == len(set(new[g][layer])) == len(assignment[g][layer])
    for layer in (0, 1):  # every expert keeps its number of copies
        before = sorted(e for g in groups for e in assignment[g][layer])
        assert sorted(e for g in groups for e in new[g][layer]) == before


def test_format_placement_shows_matrix_groups_and_costs():
    report = {"links": LINKS, "router_nodes": ["n0"], "load_source": "tokens since start",
              "groups": {"m/group-0": {"node": "n0", "latency_ms": 0.5}, "m/group-1": {"node": "far", "latency_ms": 30.0}},
              "pairs": 1,
              "current": {"assignment": {"m/group-0": {"0": [1]}, "m/group-1": {"0": [0]}}, "cost": 251.0,
                          "mean_latency_ms": 25.1, "pairs_kept": 0.0},
              "proposed": {"assignment": {"m/group-0": {"0": [0]}, "m/group-1": {"0": [1]}}, "cost": 54.0,
                           "mean_latency_ms": 5.4, "pairs_kept": 0.5},
              "adds": [[0, 0, "m/group-0"], [0, 1, "m/group-1"]], "removes": []}
    text = format_placement(report)
    assert "   30.00" in text and "m/group-1" in text and "L0:0  -> L0:1" in text
    assert "current 251.0, proposed 54.0 ms x tokens/s" in text
    assert "current 25.10 ms, proposed 5.40 ms (2 copies move" in text
    assert "(1 counted) with both copies on one group: current 0%, proposed 50%" in text


def test_pick_groups_adds_to_the_least_loaded_and_removes_from_the_most_loaded():
    assignment = {"a": {0: [0, 1]}, "b": {0: [2]}, "c": {0: [0, 3]}, "d": {0: [4]}}
    load = {(0, 0): 100.0, (0, 1): 10.0, (0, 2): 80.0, (0, 3): 5.0, (0, 4): 1.0}
    assert group_loads(assignment, load) == {"a": 60.0, "b": 80.0, "c": 55.0, "d": 1.0}
    assert pick_groups(assignment, load, 0, 0, 2) == ["d", "b"]   # never a group that holds expert 0
    assert pick_groups(assignment, load, 0, 0, -1) == ["a"]       # the busier holder loses its copy
    assert pick_groups(assignment, load, 0, 4, 5) == ["c", "a", "b"]  # at most the groups without one
    assert pick_groups({"x": {}, "y": {}}, {}, 0, 0, 1) == ["x"]  # no load: by copies, then name
