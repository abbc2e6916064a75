"""The mesh's metrics as Prometheus scrapes them from Ray's metrics export ports.

Where Ray 2.60 exports them: every node's metrics agent serves the metrics of the processes on
*its* node at `http://<node>:<MetricsExportPort>/metrics` (`ray.nodes()[i]["MetricsExportPort"]`);
the head's port (`ray_cluster.metrics_port`, `--metrics-export-port`) covers the head only.
Prometheus scrapes every node (with the dashboard on, the head writes the list to
`/tmp/ray/prom_metrics_service_discovery.json` for `file_sd_configs`); this test sums over all the
nodes as a PromQL `sum` would. Names: `ray_` + METRIC_NAMES, counters with `_total` (OpenTelemetry
exporter), histograms as `_bucket`/`_sum`/`_count`; values appear within one report interval (~10 s).

Known traffic (Forward calls on every MoE layer and one bad request) to a mesh of its own: the
scraped per-expert token counters exceed the router's warm-up counts by exactly the token copies
that experts.Gate routes for those inputs; requests by layer and code, errors by code and the latency
histogram's count are exactly that traffic (the warm-up is no Forward request); the batch
histograms count the router's batches.
"""

from __future__ import annotations

import collections
import re
import time
import urllib.request

import msgpack
import pytest
import ray
import torch

from experts import CheckpointReader, Gate, load_spec
from router_service import MeshClient
from router_service.metrics import METRIC_NAMES
from protos.errors import MeshClientError

SCRAPE_TIMEOUT_S = 45.0
SIZES = (1, 5, 24, 9, 16, 3, 7, 12)   # tokens per Forward request
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
TOKENS = f"ray_{METRIC_NAMES['tokens']}_total"
REQUESTS = f"ray_{METRIC_NAMES['requests']}_total"
ERRORS = f"ray_{METRIC_NAMES['errors']}_total"
LATENCY_COUNT = f"ray_{METRIC_NAMES['latency']}_count"
BATCH_TOKENS_COUNT = f"ray_{METRIC_NAMES['batch_tokens']}_count"
BATCH_REQUESTS_COUNT = f"ray_{METRIC_NAMES['batch_requests']}_count"
KEYS = {TOKENS: ("layer", "expert"), REQUESTS: ("layer", "code"), ERRORS: ("code",), LATENCY_COUNT: (),
        BATCH_TOKENS_COUNT: (), BATCH_REQUESTS_COUNT: ()}


def scrape(mesh: str) -> dict[str, collections.Counter]:
    """Per metric of KEYS, the samples of `mesh` summed over every node's export port and worker:
    {metric: Counter({label values: value})}."""
    totals = {name: collections.Counter() for name in KEYS}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
        except OSError:  # an agent still starting (nodes come and go in this session): retried by the caller
            continue
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match is None or match.group(1) not in totals:
                continue
            labels = dict(_LABEL.findall(match.group(2) or ""))
            if labels.get("mesh") == mesh:
                totals[match.group(1)][tuple(labels[k] for k in KEYS[match.group(1)])] += float(match.group(3))
    return totals


def wait_for_scrape(mesh: str, is_done) -> dict[str, collections.Counter]:
    """Scrape until `is_done(scraped)` (metrics reach the agents once per report interval)."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        scraped = scrape(mesh)
        if is_done(scraped) or time.monotonic() > deadline:
            return scraped
        time.sleep(1.0)


def router_report(mesh) -> tuple[collections.Counter, dict]:
    """The router's own counters: tokens per ("layer", "expert") since start, and batch statistics."""
    report = msgpack.unpackb(ray.get(mesh.router.load_report.remote()), strict_map_key=False)
    tokens = collections.Counter({(str(l), str(e)): n for l, e, n in report["tokens"]})
    return tokens, report["batches"]


def gate_copies(path, layer: int, x: torch.Tensor) -> collections.Counter:
    """Per ("layer", "expert"): the token copies that the gate of `layer` routes for x [T, H]."""
    spec, reader = load_spec(path), CheckpointReader(path)
    try:
        _, ids = Gate(spec, reader.gate(layer))(x)  # [T, k]
    finally:
        reader.close()
    counts = torch.bincount(ids.reshape(-1), minlength=spec.num_experts).tolist()
    return collections.Counter({(str(layer), str(e)): n for e, n in enumerate(counts) if n})


def delta(after: collections.Counter, before: collections.Counter) -> collections.Counter:
    return collections.Counter({k: after[k] - before[k] for k in after if after[k] != before[k]})


@pytest.fixture(scope="module")
def metrics_mesh(ray_cluster, meshes, zoo):
    path = zoo.checkpoint("mixtral")
    return path, meshes.get(path, key="metrics")


def test_scraped_metrics_match_the_traffic_sent(metrics_mesh):
    path, mesh = metrics_mesh
    spec = load_spec(path)
    # Step 1: what the router counted before (its warm-up batch per layer: tokens and batches, no request).
    warm_tokens, warm_batches = router_report(mesh)

    # Step 2: known traffic, one request at a time, over every MoE layer; then one bad request.
    generator = torch.Generator().manual_seed(3)
    expected_tokens, expected_requests = collections.Counter(), collections.Counter()
    with MeshClient(mesh.address, timeout_s=60) as client:
        for i, num_tokens in enumerate(SIZES):
            layer = spec.moe_layers[i % len(spec.moe_layers)]
            x = torch.randn(num_tokens, spec.hidden_size, generator=generator)
            client.forward(layer, x)
            expected_tokens += gate_copies(path, layer, x)
            expected_requests[(str(layer), "OK")] += 1
        with pytest.raises(MeshClientError):
            client.forward(spec.moe_layers[0], torch.randn(2, spec.hidden_size + 1))
        expected_requests[(str(spec.moe_layers[0]), "INVALID_ARGUMENT")] += 1
    router_tokens, router_batches = router_report(mesh)
    assert delta(router_tokens, warm_tokens) == expected_tokens  # the router counted what the gate routes
    assert sum(expected_tokens.values()) == spec.top_k * sum(SIZES)
    num_batches = router_batches["batches"] - warm_batches["batches"]
    assert num_batches >= len(SIZES)

    # Step 3: scrape until the export caught up; the counters hold exactly warm-up + that traffic.
    num_requests = len(SIZES) + 1
    scraped = wait_for_scrape(mesh.name, lambda s: s[TOKENS] == router_tokens
                              and s[LATENCY_COUNT][()] == num_requests
                              and s[BATCH_TOKENS_COUNT][()] == router_batches["batches"])
    assert delta(scraped[TOKENS], warm_tokens) == expected_tokens
    assert scraped[REQUESTS] == expected_requests  # warm-up batches are not Forward requests
    assert scraped[ERRORS] == collections.Counter({("INVALID_ARGUMENT",): 1})
    assert scraped[LATENCY_COUNT][()] == num_requests
    for batches in (BATCH_TOKENS_COUNT, BATCH_REQUESTS_COUNT):
        assert scraped[batches][()] - warm_batches["batches"] == num_batches, batches
