"""A plain implementation of DeepSeek EPLB's published algorithm, for comparison only.

Written from the algorithm's description (deepseek-ai/EPLB, `eplb.py`): the same inputs, outputs
and greedy steps, written for reading rather than speed. Used by bench/bench_elastic.py and the
unit tests of `mesh.replication`; nothing in the mesh imports it.

    hierarchical (num_groups % num_nodes == 0):
      Step 1: pack expert groups onto nodes, num_groups / num_nodes groups each, by group load
      Step 2: within each node, replicate experts to num_replicas / num_nodes slots
              (greedy: one more copy for the expert with the highest load per copy)
      Step 3: within each node, pack the copies onto its GPUs, num_replicas / num_gpus each
    global: the same with one group and one node.

Like EPLB, nothing stops two copies of one expert from landing on one GPU.

Shape legend: L = layers, E = logical experts, P = physical slots (num_replicas), X = max copies.
"""

from __future__ import annotations

import torch

__all__ = ["balanced_packing", "replicate_experts", "rebalance_hierarchical", "rebalance_experts"]


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items into packs of equal count, heaviest item first into the lightest pack with room.

    weight: [R, n] float, n a multiple of num_packs.
    Returns pack_index [R, n] and rank_in_pack [R, n] (int64): the pack of each item and its
    position in that pack.
    """
    num_rows, num_items = weight.shape
    items_per_pack = num_items // num_packs
    pack_index = torch.empty(num_rows, num_items, dtype=torch.int64)
    rank_in_pack = torch.empty(num_rows, num_items, dtype=torch.int64)
    order = weight.sort(dim=-1, descending=True).indices.tolist()
    rows = weight.tolist()
    for row in range(num_rows):
        pack_load = [0.0] * num_packs
        pack_count = [0] * num_packs
        for item in order[row]:
            # Step 1: the lightest pack that still has room.
            open_packs = [p for p in range(num_packs) if pack_count[p] < items_per_pack]
            pack = min(open_packs, key=lambda p: pack_load[p])
            # Step 2: put the item there.
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_count[pack]
            pack_load[pack] += rows[row][item]
            pack_count[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each extra slot to the expert with the highest load per copy.

    weight: [R, n] float. Returns phy2log [R, num_physical] (slot i < n holds expert i, later
    slots the extra copies in the order they were added), replica_rank [R, num_physical] and
    logcnt [R, n] (int64).
    """
    num_rows, num_logical = weight.shape
    rows = torch.arange(num_rows)
    phy2log = torch.arange(num_physical).repeat(num_rows, 1)
    replica_rank = torch.zeros(num_rows, num_physical, dtype=torch.int64)
    logcnt = torch.ones(num_rows, num_logical, dtype=torch.int64)
    for slot in range(num_logical, num_physical):
        hottest = (weight / logcnt).argmax(dim=-1)
        phy2log[:, slot] = hottest
        replica_rank[:, slot] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, replica_rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """perm: [R, n] a permutation per row. Returns its inverse, [R, n]."""
    inverse = torch.empty_like(perm)
    inverse.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm).contiguous())
    return inverse


def rebalance_hierarchical(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's hierarchical policy. weight: [L, E] float.

    Returns phy2log [L, P], replica_rank [L, P], logcnt [L, E] (int64).
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    logical_per_node = num_logical // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # Step 1: pack groups onto nodes; renumber experts so that node n owns a contiguous block
    # ("node-major" ids: mlog).
    group_load = weight.view(num_layers, num_groups, group_size).sum(-1)
    node_of_group, rank_of_group = balanced_packing(group_load, num_nodes)
    first_mlog = (node_of_group * groups_per_node + rank_of_group) * group_size
    log2mlog = (first_mlog.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate within each node; rows are (layer, node).
    mlog_load = weight.gather(-1, mlog2log).view(-1, logical_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_replicas // num_nodes)

    # Step 3: pack each node's copies onto its GPUs; pphy = slot id in GPU order.
    copy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    gpu, rank_in_gpu = balanced_packing(copy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(gpu * slots_per_gpu + rank_in_gpu)

    # Step 4: back to layer-wide slot and expert ids.
    pphy2mlog = phy2mlog.gather(-1, pphy2phy).view(num_layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + torch.arange(num_nodes).view(1, -1, 1) * logical_per_node).flatten(-2)
    phy2log = mlog2log.gather(-1, pphy2mlog)
    replica_rank = phy_rank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return phy2log, replica_rank, logcnt


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EPLB's entry point: hierarchical if num_groups % num_nodes == 0, else global.

    weight: [L, E]. Returns phy2log [L, P], log2phy [L, E, X] (padded with -1), logcnt [L, E].
    """
    num_layers, num_logical = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, replica_rank, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, replica_rank, logcnt = rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_copies = int(logcnt.max())
    log2phy = torch.full((num_layers, num_logical, max_copies), -1, dtype=torch.int64)
    log2phy.view(num_layers, -1).scatter_(
        -1, phy2log * max_copies + replica_rank, torch.arange(num_replicas).expand(num_layers, -1).contiguous())
    return phy2log, log2phy, logcnt
