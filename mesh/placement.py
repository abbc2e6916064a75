"""Where expert copies go: pure policies (no Ray), unit-testable in milliseconds."""

from __future__ import annotations

from mesh.replication import rebalance_experts  # the replication policy's entry point, EPLB's signature

__all__ = ["group_latency", "group_loads", "initial_assignment", "pick_groups", "placement_cost", "placement_moves", "plan_placement",
           "rebalance_experts", "restore_node", "spread_groups"]


def initial_assignment(moe_layers: list[int], num_experts: int, num_groups: int,
                       replicas: int = 1) -> list[dict[int, list[int]]]:
    """Copies of every expert of every layer over `num_groups` groups.

    Copy r of expert e of layer l goes to group (e + l + r * stride) % G with stride = G // replicas,
    so an expert's copies land on distinct groups and each layer starts on a different group.
    Returns one {layer: [experts]} per group. Raises ValueError if replicas > num_groups.
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if not 1 <= replicas <= num_groups:
        raise ValueError(f"replicas must be in [1, num_groups={num_groups}], got {replicas}")
    stride = num_groups // replicas
    groups: list[dict[int, list[int]]] = [{layer: [] for layer in moe_layers} for _ in range(num_groups)]
    for layer in moe_layers:
        for expert in range(num_experts):
            for copy in range(replicas):
                groups[(expert + layer + copy * stride) % num_groups][layer].append(expert)
    return [{layer: sorted(experts) for layer, experts in g.items() if experts} for g in groups]


def spread_groups(num_groups: int, node_ids: list[str]) -> list[str]:
    """Node of each group: round-robin over the nodes, in the order given."""
    if not node_ids:
        raise ValueError("no node to place expert groups on")
    return [node_ids[k % len(node_ids)] for k in range(num_groups)]


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


# -- placement by measured latency -----------------------------------------------------------------
# An assignment maps each group to the experts it holds per layer: {group: {layer: [experts]}}.
# Load is tokens/s per (layer, expert), split evenly over the expert's copies (as the router does).

Assignment = dict[str, dict[int, list[int]]]


def group_latency(group_nodes: dict[str, str], router_nodes: list[str], links: dict) -> dict[str, float]:
    """ms for a token copy to reach each group: the mean, over the routers, of the RTT the probes
    measured from the router's node to the group's node. `links` is probes.link_matrix's output."""
    if not router_nodes:
        raise ValueError("no router to measure latency from")
    index = {node: i for i, node in enumerate(links["nodes"])}
    rtt = links["rtt_ms"]
    return {g: sum(rtt[index[r]][index[node]] for r in router_nodes) / len(router_nodes)
            for g, node in group_nodes.items()}


def _copy_shares(assignment: Assignment, load: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    copies: dict[tuple[int, int], int] = {}
    for held in assignment.values():
        for layer, experts in held.items():
            for e in experts:
                copies[(layer, e)] = copies.get((layer, e), 0) + 1
    return {key: load.get(key, 0.0) / n for key, n in copies.items()}


def placement_cost(assignment: Assignment, latency: dict[str, float], load: dict[tuple[int, int], float]) -> float:
    """Expected communication cost, ms x tokens/s: every copy's share of its expert's load times its
    group's latency. Divided by the total load it is the mean latency a token copy meets."""
    share = _copy_shares(assignment, load)
    return sum(share[(layer, e)] * latency[g] for g, held in assignment.items()
               for layer, experts in held.items() for e in experts)


def plan_placement(assignment: Assignment, latency: dict[str, float], load: dict[tuple[int, int], float],
                   balance: float = 0.5, min_gap: float = 0.5) -> Assignment:
    """A placement with lower `placement_cost`: copies of one layer swap groups, a hotter copy
    moving to the group with lower latency (every group keeps its number of copies, so memory).

    Greedy: takes the swap that lowers the cost most, until none does. A swap may not lift a group's
    load above (1 + balance) x the mean group load, so a near node is not buried under every hot
    expert. Two groups count as equally near unless one's latency exceeds the other's by more than
    `min_gap` x the smaller (measurement noise moves nothing). Never two copies of one expert in one
    group. Pure; returns a new assignment.
    """
    if balance < 0 or min_gap < 0:
        raise ValueError(f"balance and min_gap must be >= 0, got {balance} and {min_gap}")
    held = {g: {layer: set(es) for layer, es in a.items()} for g, a in assignment.items()}
    share = _copy_shares(assignment, load)
    group_load = group_loads(assignment, load)
    cap = (1 + balance) * sum(group_load.values()) / max(len(held), 1)
    for _ in range(sum(len(es) for a in held.values() for es in a.values())):
        swap = _best_swap(held, latency, share, group_load, cap, min_gap)
        if swap is None:
            break
        layer, far, near, a, b = swap
        held[far][layer].remove(a), held[far][layer].add(b)
        held[near][layer].remove(b), held[near][layer].add(a)
        delta = share[(layer, a)] - share[(layer, b)]
        group_load[far] -= delta
        group_load[near] += delta
    return {g: {layer: sorted(es) for layer, es in a.items()} for g, a in held.items()}


def _best_swap(held, latency, share, group_load, cap, min_gap) -> tuple[int, str, str, int, int] | None:
    """(layer, far group, near group, expert leaving far, expert leaving near) of largest gain."""
    best, best_gain = None, 1e-9
    for far in held:
        for near in held:
            gap = latency[far] - latency[near]
            if gap <= min_gap * latency[near]:
                continue
            for layer in held[far].keys() & held[near].keys():
                outs = sorted(held[far][layer] - held[near][layer], key=lambda e: -share[(layer, e)])
                ins = sorted(held[near][layer] - held[far][layer], key=lambda e: share[(layer, e)])
                for a in outs:
                    # the first b that fits under the cap moves the most load: the best for this a
                    fit = next((b for b in ins if share[(layer, a)] - share[(layer, b)] > 0
                                and group_load[near] + share[(layer, a)] - share[(layer, b)] <= cap), None)
                    if fit is not None and (gain := gap * (share[(layer, a)] - share[(layer, fit)])) > best_gain:
                        best, best_gain = (layer, far, near, a, fit), gain
    return best


def group_loads(assignment: Assignment, load: dict[tuple[int, int], float]) -> dict[str, float]:
    """tokens/s each group carries: the sum of its copies' shares."""
    share = _copy_shares(assignment, load)
    return {g: sum(share[(layer, e)] for layer, es in held.items() for e in es) for g, held in assignment.items()}


def pick_groups(assignment: Assignment, load: dict[tuple[int, int], float], layer: int, expert: int,
                count: int) -> list[str]:
    """Groups that gain (count > 0) or lose (count < 0) a copy of (layer, expert), |count| of them.

    Gains go to the least-loaded groups without a copy, losses come from the most-loaded holders;
    ties go by copies held (fewest gain, most lose), then by name. Copies already in place stay.
    """
    loads = group_loads(assignment, load)
    held = {g: expert in a.get(layer, []) for g, a in assignment.items()}
    copies = {g: sum(len(es) for es in a.values()) for g, a in assignment.items()}
    if count >= 0:
        return sorted((g for g in assignment if not held[g]), key=lambda g: (loads[g], copies[g], g))[:count]
    return sorted((g for g in assignment if held[g]), key=lambda g: (-loads[g], -copies[g], g))[:-count]


def placement_moves(old: Assignment, new: Assignment) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]:
    """(copies to add, copies to remove) as (layer, expert, group) taking `old` to `new`."""
    adds, removes = [], []
    for g in new.keys() | old.keys():
        for layer in new.get(g, {}).keys() | old.get(g, {}).keys():
            before, after = set(old.get(g, {}).get(layer, [])), set(new.get(g, {}).get(layer, []))
            adds += [(layer, e, g) for e in sorted(after - before)]
            removes += [(layer, e, g) for e in sorted(before - after)]
    return sorted(adds), sorted(removes)
