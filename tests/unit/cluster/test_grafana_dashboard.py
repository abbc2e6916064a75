"""cluster/grafana_dashboard.json charts only metrics the mesh exports, with labels they carry.

What the mesh exports is read from RouterMetrics itself, built on fakes of ray.util.metrics: a
Counter `n` is scraped as `ray_n_total`, a Histogram `n` as `ray_n_bucket` / `ray_n_sum` /
`ray_n_count` (Ray 2.60's OpenTelemetry exporter; tests/integration/test_metrics.py scrapes those
names from a real cluster). No Ray cluster here.
"""

from __future__ import annotations

import re

import pytest

from router_service.metrics import METRIC_NAMES, RouterMetrics
from tests.grafana import load_dashboard, queries

# PromQL functions, aggregations and keywords the dashboard may use; any other name must be a metric.
PROMQL_WORDS = {"sum", "avg", "max", "min", "count", "rate", "irate", "increase", "histogram_quantile", "clamp_min",
                "clamp_max", "sort_desc", "sort", "topk", "bottomk", "label_values", "by", "without", "on",
                "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool", "vector", "abs"}
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId"}  # Ray adds these to every sample
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


class FakeMetric:
    kind = ""

    def __init__(self, name: str, description: str = "", boundaries=None, tag_keys=()):
        EXPORTED.append((self.kind, name, tuple(tag_keys)))

    def set_default_tags(self, tags: dict) -> None:
        pass


class FakeCounter(FakeMetric):
    kind = "counter"


class FakeHistogram(FakeMetric):
    kind = "histogram"


EXPORTED: list[tuple[str, str, tuple[str, ...]]] = []


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[str, set[str]]]:
    """Scraped metric name -> (METRIC_NAMES entry, its labels), from a RouterMetrics on fakes."""
    import ray.util.metrics

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray.util.metrics, "Counter", FakeCounter)
        patch.setattr(ray.util.metrics, "Histogram", FakeHistogram)
        EXPORTED.clear()
        RouterMetrics("mesh")
    assert sorted(name for _, name, _ in EXPORTED) == sorted(METRIC_NAMES.values())
    names = {}
    for kind, name, tags in EXPORTED:
        if kind == "counter":
            names[f"ray_{name}_total"] = (name, set(tags))
        else:
            for suffix in ("_sum", "_count"):
                names[f"ray_{name}{suffix}"] = (name, set(tags))
            names[f"ray_{name}_bucket"] = (name, {*tags, "le"})
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression reads (strings, label sets, ranges, variables dropped)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", " ", bare)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
    bare = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", " ", bare)
    return [name for name in _NAME.findall(bare) if name not in PROMQL_WORDS]


def test_every_charted_metric_is_one_the_mesh_exports(dashboard, exported):
    for where, expr in queries(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        for name in names:
            assert name in exported, f"{where}: {name} is not exported by the mesh (exported: {sorted(exported)})"


def test_labels_in_queries_are_labels_of_those_metrics(dashboard, exported):
    for where, expr in queries(dashboard):
        labels = set().union(*(exported[n][1] for n in metric_names(expr))) | RAY_LABELS
        for name, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", re.sub(r'"(?:[^"\\]|\\.)*"', "", matchers)):
                assert label in exported[name][1] | RAY_LABELS, f"{where}: {name} has no label {label!r}"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (s.strip() for s in group.split(","))):
                assert label in labels, f"{where}: grouping by {label!r}, a label none of {metric_names(expr)} has"


def test_every_mesh_metric_is_charted(dashboard, exported):
    charted = {exported[n][0] for _, expr in queries(dashboard) for n in metric_names(expr)}
    assert charted == set(METRIC_NAMES.values())


def test_dashboard_is_well_formed(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "mesh"} <= variables
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert 'mesh=~"$mesh"' in target["expr"], f"{panel['title']}: {target['expr']} ignores $mesh"
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range", "__interval"}
            assert used <= variables, f"{panel['title']}: unknown variables {used - variables}"


@pytest.mark.parametrize("expr,names", [
    ('sum by (le) (rate(ray_a_bucket{mesh=~"$mesh"}[$__rate_interval]))', ["ray_a_bucket"]),
    ("histogram_quantile(0.99, sum by (le) (rate(x[5m]))) / clamp_min(y, 1e-9)", ["x", "y"]),
    ('sum by (layer) (ray_b_total{mesh=~"$mesh", layer!="0"})', ["ray_b_total"]),
])
def test_metric_names_parser(expr, names):
    assert metric_names(expr) == names
