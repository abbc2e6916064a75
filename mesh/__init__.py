"""The control plane: controller, routing tables, placement and replication policies."""

from mesh.replication import KEEP_TOLERANCE, rebalance_experts

__all__: list[str] = ["KEEP_TOLERANCE", "rebalance_experts"]
