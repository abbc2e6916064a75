"""The PromQL that cluster/grafana_dashboard.json runs: read by the unit test of its metric names
and by the monitoring check, which runs every query against a real Prometheus."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["DASHBOARD", "load_dashboard", "queries"]

DASHBOARD = Path(__file__).parents[1] / "cluster" / "grafana_dashboard.json"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable (`label_values(q, l)` as
    `sum by (l) (q)`, so that its label is checked like any grouping and Prometheus can run it).
    where: "panel 'title' target A" or "variable $name"."""
    found = [(f"panel {p['title']!r} target {t['refId']}", t["expr"])
             for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = re.sub(r"^label_values\((.*),\s*(\w+)\)$", r"sum by (\2) (\1)", variable["query"]["query"])
            found.append((f"variable ${variable['name']}", query))
    return found
