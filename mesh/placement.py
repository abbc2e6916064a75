"""Where expert copies go: pure policies (no Ray), unit-testable in milliseconds."""

from __future__ import annotations

from mesh.replication import rebalance_experts  # the replication policy's entry point, EPLB's signature

__all__ = ["initial_assignment", "rebalance_experts", "restore_node", "spread_groups"]


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
