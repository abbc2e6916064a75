"""mesh.replication.rebalance_experts: EPLB's maps and their consistency, one copy of an expert per
device, expert groups kept on their node, balance against EPLB's algorithm (the plain implementation
in bench/eplb_reference.py) on the bench's matrices, kept placements, link costs, errors."""

from __future__ import annotations

import pytest
import torch

from bench.bench_elastic import device_load, duplicate_slots, max_over_mean, zipf_loads
from bench.eplb_reference import rebalance_experts as eplb_rebalance
from mesh import KEEP_TOLERANCE, rebalance_experts

PLAN_CASES = [
    # layers, experts, slots, groups, nodes, devices, keep_groups_on_node
    (1, 4, 4, 1, 1, 1, False),  # one device, no spare slot
    (2, 8, 12, 4, 2, 4, False),
    (2, 8, 12, 4, 2, 4, True),
    (3, 16, 24, 4, 2, 4, True),
    (4, 12, 36, 3, 1, 3, False),  # every expert on every device
    (2, 32, 40, 8, 2, 8, True),
    (3, 24, 48, 12, 3, 6, True),  # a node may host 1 to 4 groups of 2 experts
    (5, 64, 72, 8, 2, 8, False),
    (5, 64, 72, 8, 2, 8, True),
]
LOADS = ["zipf", "zeros", "equal"]

# The bench's matrices at small scale: 9 slots per device, 1/8 of them spare, 8 groups.
SMALL_BENCH = dict(num_layers=8, num_experts=64, num_tokens=8192)
SMALL_SHAPE = dict(num_replicas=72, num_groups=8, num_nodes=2, num_gpus=8)
BALANCE_CASES = [(alpha, seed) for alpha in (0.6, 1.0, 1.4) for seed in (0, 1)]


def make_weight(kind: str, num_layers: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    if kind == "zipf":
        return zipf_loads(num_layers, num_experts, 1.2, 64 * num_experts, seed)
    if kind == "zeros":
        return torch.zeros(num_layers, num_experts)
    return torch.full((num_layers, num_experts), 7.0)


def assert_plan(phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor, num_layers: int,
                num_experts: int, num_replicas: int, num_gpus: int) -> None:
    """EPLB's shapes and meaning, the three maps agree, every expert has a copy, no device holds two
    copies of one expert."""
    assert phy2log.shape == (num_layers, num_replicas) and logcnt.shape == (num_layers, num_experts)
    assert log2phy.shape == (num_layers, num_experts, int(logcnt.max()))
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert bool((logcnt >= 1).all()) and bool((logcnt.sum(1) == num_replicas).all())
    counted = torch.zeros_like(logcnt).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counted, logcnt)
    copy_rank = torch.arange(log2phy.shape[2])
    is_copy = copy_rank < logcnt.unsqueeze(-1)  # [L, E, X]
    assert bool((log2phy[~is_copy] == -1).all())
    slots = log2phy.clamp_min(0)
    owner = phy2log.gather(1, slots.flatten(1)).view_as(slots)
    assert bool((owner == torch.arange(num_experts).view(1, -1, 1))[is_copy].all())
    assert bool((slots[..., 1:] > slots[..., :-1])[is_copy[..., 1:]].all()), "a copy listed twice or out of order"
    assert duplicate_slots(phy2log, num_gpus) == 0


def group_nodes(phy2log: torch.Tensor, num_experts: int, num_groups: int, num_nodes: int) -> torch.Tensor:
    """[L, G] number of nodes holding copies of each group's experts."""
    num_layers, num_replicas = phy2log.shape
    node = (torch.arange(num_replicas) // (num_replicas // num_nodes)).expand(num_layers, -1)
    seen = torch.zeros(num_layers, num_groups * num_nodes, dtype=torch.int64)
    seen.scatter_(1, (phy2log // (num_experts // num_groups)) * num_nodes + node, 1)
    return seen.view(num_layers, num_groups, num_nodes).sum(-1)


@pytest.mark.parametrize("kind", LOADS)
@pytest.mark.parametrize("num_layers,num_experts,num_replicas,num_groups,num_nodes,num_gpus,keep", PLAN_CASES)
def test_maps_are_consistent_with_one_copy_per_device(kind, num_layers, num_experts, num_replicas, num_groups,
                                                       num_nodes, num_gpus, keep):
    weight = make_weight(kind, num_layers, num_experts)
    maps = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, keep_groups_on_node=keep)
    assert_plan(*maps, num_layers, num_experts, num_replicas, num_gpus)


@pytest.mark.parametrize("num_layers,num_experts,num_replicas,num_groups,num_nodes,num_gpus,keep",
                         [case for case in PLAN_CASES if case[-1]])
def test_keep_groups_on_node_keeps_every_group_on_one_node(num_layers, num_experts, num_replicas, num_groups,
                                                           num_nodes, num_gpus, keep):
    weight = make_weight("zipf", num_layers, num_experts)
    phy2log, _, _ = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, keep_groups_on_node=True)
    assert bool((group_nodes(phy2log, num_experts, num_groups, num_nodes) == 1).all())


def test_a_node_can_host_fewer_groups_and_replicate_them():
    """One hot group: its node takes just one cold group besides (the fewest that fill its slots) and
    spends the spare slots on the hot experts; EPLB's hierarchical policy gives each node 4 groups."""
    weight = torch.ones(1, 16)
    weight[0, :2] = 200.0  # group 0 (experts 0, 1) carries almost everything
    ours = rebalance_experts(weight, 32, 8, 2, 8, keep_groups_on_node=True)
    assert_plan(*ours, 1, 16, 32, 8)
    hot_node_groups = torch.unique(ours[0][0, :16] // 2)  # node 0 holds slots 0..15
    assert 0 in hot_node_groups and hot_node_groups.numel() == 2
    assert ours[2][0, :2].tolist() == [4, 4]  # a copy on each of the node's 4 devices
    eplb = eplb_rebalance(weight, 32, 8, 2, 8)
    ratio = [max_over_mean(device_load(weight, p, c, 8)) for p, _, c in (ours, eplb)]
    assert ratio[0] == pytest.approx((402 / 4) / (414 / 8), rel=1e-4)  # node 0's 4 devices share 402 of 414: optimal
    assert ratio[1] > 2.3, ratio


@pytest.mark.parametrize("alpha,seed", BALANCE_CASES)
def test_balance_at_least_eplb_on_small_bench_matrices(alpha, seed):
    weight = zipf_loads(SMALL_BENCH["num_layers"], SMALL_BENCH["num_experts"], alpha, SMALL_BENCH["num_tokens"], seed)
    shape = SMALL_SHAPE
    ratio = {}
    for name, maps in {
        "eplb global": eplb_rebalance(weight, shape["num_replicas"], 1, 1, shape["num_gpus"]),
        "eplb hierarchical": eplb_rebalance(weight, *shape.values()),
        "ours global": rebalance_experts(weight, *shape.values()),
        "ours on node": rebalance_experts(weight, *shape.values(), keep_groups_on_node=True),
    }.items():
        ratio[name] = max_over_mean(device_load(weight, maps[0], maps[2], shape["num_gpus"]))
    assert ratio["ours global"] <= ratio["eplb global"] + 1e-6, ratio
    assert ratio["ours on node"] <= ratio["eplb hierarchical"] + 1e-6, ratio


def test_bench_matrix_at_alpha_1_4_beats_eplb_global():
    """The bench's hardest matrix: EPLB's greedy leaves more heavy copies than devices."""
    weight = zipf_loads(58, 256, 1.4, 32_768, 0)
    ours = rebalance_experts(weight, 288, 8, 4, 32)
    eplb = eplb_rebalance(weight, 288, 1, 1, 32)
    assert max_over_mean(device_load(weight, ours[0], ours[2], 32)) < 1.03
    assert max_over_mean(device_load(weight, eplb[0], eplb[2], 32)) > 1.15
    assert duplicate_slots(eplb[0], 32) > 0 == duplicate_slots(ours[0], 32)


PRESERVE_CASES = [
    # layers, experts, slots, groups, nodes, devices, keep_groups_on_node, with link cost
    (4, 64, 72, 8, 2, 8, False, False),
    (4, 64, 72, 8, 2, 8, True, False),
    (4, 64, 72, 8, 2, 8, False, True),
    (3, 24, 48, 12, 3, 6, True, True),
]


@pytest.mark.parametrize("num_layers,num_experts,num_replicas,num_groups,num_nodes,num_gpus,keep,costly",
                         PRESERVE_CASES)
def test_current_placement_is_kept_when_loads_do_not_change(num_layers, num_experts, num_replicas, num_groups,
                                                            num_nodes, num_gpus, keep, costly):
    weight = make_weight("zipf", num_layers, num_experts)
    kwargs = dict(keep_groups_on_node=keep, link_cost=torch.linspace(0, 0.5, num_gpus) if costly else None)
    first = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, **kwargs)
    again = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, current_phy2log=first[0], **kwargs)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("keep,costly", [(False, False), (True, False), (False, True)])
def test_small_load_changes_keep_most_copies_in_place(keep, costly):
    """2% noise on the loads: most (device, expert) pairs stay, and the busiest device (load x
    (1 + link_cost)) is within KEEP_TOLERANCE of the mean above a fresh plan's."""
    weight = zipf_loads(**SMALL_BENCH, alpha=1.0, seed=0)
    noisy = weight * (1 + 0.02 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    cost = torch.linspace(0, 0.5, 8) if costly else torch.zeros(8)
    kwargs = dict(keep_groups_on_node=keep, link_cost=cost)
    before = rebalance_experts(weight, *SMALL_SHAPE.values(), **kwargs)[0]
    kept = rebalance_experts(noisy, *SMALL_SHAPE.values(), current_phy2log=before, **kwargs)
    fresh = rebalance_experts(noisy, *SMALL_SHAPE.values(), **kwargs)

    def in_place(phy2log):  # fraction of (device, expert) pairs of `before` that phy2log still holds
        old, new = before.view(8, 8, 9), phy2log.view(8, 8, 9)
        return float((new.unsqueeze(-1) == old.unsqueeze(-2)).any(-1).float().mean())

    assert in_place(kept[0]) >= 0.8 and in_place(kept[0]) >= in_place(fresh[0]) + 0.2
    kept_load, fresh_load = (device_load(noisy, p, c, 8) * (1 + cost) for p, _, c in (kept, fresh))
    slack = KEEP_TOLERANCE * device_load(noisy, *fresh[::2], 8).mean(1)
    assert bool((kept_load.max(1).values <= fresh_load.max(1).values + slack + 1e-3).all())


@pytest.mark.parametrize("alpha", [0.6, 1.4])
def test_a_new_sample_keeps_the_busiest_device_within_tolerance_of_a_fresh_plan(alpha):
    """The placement in force was planned on an earlier sample of the same popularity (the bench's
    case): whatever the policy keeps, its busiest device stays within KEEP_TOLERANCE of the mean
    above a fresh plan's."""
    earlier = zipf_loads(**SMALL_BENCH, alpha=alpha, seed=1)
    weight = zipf_loads(**SMALL_BENCH, alpha=alpha, seed=2)
    current = rebalance_experts(earlier, *SMALL_SHAPE.values())[0]
    kept = rebalance_experts(weight, *SMALL_SHAPE.values(), current_phy2log=current)
    fresh = rebalance_experts(weight, *SMALL_SHAPE.values())
    assert float((kept[0] == current).float().mean()) >= 0.4  # a fresh plan keeps 1-2%
    kept_load, fresh_load = (device_load(weight, p, c, 8) for p, _, c in (kept, fresh))
    slack = KEEP_TOLERANCE * fresh_load.mean(1)
    assert bool((kept_load.max(1).values <= fresh_load.max(1).values + slack + 1e-3).all())


def test_current_placement_with_repeats_and_moves_stays_valid():
    """A current placement with two copies of an expert on one device, whose kept copies leave only
    devices that already hold the expert that is still to place: the policy moves another copy."""
    current = torch.tensor([[2, 1, 3, 1, 0, 0]])
    maps = rebalance_experts(torch.tensor([[2.0, 3.0, 0.0, 1.0]]), 6, 4, 1, 3, current_phy2log=current)
    assert_plan(*maps, 1, 4, 6, 3)


def test_empty_slots_in_the_current_placement_are_filled_and_the_rest_kept():
    """-1 marks a slot the placement in force leaves empty (a device holding fewer copies)."""
    current = torch.tensor([[0, 4, 1, 5, 2, -1, 3, -1]])  # devices of 2 slots; devices 2, 3 hold one copy
    weight = torch.tensor([[5.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    phy2log, _, logcnt = maps = rebalance_experts(weight, 8, 1, 1, 4, current_phy2log=current)
    assert_plan(*maps, 1, 6, 8, 4)
    assert logcnt[0].tolist() == [3, 1, 1, 1, 1, 1]  # the two empty slots went to the hot expert
    assert int((phy2log == current).sum()) == 6  # every copy in force stayed in its slot


@pytest.mark.parametrize("max_copies", [2, 3, 4])
def test_max_copies_bounds_the_copies_of_the_hottest_expert(max_copies):
    weight = torch.tensor([[100.0, 1.0, 1.0, 1.0]])  # 4 spare slots on 4 devices: all would go to expert 0
    maps = rebalance_experts(weight, 8, 1, 1, 4, max_copies=max_copies)
    assert_plan(*maps, 1, 4, 8, 4)
    assert int(maps[2].max()) == max_copies == int(maps[2][0, 0])


def test_link_cost_moves_load_off_costly_devices():
    weight = zipf_loads(**SMALL_BENCH, alpha=0.6, seed=0)
    cost = torch.tensor([0.0] * 4 + [0.5] * 4)  # node 1's devices are costly
    phy2log, _, logcnt = rebalance_experts(weight, *SMALL_SHAPE.values(), link_cost=cost)
    load = device_load(weight, phy2log, logcnt, 8)
    assert float(load[:, 4:].mean() / load[:, :4].mean()) < 0.8
    effective = load * (1 + cost)
    assert max_over_mean(effective) < 1.05  # balanced in load times (1 + cost)
    plain = rebalance_experts(weight, *SMALL_SHAPE.values())
    assert all(torch.equal(a, b) for a, b in
               zip(plain, rebalance_experts(weight, *SMALL_SHAPE.values(), link_cost=torch.zeros(8))))


BASE = dict(weight=torch.ones(2, 8), num_replicas=12, num_groups=4, num_nodes=2, num_gpus=4)
ERROR_CASES = [
    # changed arguments, name in the message
    (dict(weight=torch.ones(8)), "weight"),
    (dict(weight=-torch.ones(2, 8)), "weight"),
    (dict(weight=torch.full((2, 8), float("nan"))), "weight"),
    (dict(weight=torch.ones(2, 8, dtype=torch.bool)), "weight"),
    (dict(num_replicas=10), "num_replicas"),  # not a multiple of num_gpus
    (dict(num_replicas=4), "num_replicas"),  # fewer slots than experts
    (dict(num_replicas=36), "num_replicas"),  # a device would hold an expert twice
    (dict(num_gpus=0), "num_gpus"),
    (dict(num_nodes=3), "num_nodes"),
    (dict(num_groups=0), "num_groups"),
    (dict(num_groups=3, keep_groups_on_node=True), "num_groups"),  # does not divide 8 experts
    (dict(num_groups=1, keep_groups_on_node=True), "num_groups"),  # one group for two nodes
    (dict(current_phy2log=torch.zeros(2, 5, dtype=torch.int64)), "current_phy2log"),
    (dict(current_phy2log=torch.zeros(2, 12)), "current_phy2log"),
    (dict(current_phy2log=torch.full((2, 12), 8)), "current_phy2log"),
    (dict(link_cost=torch.ones(3)), "link_cost"),
    (dict(link_cost=-torch.ones(4)), "link_cost"),
    (dict(current_phy2log=torch.full((2, 12), -2)), "current_phy2log"),
    (dict(max_copies=0), "max_copies"),
    (dict(max_copies=1), "max_copies"),  # 12 slots for 8 experts need a second copy of some
]


@pytest.mark.parametrize("change,name", ERROR_CASES)
def test_bad_input_raises_value_error_naming_the_argument(change, name):
    with pytest.raises(ValueError, match=name):
        rebalance_experts(**{**BASE, **change})


def test_eplb_reference_wastes_slots_on_duplicates_and_keeps_its_maps_consistent():
    """The reference is EPLB's algorithm: valid maps, but copies of one expert may share a device."""
    weight = zipf_loads(**SMALL_BENCH, alpha=1.4, seed=0)
    phy2log, log2phy, logcnt = eplb_rebalance(weight, *SMALL_SHAPE.values())
    counted = torch.zeros_like(logcnt).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counted, logcnt) and log2phy.shape[:2] == weight.shape
    assert duplicate_slots(phy2log, 8) > 0
    assert bool((group_nodes(phy2log, 64, 8, 2) == 1).all())  # hierarchical: groups stay on their node
