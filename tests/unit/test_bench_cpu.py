"""bench/cpu.py: CPU seconds read from /proc, per call, with the idle share taken out."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
cpu = pytest.importorskip("cpu")

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _spin(seconds: float) -> None:
    import time

    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_process_cpu_s_grows_with_work():
    before = cpu.process_cpu_s(os.getpid())
    _spin(0.2)
    assert cpu.process_cpu_s(os.getpid()) - before == pytest.approx(0.2, abs=0.05)


def test_cpu_per_call_is_the_work_of_one_call():
    assert cpu.cpu_per_call([os.getpid()], lambda: _spin(0.02), 10) == pytest.approx(0.02, abs=0.01)


def test_a_row_sums_its_roles_and_sets_its_floor():
    floors = cpu.CpuFloors(grpc_us=400.0, gloo_us=100.0, layer_us=300.0)
    sent = iter([0, 30])  # the counter before and after: 30 messages over 5 windows x 2 calls
    row = cpu.cpu_row("x", {"client": [os.getpid()]}, lambda: _spin(0.005), 2, lambda: next(sent), 1, 100.0, floors)
    assert row.destinations == 3.0
    assert row.floor_us == 300.0 + 400.0 + 3 * 100.0  # (its measured CPU is test_cpu_per_call's)
