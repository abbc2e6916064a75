"""The simulated device's cost model, and that its module stays free of torch (the reason it exists)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from experts.simulated import CostModel


def test_cost_model_is_flops_over_throughput_plus_latency():
    cost = CostModel(hidden_size=1000, intermediate_size=2000, tflops=2.0, latency_ms=0.5)
    assert cost.seconds(0) == pytest.approx(0.5e-3)
    assert cost.seconds(100) == pytest.approx(0.5e-3 + 6 * 1000 * 2000 * 100 / 2e12)


def test_simulated_device_module_does_not_import_torch():
    code = "import sys, experts.simulated; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
