"""The README's monitoring set-up, run for real: `make monitor-check` (skipped anywhere else).

A 2-node Ray cluster with the dashboard on runs a mesh (2 expert groups, 2 routers; the zoo's
mixtral: MoE layers 0 and 1, 6 experts, top-2). A Prometheus of our own scrapes the targets that
the dashboard writes to `<session dir>/prom_metrics_service_discovery.json` (Ray 2.60; the link to it
in /tmp/ray/ follows the newest session on the machine, which may be another cluster's).

Step 1: priming traffic, so that every series the dashboard reads exists before the window
        (Prometheus cannot count what a counter held at its first scrape).
Step 2: t0 = a scrape that shows the priming; the known traffic (Forwards through MeshClient and
        requests failing with INVALID_ARGUMENT, one at a time); t1 = a scrape that shows it.
Step 3: every query of cluster/grafana_dashboard.json runs at t1 with $__rate_interval = $__range =
        t1 - t0 (+1 ms, so that the sample at t0 is inside either way a range is bounded): rate() x
        window and increase() are then the traffic's counts. Tokens per expert are what the gate
        routes (adding up to tokens x top_k), requests by code and layer and the error ratio what
        was sent, batch quantiles what histogram_quantile gives for the batches sent, latency
        quantiles positive, ordered and within the bucket of the slowest call the client timed.
Also: the dashboard's actor listing names the mesh's groups, controller and routers, and headless
Chromium's rendering of its Actors page shows them. Figures per query and the screenshot go to
$MONITOR_OUT (default: the test's temp dir): figures.json, actors.json, dashboard-actors.png.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shutil
import struct
import time
from pathlib import Path

import msgpack
import pytest
import torch

from cluster.local import MeshHandle, start_local_cluster, start_mesh
from experts import load_spec
from mesh.config import MeshConfig
from mesh.controller import NAMESPACE
from router_service import MeshClient
from router_service.metrics import METRIC_NAMES
from tests.grafana import load_dashboard, queries
from tests.integration.mesh_helpers import gate_counts
from tests.monitoring.servers import SCRAPE_INTERVAL_S, Prometheus, chromium, free_port, http_json
from protos.errors import MeshClientError

PROMETHEUS = shutil.which("prometheus")
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.skipif(not os.environ.get("EXPERT_MESH_MONITOR_CHECK"), reason=(
        "opt-in, slow: `make monitor-check` runs it (Ray dashboard, Prometheus and Chromium on 127.0.0.1)")),
    pytest.mark.skipif(PROMETHEUS is None, reason=(
        "no `prometheus` on PATH (Debian: apt-get install prometheus; `make monitor-check` installs it)")),
]

SIZES = (1, 5, 24, 9, 16, 3, 7, 12)   # tokens per good Forward of the known traffic
NUM_BAD = 3                           # Forwards with the wrong hidden size (INVALID_ARGUMENT)
PRIMING_TOKENS = 64                   # per MoE layer: enough that the gate picks every expert
NUM_GROUPS, NUM_ROUTERS = 2, 2
SHOW_TIMEOUT_S = 60.0                 # Ray reports metrics to its agent every ~10 s, scraped every 2 s
TOKENS, REQUESTS = f"ray_{METRIC_NAMES['tokens']}_total", f"ray_{METRIC_NAMES['requests']}_total"
BATCHES = f"ray_{METRIC_NAMES['batch_tokens']}_count"
# Ray 2.60's dashboard and autoscaler serve their own metrics on fixed ports (44227, 44217) unless
# these are set; both are targets in the discovery file.
FIXED_METRIC_PORTS = ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")


@dataclasses.dataclass
class Monitored:
    mesh: MeshHandle
    path: Path
    dashboard_url: str
    targets_file: Path
    prometheus: Prometheus
    workdir: Path
    out: Path


@dataclasses.dataclass
class Traffic:
    """The known traffic and the window [t0, t1] that holds it."""
    mesh: str
    at: float                                  # t1, unix s
    window_ms: int                             # t1 - t0 + 1 ms
    tokens: dict[tuple[str, str], int]         # ("layer", "expert") -> copies routed; every expert, zeros kept
    requests: collections.Counter              # ("layer", "code") -> Forwards
    top_k: int
    num_batches: int
    batch_tokens: list[int]                    # tokens of each batch
    slowest_call_ms: float                     # the slowest Forward as the client timed it
    bounds: dict[str, list[float]]             # histogram metric -> its finite bucket bounds, from Prometheus

    @property
    def window_s(self) -> float:
        return self.window_ms / 1000.0


@pytest.fixture(scope="module")
def monitored(zoo, tmp_path_factory):
    import ray

    if ray.is_initialized():
        pytest.skip("needs a Ray cluster of its own: run tests/monitoring in a pytest process of its own")
    workdir = tmp_path_factory.mktemp("monitoring")
    out = Path(os.environ.get("MONITOR_OUT") or workdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dashboard_port, env = free_port(), pytest.MonkeyPatch()
    for variable in FIXED_METRIC_PORTS:  # else every cluster on the machine exports on the same two ports
        env.setenv(variable, str(free_port()))
    cluster = start_local_cluster(num_nodes=2, dashboard=True, dashboard_port=dashboard_port,
                                  metrics_export_port=free_port())
    mesh = prometheus = None
    try:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        path = zoo.checkpoint("mixtral")
        config = MeshConfig(name=f"mon{os.getpid()}", num_routers=NUM_ROUTERS, router={"port": 0},
                            groups={"num_groups": NUM_GROUPS})
        mesh = start_mesh(config, path)
        from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

        targets_file = Path(cluster.head_node.get_session_dir_path()) / PROMETHEUS_SERVICE_DISCOVERY_FILE
        wait_for_node_targets(targets_file)
        prometheus = Prometheus(PROMETHEUS, targets_file, workdir)
        prometheus.start()
        yield Monitored(mesh, path, f"http://127.0.0.1:{dashboard_port}", targets_file, prometheus, workdir, out)
    finally:
        if prometheus is not None:
            prometheus.stop()
        if mesh is not None:
            mesh.stop()
        ray.shutdown()
        cluster.shutdown()
        env.undo()


def wait_for_node_targets(targets_file: Path, timeout_s: float = 60.0) -> list[str]:
    """The file's targets once it names every live node's metrics export port (the dashboard
    rewrites it every 5 s)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        nodes = {f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]}
        targets = file_targets(targets_file)
        if nodes <= set(targets):
            return targets
        if time.monotonic() > deadline:
            raise AssertionError(f"{targets_file} names {targets}, not every node's {sorted(nodes)}")
        time.sleep(1.0)


def file_targets(targets_file: Path) -> list[str]:
    if not targets_file.exists():
        return []
    return [t for group in json.loads(targets_file.read_text()) for t in group["targets"]]


def router_counts(mesh: MeshHandle) -> dict:
    """Summed over the mesh's routers: {"tokens": {(layer, expert): copies}, "batches", "entries"}
    since start; and router 0's own under "first"."""
    import ray

    reports = [msgpack.unpackb(r, strict_map_key=False)
               for r in ray.get([router.load_report.remote() for router in mesh.routers])]
    total = {"tokens": collections.Counter(), "batches": 0, "entries": 0}
    for report in reports:
        total["tokens"].update({(str(l), str(e)): n for l, e, n in report["tokens"]})
        total["batches"] += report["batches"]["batches"]
        total["entries"] += report["batches"]["entries"]
    first = reports[0]
    total["first"] = {"tokens": {(str(l), str(e)): n for l, e, n in first["tokens"]},
                      "batches": first["batches"]["batches"], "entries": first["batches"]["entries"]}
    return total


def scalar(prometheus: Prometheus, expr: str, at: float) -> float:
    result = prometheus.query(expr, at)
    return float(result[0]["value"][1]) if result else 0.0


def wait_until_shown(monitored: Monitored, num_requests: int) -> float:
    """The time of the newest scrape once Prometheus holds what the routers counted (tokens and
    batches) and `num_requests` Forwards."""
    mesh, prometheus = monitored.mesh, monitored.prometheus
    counted = router_counts(mesh)
    want = {TOKENS: sum(counted["tokens"].values()), REQUESTS: num_requests, BATCHES: counted["batches"]}
    deadline = time.monotonic() + SHOW_TIMEOUT_S
    while True:
        now = time.time()
        shown = {name: scalar(prometheus, f'sum({name}{{mesh="{mesh.name}"}})', now) for name in want}
        if shown == want:
            return scalar(prometheus, f'max(timestamp({REQUESTS}{{mesh="{mesh.name}"}}))', now)
        if time.monotonic() > deadline:
            raise AssertionError(f"Prometheus shows {shown}, the routers counted {want} "
                                 f"(targets: {monitored.prometheus.active_targets()})")
        time.sleep(SCRAPE_INTERVAL_S / 2)


def bad_input(spec) -> torch.Tensor:
    return torch.randn(2, spec.hidden_size + 1)


def send_priming(monitored: Monitored, spec, client: MeshClient) -> int:
    """One good and one bad Forward per MoE layer (the good one hits every expert); returns the
    number of Forwards."""
    generator = torch.Generator().manual_seed(11)
    for layer in spec.moe_layers:
        x = torch.randn(PRIMING_TOKENS, spec.hidden_size, generator=generator)
        picked = gate_counts(monitored.path, layer, x)
        assert len(picked) == spec.num_experts, f"priming of layer {layer} misses experts: {picked}"
        client.forward(layer, x)
        with pytest.raises(MeshClientError, match="INVALID_ARGUMENT"):
            client.forward(layer, bad_input(spec))
    return 2 * len(spec.moe_layers)


def send_known_traffic(monitored: Monitored, spec, client: MeshClient) -> tuple[dict, collections.Counter, float]:
    """SIZES good Forwards and NUM_BAD bad ones, one at a time, over the MoE layers in turn.
    Returns the token copies the gate routes per ("layer", "expert") (every expert, zeros kept),
    the Forwards per ("layer", "code") and the slowest call in ms."""
    tokens = {(str(l), str(e)): 0 for l in spec.moe_layers for e in range(spec.num_experts)}
    requests, slowest_ms = collections.Counter(), 0.0
    generator = torch.Generator().manual_seed(5)
    calls = [(True, n) for n in SIZES] + [(False, 2)] * NUM_BAD
    for i, (is_good, num_tokens) in enumerate(calls):
        layer = spec.moe_layers[i % len(spec.moe_layers)]
        x = torch.randn(num_tokens, spec.hidden_size, generator=generator) if is_good else bad_input(spec)
        start = time.perf_counter()
        if is_good:
            client.forward(layer, x)
        else:
            with pytest.raises(MeshClientError, match="INVALID_ARGUMENT"):
                client.forward(layer, x)
        slowest_ms = max(slowest_ms, (time.perf_counter() - start) * 1e3)
        for key, n in (gate_counts(monitored.path, layer, x) if is_good else {}).items():
            tokens[tuple(key.split("/"))] += n
        requests[(str(layer), "OK" if is_good else "INVALID_ARGUMENT")] += 1
    return tokens, requests, slowest_ms


@pytest.fixture(scope="module")
def traffic(monitored) -> Traffic:
    mesh, spec = monitored.mesh, load_spec(monitored.path)
    with MeshClient(mesh.address, timeout_s=60) as client:
        # Step 1: priming, and t0: a scrape that holds it.
        num_priming = send_priming(monitored, spec, client)
        t0 = wait_until_shown(monitored, num_priming)
        before = router_counts(mesh)["first"]
        # Step 2: the known traffic through router 0; t1: a scrape that holds it.
        tokens, requests, slowest_ms = send_known_traffic(monitored, spec, client)
    t1 = wait_until_shown(monitored, num_priming + len(SIZES) + NUM_BAD)
    after = router_counts(mesh)["first"]
    routed = {k: after["tokens"].get(k, 0) - before["tokens"].get(k, 0) for k in tokens}
    assert routed == tokens, "router 0 counted other copies than the gate routes"
    num_batches = after["batches"] - before["batches"]
    assert num_batches == after["entries"] - before["entries"] == len(SIZES), "one batch per sequential Forward"
    bounds = {name: bucket_bounds(monitored, f"ray_{METRIC_NAMES[name]}_bucket", t1)
              for name in ("latency", "batch_tokens", "batch_requests")}
    return Traffic(mesh.name, t1, round((t1 - t0) * 1000) + 1, tokens, requests, spec.top_k, num_batches,
                   list(SIZES), slowest_ms, bounds)


def bucket_bounds(monitored: Monitored, bucket: str, at: float) -> list[float]:
    series = monitored.prometheus.query(f'sum by (le) ({bucket}{{mesh="{monitored.mesh.name}"}})', at)
    return sorted(float(s["metric"]["le"]) for s in series if s["metric"]["le"] != "+Inf")


def histogram_quantile(q: float, observations: list[float], bounds: list[float]) -> float:
    """What PromQL's histogram_quantile gives for `observations` in buckets of upper `bounds`
    (linear inside the bucket holding rank q x count; the first bucket starts at 0)."""
    cumulative = [sum(1 for v in observations if v <= b) for b in bounds]
    rank = q * len(observations)
    b = next(i for i, c in enumerate(cumulative) if c >= rank)
    start, below = (0.0, 0) if b == 0 else (bounds[b - 1], cumulative[b - 1])
    return start + (bounds[b] - start) * (rank - below) / (cumulative[b] - below)


def concrete(expr: str, mesh: str, window_ms: int) -> str:
    """The query with Grafana's variables replaced: $mesh by the mesh's name, $layer by its
    "All" value, the rate interval and the range by the window."""
    values = {"mesh": mesh, "layer": ".*", "__rate_interval": f"{window_ms}ms", "__range": f"{window_ms}ms"}
    return re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)


def by(series: list[dict], *labels: str) -> dict[tuple[str, ...], float]:
    """{label values: sample value} of an instant vector; each key once."""
    found = {}
    for s in series:
        key = tuple(s["metric"].get(label, "") for label in labels)
        assert key not in found, f"two series for {dict(zip(labels, key))}"
        found[key] = float(s["value"][1])
    return found


def one(series: list[dict]) -> float:
    assert len(series) == 1, f"{len(series)} series, one expected"
    return float(series[0]["value"][1])


def assert_counts(rates: dict, expected: dict, window_s: float) -> dict:
    """rate() values x the window equal the counts expected (zeros included); returns the counts."""
    counts = {key: rate * window_s for key, rate in rates.items()}
    assert set(counts) == set(expected), f"series {sorted(counts)}, expected {sorted(expected)}"
    for key, n in expected.items():
        assert counts[key] == pytest.approx(n, rel=1e-3, abs=1e-6), f"{key}: {counts[key]:.4f}, sent {n}"
    return counts


def check_tokens_per_expert(series, traffic: Traffic) -> dict:
    counts = assert_counts(by(series, "layer", "expert"), traffic.tokens, traffic.window_s)
    assert sum(counts.values()) == pytest.approx(traffic.top_k * sum(SIZES), rel=1e-3)
    return counts


def check_imbalance(series, traffic: Traffic) -> dict:
    found = by(series, "layer")
    for (layer,) in found:
        layer_tokens = [n for (l, _), n in traffic.tokens.items() if l == layer]
        want = max(layer_tokens) / (sum(layer_tokens) / len(layer_tokens))
        assert found[(layer,)] == pytest.approx(want, rel=1e-6), f"layer {layer}: {found[(layer,)]}, want {want}"
    assert set(found) == {(l,) for l, _ in traffic.tokens}
    return found


def check_tokens_over_range(series, traffic: Traffic) -> dict:
    found = by(series, "layer", "expert")
    values = [float(s["value"][1]) for s in series]
    assert values == sorted(values, reverse=True), "sort_desc order"
    return assert_counts(found, traffic.tokens, 1.0)


def check_requests_by_code(series, traffic: Traffic) -> dict:
    sent = collections.Counter()
    for (_, code), n in traffic.requests.items():
        sent[(code,)] += n
    return assert_counts(by(series, "code"), sent, traffic.window_s)


def check_requests_by_layer(series, traffic: Traffic) -> dict:
    sent = collections.Counter()
    for (layer, _), n in traffic.requests.items():
        sent[(layer,)] += n
    return assert_counts(by(series, "layer"), sent, traffic.window_s)


def check_error_ratio(series, traffic: Traffic) -> dict:
    ratio = one(series)
    assert ratio == pytest.approx(NUM_BAD / (NUM_BAD + len(SIZES)), rel=1e-6)
    return {"ratio": ratio}


def check_errors_by_code(series, traffic: Traffic) -> dict:
    return assert_counts(by(series, "code"), {("INVALID_ARGUMENT",): NUM_BAD}, traffic.window_s)


def check_latency_quantile(series, traffic: Traffic) -> dict:
    """Positive and at most the upper bound of the bucket that holds the slowest call the client timed."""
    value = one(series)
    ceiling = min((b for b in traffic.bounds["latency"] if b >= traffic.slowest_call_ms), default=math.inf)
    assert 0 < value <= ceiling, f"{value} ms; the slowest call took {traffic.slowest_call_ms:.1f} ms"
    return {"ms": value, "slowest_call_ms": traffic.slowest_call_ms}


def check_tokens_routed(series, traffic: Traffic) -> dict:
    copies = one(series) * traffic.window_s
    assert copies == pytest.approx(traffic.top_k * sum(SIZES), rel=1e-3)
    return {"copies": copies}


def batch_quantile(metric: str, q: float, observations):
    def check(series, traffic: Traffic) -> dict:
        want = histogram_quantile(q, observations(traffic), traffic.bounds[metric])
        assert one(series) == pytest.approx(want, rel=1e-6), f"{one(series)}, histogram_quantile of the batches {want}"
        return {"value": one(series)}
    return check


def check_batches(series, traffic: Traffic) -> dict:
    batches = one(series) * traffic.window_s
    assert batches == pytest.approx(traffic.num_batches, rel=1e-3)
    return {"batches": batches}


def check_mesh_variable(series, traffic: Traffic) -> dict:
    assert (traffic.mesh,) in by(series, "mesh")
    return {"meshes": sorted(by(series, "mesh"))}


def check_layer_variable(series, traffic: Traffic) -> dict:
    assert set(by(series, "layer")) == {(l,) for l, _ in traffic.tokens}
    return {"layers": sorted(by(series, "layer"))}


def _tokens(traffic):
    return traffic.batch_tokens


def _one_request_each(traffic):
    return [1] * traffic.num_batches


CHECKS = {
    "panel 'Tokens per expert' target A": check_tokens_per_expert,
    "panel 'Expert load imbalance' target A": check_imbalance,
    "panel 'Tokens per expert over the range' target A": check_tokens_over_range,
    "panel 'Requests by code' target A": check_requests_by_code,
    "panel 'Requests by code' target B": check_requests_by_layer,
    "panel 'Error rate' target A": check_error_ratio,
    "panel 'Errors by code' target A": check_errors_by_code,
    "panel 'Forward latency in the router' target A": check_latency_quantile,
    "panel 'Forward latency in the router' target B": check_latency_quantile,
    "panel 'Forward latency in the router' target C": check_latency_quantile,
    "panel 'Tokens routed' target A": check_tokens_routed,
    "panel 'Tokens per batch' target A": batch_quantile("batch_tokens", 0.5, _tokens),
    "panel 'Tokens per batch' target B": batch_quantile("batch_tokens", 0.9, _tokens),
    "panel 'Tokens per batch' target C": check_batches,
    "panel 'Requests merged per batch' target A": batch_quantile("batch_requests", 0.5, _one_request_each),
    "panel 'Requests merged per batch' target B": batch_quantile("batch_requests", 0.9, _one_request_each),
    "panel 'Requests merged per batch' target C": batch_quantile("batch_requests", 0.99, _one_request_each),
    "variable $mesh": check_mesh_variable,
    "variable $layer": check_layer_variable,
}


def test_prometheus_scrapes_every_target_of_rays_discovery_file(monitored, traffic):
    targets = file_targets(monitored.targets_file)
    assert targets and all(t.startswith("127.0.0.1:") for t in targets), targets
    active = {t["labels"]["instance"]: t for t in monitored.prometheus.active_targets()}
    assert set(active) == set(targets), f"Prometheus scrapes {sorted(active)}, the file names {targets}"
    down = {name: t["lastError"] for name, t in active.items() if t["health"] != "up"}
    assert not down, f"targets not up: {down}"


def test_every_dashboard_query_shows_the_traffic(monitored, traffic):
    mesh, failures, figures = monitored.mesh.name, [], {}
    for where, expr in queries(load_dashboard()):
        query = concrete(expr, mesh, traffic.window_ms)
        check = CHECKS.get(where)
        try:
            series = monitored.prometheus.query(query, traffic.at)
            assert series, "no series"
            assert check is not None, "no check for this query: add one to CHECKS"
            seen = check(series, traffic)
            figures[where] = {"query": query, "values": {"/".join(k) if isinstance(k, tuple) else k: v
                                                         for k, v in seen.items()}}
        except (AssertionError, RuntimeError) as exc:
            failures.append(f"{where}: {query}\n    {exc}")
    latency = [figures.get(f"panel 'Forward latency in the router' target {r}", {}).get("values", {}).get("ms")
               for r in "ABC"]
    if None not in latency and not latency[0] <= latency[1] <= latency[2]:
        failures.append(f"latency p50 <= p90 <= p99 does not hold: {latency}")
    write_figures(monitored.out / "figures.json", traffic, figures)
    assert not failures, "\n".join(failures)


def write_figures(path: Path, traffic: Traffic, figures: dict) -> None:
    sent = {"window_ms": traffic.window_ms, "good_forwards": len(SIZES), "tokens": sum(SIZES), "top_k": traffic.top_k,
            "bad_forwards": NUM_BAD, "batches": traffic.num_batches, "slowest_call_ms": traffic.slowest_call_ms}
    path.write_text(json.dumps({"sent": sent, "queries": figures}, indent=1, default=str))


def mesh_actor_names(mesh: MeshHandle) -> set[str]:
    return ({f"{mesh.name}/controller"} | {f"{mesh.name}/group-{k}" for k in range(NUM_GROUPS)}
            | {f"{mesh.name}/router-{k}" for k in range(NUM_ROUTERS)})


def listed_actors(dashboard_url: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """The live actors in namespace expert-mesh by name, as the state API lists them and as the
    Actors page's own endpoint does."""
    state = http_json(f"{dashboard_url}/api/v0/actors?limit=10000")["data"]["result"]["result"]
    logical = http_json(f"{dashboard_url}/logical/actors")["data"]["actors"].values()
    return ({a["name"]: a for a in state if a["state"] == "ALIVE" and a["ray_namespace"] == NAMESPACE},
            {a["name"]: a for a in logical if a["state"] == "ALIVE"})


def test_dashboard_lists_the_mesh_actors(monitored):
    want = mesh_actor_names(monitored.mesh)
    deadline = time.monotonic() + 30
    while True:
        state, logical = listed_actors(monitored.dashboard_url)
        if want <= set(state) and want <= set(logical) or time.monotonic() > deadline:
            break
        time.sleep(2.0)  # /logical/actors answers from a cache
    rows = {name: {key: state.get(name, {}).get(key) for key in ("class_name", "actor_id", "node_id", "pid")}
            for name in sorted(want)}
    (monitored.out / "actors.json").write_text(json.dumps(rows, indent=1))
    assert want <= set(state), f"/api/v0/actors lacks {sorted(want - set(state))}"
    assert want <= set(logical), f"/logical/actors lacks {sorted(want - set(logical))}"


@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH (Debian: apt-get install chromium)")
def test_actors_page_shows_the_mesh_actors(monitored):
    url = f"{monitored.dashboard_url}/#/actors"
    budget = "--virtual-time-budget=20000"  # let the page fetch and render the actor table
    dom = chromium(CHROMIUM, url, monitored.workdir / "chromium-dom", budget, "--dump-dom")
    missing = sorted(name for name in mesh_actor_names(monitored.mesh) if name not in dom)
    assert not missing, f"the Actors page as rendered lacks {missing}"
    png = monitored.out / "dashboard-actors.png"
    png.unlink(missing_ok=True)
    chromium(CHROMIUM, url, monitored.workdir / "chromium-shot", budget, f"--screenshot={png}",
             "--window-size=1400,900")
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    assert struct.unpack(">II", header[16:24]) == (1400, 900), "screenshot size"
