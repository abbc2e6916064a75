"""Emulated slow links, for testing placement on one machine (where every link is loopback): what
reads a node's emulated delay. A node started with the Ray label `expert-mesh.io/link-delay-ms=<d>`
stands for a far host when the mesh runs emulated links (cluster/links.py's EmulatedLinks, or a
bench's simulated devices, experts/simulated.py): every gRPC call served by a process on it answers
d ms later, whoever the caller is. The probes measure that delay like any real one; nothing tells
the placement optimiser about the label. A mesh of real groups reads no label.
"""

from __future__ import annotations

import asyncio

__all__ = ["LINK_DELAY_LABEL", "emulated_delay_s", "serve_delay"]

LINK_DELAY_LABEL = "expert-mesh.io/link-delay-ms"


def emulated_delay_s() -> float:
    """This node's emulated link delay in seconds (0 outside Ray or without the label)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    value = ray.get_runtime_context().get_node_labels().get(LINK_DELAY_LABEL)
    if isinstance(value, list):  # some Ray versions give label values as lists
        value = value[0] if value else None
    try:
        return max(float(value), 0.0) / 1000 if value else 0.0
    except ValueError as exc:
        raise ValueError(f"node label {LINK_DELAY_LABEL} must be a number of ms, got {value!r}") from exc


async def serve_delay(delay_s: float) -> None:
    """Hold a reply for the emulated link delay (no-op when it is 0)."""
    if delay_s > 0:
        await asyncio.sleep(delay_s)
