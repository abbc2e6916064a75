"""The data plane: gRPC router, batcher, dispatch and transports, client library."""

__all__: list[str] = []
