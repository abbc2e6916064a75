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


def test_the_skeleton_plans_what_the_layer_computes(tmp_path):
    """bench/skeleton.py's split of a Forward over its groups, each computed by the group that owns
    those experts, combines to MoELayer's own answer: the skeleton does the whole work."""
    import torch

    skeleton = pytest.importorskip("skeleton")
    from experts import MoELayer
    from experts.builtin import build_model, save_checkpoint
    from experts.group import ExpertGroup

    save_checkpoint(build_model("mixtral", seed=0, hidden_size=64, intermediate_size=128, num_local_experts=8,
                                num_experts_per_tok=2, num_hidden_layers=1), tmp_path)
    layer = MoELayer.from_pretrained(tmp_path, 0)
    groups = [ExpertGroup.from_checkpoint(tmp_path, {0: list(skeleton.owned(8, g))}) for g in range(skeleton.NUM_GROUPS)]
    x = torch.randn(skeleton.TOKENS, 64, generator=torch.Generator().manual_seed(0))
    plan = skeleton.Plan(layer, x)
    ys = [skeleton.compute(groups[g], counts, rows) for g, (counts, rows) in plan.sends.items()]
    assert sum(rows.shape[0] for _, rows in plan.sends.values()) == skeleton.TOKENS * 2
    torch.testing.assert_close(plan.combine(ys), layer(x), rtol=1e-5, atol=1e-6)
