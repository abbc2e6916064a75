"""The simulated device's cost model, and that its module stays free of torch (the reason it exists)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.checkpoints import zoo  # noqa: F401

from experts.simulated import CostModel


def test_cost_model_is_flops_over_throughput_plus_latency():
    cost = CostModel(hidden_size=1000, intermediate_size=2000, tflops=2.0, latency_ms=0.5)
    assert cost.seconds(0) == pytest.approx(0.5e-3)
    assert cost.seconds(100) == pytest.approx(0.5e-3 + 6 * 1000 * 2000 * 100 / 2e12)


def test_simulated_device_module_does_not_import_torch():
    code = "import sys, experts.simulated; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


SWAP_SCRIPT = """
import asyncio, json, sys
from experts.simulated import CostModel, SimulatedGroupActor
path, layer = sys.argv[1], int(sys.argv[2])
device = SimulatedGroupActor("g", {layer: [0, 1, 2]}, CostModel(8, 8))
out = {"start": device.versions[(layer, 1)]}
out["staged"] = asyncio.run(device.stage_experts(layer, [2, 1], path, [1], None))
device.commit_staged(layer)
out["committed"] = [device.versions[(layer, e)] for e in (0, 1, 2)]
out["loaded"] = asyncio.run(device.load_experts(layer, [3], path))
device.release_experts(layer, [0])
out["held"] = sorted(e for l, e in device.versions)
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
"""


def test_a_simulated_device_stages_commits_and_loads_versions_from_the_source_bytes(zoo):
    """Stage, commit, load and release as bookkeeping: versions are the source bytes' sha256 (the
    same a real group reports), and the process still never imports torch."""
    import json

    from experts.checkpoint import CheckpointReader

    path = zoo.checkpoint("mixtral")
    reader = CheckpointReader(path)
    layer = reader.spec.moe_layers[0]
    checksums = reader.experts(layer, [1, 2, 3]).checksums
    reader.close()
    out = json.loads(subprocess.run([sys.executable, "-c", SWAP_SCRIPT, str(path), str(layer)], capture_output=True,
                                    text=True, check=True).stdout)
    assert out["start"] == "simulated" and out["torch"] is False
    assert out["staged"] == {"versions": [c[:12] for c in checksums[:2]], "checksums": checksums[:2], "probe": None}
    assert out["committed"] == ["simulated", checksums[0][:12], checksums[1][:12]]
    assert out["loaded"] == [checksums[2][:12]] and out["held"] == [1, 2, 3]
