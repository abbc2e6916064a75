"""Test and bench parts reach a mesh only through the group factory: no production module imports
the link emulation (cluster/links.py, experts/links.py) or the simulated devices."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
EMULATION = {"cluster.links", "experts.links", "experts.simulated"}
# the emulation's own modules
ALLOWED = {"cluster/links.py", "experts/links.py", "experts/simulated.py"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


PRODUCTION = sorted(str(p.relative_to(ROOT)) for folder in ("mesh", "experts", "router_service", "protos", "kernels",
                                                            "cluster")
                    for p in (ROOT / folder).rglob("*.py") if str(p.relative_to(ROOT)) not in ALLOWED)


def test_the_scan_sees_the_emulations_own_imports():
    assert "experts.links" in _imports(ROOT / "cluster/links.py")  # the scan reads what it should


@pytest.mark.parametrize("module", PRODUCTION)
def test_no_production_module_imports_the_emulation(module):
    assert not _imports(ROOT / module) & EMULATION, f"{module} imports {_imports(ROOT / module) & EMULATION}"
