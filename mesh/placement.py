"""Where expert copies go: pure policies (no Ray), unit-testable in milliseconds."""

from __future__ import annotations

import collections

import torch

from protos.errors import PlacementError
from mesh.replication import rebalance_experts  # the replication policy's entry point, EPLB's signature

__all__ = ["check_memory", "copy_offsets", "group_latency", "group_loads", "initial_assignment", "latency_tiers",
           "pairs_kept", "pick_groups", "placement_cost", "placement_moves", "placement_report", "plan_placement",
           "rebalance_experts", "replicate_layer", "restore_node", "scale_count", "shared_nodes", "spread_groups",
           "spread_layer"]


def initial_assignment(moe_layers: list[int], num_experts: int, num_groups: int,
                       replicas: int = 1, num_nodes: int | None = None) -> list[dict[int, list[int]]]:
    """Copies of every expert of every layer over `num_groups` groups.

    Copy r of expert e of layer l goes to group (e + l + offset_r) % G, offset_0 = 0 and offset_r
    near r * G / replicas: each copy set is a rotation, so every group holds as many copies as the
    next, an expert's copies land on distinct groups, and each layer starts on a different group.
    With `num_nodes` (groups on nodes as `spread_groups` lays them: group k on node k % num_nodes),
    the offsets also put an expert's copies on distinct nodes while replicas <= num_nodes.
    Returns one {layer: [experts]} per group. Raises ValueError if replicas > num_groups.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if not 1 <= replicas <= num_groups:
        raise ValueError(f"replicas must be in [1, num_groups={num_groups}], got {replicas}")
    offsets = copy_offsets(num_groups, replicas, num_nodes or num_groups)
    groups: list[dict[int, list[int]]] = [{layer: [] for layer in moe_layers} for _ in range(num_groups)]
    for layer in moe_layers:
        for expert in range(num_experts):
            for offset in offsets:
                groups[(expert + layer + offset) % num_groups][layer].append(expert)
    return [{layer: sorted(experts) for layer, experts in g.items() if experts} for g in groups]


def copy_offsets(num_groups: int, replicas: int, num_nodes: int) -> list[int]:
    """Group offsets of the copies of an expert: distinct groups always, distinct nodes (offset mod
    num_nodes) while replicas <= num_nodes; each the first that qualifies from r * G // replicas."""
    offsets: list[int] = []
    for copy in range(replicas):
        start = copy * num_groups // replicas
        candidates = [(start + d) % num_groups for d in range(num_groups)]
        free = [o for o in candidates if o not in offsets]
        on_new_node = [o for o in free if o % num_nodes not in {x % num_nodes for x in offsets}]
        offsets.append((on_new_node or free)[0])
    return offsets


def spread_groups(num_groups: int, node_ids: list[str]) -> list[str]:
    """Node of each group: round-robin over the nodes, in the order given."""
    if not node_ids:
        raise ValueError("no node to place expert groups on")
    return [node_ids[k % len(node_ids)] for k in range(num_groups)]


def check_memory(names: list[str], need: list[int], placement: list[str], capacity: dict[str, float],
                 on_gpus: bool, fraction: float) -> None:
    """need[k]: bytes of the weights of group names[k], placed on node placement[k]; capacity: per node,
    the memory of one of its GPUs (`on_gpus`: the groups compute on GPUs, one each), else its Ray
    memory. On GPUs every group must fit `fraction` of its GPU; on hosts each node's groups together
    `fraction` of the node's. PlacementError naming the first group (or node, and its groups) that
    would not fit. Pure policy."""
    if on_gpus:
        for name, nbytes, node in zip(names, need, placement):
            if nbytes > fraction * capacity[node]:
                raise PlacementError(
                    f"expert group {name} needs {nbytes / 2**30:.2f} GiB of weights on its GPU, more than "
                    f"memory_fraction={fraction} of the {capacity[node] / 2**30:.2f} GiB of a GPU of node "
                    f"{node[:12]}; add GPUs, or lower groups.replicas")
        return
    on_node: dict[str, list[int]] = collections.defaultdict(list)
    for k, node in enumerate(placement):
        on_node[node].append(k)
    for node, groups in on_node.items():
        nbytes = sum(need[k] for k in groups)
        if nbytes > fraction * capacity[node]:
            raise PlacementError(
                f"expert groups {', '.join(names[k] for k in groups)} on node {node[:12]} need {nbytes / 2**30:.2f} "
                f"GiB of weights, more than memory_fraction={fraction} of its {capacity[node] / 2**30:.2f} GiB "
                f"Ray memory; add nodes or groups, or lower groups.replicas")


def restore_node(experts: dict[int, list[int]], node_ids: list[str],
                 live_groups: list[tuple[str, dict[int, list[int]]]]) -> str:
    """Node to restart a dead group holding `experts` on, given the live groups as (node, experts).

    Prefers the node holding the fewest other copies of the same experts (so that one node going
    down never takes every copy of an expert), then the node with the fewest groups, then the
    order given. Raises ValueError if there is no node.
    """
    if not node_ids:
        raise ValueError("no live node to restore an expert group on")
    wanted = {(layer, e) for layer, es in experts.items() for e in es}

    def cost(rank_node: tuple[int, str]) -> tuple[int, int, int]:
        rank, node = rank_node
        here = [held for n, held in live_groups if n == node]
        shared = sum(len(wanted & {(layer, e) for layer, es in held.items() for e in es}) for held in here)
        return shared, len(here), rank

    return min(enumerate(node_ids), key=cost)[1]


# -- placement by measured latency and co-activation ------------------------------------------------
# An assignment maps each group to the experts it holds per layer: {group: {layer: [experts]}}.
# Load is tokens/s per (layer, expert), split evenly over the expert's copies (as the router does).
# Pairs are tokens/s per (layer, a, b), a < b, of tokens that picked both experts.
#
# The cost is ms x tokens/s of group visits: a token visits every group holding one of the copies it
# picked (one message), so its copies that share a group with a co-activated expert's copy ride along.
# With pair counts only, a pair on one group saves 2 / top_k of a visit (exact for top-2, and for a
# token whose top_k copies all share one group; never below one visit per group touched).

Assignment = dict[str, dict[int, list[int]]]
Pairs = dict[tuple[int, int, int], float]


def group_latency(group_nodes: dict[str, str], router_nodes: list[str], links: dict) -> dict[str, float]:
    """ms for a token copy to reach each group: the mean, over the routers, of the RTT the probes
    measured from the router's node to the group's node. `links` is probes.link_matrix's output."""
    if not router_nodes:
        raise ValueError("no router to measure latency from")
    index = {node: i for i, node in enumerate(links["nodes"])}
    rtt = links["rtt_ms"]
    return {g: sum(rtt[index[r]][index[node]] for r in router_nodes) / len(router_nodes)
            for g, node in group_nodes.items()}


def latency_tiers(latency: dict[str, float], min_gap: float) -> dict[str, float]:
    """The latency the planner uses per group: groups in order of latency form tiers, a new tier
    starting where a latency exceeds its tier's lowest by more than `min_gap` x that; each group gets
    its tier's mean. Links within measurement noise of each other count as equal."""
    tiers: list[list[str]] = []
    for g in sorted(latency, key=lambda g: (latency[g], g)):
        if tiers and latency[g] <= (1 + min_gap) * latency[tiers[-1][0]]:
            tiers[-1].append(g)
        else:
            tiers.append([g])
    return {g: sum(latency[m] for m in tier) / len(tier) for tier in tiers for g in tier}


def _copies(assignment: Assignment) -> dict[tuple[int, int], int]:
    copies: dict[tuple[int, int], int] = {}
    for held in assignment.values():
        for layer, experts in held.items():
            for e in experts:
                copies[(layer, e)] = copies.get((layer, e), 0) + 1
    return copies


def _copy_shares(assignment: Assignment, load: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    return {key: load.get(key, 0.0) / n for key, n in _copies(assignment).items()}


def _together(assignment: Assignment, pairs: Pairs) -> dict[str, float]:
    """Per group, tokens/s of the pairs whose copies it holds both of, each pair's rate split over
    its (copy of a, copy of b) choices (the router picks copies independently)."""
    copies = _copies(assignment)
    together = {}
    for g, held in assignment.items():
        sets = {layer: set(es) for layer, es in held.items()}
        together[g] = sum(rate / (copies[(layer, a)] * copies[(layer, b)]) for (layer, a, b), rate in pairs.items()
                          if a in sets.get(layer, ()) and b in sets.get(layer, ()))
    return together


def placement_cost(assignment: Assignment, latency: dict[str, float], load: dict[tuple[int, int], float],
                   pairs: Pairs | None = None, top_k: int = 2) -> float:
    """Expected communication cost, ms x tokens/s of group visits (see above): every copy's share of
    its expert's load times its group's latency, less 2 / top_k of that for the co-activated pairs
    sharing a group. Divided by the total load it is the mean latency a token copy meets."""
    share = _copy_shares(assignment, load)
    together = _together(assignment, pairs or {})
    return sum(latency[g] * (sum(share[(layer, e)] for layer, es in held.items() for e in es)
                             - 2 / max(top_k, 2) * together[g]) for g, held in assignment.items())


def pairs_kept(assignment: Assignment, pairs: Pairs) -> float:
    """Fraction of the co-activated pairs' tokens/s whose two copies share a group (1.0 if no pairs)."""
    total = sum(pairs.values())
    return sum(_together(assignment, pairs).values()) / total if total else 1.0


def plan_placement(assignment: Assignment, latency: dict[str, float], load: dict[tuple[int, int], float],
                   balance: float = 0.5, min_gap: float = 0.5, pairs: Pairs | None = None,
                   top_k: int = 2, min_saving: float = 0.1, nodes: dict[str, str] | None = None) -> Assignment:
    """A placement with lower `placement_cost`: copies of one layer swap groups, so a hotter copy
    moves to a group with lower latency, or next to the experts its tokens also pick. Every group
    keeps its number of copies (its memory).

    Greedy: takes the swap that lowers the cost most, until none does. A swap may not lift a group's
    load above (1 + balance) x the mean group load, so a near node is not buried under every hot
    expert. Noise moves nothing: latencies are planned in tiers (`latency_tiers(latency, min_gap)`),
    and a swap must save at least `min_saving` of what the two copies it moves cost (sampled pair
    counts of independent experts differ a little; moving copies is not free). Never two copies of
    one expert in one group; with `nodes` (group -> node), a copy moves to another node only if that
    node holds fewer copies of its expert than the one it leaves (copies spread stay spread). Pure;
    returns a new assignment.
    """
    if balance < 0 or min_gap < 0 or top_k < 1 or min_saving < 0:
        raise ValueError(f"need balance >= 0, min_gap >= 0, top_k >= 1, min_saving >= 0; got {balance}, "
                         f"{min_gap}, {top_k}, {min_saving}")
    groups = sorted(assignment)
    tiers = latency_tiers({g: latency[g] for g in groups}, min_gap)
    lat = torch.tensor([tiers[g] for g in groups], dtype=torch.float64)  # [G]
    node_ids = {n: i for i, n in enumerate(sorted({(nodes or {}).get(g, g) for g in groups}))}
    on_node = torch.zeros(len(groups), len(node_ids), dtype=torch.float64)  # [G, N] one-hot
    for k, g in enumerate(groups):
        on_node[k, node_ids[(nodes or {}).get(g, g)]] = 1.0
    layers = {layer: _layer_state(assignment, groups, layer, load, pairs or {}, 2 / max(top_k, 2))
              for layer in sorted({layer for held in assignment.values() for layer in held})}
    group_load = sum((holds.double().T @ share for _, holds, share, _ in layers.values()),
                     torch.zeros(len(groups), dtype=torch.float64))  # [G]
    cap = (1 + balance) * float(group_load.mean()) if groups else 0.0
    for _ in range(4 * sum(int(holds.sum()) for _, holds, _, _ in layers.values())):
        best = max(((*_best_swap(holds, share, weight, lat, group_load, cap, min_saving, on_node), layer)
                    for layer, (_, holds, share, weight) in layers.items()), default=None)
        if best is None or best[0] <= 1e-9 * (1 + float(group_load.sum() * lat.max())):
            break
        _, a, g, b, h, layer = best
        _, holds, share, _ = layers[layer]
        holds[a, g], holds[a, h], holds[b, h], holds[b, g] = False, True, False, True
        moved = float(share[a] - share[b])
        group_load[g] -= moved
        group_load[h] += moved
    return {g: {layer: sorted(experts[i] for i in holds[:, k].nonzero().flatten().tolist())
                for layer, (experts, holds, _, _) in layers.items() if layer in assignment[g]}
            for k, g in enumerate(groups)}


def _layer_state(assignment: Assignment, groups: list[str], layer: int, load: dict[tuple[int, int], float],
                 pairs: Pairs, pair_weight: float) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts [M] of the layer, holds [M, G] bool, share [M] tokens/s per copy, weight [M, M]: the
    tokens/s a co-located pair of copies saves, pair_weight x rate / (copies of a x copies of b))."""
    experts = sorted({e for g in groups for e in assignment[g].get(layer, [])})
    index = {e: i for i, e in enumerate(experts)}
    holds = torch.zeros(len(experts), len(groups), dtype=torch.bool)
    for k, g in enumerate(groups):
        for e in assignment[g].get(layer, []):
            holds[index[e], k] = True
    copies = holds.sum(dim=1).double()
    share = torch.tensor([load.get((layer, e), 0.0) for e in experts], dtype=torch.float64) / copies
    weight = torch.zeros(len(experts), len(experts), dtype=torch.float64)
    for (pair_layer, a, b), rate in pairs.items():
        if pair_layer == layer and a in index and b in index:
            i, j = index[a], index[b]
            weight[i, j] = weight[j, i] = pair_weight * rate / float(copies[i] * copies[j])
    return experts, holds, share, weight


def _best_swap(holds: torch.Tensor, share: torch.Tensor, weight: torch.Tensor, lat: torch.Tensor,
               group_load: torch.Tensor, cap: float, min_saving: float,
               on_node: torch.Tensor) -> tuple[float, int, int, int, int]:
    """(gain, a, g, b, h) of the best swap within one layer: the copy of expert a leaves group g for h,
    the copy of b leaves h for g. Shapes: holds [M, G], share [M], weight [M, M], lat [G], group_load [G],
    on_node [G, N] (each group's node, one-hot). The gain is the drop in placement_cost; -inf if no
    swap is allowed."""
    # what x's copy costs in g given the copies there: lat[g] x (share[x] - what its pairs save in g)
    cost_in = lat * (share[:, None] - weight @ holds.double())  # [M, G]
    expert, group = holds.nonzero(as_tuple=True)               # the copies, [C] each
    saving = cost_in[expert, group][:, None] - cost_in[expert][:, group]  # [C, C]: copy i moving to j's group
    # the pair (a, b) itself does not end together: its saving in the new groups is taken back
    gain = saving + saving.T - weight[expert][:, expert] * (lat[group][:, None] + lat[group][None, :])
    moved = share[expert][:, None] - share[expert][None, :]    # [C, C]: load that j's group gains
    gained = torch.where(moved > 0, group_load[group][None, :] + moved, group_load[group][:, None] - moved)
    blocked = holds[expert][:, group]                          # [C, C]: j's group already holds i's expert
    copy_cost = lat[group] * share[expert]                     # [C]: a copy's load x latency, no pair saving
    worth_it = gain >= min_saving * (copy_cost[:, None] + copy_cost[None, :])
    per_node = holds.double() @ on_node                        # [M, N]: copies of each expert per node
    node = on_node[group].argmax(dim=1)                        # [C]: each copy's node
    spread = (node[:, None] == node[None, :]) | (per_node[expert][:, node] < per_node[expert, node][:, None])
    allowed = ~blocked & ~blocked.T & spread & spread.T & (gained <= cap * (1 + 1e-12)) & worth_it
    gain = torch.where(allowed, gain, torch.tensor(-float("inf"), dtype=torch.float64))
    if gain.numel() == 0:
        return -float("inf"), 0, 0, 0, 0
    i, j = divmod(int(gain.argmax()), gain.shape[1])
    return float(gain[i, j]), int(expert[i]), int(group[i]), int(expert[j]), int(group[j])


def replicate_layer(assignment: Assignment, layer: int, load: dict[tuple[int, int], float], num_copies: int,
                    num_experts: int, max_copies: int, nodes: dict[str, str] | None = None) -> Assignment:
    """`assignment` with the copies of `layer` re-planned by `rebalance_experts` (the groups, in name
    order, are its devices): copies per expert by load, packed so that every group holds the same
    number S of them, copies in force kept where that costs little. S is num_copies / groups rounded
    up, within [E / groups, E]; no expert gets more than max_copies copies unless the S x groups
    slots need it. With `nodes` (group -> node), copies then move apart (`spread_layer`). Other
    layers are unchanged. Pure; returns a new assignment."""
    groups = sorted(assignment)
    if not groups:
        raise ValueError("no expert group to place copies on")
    per_group = min(num_experts, max(-(-num_experts // len(groups)), -(-num_copies // len(groups))))
    num_slots = per_group * len(groups)
    most = max(min(max_copies, len(groups)), -(-num_slots // num_experts))
    current = torch.full((len(groups), per_group), -1, dtype=torch.int64)  # [D, S], -1: empty slot
    for k, g in enumerate(groups):
        held = sorted(assignment[g].get(layer, []), key=lambda e: -load.get((layer, e), 0.0))[:per_group]
        current[k, :len(held)] = torch.tensor(held, dtype=torch.int64)
    weight = torch.tensor([[float(load.get((layer, e), 0.0)) for e in range(num_experts)]])  # [1, E]
    phy2log, _, _ = rebalance_experts(weight, num_slots, 1, 1, len(groups), current_phy2log=current.view(1, -1),
                                      max_copies=most)
    rows = phy2log.view(len(groups), per_group).tolist()
    planned = {g: {**assignment[g], layer: sorted(rows[k])} for k, g in enumerate(groups)}
    return spread_layer(planned, layer, nodes, load) if nodes else planned


def spread_layer(assignment: Assignment, layer: int, nodes: dict[str, str],
                 load: dict[tuple[int, int], float]) -> Assignment:
    """`assignment` with copies of `layer` exchanged between groups until no node holds two copies of
    an expert while another node holds fewer than one less: a copy of expert a on a crowded node
    trades groups with a copy of some b on the emptier node, b chosen so that it lands on a node
    with fewer of its copies than it leaves, and with the load nearest a's (group loads stay near
    EPLB's balance). Every group keeps its number of copies; what cannot be spread is left (and
    reported by `shared_nodes`). Pure; returns a new assignment."""
    held = {g: set(a.get(layer, [])) for g, a in assignment.items()}
    count = collections.Counter((e, nodes[g]) for g, es in held.items() for e in es)
    copies = collections.Counter(e for es in held.values() for e in es)
    share = {e: load.get((layer, e), 0.0) / n for e, n in copies.items()}
    node_set = sorted(set(nodes[g] for g in held))
    for a in sorted(copies):
        for _ in range(copies[a]):
            crowded = max(node_set, key=lambda n: (count[(a, n)], n))
            empty = min(node_set, key=lambda n: (count[(a, n)], n))
            if count[(a, crowded)] - count[(a, empty)] < 2:
                break
            givers = [g for g in sorted(held) if nodes[g] == crowded and a in held[g]]
            takers = [h for h in sorted(held) if nodes[h] == empty]
            trade = min(((abs(share[b] - share[a]), g, h, b) for g in givers for h in takers for b in sorted(held[h])
                         if b not in held[g] and count[(b, crowded)] < count[(b, empty)]), default=None)
            if trade is None:
                break
            _, g, h, b = trade
            held[g].symmetric_difference_update({a, b})
            held[h].symmetric_difference_update({a, b})
            count.update({(a, empty): 1, (b, crowded): 1})
            count.subtract({(a, crowded): 1, (b, empty): 1})
    return {g: {**a, layer: sorted(held[g])} if layer in a else dict(a) for g, a in assignment.items()}


def group_loads(assignment: Assignment, load: dict[tuple[int, int], float]) -> dict[str, float]:
    """tokens/s each group carries: the sum of its copies' shares."""
    share = _copy_shares(assignment, load)
    return {g: sum(share[(layer, e)] for layer, es in held.items() for e in es) for g, held in assignment.items()}


def pick_groups(assignment: Assignment, load: dict[tuple[int, int], float], layer: int, expert: int,
                count: int, nodes: dict[str, str] | None = None) -> list[str]:
    """Groups that gain (count > 0) or lose (count < 0) a copy of (layer, expert), |count| of them.

    With `nodes` (group -> node), gains go first to groups on nodes that hold no copy of it yet and
    losses come first from nodes holding two or more; then gains go to the least-loaded groups
    without a copy, losses come from the most-loaded holders; ties go by copies held (fewest gain,
    most lose), then by name. Copies already in place stay.
    """
    loads = group_loads(assignment, load)
    held = {g: expert in a.get(layer, []) for g, a in assignment.items()}
    copies = {g: sum(len(es) for es in a.values()) for g, a in assignment.items()}
    node_of = nodes or {g: g for g in assignment}
    per_node = collections.Counter(node_of.get(g, g) for g in assignment if held[g])
    picked: list[str] = []
    for _ in range(abs(count)):  # one at a time: each pick changes which nodes hold a copy
        if count >= 0:
            pool = [g for g in assignment if not held[g] and g not in picked]
            key = (lambda g: (per_node[node_of.get(g, g)] > 0, loads[g], copies[g], g))
        else:
            pool = [g for g in assignment if held[g] and g not in picked]
            key = (lambda g: (per_node[node_of.get(g, g)] < 2, -loads[g], -copies[g], g))
        if not pool:
            break
        best = min(pool, key=key)
        picked.append(best)
        per_node[node_of.get(best, best)] += 1 if count >= 0 else -1
    return picked


def scaled(assignment: Assignment, load: dict[tuple[int, int], float], layer: int, expert: int, replicas: int,
           named: int, nodes: dict[str, str]) -> Assignment:
    """`assignment` (the live groups') with `replicas` copies of (layer, expert) in all, `named` of
    which the desired state names now (scale_count); the groups that gain or lose one by pick_groups."""
    plan = {g: {l: list(e) for l, e in held.items()} for g, held in assignment.items()}
    count = scale_count(replicas, named, sum(expert in held.get(layer, []) for held in plan.values()))
    for group in pick_groups(plan, load, layer, expert, count, nodes):
        experts = plan[group].setdefault(layer, [])
        experts.append(expert) if count > 0 else experts.remove(expert)
    return plan


def scale_count(replicas: int, named: int, live: int) -> int:
    """Copies to add (> 0) on live groups, or remove (< 0) from them, for `replicas` copies in all:
    `named` copies the desired state names (a dead group's among them: its restart brings it back),
    `live` of them on live groups. Never the last live copy. Pure."""
    change = replicas - named
    return change if change >= 0 else -min(-change, live - 1)


def shared_nodes(copies: dict[tuple[int, int], list[str]], nodes: dict[str, str]) -> list[tuple[int, int]]:
    """(layer, expert) pairs two of whose copies (groups) sit on one node although the nodes holding
    groups are enough to keep them apart: what `mesh status` reports. Pure policy."""
    num_nodes = len(set(nodes.values()))
    return sorted(key for key, groups in copies.items()
                  if len(groups) <= num_nodes and len({nodes.get(g, g) for g in groups}) < len(groups))


def placement_moves(old: Assignment, new: Assignment) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]:
    """(copies to add, copies to remove) as (layer, expert, group) taking `old` to `new`."""
    adds, removes = [], []
    for g in new.keys() | old.keys():
        for layer in new.get(g, {}).keys() | old.get(g, {}).keys():
            before, after = set(old.get(g, {}).get(layer, [])), set(new.get(g, {}).get(layer, []))
            adds += [(layer, e, g) for e in sorted(after - before)]
            removes += [(layer, e, g) for e in sorted(before - after)]
    return sorted(adds), sorted(removes)


def placement_report(links: dict, router_nodes: list[str], current: Assignment, group_nodes: dict[str, str],
                     load: tuple[dict, dict, Pairs], balance: float, top_k: int) -> dict:
    """`mesh placement`'s report (and `mesh rebalance`'s plan): each group's latency from the
    routers over the measured `links`, the current and the proposed placement (plan_placement) with
    their cost and mean latency per token copy, and the moves between them. `load`: (tokens since
    start, tokens/s over the window, co-activated pairs), as mesh.load aggregates them."""
    tokens, rates, pairs = load
    latency = group_latency(group_nodes, router_nodes, links)
    weights = rates or tokens
    proposed = plan_placement(current, latency, weights, balance, pairs=pairs, top_k=top_k, nodes=group_nodes)
    total = sum(weights.values()) or 1.0
    adds, removes = placement_moves(current, proposed)

    def summary(plan: Assignment) -> dict:
        cost = placement_cost(plan, latency, weights, pairs, top_k)
        return {"assignment": plan, "cost": cost, "mean_latency_ms": cost / total, "pairs_kept": pairs_kept(plan, pairs)}

    return {"links": links, "router_nodes": router_nodes,
            "load_source": "tokens/s over the load window" if rates else "tokens since start",
            "groups": {n: {"node": group_nodes[n], "latency_ms": latency[n]} for n in current},
            "pairs": len(pairs), "current": summary(current), "proposed": summary(proposed),
            "adds": adds, "removes": removes}
