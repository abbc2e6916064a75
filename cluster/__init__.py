"""Getting expert-mesh onto machines: the `mesh` CLI, the embedded local cluster, deployment."""

__all__: list[str] = []
