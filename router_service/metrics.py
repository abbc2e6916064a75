"""Router metrics through ray.util.metrics (exported on Ray's metrics port with a `ray_` prefix).

Names are listed in METRIC_NAMES; cluster/grafana_dashboard.json charts only these.
"""

from __future__ import annotations

__all__ = ["METRIC_NAMES", "RouterMetrics"]

METRIC_NAMES = {
    "tokens": "expert_mesh_expert_tokens",            # counter, tags: mesh, layer, expert
    "requests": "expert_mesh_requests",               # counter, tags: mesh, layer, code
    "errors": "expert_mesh_request_errors",           # counter, tags: mesh, code
    "latency": "expert_mesh_request_latency_ms",      # histogram, tags: mesh
    "batch_tokens": "expert_mesh_batch_tokens",       # histogram, tags: mesh
    "batch_requests": "expert_mesh_batch_requests",   # histogram, tags: mesh
    "hedges": "expert_mesh_hedges",                   # counter, tags: mesh, group, kind (hedge, ejection)
}

_LATENCY_BOUNDS_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
_TOKEN_BOUNDS = [1, 8, 32, 128, 512, 2048, 8192]
_REQUEST_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128]


class RouterMetrics:
    """Created inside a Ray worker (the router actor or Serve replica)."""

    def __init__(self, mesh: str):
        from ray.util import metrics

        tags = {"mesh": mesh}
        self._tokens = metrics.Counter(METRIC_NAMES["tokens"], "Token copies routed to each expert.",
                                       tag_keys=("mesh", "layer", "expert"))
        self._requests = metrics.Counter(METRIC_NAMES["requests"], "Forward requests by status code.",
                                         tag_keys=("mesh", "layer", "code"))
        self._errors = metrics.Counter(METRIC_NAMES["errors"], "Forward requests that failed, by code.",
                                       tag_keys=("mesh", "code"))
        self._latency = metrics.Histogram(METRIC_NAMES["latency"], "Forward latency in the router (ms).",
                                          boundaries=_LATENCY_BOUNDS_MS, tag_keys=("mesh",))
        self._batch_tokens = metrics.Histogram(METRIC_NAMES["batch_tokens"], "Tokens per batch.",
                                               boundaries=_TOKEN_BOUNDS, tag_keys=("mesh",))
        self._batch_requests = metrics.Histogram(METRIC_NAMES["batch_requests"], "Requests merged per batch.",
                                                 boundaries=_REQUEST_BOUNDS, tag_keys=("mesh",))
        self._hedges = metrics.Counter(METRIC_NAMES["hedges"], "Slices hedged past their deadline, and groups "
                                       "ejected from routing, per expert group.", tag_keys=("mesh", "group", "kind"))
        for metric in (self._tokens, self._requests, self._errors, self._latency, self._batch_tokens,
                       self._batch_requests, self._hedges):
            metric.set_default_tags(tags)

    def observe_tokens(self, layer: int, counts: list[int]) -> None:
        for expert, count in enumerate(counts):
            if count:
                self._tokens.inc(count, {"layer": str(layer), "expert": str(expert)})

    def observe_batch(self, num_tokens: int, num_requests: int) -> None:
        self._batch_tokens.observe(num_tokens)
        self._batch_requests.observe(num_requests)

    def observe_hedge(self, group: str, ejected: bool) -> None:
        """A slice to `group` was hedged; `ejected`: that miss ejected the group."""
        self._hedges.inc(1, {"group": group, "kind": "hedge"})
        if ejected:
            self._hedges.inc(1, {"group": group, "kind": "ejection"})

    def observe_request(self, layer: str, code: str, latency_ms: float) -> None:
        """layer: an MoE layer's number or "other"; code: a grpc.StatusCode name (bounded labels)."""
        self._requests.inc(1, {"layer": layer, "code": code})
        self._latency.observe(latency_ms)
        if code != "OK":
            self._errors.inc(1, {"code": code})
