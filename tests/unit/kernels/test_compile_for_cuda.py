"""Every kernel compiles for a CUDA target (to a cubin, with Triton's bundled ptxas), no GPU needed.

The interpreter runs the kernels as numpy and accepts code that the compiler refuses, so the tests
that compare against the references do not prove that the kernels build for a GPU; this one does.
It runs in a subprocess because this process imported the kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import triton_align as a, triton_combine as c, triton_expert_mlp as m, triton_gating as g


def pointers(**types):
    return {name: "*" + t for name, t in types.items()}


BF16_GATE_UP = pointers(x_ptr="bf16", w_ptr="bf16", b_ptr="bf16", h_ptr="bf16", counts_ptr="i64", s_ptr="fp32")
UNSCALED = dict(SCALED=False, SCALE_N=1, SCALE_K=1)
FP8 = dict(SCALED=True, SCALE_N=128, SCALE_K=128)
GATE_SCALARS = dict(scaling="fp32", renorm_min="fp32", softcap="fp32")
KERNELS = [
    # kernel, argument types (other arguments: i32), constexprs: production-sized tiles
    (g._topk_softmax_kernel, dict(pointers(logits_ptr="bf16", weights_ptr="fp32", ids_ptr="i64"), renorm_p="fp32"),
     dict(RENORMALIZE=True, BLOCK_T=16, BLOCK_E=256, BLOCK_K=8)),
    (g._topk_sigmoid_grouped_kernel,
     dict(pointers(logits_ptr="bf16", bias_ptr="fp32", weights_ptr="fp32", ids_ptr="i64"), **GATE_SCALARS),
     dict(HAS_BIAS=True, RENORMALIZE=True, SQRT_SOFTPLUS=False, SOFTMAX=False, GROUP_BY_BEST=False, BLOCK_T=16,
          BLOCK_G=8, BLOCK_S=32, BLOCK_K=8, BLOCK_KG=4)),
    (g._topk_sigmoid_grouped_kernel,
     dict(pointers(logits_ptr="bf16", bias_ptr="fp32", weights_ptr="fp32", ids_ptr="i64"), **GATE_SCALARS),
     dict(HAS_BIAS=True, RENORMALIZE=True, SQRT_SOFTPLUS=True, SOFTMAX=False, GROUP_BY_BEST=False, BLOCK_T=16,
          BLOCK_G=1, BLOCK_S=256, BLOCK_K=8, BLOCK_KG=1)),  # DeepSeek-V4
    (g._topk_sigmoid_grouped_kernel,
     dict(pointers(logits_ptr="bf16", bias_ptr="fp32", weights_ptr="fp32", ids_ptr="i64"), **GATE_SCALARS),
     dict(HAS_BIAS=False, RENORMALIZE=False, SQRT_SOFTPLUS=False, SOFTMAX=True, GROUP_BY_BEST=True, BLOCK_T=16,
          BLOCK_G=8, BLOCK_S=32, BLOCK_K=8, BLOCK_KG=4)),  # DeepSeek-V2
    (g._topk_sigmoid_grouped_kernel,
     dict(pointers(logits_ptr="bf16", bias_ptr="fp32", weights_ptr="fp32", ids_ptr="i64"), **GATE_SCALARS),
     dict(HAS_BIAS=False, RENORMALIZE=True, SQRT_SOFTPLUS=False, SOFTMAX=True, GROUP_BY_BEST=False, BLOCK_T=16,
          BLOCK_G=8, BLOCK_S=16, BLOCK_K=4, BLOCK_KG=4)),  # Mistral Large 3, n_group > 1
    (g._topk_sigmoid_grouped_kernel,
     dict(pointers(logits_ptr="fp32", bias_ptr="fp32", weights_ptr="fp32", ids_ptr="i64"), **GATE_SCALARS),
     dict(HAS_BIAS=True, RENORMALIZE=True, SQRT_SOFTPLUS=False, SOFTMAX=True, GROUP_BY_BEST=False, BLOCK_T=16,
          BLOCK_G=1, BLOCK_S=64, BLOCK_K=8, BLOCK_KG=1)),  # Ernie 4.5: a bias for the choice, clamped renorm
    (g._topk_sigmoid_sink_kernel, dict(pointers(logits_ptr="fp32", bias_ptr="fp32", weights_ptr="fp32", ids_ptr="i64"),
                                        scaling="fp32"),
     dict(HAS_BIAS=True, BLOCK_T=16, BLOCK_E=256, BLOCK_S=2, BLOCK_K=8)),  # Inkling
    (g._sparsemixer_kernel, dict(pointers(logits_ptr="bf16", weights_ptr="fp32", ids_ptr="i64"), band="fp32"),
     dict(BLOCK_T=256, BLOCK_E=16)),  # PhiMoE
    (g._topk_then_sigmoid_kernel, pointers(logits_ptr="bf16", bias_ptr="fp32", weights_ptr="bf16", ids_ptr="i64"),
     dict(HAS_BIAS=False, RENORMALIZE=False, IS_FP64=False, BLOCK_T=256, BLOCK_E=16, BLOCK_K=1)),
    (g._topk_then_sigmoid_kernel, pointers(logits_ptr="fp32", bias_ptr="fp32", weights_ptr="fp32", ids_ptr="i64"),
     dict(HAS_BIAS=True, RENORMALIZE=True, IS_FP64=False, BLOCK_T=16, BLOCK_E=512, BLOCK_K=8)),  # Kolibri
    (a._histogram_kernel, pointers(ids_ptr="i64", block_counts_ptr="i32"), dict(BLOCK_N=128, BLOCK_E=256)),
    (a._scan_blocks_kernel, pointers(block_counts_ptr="i32", counts_ptr="i64"), dict(BLOCK_B=64)),
    (a._place_kernel, pointers(ids_ptr="i64", counts_ptr="i64", block_starts_ptr="i32", order_ptr="i64",
                               offsets_ptr="i64"), dict(BLOCK_N=128, BLOCK_E=256)),
    (m._gate_up_kernel, BF16_GATE_UP,
     dict(ACTIVATION="silu", ALPHA=1.0, LIMIT=0.0, UP_OFFSET=0.0, GATED=True, HAS_BIAS=False, UPCAST_DOT=False,
          **UNSCALED, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_E=256)),
    (m._gate_up_kernel, BF16_GATE_UP,
     dict(ACTIVATION="silu", ALPHA=1.702, LIMIT=7.0, UP_OFFSET=1.0, GATED=True, HAS_BIAS=True, UPCAST_DOT=False,
          **UNSCALED, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_E=128)),  # gpt-oss
    (m._gate_up_kernel, BF16_GATE_UP,
     dict(ACTIVATION="relu2", ALPHA=1.0, LIMIT=0.0, UP_OFFSET=0.0, GATED=False, HAS_BIAS=False, UPCAST_DOT=False,
          **UNSCALED, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_E=128)),  # Nemotron-H
    (m._down_kernel, pointers(h_ptr="fp32", w_ptr="fp32", b_ptr="fp32", out_ptr="fp32", counts_ptr="i64", s_ptr="fp32"),
     dict(HAS_BIAS=False, UPCAST_DOT=False, **UNSCALED, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, BLOCK_E=8)),
    (m._down_kernel, pointers(h_ptr="bf16", w_ptr="bf16", b_ptr="bf16", out_ptr="bf16", counts_ptr="i64", s_ptr="fp32"),
     dict(HAS_BIAS=True, UPCAST_DOT=False, **UNSCALED, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_E=128)),
    (m._gate_up_kernel, pointers(x_ptr="bf16", w_ptr="fp8e4nv", b_ptr="bf16", h_ptr="bf16", counts_ptr="i64",
                                 s_ptr="fp32"),
     dict(ACTIVATION="silu", ALPHA=1.0, LIMIT=0.0, UP_OFFSET=0.0, GATED=True, HAS_BIAS=False, UPCAST_DOT=False,
          **FP8, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_E=256)),  # DeepSeek-V3, block fp8
    (m._down_kernel, pointers(h_ptr="bf16", w_ptr="fp8e4nv", b_ptr="bf16", out_ptr="bf16", counts_ptr="i64",
                              s_ptr="fp32"),
     dict(HAS_BIAS=False, UPCAST_DOT=False, **FP8, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_E=256)),
    (c._invert_kernel, pointers(order_ptr="i64", rows_ptr="i64"), dict(BLOCK=1024)),
    (c._combine_kernel, pointers(y_ptr="bf16", rows_ptr="i64", weights_ptr="fp32", out_ptr="bf16"),
     dict(HAS_WEIGHTS=True, BLOCK_H=1024)),
]
for kernel, types, constexprs in KERNELS:
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], kernel.__name__
    print("compiled", kernel.__name__)
"""


def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == 22, result.stdout
