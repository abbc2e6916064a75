"""bench/gpu_check.py, the check prepared for a GPU machine, run here on CPU (Triton interpreted,
small shapes): every check passes, each kernel family is among them, and it imports neither Ray
nor pydantic (the lent GPU machine has neither; its two-process check, which needs pydantic, runs
in a process of its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = """
import runpy, sys
sys.argv = ["bench/gpu_check.py", "--device", "cpu"]
try:
    runpy.run_path("bench/gpu_check.py", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("imported:", sorted(m for m in ("ray", "pydantic") if m in sys.modules))
sys.exit(code)
"""


def test_gpu_check_passes_on_cpu_without_ray_or_pydantic():
    result = subprocess.run([sys.executable, "-c", RUN], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "all checks passed" in out and "FAIL" not in out
    for check in ("gate sigmoid sink", "gate sparsemixer", "align", "grouped MLP SwiGLU", "grouped MLP clamped",
                  "grouped MLP relu^2 not gated", "grouped MLP block fp8", "combine",
                  "MoELayer on cpu vs the host, nemotron_h",
                  "router core (on the host) and a group's worker (cpu), two processes over grpc, three layers"):
        assert f"PASS {check}" in out, check
    for layer in ("small_Mixtral_checkpoint", "tiny_Mixtral", "tiny_V3"):  # each layer's answer checked
        assert f"two processes, {layer}: error" in out, layer
    assert "imported: []" in out


def test_a_check_past_its_tolerance_or_raising_fails_and_the_others_run(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    checks = gpu_check.Checks(limit_s=1)
    checks.run("off", lambda: (1.0, 0.1))
    checks.run("raises", lambda: 1 / 0)
    checks.run("slow", lambda: __import__("time").sleep(10))
    checks.run("fine", lambda: (0.0, 0.1))
    assert checks.failed == ["off", "raises", "slow"]
    out = capsys.readouterr().out
    assert "PASS fine" in out and "TimeoutError" in out and "ZeroDivisionError" in out
