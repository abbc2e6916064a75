"""The control plane: controller, routing tables, placement and replication policies."""

__all__: list[str] = []
