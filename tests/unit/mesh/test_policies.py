"""Control-plane policies with no Ray and no clock: initial placement, autoscaling, load window."""

from __future__ import annotations

import itertools

import pytest
import torch

from mesh.autoscale import plan_autoscale
from mesh.handles import has_labels
from mesh.placement import initial_assignment, replicate_layer, restore_node, spread_groups
from router_service.load import LoadWindow, PairShares, coactivation_counts


@pytest.mark.parametrize("num_experts,num_groups,replicas", [(8, 3, 1), (6, 2, 2), (5, 4, 3), (16, 4, 1)])
def test_initial_assignment_places_every_copy_once_per_group(num_experts, num_groups, replicas):
    groups = initial_assignment([0, 2], num_experts, num_groups, replicas)
    for layer in (0, 2):
        held = [e for g in groups for e in g.get(layer, [])]
        assert sorted(held) == sorted(list(range(num_experts)) * replicas)
        for g in groups:
            assert len(set(g.get(layer, []))) == len(g.get(layer, []))  # never two copies in one group
        sizes = [len(g.get(layer, [])) for g in groups]
        assert max(sizes) - min(sizes) <= 1


def test_initial_assignment_refuses_more_replicas_than_groups():
    with pytest.raises(ValueError, match="replicas must be in"):
        initial_assignment([0], 4, 2, 3)


def test_spread_groups_round_robin():
    assert spread_groups(5, ["a", "b"]) == ["a", "b", "a", "b", "a"]


RESTORE_CASES = [
    # live groups (node, experts), expected node for a dead group holding layer 0's [0, 2]
    ([("a", {0: [0, 2]}), ("b", {0: [1, 3]})], "b"),           # never beside the other copy
    ([("a", {0: [1]}), ("a", {0: [3]}), ("b", {0: [5]})], "b"),  # no shared copy anywhere: fewest groups
    ([("a", {0: [0]}), ("b", {0: [0, 2]})], "a"),              # fewest shared copies wins over group count
    ([], "a"),                                                  # empty cluster: the order given
]


@pytest.mark.parametrize("live,expected", RESTORE_CASES)
def test_restore_node_keeps_copies_apart(live, expected):
    assert restore_node({0: [0, 2]}, ["a", "b"], live) == expected


def test_restore_node_needs_a_node():
    with pytest.raises(ValueError, match="no live node"):
        restore_node({0: [0]}, [], [])


AUTOSCALE_CASES = [
    # rates, copies, expected changes (target 100/s per copy, max 4, hysteresis 0.25)
    ({(0, 1): 120.0}, {(0, 1): 1}, {}),                   # inside the band: no change
    ({(0, 1): 260.0}, {(0, 1): 1}, {(0, 1): 3}),          # hot: grows to ceil(rate / target)
    ({(0, 1): 900.0}, {(0, 1): 1}, {(0, 1): 4}),          # bounded by max_copies
    ({(0, 1): 140.0}, {(0, 1): 2}, {}),                   # one copy fewer would carry 140 > 75
    ({(0, 1): 50.0}, {(0, 1): 3}, {(0, 1): 1}),           # skew ended: shrinks
    ({}, {(0, 1): 2, (0, 2): 1}, {(0, 1): 1}),            # no traffic: back to one copy, never zero
]


@pytest.mark.parametrize("rates,copies,expected", AUTOSCALE_CASES)
def test_plan_autoscale(rates, copies, expected):
    assert plan_autoscale(rates, copies, target_per_copy=100.0, max_copies=4, hysteresis=0.25) == expected


def test_load_window_rates_follow_a_fake_clock():
    window = LoadWindow(window_s=10.0, bucket_s=1.0)
    window.add(0.5, {(3, 0): 4, (3, 1): 0, (3, 2): 6})
    window.add(5.2, {(3, 0): 6})
    assert window.rates(6.0) == {(3, 0): 1.0, (3, 2): 0.6}
    assert window.rates(10.9) == {(3, 0): 0.6}   # the first bucket left the window
    assert window.rates(30.0) == {}


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_coactivation_counts_count_every_pair_of_every_token(k):
    generator = torch.Generator().manual_seed(k)
    ids = torch.stack([torch.randperm(16, generator=generator)[:k] for _ in range(50)])  # [T, k]
    expected = torch.zeros(16, 16, dtype=torch.int64)
    for row in ids.tolist():
        for a, b in itertools.combinations(sorted(row), 2):
            expected[a, b] += 1
    assert torch.equal(coactivation_counts(ids, 16), expected)
    assert not coactivation_counts(ids[:0], 16).any()


def test_pair_shares_weight_recent_batches_more():
    shares = PairShares(num_experts=4, window_s=10.0)
    for second in range(100):  # a steady mix: of 4 tokens, 2 pick (0, 1), 1 picks (2, 3), 1 picks (0, 3)
        shares.add(float(second), layer=5, ids=torch.tensor([[0, 1], [1, 0], [2, 3], [3, 0]]))
    assert shares.shares(per_layer=8) == pytest.approx({(5, 0, 1): 0.5, (5, 2, 3): 0.25, (5, 0, 3): 0.25})
    assert list(shares.shares(per_layer=1)) == [(5, 0, 1)]  # the commonest pair only
    for second in range(100, 130):  # then 3 windows of one (2, 3) token a second: the old mix fades to e^-3
        shares.add(float(second), layer=5, ids=torch.tensor([[2, 3]]))
    now = shares.shares(per_layer=8)
    assert now[(5, 2, 3)] == pytest.approx(0.87, abs=0.01) and now[(5, 0, 1)] < 0.1
    shares.add(0.0, layer=1, ids=torch.tensor([[3], [2]]))  # top-1 has no pairs
    assert {layer for layer, _, _ in shares.shares(per_layer=8)} == {5}


def _copies_of(assignment, layer: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for held in assignment.values():
        for e in held.get(layer, []):
            counts[e] = counts.get(e, 0) + 1
    return counts


def test_replicate_layer_gives_the_hot_expert_copies_in_equal_slots_and_keeps_the_rest():
    current = {f"g{k}": {0: [k, k + 4], 1: [k]} for k in range(4)}  # E = 8, 2 copies per group
    load = {(0, e): 10.0 for e in range(8)} | {(0, 4): 300.0}
    grown = replicate_layer(current, 0, load, num_copies=10, num_experts=8, max_copies=4)
    assert {g: len(held[0]) for g, held in grown.items()} == dict.fromkeys(current, 3)  # 10 -> 12 slots
    counts = _copies_of(grown, 0)
    assert counts[4] == 4 and sum(counts.values()) == 12 and min(counts.values()) == 1
    assert all(len(set(held[0])) == len(held[0]) for held in grown.values())  # one copy per group
    assert all(set(current[g][0]) <= set(grown[g][0]) for g in current)  # nothing moved, copies added
    assert all(grown[g][1] == current[g][1] for g in current)  # other layers untouched
    # the skew ends: back to one copy each, the copies in force stay where they are
    shrunk = replicate_layer(grown, 0, {(0, e): 10.0 for e in range(8)}, num_copies=8, num_experts=8, max_copies=4)
    assert _copies_of(shrunk, 0) == dict.fromkeys(range(8), 1)
    assert all(set(shrunk[g][0]) <= set(grown[g][0]) for g in current)
    placed = replicate_layer(current, 0, load, num_copies=10, num_experts=8, max_copies=2)
    assert _copies_of(placed, 0)[4] == 2  # the bound


def test_replicate_layer_evens_out_groups_of_unequal_size():
    current = {"a": {0: [0, 1, 2]}, "b": {0: [3]}, "c": {0: [4, 5]}}  # after a scale by hand, say
    load = {(0, e): 1.0 + e for e in range(6)}
    plan = replicate_layer(current, 0, load, num_copies=6, num_experts=6, max_copies=3)
    assert {g: len(held[0]) for g, held in plan.items()} == {"a": 2, "b": 2, "c": 2}
    assert _copies_of(plan, 0) == dict.fromkeys(range(6), 1)
    with pytest.raises(ValueError, match="no expert group"):
        replicate_layer({}, 0, load, 6, 6, 3)


@pytest.mark.parametrize("node,wanted,expected", [
    ({"ray.io/node-id": "n1", "expert-mesh.io/role": "experts"}, {"expert-mesh.io/role": "experts"}, True),
    ({"ray.io/node-id": "n1"}, {"expert-mesh.io/role": "experts"}, False),
    ({"expert-mesh.io/role": "router"}, {"expert-mesh.io/role": "experts"}, False),
    ({"ray.io/node-id": "n1"}, {}, True),
])
def test_has_labels_wants_every_label_with_its_value(node, wanted, expected):
    assert has_labels(node, wanted) is expected
