"""The check prepared for a GPU machine: every Triton kernel against its torch reference at real
expert shapes, MoELayer on the device against the same layer on the host, and figures. It imports
nothing that needs Ray or pydantic (the lent GPU machine has neither).

    python bench/gpu_check.py --device cuda   # Mixtral (H=4096, I=14336, E=8, k=2) and DeepSeek-V3
                                              # (H=7168, I=2048, E=256, k=8) shapes, T in {64, 256, 4096}
    python bench/gpu_check.py --device cpu    # the same checks through Triton's interpreter at small
                                              # shapes (tests/unit/test_gpu_check.py runs it)

Each check prints one line as it finishes: PASS or FAIL, its worst error beside the tolerance, its
seconds; one that runs past LIMIT_S fails with a timeout and the others still run. Figures (cuda):
each grouped-MLP shape's TFLOP/s, Triton beside torch's per-expert reference and beside a plain
bf16 matmul of 8192^3 measured in the same run (the device's practical peak); the two-process
check's ms per layer beside the in-process layer's. Exit status 1 when a check failed. Not built
yet: `router.device` (the router core gates, plans and combines on the host), NCCL channels.
The two-process check needs pydantic: carry its wheels (bench/gpu_wheels.sh says how).

Shapes: T = tokens, k = experts per token, N = T * k copies, H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

if __name__ == "__main__" and "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1:][:1] == ["cpu"]:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before kernels.triton_* import
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

LIMIT_S = 120  # one check's limit (cuda); the whole run stays within 5 minutes
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # max |got - ref| / max |ref|, as the kernel tests'
MAX_ROWS_OFF = 1e-3  # gates: rows whose experts differ (scores within one rounding of a tie) at most this share


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int
    experts: int
    top_k: int
    tokens: tuple[int, ...]


CUDA_SHAPES = (Shape("Mixtral", 4096, 14336, 8, 2, (64, 256, 4096)),
               Shape("DeepSeek-V3", 7168, 2048, 256, 8, (64, 256, 4096)))
CPU_SHAPES = (Shape("tiny Mixtral", 64, 96, 8, 2, (8, 33)), Shape("tiny V3", 64, 32, 16, 4, (8,)))


class Checks:
    """Runs named checks, each within `limit_s`, and prints one line per check as it ends."""

    def __init__(self, limit_s: float):
        self.limit_s, self.failed, self.figures = limit_s, [], []

    def run(self, name: str, check: Callable[[], tuple[float, float] | str]) -> None:
        """check() returns (worst error, tolerance), or a line to print as it is (a SKIP)."""
        start = time.perf_counter()
        try:
            with _time_limit(self.limit_s):
                result = check()
        except Exception as exc:  # noqa: BLE001 - one failing check is reported; the others run
            self.failed.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {exc} ({time.perf_counter() - start:.1f} s)", flush=True)
            return
        if isinstance(result, str):
            print(f"SKIP {name}: {result}", flush=True)
            return
        error, tol = result
        verdict = "PASS" if error <= tol else "FAIL"
        if verdict == "FAIL":
            self.failed.append(name)
        print(f"{verdict} {name}: error {error:.2e} (tolerance {tol:.0e}), {time.perf_counter() - start:.1f} s",
              flush=True)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(_signum, _frame):
        raise TimeoutError(f"past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)) if ref.numel() else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


# -- kernels ---------------------------------------------------------------------------------------

def gate_error(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The weights' relative error on rows whose experts agree; inf when more than MAX_ROWS_OFF of
    the rows picked other experts (more than the near-ties that Triton's and torch's last bits split)."""
    (weights, ids), (ref_weights, ref_ids) = got, ref
    k = ids.shape[1]
    same = (ids.sort(dim=1).values == ref_ids.sort(dim=1).values).all(dim=1)
    if (~same).float().mean() > MAX_ROWS_OFF:
        return float("inf")
    order, ref_order = ids.argsort(dim=1), ref_ids.argsort(dim=1)
    routed = weights[:, :k].gather(1, order)[same], ref_weights[:, :k].gather(1, ref_order)[same]
    return max(rel_err(*routed), rel_err(weights[same, k:], ref_weights[same, k:]) if weights.shape[1] > k else 0.0)


def gate_checks(shape: Shape, num_tokens: int, device: torch.device) -> dict[str, Callable]:
    """(Triton launcher, torch reference, arguments) of every gate at this shape."""
    from kernels import gating, triton_gating as tg

    gen = torch.Generator(device).manual_seed(num_tokens)
    num_experts, k = shape.experts, shape.top_k
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    bias = 0.1 * torch.randn(num_experts, generator=gen, device=device)
    groups = 8 if num_experts % 8 == 0 and num_experts >= 64 else 4 if num_experts % 4 == 0 else 1
    sink = torch.randn(num_tokens, num_experts + 2, generator=gen, device=device)
    return {
        "softmax": (tg.topk_softmax_triton, gating.topk_softmax_reference, (logits, k, True)),
        "sigmoid, grouped, biased": (tg.topk_sigmoid_grouped_triton, gating.topk_sigmoid_grouped_reference,
                                     (logits, bias, k, groups, max(1, groups // 2), True, 2.5)),
        "softmax, grouped (V2)": (tg.topk_softmax_grouped_triton, gating.topk_softmax_grouped_reference,
                                  (logits, None, k, groups, max(1, groups // 2), 1, False, 16.0)),
        "top-k then sigmoid": (tg.topk_then_sigmoid_triton, gating.topk_then_sigmoid_reference, (logits, k)),
        "sqrt(softplus)": (tg.topk_sqrtsoftplus_triton, gating.topk_sqrtsoftplus_reference,
                           (logits, bias, k, True, 1.5)),
        "sparsemixer": (tg.topk_sparsemixer_triton, gating.topk_sparsemixer_reference, (logits, 0.01)),
        "sigmoid sink (Inkling)": (tg.topk_sigmoid_sink_triton, gating.topk_sigmoid_sink_reference,
                                   (sink, bias, k, 2, 2.5)),
    }


def expert_weights(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_gate_up [E, 2I, H], w_down [E, H, I]) drawn on the device, once per shape (V3's: 22.5 GB in bf16)."""
    gen = torch.Generator(device).manual_seed(1)
    w_gate_up = torch.randn(shape.experts, 2 * shape.inter, shape.hidden, generator=gen, device=device, dtype=dtype)
    w_down = torch.randn(shape.experts, shape.hidden, shape.inter, generator=gen, device=device, dtype=dtype)
    return w_gate_up.div_(shape.hidden ** 0.5), w_down.div_(shape.inter ** 0.5)


def token_rows(shape: Shape, num_tokens: int, dtype: torch.dtype, device: torch.device):
    """(x [N, H] sorted by expert, counts [E]): the copies of `num_tokens` tokens routed at random."""
    gen = torch.Generator(device).manual_seed(num_tokens)
    ids = torch.randint(0, shape.experts, (num_tokens * shape.top_k,), generator=gen, device=device)
    x = torch.randn(ids.numel(), shape.hidden, generator=gen, device=device).to(dtype)
    return x, torch.bincount(ids, minlength=shape.experts)


def kernel_checks(checks: Checks, shapes: tuple[Shape, ...], device: torch.device, figures: bool) -> None:
    from kernels import align, expert_mlp, triton_align, triton_combine, triton_expert_mlp
    from kernels.combine import combine_reference
    from kernels.expert_mlp import GatedActivation

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shape in shapes:
        w_gate_up, w_down = expert_weights(shape, dtype, device)
        up = w_gate_up[:, shape.inter:]  # the up rows: non-gated experts' weights (a view, no copy)
        for num_tokens in shape.tokens:
            where = f"{shape.name} T={num_tokens}"
            for gate, (launcher, reference, args) in gate_checks(shape, num_tokens, device).items():
                checks.run(f"gate {gate}, {where}",
                           lambda: (gate_error(launcher(*args), reference(*args)), TOL[torch.float32]))
            ids = torch.randint(0, shape.experts, (num_tokens, shape.top_k), device=device)
            checks.run(f"align, {where}", lambda: (
                float(not all(torch.equal(g, r) for g, r in zip(triton_align.align_tokens_triton(ids, shape.experts),
                                                               align.align_tokens_reference(ids, shape.experts)))),
                0.0))
            x, counts = token_rows(shape, num_tokens, dtype, device)
            for act in (GatedActivation("silu"), GatedActivation("silu", limit=7.0, alpha=1.702, up_offset=1.0)):
                label = "SwiGLU" if act.limit == 0 else "clamped SwiGLU (gpt-oss)"
                checks.run(f"grouped MLP {label}, {dtype}, {where}", lambda: (rel_err(
                    triton_expert_mlp.grouped_mlp_triton(x, w_gate_up, w_down, counts, act),
                    expert_mlp.grouped_mlp_reference(x, w_gate_up, w_down, counts, act)), TOL[dtype]))
            relu2 = GatedActivation("relu2", gated=False)
            checks.run(f"grouped MLP relu^2 not gated, {dtype}, {where}", lambda: (rel_err(
                triton_expert_mlp.grouped_mlp_triton(x, up, w_down, counts, relu2),
                expert_mlp.grouped_mlp_reference(x, up, w_down, counts, relu2)), TOL[dtype]))
            order = torch.argsort(ids.reshape(-1), stable=True)
            weights = torch.rand(num_tokens, shape.top_k, device=device)
            checks.run(f"combine, {dtype}, {where}", lambda: (rel_err(
                triton_combine.combine_triton(x, order, weights, num_tokens),
                combine_reference(x, order, weights, num_tokens)), TOL[dtype]))
            if figures:
                checks.figures.append(mlp_figure(shape, num_tokens, x, w_gate_up, w_down, counts, device))
        del w_gate_up, w_down, up  # the next shape's weights in their place
        fp8_checks(checks, shape, device, figures)


def fp8_checks(checks: Checks, shape: Shape, device: torch.device, figures: bool) -> None:
    """The grouped MLP over block fp8 weights (read as stored) against the torch reference over the
    same weights dequantized to bf16 (fp32 on the CPU), every T of the shape."""
    from kernels import expert_mlp, triton_expert_mlp

    block = (128, 128) if device.type == "cuda" else (32, 32)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w_gate_up, w_down, scales = fp8_weights(shape, block, device)
    reference = (expert_mlp.dequantize_blocks(w_gate_up, scales.gate_up, block, dtype),
                 expert_mlp.dequantize_blocks(w_down, scales.down, block, dtype))
    for num_tokens in shape.tokens:
        x, counts = token_rows(shape, num_tokens, dtype, device)
        checks.run(f"grouped MLP block fp8 {list(block)}, {shape.name} T={num_tokens}", lambda: (rel_err(
            triton_expert_mlp.grouped_mlp_triton(x, w_gate_up, w_down, counts, scales=scales),
            expert_mlp.grouped_mlp_reference(x, *reference, counts)), TOL[dtype]))
        if figures:
            flops = 6 * x.shape[0] * shape.hidden * shape.inter
            fp8_s = seconds_per_call(lambda: triton_expert_mlp.grouped_mlp_triton(x, w_gate_up, w_down, counts,
                                                                                  scales=scales), device)
            bf16_s = seconds_per_call(lambda: triton_expert_mlp.grouped_mlp_triton(x, *reference, counts), device)
            checks.figures.append(f"grouped MLP block fp8 {shape.name} T={num_tokens}: {flops / fp8_s / 1e12:.1f} "
                                  f"TFLOP/s ({fp8_s * 1e3:.2f} ms), bf16 weights {flops / bf16_s / 1e12:.1f} TFLOP/s")


def fp8_weights(shape: Shape, block: tuple[int, int], device: torch.device):
    """(w_gate_up, w_down float8_e4m3fn, BlockScales): random weights quantized on the device one
    expert at a time, as checkpoints are (experts.quantized.quantize_fp8_block)."""
    from experts.quantized import quantize_fp8_block
    from kernels.expert_mlp import BlockScales

    def quantized(rows: int, cols: int):
        q = torch.empty(shape.experts, rows, cols, dtype=torch.float8_e4m3fn, device=device)
        s = torch.empty(shape.experts, -(-rows // block[0]), -(-cols // block[1]), device=device)
        gen = torch.Generator(device).manual_seed(rows)
        for expert in range(shape.experts):
            w = torch.randn(rows, cols, generator=gen, device=device) / cols ** 0.5
            q[expert], s[expert] = quantize_fp8_block(w, block)
        return q, s

    (w_gate_up, s_gate_up), (w_down, s_down) = quantized(2 * shape.inter, shape.hidden), quantized(shape.hidden,
                                                                                                     shape.inter)
    return w_gate_up, w_down, BlockScales(s_gate_up, s_down, block)


def mlp_figure(shape: Shape, num_tokens: int, x, w_gate_up, w_down, counts, device: torch.device) -> str:
    from kernels import expert_mlp, triton_expert_mlp

    flops = 6 * x.shape[0] * shape.hidden * shape.inter
    triton_s = seconds_per_call(lambda: triton_expert_mlp.grouped_mlp_triton(x, w_gate_up, w_down, counts), device)
    torch_s = seconds_per_call(lambda: expert_mlp.grouped_mlp_reference(x, w_gate_up, w_down, counts), device, 3)
    return (f"grouped MLP bf16 {shape.name} T={num_tokens}: Triton {flops / triton_s / 1e12:.1f} TFLOP/s "
            f"({triton_s * 1e3:.2f} ms), torch per expert {flops / torch_s / 1e12:.1f} TFLOP/s")


def matmul_peak(device: torch.device) -> str:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    s = seconds_per_call(lambda: a @ a, device)
    return f"bf16 matmul 8192^3 (the practical peak): {2 * 8192 ** 3 / s / 1e12:.1f} TFLOP/s"


# -- a whole layer on the device ---------------------------------------------------------------------

def layer_checks(checks: Checks, device: torch.device) -> None:
    """MoELayer loaded onto the device against the same layer on the host, fp32 and bf16, for a few
    families (tiny seeded checkpoints: the gate, align, grouped MLP and combine all on the device)."""
    from experts import MoELayer, load_spec
    from experts.builtin import build_model, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for family in ("mixtral", "deepseek_v3", "gpt_oss", "nemotron_h"):
            path = save_checkpoint(build_model(family, seed=3), Path(tmp) / family)
            spec = load_spec(path)
            layer = spec.moe_layers[-1]
            x = torch.randn(37, spec.hidden_size, generator=torch.Generator().manual_seed(5))
            for dtype in (torch.float32, torch.bfloat16):
                def check(dtype=dtype):
                    reference = MoELayer.from_pretrained(path, layer, dtype=dtype)(x.to(dtype))
                    out = MoELayer.from_pretrained(path, layer, dtype=dtype, device=device)(x.to(device, dtype))
                    if out.device != device:
                        raise AssertionError(f"the answer came back on {out.device}, not {device}")
                    return layer_error(out.cpu(), reference, dtype), TOL[dtype]
                checks.run(f"MoELayer on {device.type} vs the host, {family}, {dtype}", check)


def layer_error(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The worst token's error relative to max |ref|; in bf16 the second worst (one token of 37 may
    pick another expert on a near-tie that the two devices round apart)."""
    per_token = (out.float() - ref.float()).abs().amax(dim=1) / ref.float().abs().max()
    return float(per_token.sort().values[-1 if dtype == torch.float32 else -2])


def two_process_check(checks: Checks, device: torch.device) -> None:
    """bench/gpu_two_processes.py in a process of its own (it needs pydantic; this one imports none):
    its error and figures, or a SKIP naming what to carry when pydantic is missing there."""
    def check():
        script = Path(__file__).with_name("gpu_two_processes.py")
        result = subprocess.run([sys.executable, str(script), "--device", device.type], capture_output=True,
                                text=True, timeout=checks.limit_s - 5)
        if result.returncode and "No module named 'pydantic" in result.stderr:  # or pydantic_core
            return "pydantic is not installed here: carry its wheels (bench/gpu_wheels.sh)"
        if result.returncode:
            raise RuntimeError(f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
        lines = result.stdout.splitlines()
        checks.figures += [line.removeprefix("FIGURE ") for line in lines if line.startswith("FIGURE ")]
        results = [(line.split()[1], float(line.split()[2]), float(line.split()[3])) for line in lines
                   if line.startswith("RESULT ")]
        checks.figures += [f"two processes, {name}: error {error:.2e} (tolerance {tol:.0e})"
                           for name, error, tol in results]
        if len(results) != 3:
            raise RuntimeError(f"expected 3 layers' RESULT lines, got {len(results)}: {lines[-3:]}")
        _, error, tolerance = max(results, key=lambda r: r[1] / r[2])  # the layer nearest its tolerance
        return error, tolerance

    routers = "the device, then the host" if device.type == "cuda" else "the host"
    checks.run(f"router core (on {routers}) and a group's worker ({device.type}), two processes over grpc, "
               f"three layers", check)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu, or on the GPU machine", flush=True)
        return 2
    start = time.perf_counter()
    checks = Checks(LIMIT_S if device.type == "cuda" else 60)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreted)"
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    kernel_checks(checks, CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES, device, device.type == "cuda")
    layer_checks(checks, device)
    two_process_check(checks, device)
    if device.type == "cuda":
        checks.figures.insert(0, matmul_peak(device))
    for line in checks.figures:
        print(f"FIGURE {line}", flush=True)
    print(f"{len(checks.failed)} failed: {checks.failed}" if checks.failed else "all checks passed",
          f"in {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
