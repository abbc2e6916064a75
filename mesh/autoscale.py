"""Autoscaling trigger: copies per expert that follow the measured load, with hysteresis and bounds.
The controller re-plans the layers it names with the replication policy (placement.replicate_layer).
Pure: no Ray, no clock."""

from __future__ import annotations

import math

from mesh.placement import Assignment, replicate_layer

__all__ = ["autoscaled", "plan_autoscale"]


def plan_autoscale(rates: dict[tuple[int, int], float], copies: dict[tuple[int, int], int],
                   target_per_copy: float, max_copies: int, hysteresis: float = 0.25) -> dict[tuple[int, int], int]:
    """New copy counts for the experts whose count should change.

    rates: tokens/s per (layer, expert) over the routers' window (missing: 0); copies: current
    copies per (layer, expert); target_per_copy: tokens/s one copy should carry. An expert grows
    when its load per copy exceeds target * (1 + hysteresis) and shrinks only when one copy fewer
    would still carry less than target * (1 - hysteresis) each: the band between keeps a steady
    load from flapping. Counts stay in [1, max_copies].
    """
    if target_per_copy <= 0 or max_copies < 1 or not 0 <= hysteresis < 1:
        raise ValueError(f"need target_per_copy > 0, max_copies >= 1, 0 <= hysteresis < 1; got "
                         f"{target_per_copy}, {max_copies}, {hysteresis}")
    changes = {}
    for key, current in copies.items():
        rate = rates.get(key, 0.0)
        want = min(max_copies, max(1, math.ceil(rate / target_per_copy)))
        if want > current and rate > target_per_copy * (1 + hysteresis) * current:
            changes[key] = want
        elif want < current and rate < target_per_copy * (1 - hysteresis) * (current - 1):
            changes[key] = want
    return changes


def autoscaled(assignment: Assignment, copies: dict[tuple[int, int], int], rates: dict[tuple[int, int], float],
               target_per_copy: float, max_copies: int, hysteresis: float, num_experts: int,
               nodes: dict[str, str]) -> Assignment:
    """`assignment` (the live groups') with every layer that plan_autoscale names re-planned by
    replicate_layer for its new total of copies (equal slots per group, copies on distinct nodes)."""
    most = min(max_copies or len(assignment), len(assignment))
    wanted = {**copies, **plan_autoscale(rates, copies, target_per_copy, most, hysteresis)}
    plan = assignment
    for layer in sorted({l for (l, e), n in wanted.items() if n != copies[(l, e)]}):
        total = sum(n for (l, _), n in wanted.items() if l == layer)
        plan = replicate_layer(plan, layer, rates, total, num_experts, most, nodes)
    return plan
