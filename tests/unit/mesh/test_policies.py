"""Control-plane policies with no Ray and no clock: initial placement, autoscaling, load window."""

from __future__ import annotations

import itertools

import pytest
import torch

from mesh.autoscale import plan_autoscale
from mesh.placement import initial_assignment, restore_node, spread_groups
from router_service.load import LoadWindow, coactivated_pairs


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
def test_coactivated_pairs_count_every_pair_of_every_token(k):
    generator = torch.Generator().manual_seed(k)
    ids = torch.stack([torch.randperm(16, generator=generator)[:k] for _ in range(50)])  # [T, k]
    expected: dict = {}
    for row in ids.tolist():
        for a, b in itertools.combinations(sorted(row), 2):
            expected[(a, b)] = expected.get((a, b), 0) + 1
    assert coactivated_pairs(ids, 16) == expected
    assert coactivated_pairs(ids[:0], 16) == {}
