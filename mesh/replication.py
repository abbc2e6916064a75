"""Replication and placement of expert copies: a pure policy on load tensors (no Ray, no clock).

    weight [L, E] -> [1: groups to nodes] -> [2: copies per expert] -> [3: pack copies onto devices]
                  -> [4: pairwise exchange] -> [5: keep current copies where it costs little] -> maps

Takes DeepSeek EPLB's inputs and returns its three maps (phy2log, log2phy, logcnt, same shapes and
meaning), so the two compare on one matrix. Unlike EPLB it never puts two copies of one expert on
one device; it picks the number of copies with the packing in mind (EPLB's greedy can leave more
heavy copies than devices, so two of them share one); and with `keep_groups_on_node` a node's room
is counted in slots, not in an equal share of groups.

Words: a device is one of EPLB's GPUs (an expert-group actor of the mesh, see DESIGN.md); an
expert group is EPLB's group of consecutive logical experts (num_groups of them) that
`keep_groups_on_node` keeps on one node. Device d has slots d * S .. (d + 1) * S - 1 and sits on
node d // (D // N). Internally each (layer, node) is one row: the policy for one node of one layer
is independent of the others once Step 1 has decided which experts the node hosts (the global
policy has one node).

Shape legend: L = layers, E = logical experts, P = physical slots (num_replicas), D = devices
(num_gpus), S = P // D slots per device, N = nodes, G = expert groups, X = most copies of an expert,
R = rows (L * N, or L for the global policy), M = experts of a row (E for the global policy; the
row helpers below write E for it), Dn = devices of a row, K = spare slots of a row, C = candidate
copy counts of a row, I = E + 2K (expert, copy count) items, H = device pairs of a row.
"""

from __future__ import annotations

import torch

__all__ = ["KEEP_TOLERANCE", "rebalance_experts"]

KEEP_TOLERANCE = 0.05
"""With `current_phy2log`, a layer keeps the plan that leaves most copies in place unless its busiest
device carries more than this fraction of the mean device load above the fresh plan's busiest."""

_INF = float("inf")
_FORBID = 1e30  # added to a forbidden swap's load: an additive mask keeps the [n, H, S, S] work plain arithmetic


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      *, keep_groups_on_node: bool = False, current_phy2log: torch.Tensor | None = None,
                      link_cost: torch.Tensor | None = None, max_copies: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies per expert and their slots, balancing device load; EPLB's signature and outputs.

    weight: [L, E] load per logical expert (tokens or tokens/s; any real dtype, >= 0).
    num_replicas: P, physical slots in all, a multiple of num_gpus, E <= P <= E * num_gpus.
    num_groups: G, expert groups of E // G consecutive experts (only used with keep_groups_on_node).
    num_nodes: N, nodes; num_gpus must be a multiple of it.
    num_gpus: D, devices.
    keep_groups_on_node: keep every copy of every expert of a group on one node (EPLB's hierarchical
        constraint), else place copies anywhere (EPLB's global policy).
    current_phy2log: [L, P] int, the placement in force (-1: an empty slot). A layer keeps as many of
        its copies in place (same device; same slot where possible) as the new copy counts allow, unless
        that leaves the busiest device more than KEEP_TOLERANCE of the mean device load above a fresh plan's.
    link_cost: [D] float >= 0, relative cost of sending a token to each device: device d's load counts
        as load * (1 + link_cost[d]) when balancing, so costly devices get less load.
    max_copies: most copies of one expert (default and at most: devices of a row); num_replicas must
        leave no expert more.

    Returns phy2log [L, P] (expert of each slot), log2phy [L, E, X] (slots of each expert's copies in
    increasing order, padded with -1) and logcnt [L, E] (copies per expert), all int64. No device holds
    two copies of one expert. Raises ValueError naming the argument on bad input.
    """
    _validate(weight, num_replicas, num_groups, num_nodes, num_gpus, keep_groups_on_node, current_phy2log, link_cost,
              max_copies)
    weight = weight.detach().to("cpu", torch.float32)
    num_layers, num_logical = weight.shape
    rows_per_layer = num_nodes if keep_groups_on_node else 1
    devices_per_row, slots_per_device = num_gpus // rows_per_layer, num_replicas // num_gpus
    cost = torch.zeros(num_gpus) if link_cost is None else link_cost.detach().to("cpu", torch.float32)
    factor = (1 + cost).view(rows_per_layer, devices_per_row).repeat(num_layers, 1)  # [R, Dn]

    # Step 1: the experts of each row (layer, node), M of them: all, or the groups given to that node.
    # From here on experts are numbered within their row; member maps them back.
    if keep_groups_on_node:
        member, is_member = _node_members(weight, num_replicas, num_groups, num_nodes, num_gpus)  # [R, M]
    else:
        member = torch.arange(num_logical).expand(num_layers, -1)
        is_member = torch.ones(num_layers, num_logical, dtype=torch.bool)
    row_weight = weight.repeat_interleave(rows_per_layer, dim=0).gather(1, member) * is_member  # [R, M]

    # Step 2: copies per expert, within each row's slots.
    most = devices_per_row if max_copies is None else min(max_copies, devices_per_row)
    count = _replicate(row_weight, is_member, num_replicas // rows_per_layer, most, slots_per_device)
    copy_load = row_weight / count.clamp_min(1)  # [R, M]

    # Steps 3-4: pack the copies, then even out pairs of devices: plan = (has [R, Dn, M], slots [R, Dn, S]).
    # Step 5: with a current placement, a plan that keeps its copies where that costs little.
    if current_phy2log is None:
        plan = _exchange(*_pack(copy_load, count, None, factor, slots_per_device), copy_load, factor)
    else:
        current_phy2log = current_phy2log.detach().cpu().long()
        kept = _keep_current(current_phy2log, count, member, is_member, devices_per_row, num_logical)
        slack = KEEP_TOLERANCE * weight.sum(1) / num_gpus  # [L]
        plan = _prefer_kept(kept, copy_load, count, factor, slack, slots_per_device)
    slots = member.gather(1, plan[1].flatten(1))  # [R, Dn * S] global expert ids
    phy2log = _slots(slots.view(num_layers, num_gpus, slots_per_device), current_phy2log)
    logcnt = torch.zeros(member.shape[0], num_logical, dtype=torch.int64).scatter_add_(1, member, count)
    logcnt = logcnt.view(num_layers, rows_per_layer, num_logical).sum(1)
    return phy2log, _log2phy(phy2log, logcnt), logcnt


def _validate(weight, num_replicas, num_groups, num_nodes, num_gpus, keep_groups_on_node, current_phy2log,
              link_cost, max_copies) -> None:
    """Raise ValueError naming the first bad argument."""
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype == torch.bool
            or weight.is_complex()):
        raise ValueError(f"weight must be a real [layers, num_logical_experts] tensor, got "
                         f"{getattr(weight, 'shape', type(weight))}")
    num_layers, num_logical = weight.shape
    if num_layers < 1 or num_logical < 1:
        raise ValueError(f"weight must have at least one layer and one expert, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError("weight must be finite and >= 0")
    for name, value in (("num_gpus", num_gpus), ("num_nodes", num_nodes), ("num_groups", num_groups)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas!r} must be a multiple of num_gpus={num_gpus}")
    if not num_logical <= num_replicas <= num_logical * num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be in [num_logical_experts={num_logical}, "
                         f"num_logical_experts * num_gpus={num_logical * num_gpus}]: one copy of every expert, "
                         f"at most one copy of an expert per device")
    if keep_groups_on_node:
        _validate_groups(num_logical, num_replicas, num_groups, num_nodes, num_gpus)
    if current_phy2log is not None:
        if (not isinstance(current_phy2log, torch.Tensor) or current_phy2log.is_floating_point()
                or current_phy2log.dtype == torch.bool or tuple(current_phy2log.shape) != (num_layers, num_replicas)):
            raise ValueError(f"current_phy2log must be an integer tensor of shape {(num_layers, num_replicas)}, "
                             f"got {getattr(current_phy2log, 'shape', type(current_phy2log))}")
        if bool((current_phy2log < -1).any()) or bool((current_phy2log >= num_logical).any()):
            raise ValueError(f"current_phy2log values must be expert ids in [0, {num_logical}) or -1 (empty)")
    if max_copies is not None:
        if not isinstance(max_copies, int) or isinstance(max_copies, bool) or max_copies < 1:
            raise ValueError(f"max_copies must be an int >= 1, got {max_copies!r}")
        if num_replicas > num_logical * max_copies:
            raise ValueError(f"num_replicas={num_replicas} needs more than max_copies={max_copies} copies of "
                             f"some of the {num_logical} experts")
    if link_cost is not None:
        if not isinstance(link_cost, torch.Tensor) or tuple(link_cost.shape) != (num_gpus,):
            raise ValueError(f"link_cost must be a tensor of shape ({num_gpus},), got "
                             f"{getattr(link_cost, 'shape', type(link_cost))}")
        if not bool(torch.isfinite(link_cost).all()) or bool((link_cost < 0).any()):
            raise ValueError("link_cost must be finite and >= 0")


def _group_limits(num_logical: int, num_replicas: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[int, int]:
    """Fewest and most groups one node can host: enough experts to fill its slots with at most one
    copy of an expert per device, no more experts than slots."""
    group_size = num_logical // num_groups
    slots_per_node = num_replicas // num_nodes
    devices_per_node = num_gpus // num_nodes
    fewest = max(1, -(-slots_per_node // (group_size * devices_per_node)))
    return fewest, slots_per_node // group_size


def _validate_groups(num_logical, num_replicas, num_groups, num_nodes, num_gpus) -> None:
    if num_logical % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide num_logical_experts={num_logical}")
    fewest, most = _group_limits(num_logical, num_replicas, num_groups, num_nodes, num_gpus)
    if not num_nodes * fewest <= num_groups <= num_nodes * most:
        raise ValueError(f"num_groups={num_groups} groups of {num_logical // num_groups} experts cannot fill "
                         f"num_nodes={num_nodes} nodes of {num_replicas // num_nodes} slots on "
                         f"{num_gpus // num_nodes} devices each (a node needs {fewest} to {most} groups)")


def _assign_groups_to_nodes(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                            num_gpus: int) -> torch.Tensor:
    """Heaviest group first onto the least-loaded node with room for its experts.

    Room is counted in slots, not in an equal share of groups: a node that takes a hot group may
    end up with fewer groups and spend the spare slots on copies of that group's hot experts.
    weight: [L, E]. Returns group_node [L, G] int64.
    """
    num_layers, num_logical = weight.shape
    fewest, most = _group_limits(num_logical, num_replicas, num_groups, num_nodes, num_gpus)
    group_load = weight.view(num_layers, num_groups, -1).sum(-1)  # [L, G]
    order = group_load.argsort(dim=1, descending=True, stable=True)
    node_load = torch.zeros(num_layers, num_nodes, dtype=weight.dtype)
    node_groups = torch.zeros(num_layers, num_nodes, dtype=torch.int64)
    group_node = torch.empty(num_layers, num_groups, dtype=torch.int64)
    rows = torch.arange(num_layers)
    for rank in range(num_groups):
        group = order[:, rank]  # [L]
        # Step 1: nodes with room; once the groups left just suffice for every node's fewest, only
        # the nodes still short of theirs.
        short = (fewest - node_groups).clamp_min(0)  # [L, N]
        must_fill = (short.sum(1) >= num_groups - rank).unsqueeze(1)
        is_open = (node_groups < most) & (~must_fill | (short > 0))
        # Step 2: the least-loaded open node takes the group.
        node = node_load.masked_fill(~is_open, _INF).argmin(1)
        group_node[rows, group] = node
        node_load[rows, node] += group_load[rows, group]
        node_groups[rows, node] += 1
    return group_node


def _node_members(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts of each (layer, node) row: its groups' experts, then padding (other groups'
    experts, not members) up to M = the most groups a node can host times the group size.

    weight: [L, E]. Returns member [R, M] (global expert ids) and is_member [R, M] bool.
    """
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    most = _group_limits(num_logical, num_replicas, num_groups, num_nodes, num_gpus)[1]
    group_node = _assign_groups_to_nodes(weight, num_replicas, num_groups, num_nodes, num_gpus)  # [L, G]
    node = torch.arange(num_nodes).repeat(num_layers).unsqueeze(1)  # [R, 1]
    is_mine = group_node.repeat_interleave(num_nodes, dim=0) == node  # [R, G]
    group = (~is_mine).to(torch.int8).argsort(dim=1, stable=True)[:, :most]  # [R, most], the node's first
    member = (group.unsqueeze(2) * group_size + torch.arange(group_size)).flatten(1)
    return member, is_mine.gather(1, group).repeat_interleave(group_size, dim=1)


def _replicate(weight: torch.Tensor, is_member: torch.Tensor, num_slots: int, max_copies: int,
               slots_per_device: int) -> torch.Tensor:
    """Copies per expert of each row.

    Candidate k gives the first k of a row's K spare slots to EPLB's greedy (one more copy for the
    expert with the highest load per copy, at most one per device) and the other K - k one each to
    the coldest experts, whose copies cost nothing. Of k = K, K - 1, .., K - Dn // 2 - 1 it keeps the
    one with the lowest bound on the busiest device (ties: the most greedy copies), so that splitting
    a hot expert does not leave more heavy copies than the devices can take without doubling up.

    weight, is_member: [R, E] (weight 0 off the row). Returns count [R, E] int64 (0 off the row).
    """
    num_rows, num_logical = weight.shape
    count = is_member.long()
    spare = num_slots - count.sum(1)  # [R]
    num_spare = int(spare.max())
    if num_spare == 0:
        return count
    # Step 1: the greedy's choices in order.
    added, copies_after = _greedy_steps(weight, is_member, spare, max_copies)
    # Step 2: the coldest experts that the greedy never touched take the rest (filler order).
    touched = torch.zeros(num_rows, num_logical + 1, dtype=torch.bool).scatter_(1, added, True)[:, :-1]
    is_filler = is_member & ~touched
    coldest = weight.masked_fill(~is_filler, _INF).argsort(dim=1, stable=True)[:, :num_spare]
    num_fillers = is_filler.sum(1)  # [R]
    filler = torch.full_like(added, num_logical)  # [R, K], num_logical past the row's fillers
    filler[:, :coldest.shape[1]] = coldest.masked_fill(torch.arange(coldest.shape[1]) >= num_fillers.unsqueeze(1),
                                                       num_logical)
    # Step 3: bound each candidate, keep the best.
    bound = _candidate_bounds(weight, is_member, added, copies_after, filler, num_fillers, spare, max_copies,
                              slots_per_device)
    best = (spare - bound.argmin(1)).unsqueeze(1)  # [R, 1] greedy steps taken
    taken = (torch.arange(num_spare) < best).long()
    filled = (torch.arange(num_spare) < spare.unsqueeze(1) - best).long()
    count = torch.cat([count, torch.zeros(num_rows, 1, dtype=torch.int64)], 1)
    return count.scatter_add_(1, added, taken).scatter_add_(1, filler, filled)[:, :-1]


def _greedy_steps(weight: torch.Tensor, is_member: torch.Tensor, spare: torch.Tensor,
                  max_copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EPLB's greedy without its loop: step after step it gives a copy to the expert with the highest
    load per copy w / c, so its steps are the K largest w / c over experts and c = 1 .. max_copies - 1,
    heaviest first; only the K heaviest experts can take part.

    weight, is_member: [R, E]; spare: [R]. Returns added [R, K] (the expert of each step, E past the
    row's spare slots) and copies_after [R, K] (its copies after the step).
    """
    num_rows, num_logical = weight.shape
    num_spare = int(spare.max())
    load, expert = weight.masked_fill(~is_member, -1).topk(min(num_spare, num_logical), dim=1)  # [R, K']
    per_copy = load.unsqueeze(2) / torch.arange(1, min(num_spare, max_copies - 1) + 1)  # [R, K', X']
    index = per_copy.flatten(1).topk(num_spare, dim=1).indices  # [R, K], heaviest first
    added = expert.gather(1, index // per_copy.shape[2])
    added = torch.where(torch.arange(num_spare) < spare.unsqueeze(1), added, num_logical)
    is_same = added.unsqueeze(2) == added.unsqueeze(1)  # [R, K, K]
    copies_after = 1 + torch.tril(is_same).sum(2)
    return added, copies_after


def _candidate_bounds(weight: torch.Tensor, is_member: torch.Tensor, added: torch.Tensor, copies_after: torch.Tensor,
                      filler: torch.Tensor, num_fillers: torch.Tensor, spare: torch.Tensor, num_devices: int,
                      slots_per_device: int) -> torch.Tensor:
    """Lower bound on the busiest device of candidates of `_replicate`, without building them.

    With a candidate's copies sorted heaviest first (c_1 >= c_2 >= ...), some device holds c_1; of
    c_1 .. c_{Dn+1+j}, at least 2j + 2 share j + 1 devices, so one device holds two, the heavier at
    least c_{Dn-j}, the other at least c_{Dn+1+j}; each such device also holds its other copies, at
    least the lightest ones; and the busiest device carries at least the mean.

    weight, is_member: [R, E]; added (greedy step k's expert), copies_after (its copies after step k),
    filler: [R, K]; num_fillers, spare: [R]. Returns bound [R, C] for k = spare - i, i = 0 .. C - 1
    (inf where a candidate needs more fillers than there are).
    """
    num_spare = added.shape[1]
    k = spare.view(-1, 1, 1) - torch.arange(min(num_spare, num_devices // 2 + 1) + 1).view(1, -1, 1)  # [R, C, 1]
    item_load, copies, lo, hi = _candidate_items(weight, is_member, added, copies_after, filler, spare)
    # Step 1: the heaviest 2Dn and the lightest S - 1 copies. A candidate leaves some items idle (at
    # most 3K); a slice with 2K items to spare is most often enough, and a short one only weakens the bound.
    never = hi < 0
    heavy = item_load.masked_fill(never, -1).argsort(dim=1, descending=True)[:, :2 * num_devices + 2 * num_spare]
    light = item_load.masked_fill(never, _INF).argsort(dim=1)[:, :slots_per_device + 2 * num_spare]
    k = k.to(weight.dtype)
    top = _nth_copy_load(item_load, copies, lo, hi, heavy, 2 * num_devices, k)  # [R, C, 2Dn]: c_1 .. c_2Dn
    bottom = _nth_copy_load(item_load, copies, lo, hi, light, slots_per_device, k).cumsum(2)  # lightest sums
    # Step 2: the bound.
    single = top[..., 0] + (bottom[..., slots_per_device - 2] if slots_per_device > 1 else 0)
    bound = torch.maximum(single, (weight.sum(1) / num_devices).unsqueeze(1))
    if slots_per_device > 1:
        pair = top[..., :num_devices].flip(2) + top[..., num_devices:]  # [R, C, Dn]: c_{Dn-j} + c_{Dn+1+j}
        lightest = bottom[..., slots_per_device - 3] if slots_per_device > 2 else 0
        bound = torch.maximum(bound, pair.amax(2) + lightest)
    is_possible = (k >= 0) & (spare.view(-1, 1, 1) - k <= num_fillers.view(-1, 1, 1))
    return bound.masked_fill(~is_possible.squeeze(2), _INF)


def _candidate_items(weight: torch.Tensor, is_member: torch.Tensor, added: torch.Tensor, copies_after: torch.Tensor,
                     filler: torch.Tensor, spare: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every candidate's copies come from I items (expert, copy count c), each present as c copies
    of load w / c in the candidates lo <= k <= hi: an untouched expert's single copy (until a greedy
    step or a filler takes it), each greedy step's new count (until the expert's next step), each
    filler's two copies.

    weight, is_member: [R, E]; added, copies_after, filler: [R, K]; spare: [R]. Returns item_load,
    copies, lo, hi: [R, I] float (hi = -1: never held).
    """
    num_rows, num_logical = weight.shape
    num_spare = added.shape[1]
    step = torch.arange(num_spare).expand(num_rows, -1)
    first_step = torch.full((num_rows, num_logical + 1), num_spare).scatter_reduce_(1, added, step, reduce="amin")
    later = torch.triu(added.unsqueeze(2) == added.unsqueeze(1), diagonal=1)  # [R, K, K] same expert, later step
    next_step = torch.where(later.any(2), later.long().argmax(2), num_spare)
    filler_rank = torch.full((num_rows, num_logical + 1), num_spare).scatter_(1, filler, step)
    expert = torch.cat([torch.arange(num_logical).expand(num_rows, -1), added, filler], 1).clamp_max(num_logical - 1)
    single = torch.ones_like(added[:, :1]).expand(-1, num_logical)
    copies = torch.cat([single, copies_after, torch.full_like(filler, 2)], 1)
    lo = torch.cat([(spare.unsqueeze(1) - filler_rank[:, :-1]).clamp_min(0), step + 1, torch.zeros_like(filler)], 1)
    hi = torch.cat([torch.where(is_member, first_step[:, :-1], -1),
                    torch.where(added < num_logical, next_step, -1),
                    torch.where(filler < num_logical, spare.unsqueeze(1) - 1 - step, -1)], 1)
    copies = copies.to(weight.dtype)
    return weight.gather(1, expert) / copies, copies, lo.to(weight.dtype), hi.to(weight.dtype)


def _nth_copy_load(item_load: torch.Tensor, copies: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   order: torch.Tensor, num_positions: int, candidate: torch.Tensor) -> torch.Tensor:
    """Per candidate, the load of its first `num_positions` copies, walking the items in `order`
    (0 past the copies it holds there). item_load, copies, lo, hi: [R, I] float; order: [R, I'];
    candidate: [R, C, 1] float, their k. Returns [R, C, num_positions]."""
    item_load, copies, lo, hi = (t.gather(1, order).unsqueeze(1) for t in (item_load, copies, lo, hi))
    num_rows, num_candidates, num_items = order.shape[0], candidate.shape[1], order.shape[1]
    # Step 1: copies held, as arithmetic (1 where lo <= k <= hi): [R, C, I'].
    held = copies * (candidate - lo + 1).clamp(0, 1) * (hi - candidate + 1).clamp(0, 1)
    upto = held.cumsum(2)
    # Step 2: each held item marks the position of its first copy (idle items mark past the end); the
    # item at a position is the last one marked at or before it.
    first = (upto - held + (1 - held.clamp_max(1)) * num_positions).clamp_max(num_positions).long()
    item = torch.zeros(num_rows, num_candidates, num_positions + 1, dtype=torch.int64)
    item.scatter_reduce_(2, first, torch.arange(num_items).expand(num_rows, num_candidates, -1), reduce="amax")
    load = item_load.expand(-1, num_candidates, -1).gather(2, item[..., :num_positions].cummax(2).values)
    return load * (torch.arange(num_positions) < upto[..., -1:])


def _keep_current(current_phy2log: torch.Tensor, count: torch.Tensor, member: torch.Tensor, is_member: torch.Tensor,
                  devices_per_row: int, num_logical: int) -> torch.Tensor:
    """Copies of the current placement that the new plan can keep: one per device and expert, on a
    device of the expert's row, at most `count` of each expert (the lowest-numbered devices).

    current_phy2log: [L, P] global ids; count, member, is_member: [R, M]. Returns has [R, Dn, M] bool.
    """
    num_rows, width = count.shape
    # Step 1: each row's number for every expert: [R, E], `width` for experts not in the row.
    local = torch.full((num_rows, num_logical + 1), width, dtype=torch.int64)
    local.scatter_(1, torch.where(is_member, member, num_logical), torch.arange(width).expand(num_rows, -1))
    current = current_phy2log.view(num_rows, -1)  # [R, Dn * S]: a row's devices are consecutive
    current = local.gather(1, current.masked_fill(current < 0, num_logical))  # empty slots: in no row
    # Step 2: mark (device, expert), then keep the first `count` devices of each expert.
    device = torch.arange(current.shape[1]) // (current.shape[1] // devices_per_row)  # [Dn * S]
    has = torch.zeros(num_rows, devices_per_row * (width + 1), dtype=torch.bool)
    has.scatter_(1, device * (width + 1) + current, True)
    has = has.view(num_rows, devices_per_row, width + 1)[..., :width]
    return has & (has.int().cumsum(1) <= count.unsqueeze(1))


def _prefer_kept(kept: torch.Tensor, copy_load: torch.Tensor, count: torch.Tensor, factor: torch.Tensor,
                 slack: torch.Tensor, slots_per_device: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the first plan within `slack` [L] of the best: the kept copies plus the rest packed,
    the same after pairwise exchange, else a fresh plan (pack, exchange). The best is a lower bound on
    any plan's busiest device where a kept plan is that close to it, else the fresh plan's busiest
    device. Each plan is built only for the layers that the plans before it left open.

    kept: [R, Dn, E] bool (a layer's rows are consecutive); copy_load, count: [R, E]; factor: [R, Dn].
    Returns (has [R, Dn, E], slots [R, Dn, S]).
    """
    num_layers = slack.shape[0]
    rows_per_layer = kept.shape[0] // num_layers
    busiest = (lambda plan: _busiest(plan[1], copy_load, factor).view(num_layers, -1).max(1).values)  # [L]
    rows_of = (lambda is_layer: is_layer.repeat_interleave(rows_per_layer).nonzero().flatten())
    # Step 1: close enough to a lower bound on any plan's busiest device: no further plan needed.
    limit = _lower_bound(copy_load, count, factor).view(num_layers, -1).max(1).values + slack
    packed = _pack(copy_load, count, kept, factor, slots_per_device)
    row = rows_of(busiest(packed) > limit)
    exchanged = _with_rows(packed, row, lambda r: _exchange(packed[0][r], packed[1][r], copy_load[r], factor[r]))
    # Step 2: the layers still open measure against a fresh plan of their rows.
    is_open = busiest(exchanged) > limit
    row = rows_of(is_open)
    fresh = _with_rows(exchanged, row, lambda r: _exchange(*_pack(copy_load[r], count[r], None, factor[r],
                                                                  slots_per_device), copy_load[r], factor[r]))
    limit = torch.where(is_open, busiest(fresh) + slack, limit)
    choice = torch.where(busiest(packed) <= limit, 0, torch.where(busiest(exchanged) <= limit, 1, 2))  # [L]
    choice = choice.repeat_interleave(rows_per_layer).view(-1, 1, 1)
    return tuple(torch.where(choice == 0, p, torch.where(choice == 1, e, f))
                 for p, e, f in zip(packed, exchanged, fresh))


def _with_rows(plan: tuple[torch.Tensor, torch.Tensor], row: torch.Tensor, make) -> tuple[torch.Tensor, torch.Tensor]:
    """plan (has [R, Dn, E], slots [R, Dn, S]) with its rows `row` [n] replaced by make(row), a plan of
    n rows; plan itself where row is empty."""
    if row.numel() == 0:
        return plan
    has, slots = (t.clone() for t in plan)
    has[row], slots[row] = make(row)
    return has, slots


def _lower_bound(copy_load: torch.Tensor, count: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """[R] no plan's busiest device (load x factor) is below: the row's load spread so that every
    device carries the same load x factor, or the heaviest copy on the cheapest device."""
    spread = (copy_load * count).sum(1) / (1 / factor).sum(1)
    return torch.maximum(spread, copy_load.max(1).values * factor.min(1).values)


def _pack(copy_load: torch.Tensor, count: torch.Tensor, kept: torch.Tensor | None, factor: torch.Tensor,
          slots_per_device: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Place the copies not kept in rounds: each round, the next heaviest copies go one each to the
    devices with room, the heaviest to the lightest (load times factor). A copy whose device already
    holds its expert trades devices with the nearest copy of the round that can (`_untangle`), else
    goes to the lightest device with room that lacks it (`_place_missed`).

    copy_load, count: [R, E]; kept: [R, Dn, E] bool or None; factor: [R, Dn]. Returns has [R, Dn, E]
    bool and slots [R, Dn, S] (the expert of each slot, in the order placed).
    """
    num_rows, num_logical = count.shape
    num_devices = factor.shape[1]
    flat = torch.zeros(num_rows, num_devices * num_logical + 1, dtype=torch.bool)  # last column: discard
    slots = torch.zeros(num_rows, num_devices * slots_per_device + 1, dtype=torch.int64)  # idem
    load = torch.zeros(num_rows, num_devices, dtype=copy_load.dtype)
    room = torch.full((num_rows, num_devices), slots_per_device, dtype=torch.int64)
    left = count
    if kept is not None:
        flat[:, :-1] = kept.view(num_rows, -1)
        slots[:, :-1] = kept.to(torch.int8).topk(slots_per_device, dim=-1).indices.flatten(1)  # kept ones first
        load, room, left = (kept * copy_load.unsqueeze(1)).sum(-1), room - kept.sum(-1), count - kept.sum(1)
    # Step 1: the copies left, heaviest first: expert [R, Q].
    order = copy_load.masked_fill(left == 0, -1).argsort(dim=1, descending=True, stable=True)
    ends = left.gather(1, order).cumsum(1)  # [R, E]
    num_left = ends[:, -1:]  # [R, 1]
    position = torch.arange(max(int(num_left.max()), 1)).expand(num_rows, -1).contiguous()
    expert = order.gather(1, torch.searchsorted(ends, position, right=True).clamp_max(num_logical - 1))
    weight = copy_load.gather(1, expert)
    state = (flat, slots, load, room, factor, num_logical)
    start, rank = torch.zeros_like(num_left), torch.arange(num_devices)
    while bool((start < num_left).any()):
        # Step 2: one round: copy start + r to the r-th lightest open device, [R, Dn].
        device = (load * factor).masked_fill(room == 0, _INF).argsort(1)
        at = start + rank
        is_copy = (rank < (room > 0).sum(1, keepdim=True)) & (at < num_left)
        at = at.clamp_max(position.shape[1] - 1)
        e, w = expert.gather(1, at), weight.gather(1, at)
        is_met = is_copy & flat.gather(1, device * num_logical + e)
        if bool(is_met.any()):
            row = is_met.any(1).nonzero().flatten()
            e[row], w[row] = _untangle(flat[row], device[row], e[row], w[row], is_copy[row], is_met[row], num_logical)
            is_met = is_copy & flat.gather(1, device * num_logical + e)
        _put(state, device, e, w, is_copy & ~is_met)
        # Step 3: the copies that still met their own expert.
        _place_missed(state, e, w, is_met, copy_load)
        start = start + is_copy.sum(1, keepdim=True)
    return (flat[:, :-1].reshape(num_rows, num_devices, num_logical).contiguous(),
            slots[:, :-1].reshape(num_rows, num_devices, slots_per_device).contiguous())


def _untangle(flat: torch.Tensor, device: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor,
              is_copy: torch.Tensor, is_met: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Within one round, give each copy that meets its expert on its device (is_met) the device of the
    nearest copy that can trade (neither then meets its expert). flat: [R, Dn * E + 1] placed copies;
    device, expert, weight, is_copy, is_met: [R, Dn] (copy r goes to device r). Returns expert, weight
    [R, Dn]."""
    num_rows, num_devices = expert.shape
    holds = flat.gather(1, (device.unsqueeze(2) * num_logical + expert.unsqueeze(1)).flatten(1))
    holds = holds.view(num_rows, num_devices, num_devices)  # [R, Dn device of r, Dn copy r']
    can_trade = ~holds & ~holds.transpose(1, 2) & is_copy.unsqueeze(1) & is_copy.unsqueeze(2)  # [R, Dn, Dn]
    rank = torch.arange(num_devices)
    distance = (rank.view(1, -1) - rank.view(-1, 1)).abs()  # [Dn, Dn]
    swap = rank.repeat(num_rows, 1)  # [R, Dn]
    is_free = is_copy & ~is_met  # copies not yet traded
    order = is_met.cumsum(1) - 1
    for j in range(int(is_met.sum(1).max())):
        met = (is_met & (order == j)).long().argmax(1, keepdim=True)  # [R, 1] j-th met copy
        options = can_trade.gather(1, met.unsqueeze(2).expand(-1, 1, num_devices)).squeeze(1) & is_free  # [R, Dn]
        score = options * (2 * num_devices - distance.gather(0, met.expand(-1, num_devices)))
        partner = score.argmax(1, keepdim=True)
        is_done = (is_met.sum(1, keepdim=True) > j) & options.gather(1, partner)
        mine, theirs = swap.gather(1, met), swap.gather(1, partner)
        swap.scatter_(1, met, torch.where(is_done, theirs, mine))
        swap.scatter_(1, partner, torch.where(is_done, mine, theirs))
        is_free.scatter_(1, partner, is_free.gather(1, partner) & ~is_done)
    return expert.gather(1, swap), weight.gather(1, swap)


def _put(state: tuple, device: torch.Tensor, expert: torch.Tensor, weight: torch.Tensor, is_put: torch.Tensor) -> None:
    """Put copies (device, expert, weight: [R, Q], where is_put [R, Q]; at most one per device) into
    the packing state."""
    flat, slots, load, room, _, num_logical = state
    slots_per_device = (slots.shape[1] - 1) // load.shape[1]
    slot = device * slots_per_device + slots_per_device - room.gather(1, device)
    slots.scatter_(1, torch.where(is_put, slot, slots.shape[1] - 1), expert)
    load.scatter_add_(1, device, weight * is_put)
    room.scatter_add_(1, device, -is_put.long())
    flat.scatter_(1, torch.where(is_put, device * num_logical + expert, flat.shape[1] - 1), True)


def _place_missed(state: tuple, expert: torch.Tensor, weight: torch.Tensor, is_missed: torch.Tensor,
                  copy_load: torch.Tensor) -> None:
    """One missed copy per row at a time, onto the lightest device with room that lacks its expert
    (`_place_by_move` where there is none). expert, weight, is_missed: [R, Q]."""
    flat, slots, load, room, factor, num_logical = state
    num_rows, num_devices = load.shape
    offsets = torch.arange(num_devices) * num_logical
    rank = is_missed.cumsum(1) - 1
    num_missed = is_missed.sum(1, keepdim=True)  # [R, 1]
    for j in range(int(num_missed.max())):
        copy = (is_missed & (rank == j)).long().argmax(1, keepdim=True)  # [R, 1]
        e, w = expert.gather(1, copy), weight.gather(1, copy)
        is_open = (room > 0) & ~flat.gather(1, offsets + e)  # [R, Dn]
        best, device = ((load + w) * factor).masked_fill(~is_open, _INF).min(1, keepdim=True)
        is_put = (num_missed > j) & (best < _INF)
        _put(state, device, e, w, is_put)
        for row in ((num_missed > j) & ~is_put).flatten().nonzero().flatten().tolist():
            _place_by_move(flat[row, :-1].view(num_devices, num_logical), slots[row, :-1].view(num_devices, -1),
                           load[row], room[row], copy_load[row], int(e[row]))


def _place_by_move(has: torch.Tensor, slots: torch.Tensor, load: torch.Tensor, room: torch.Tensor,
                   copy_load: torch.Tensor, expert: int) -> None:
    """One row where every device with room holds `expert`: move an expert f from a full device
    without `expert` to a device with room that lacks f, and put `expert` in the freed slot (f
    exists: the full device holds more distinct experts than the one with room).

    has: [Dn, E] bool; slots: [Dn, S]; load, room: [Dn]; copy_load: [E]. All updated in place.
    """
    with_room = int((room > 0).nonzero()[0])
    full = int((~has[:, expert] & (room == 0)).nonzero()[0])
    moved = int((has[full] & ~has[with_room]).nonzero()[0])
    has[full, moved], has[with_room, moved], has[full, expert] = False, True, True
    slots[full, int((slots[full] == moved).nonzero()[0])] = expert
    slots[with_room, slots.shape[1] - int(room[with_room])] = moved
    load[full] += copy_load[expert] - copy_load[moved]
    load[with_room] += copy_load[moved]
    room[with_room] -= 1


def _exchange(has: torch.Tensor, slots: torch.Tensor, copy_load: torch.Tensor, factor: torch.Tensor,
              max_rounds: int = 8, min_gain: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounds of pairwise exchange. Each round sorts a row's devices by load (times factor) and pairs
    the i-th busiest with a light one (the pairing shifts every round); each pair swaps the two copies
    that even it out best, if that lowers the busier device by at least min_gain of the mean and keeps
    one copy per expert per device. No device ends busier than the row's busiest was. A row leaves
    after two rounds without a swap.

    has: [R, Dn, E] bool and slots: [R, Dn, S], a plan, both updated in place; copy_load: [R, E];
    factor: [R, Dn]. Returns (has, slots).
    """
    num_rows, num_devices, num_logical = has.shape
    num_pairs, slots_per_device = num_devices // 2, slots.shape[2]
    if num_pairs == 0:
        return has, slots
    flat, slot_flat = has.view(-1), slots.view(-1)
    swapped = torch.tensor([False, True, False, True])  # a leaves here, b arrives here, b leaves there, a arrives
    shift, rows = torch.arange(num_pairs), torch.arange(num_rows)
    stalled = torch.zeros(num_rows, dtype=torch.int64)
    for round_ in range(max_rounds):
        if rows.numel() == 0:
            break
        # Step 1: the active rows' devices, busiest first; pairs (busy, light): [n, H].
        slot, fac = slots[rows], factor[rows]  # [n, Dn, S], [n, Dn]
        w = copy_load[rows].gather(1, slot.flatten(1)).view_as(slot)
        load = w.sum(-1) * fac
        order = load.argsort(1, descending=True)
        busy, light = order[:, :num_pairs], order[:, num_devices - 1 - (shift + round_) % num_pairs]
        pick = (lambda t, d: t.gather(1, d.unsqueeze(-1).expand(-1, -1, slots_per_device)))
        busy_load, busy_factor = load.gather(1, busy), fac.gather(1, busy)  # [n, H]
        light_load, light_factor = load.gather(1, light), fac.gather(1, light)
        # Step 2: busy gives copy a, light gives copy b; u = even - (w_a - w_b), where even evens the
        # pair out. After the swap the pair's busier side carries busy_factor * max(u, -ratio * u) more
        # than at even; a forbidden swap (a already on the light device, b on the busy one) gets a huge u.
        even = ((busy_load - light_load) / (busy_factor + light_factor)).unsqueeze(-1)  # [n, H, 1]
        base = (rows * num_devices).view(-1, 1, 1)
        a_there = flat.gather(0, ((base + light.unsqueeze(-1)) * num_logical + pick(slot, busy)).flatten())
        b_here = flat.gather(0, ((base + busy.unsqueeze(-1)) * num_logical + pick(slot, light)).flatten())
        give = even - pick(w, busy) + _FORBID * a_there.view(-1, num_pairs, slots_per_device)  # [n, H, S]
        take = pick(w, light) + _FORBID * b_here.view(-1, num_pairs, slots_per_device)
        u = give.unsqueeze(3) + take.unsqueeze(2)  # [n, H, S a, S b]
        ratio = (light_factor / busy_factor)[..., None, None]
        extra = torch.maximum(u, u * -ratio).flatten(2)  # [n, H, S * S]
        improves = extra.amin(2) < even.squeeze(-1) - min_gain * load.mean(1, keepdim=True) / busy_factor
        # Step 3: apply the improving swaps; rows that stall twice leave.
        row, pair = improves.nonzero(as_tuple=True)
        index = extra[row, pair].argmin(1)
        here = base.view(-1)[row] + busy[row, pair]  # devices numbered across rows
        there = base.view(-1)[row] + light[row, pair]
        slot_a = here * slots_per_device + index // slots_per_device
        slot_b = there * slots_per_device + index % slots_per_device
        a, b = slot_flat[slot_a], slot_flat[slot_b]
        slot_flat[torch.cat([slot_a, slot_b])] = torch.cat([b, a])
        where = torch.cat([here, here, there, there]) * num_logical + torch.cat([a, b, b, a])
        flat[where] = swapped.repeat_interleave(a.numel())
        stalled = torch.where(improves.any(1), 0, stalled + 1)
        rows, stalled = rows[stalled < 2], stalled[stalled < 2]
    return has, slots


def _busiest(slots: torch.Tensor, copy_load: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """slots: [R, Dn, S]; copy_load: [R, E]; factor: [R, Dn]. Returns the busiest device's load * factor, [R]."""
    return (copy_load.gather(1, slots.flatten(1)).view_as(slots).sum(-1) * factor).max(1).values


def _slots(slots: torch.Tensor, current_phy2log: torch.Tensor | None) -> torch.Tensor:
    """phy2log [L, P] from slots [L, D, S]: a copy that the current placement [L, P] holds on the same
    device stays in its slot; the other copies fill the free slots in the order they were placed."""
    num_layers, num_gpus, slots_per_device = slots.shape
    if current_phy2log is None:
        return slots.flatten(1)
    old = current_phy2log.view(num_layers, num_gpus, -1)  # [L, D, S]
    # Step 1: slots whose expert stays (the first of repeats), and the new copies that match them.
    matches = old.unsqueeze(-1) == slots.unsqueeze(-2)  # [L, D, S old, S new]
    is_kept_slot = matches.any(-1) & ~torch.tril(old.unsqueeze(-1) == old.unsqueeze(-2), diagonal=-1).any(-1)
    is_kept_copy = (matches & is_kept_slot.unsqueeze(-1)).any(-2)
    # Step 2: the r-th copy not kept goes to the r-th free slot (S: nowhere).
    free_rank = torch.where(is_kept_slot, slots_per_device, (~is_kept_slot).cumsum(-1) - 1)
    slot_of_rank = torch.full((num_layers, num_gpus, slots_per_device + 1), slots_per_device)
    slot_of_rank.scatter_(-1, free_rank, torch.arange(slots_per_device).expand_as(free_rank).contiguous())
    slot_of_rank[..., -1] = slots_per_device  # kept slots wrote there
    copy_rank = torch.where(is_kept_copy, slots_per_device, (~is_kept_copy).cumsum(-1) - 1)
    out = torch.cat([torch.where(is_kept_slot, old, -1), old[..., :1]], -1)  # [L, D, S + 1], last: nowhere
    out.scatter_(-1, slot_of_rank.gather(-1, copy_rank), slots)
    return out[..., :-1].flatten(1)


def _log2phy(phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """phy2log: [L, P]; logcnt: [L, E]. Returns log2phy [L, E, X]: slots in increasing order, -1 padded."""
    num_layers, num_replicas = phy2log.shape
    most = int(logcnt.max())
    slot = phy2log.argsort(dim=1, stable=True)  # [L, P] slots grouped by expert, increasing
    expert = phy2log.gather(1, slot)
    first = (logcnt.cumsum(1) - logcnt).gather(1, expert)  # [L, P] position of the expert's first copy
    log2phy = torch.full((num_layers, logcnt.shape[1] * most), -1, dtype=torch.int64)
    log2phy.scatter_(1, expert * most + torch.arange(num_replicas) - first, slot)
    return log2phy.view(num_layers, -1, most)
