"""Triton kernels for `kernels.expert_mlp.grouped_mlp`: a grouped GEMM over rows sorted by expert.

[x sorted by expert] -> [gate_up GEMM (+ bias), clamp, act(gate) * (up + offset)] -> h -> [down GEMM (+ bias)] -> out

The rows of expert e are x[offsets[e]:offsets[e+1]]. They are cut into BLOCK_M-row blocks that never
straddle two experts (the `moe_align_block_size` idea, without padding the rows): block m of the grid
finds its expert and row range from `counts` (`_expert_rows`), then computes a [BLOCK_M, BLOCK_N] tile
of that expert's GEMM. The grid is sized for the worst case, ceil(N / BLOCK_M) + min(E, N) blocks;
blocks past the last expert's rows return at once. Two kernels: gate_up with the activation fused
(h [N, I] kept in x.dtype, as the reference's intermediate), then down.

Shapes: N = token copies, H = hidden, I = expert intermediate size, E = experts.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.expert_mlp import BlockScales, GatedActivation, check_shapes, gated
from kernels.triton_common import check_device, is_interpreted, tile

__all__ = ["grouped_mlp_triton"]

# `_activate`'s; = kernels.expert_mlp.ACTIVATIONS
KERNEL_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "relu", "relu2", "silu")


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr, ALPHA: tl.constexpr):
    """The activations of `kernels.expert_mlp.ACTIVATIONS`, in float32 (silu: x * sigmoid(ALPHA x))."""
    if ACTIVATION == "silu":
        y = x * tl.sigmoid(ALPHA * x)
    elif ACTIVATION == "gelu":
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_pytorch_tanh":
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1
    elif ACTIVATION == "relu2":
        y = tl.maximum(x, 0.0)
        y = y * y
    else:
        tl.static_assert(ACTIVATION == "relu")
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _expert_rows(counts_ptr, num_experts, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of this program's row block; expert == num_experts past the last block."""
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0).to(tl.int64)  # [BE]
    blocks = (counts + BLOCK_M - 1) // BLOCK_M  # [BE] row blocks of each expert
    block = tl.program_id(0)
    expert = tl.sum((tl.cumsum(blocks, axis=0) <= block).to(tl.int64), axis=0)  # experts wholly before block
    is_before = experts < expert
    row_start = tl.sum(tl.where(is_before, counts, 0), axis=0)
    row_end = row_start + tl.sum(tl.where(experts == expert, counts, 0), axis=0)
    row_start += (block - tl.sum(tl.where(is_before, blocks, 0), axis=0)) * BLOCK_M
    return expert, row_start, row_end


@triton.jit
def _load_a(ptr, stride_m, stride_k, rows, is_row, ks, is_k, UPCAST_DOT: tl.constexpr):
    """The [BM, BK] tile a[rows, ks] of a row-major operand."""
    a = tl.load(ptr + rows[:, None] * stride_m + ks[None, :] * stride_k, mask=is_row[:, None] & is_k[None, :],
                other=0.0)
    if UPCAST_DOT:  # the interpreter multiplies bfloat16 as raw bits; 16-bit products are exact in float32
        a = a.to(tl.float32)
    return a


@triton.jit
def _load_b(w_ptr, stride_n, stride_k, s_ptr, stride_sn, stride_sk, n0, cols, is_col, ks, is_k, k, x_ptr,
            SCALED: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """The [BK, BN] tile w[n0 + cols, ks].T of one expert's weight stored [N, K] (torch Linear layout),
    in x's dtype. SCALED: w is block fp8 (e4m3), each value times the scale s[(n0 + c) // SCALE_N,
    k // SCALE_K] of its block, rounded to x's dtype as the dequantized reference is (the tile lies
    within one block along k: BK divides SCALE_K)."""
    rows = n0 + cols
    b = tl.load(w_ptr + ks[:, None] * stride_k + rows[None, :] * stride_n, mask=is_k[:, None] & is_col[None, :],
                other=0.0)
    if SCALED:
        scale = tl.load(s_ptr + (k // SCALE_K) * stride_sk + (rows // SCALE_N) * stride_sn, mask=is_col, other=0.0)
        b = (b.to(tl.float32) * scale[None, :]).to(x_ptr.dtype.element_ty)
    if UPCAST_DOT:
        b = b.to(tl.float32)
    return b


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, b_ptr, h_ptr, counts_ptr, s_ptr, num_experts, hidden, inter,
    stride_xm, stride_xh, stride_we, stride_wn, stride_wh, stride_be, stride_hm, stride_hi,
    stride_se, stride_sn, stride_sk,
    ACTIVATION: tl.constexpr, ALPHA: tl.constexpr, LIMIT: tl.constexpr, UP_OFFSET: tl.constexpr,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr,
    SCALED: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """h[rows, cols] = act(gate) * (up + UP_OFFSET), cols of I, with gate = x[rows] @ w_gate[e, cols].T
    (+ bias) clamped to <= LIMIT and up = x[rows] @ w_up[e, cols].T (+ bias) to [-LIMIT, LIMIT] (LIMIT > 0);
    not GATED: h = act(up), w holding the up rows only. SCALED: w block fp8, s its scales [E, 2I / SCALE_N,
    H / SCALE_K] (rounded up)."""
    expert, row_start, row_end = _expert_rows(counts_ptr, num_experts, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)  # [BM] int64
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    is_row = rows < row_end
    is_col = cols < inter
    w = w_ptr + expert * stride_we  # [2I, H]: gate rows, then up rows ([I, H], up rows, not GATED)
    s = s_ptr + expert * stride_se
    up_row = inter if GATED else 0  # the first up row of w (and of the bias)
    gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, hidden, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        is_k = ks < hidden
        x = _load_a(x_ptr, stride_xm, stride_xh, rows, is_row, ks, is_k, UPCAST_DOT)  # [BM, BK]
        if GATED:
            gate = tl.dot(x, _load_b(w, stride_wn, stride_wh, s, stride_sn, stride_sk, 0, cols, is_col, ks, is_k, k,
                                     x_ptr, SCALED, SCALE_N, SCALE_K, UPCAST_DOT), gate, input_precision="ieee")
        up = tl.dot(x, _load_b(w, stride_wn, stride_wh, s, stride_sn, stride_sk, up_row, cols, is_col, ks, is_k, k,
                               x_ptr, SCALED, SCALE_N, SCALE_K, UPCAST_DOT), up, input_precision="ieee")
    if HAS_BIAS:
        if GATED:
            gate += tl.load(b_ptr + expert * stride_be + cols, mask=is_col, other=0.0).to(tl.float32)[None, :]
        up += tl.load(b_ptr + expert * stride_be + up_row + cols, mask=is_col, other=0.0).to(tl.float32)[None, :]
    if not GATED:
        h = _activate(up, ACTIVATION, ALPHA)
    else:
        if LIMIT > 0:
            gate = tl.minimum(gate, LIMIT)
            up = tl.minimum(tl.maximum(up, -LIMIT), LIMIT)
        h = _activate(gate, ACTIVATION, ALPHA) * (up + UP_OFFSET)
    tl.store(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hi, h.to(h_ptr.dtype.element_ty),
             mask=is_row[:, None] & is_col[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, b_ptr, out_ptr, counts_ptr, s_ptr, num_experts, hidden, inter,
    stride_hm, stride_hi, stride_we, stride_wn, stride_wi, stride_be, stride_om, stride_oh,
    stride_se, stride_sn, stride_sk,
    HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, SCALED: tl.constexpr, SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """out[rows, cols] = h[rows] @ w_down[e, cols].T (+ bias[e, cols]), cols of H. SCALED: w_down block
    fp8, s its scales [E, H / SCALE_N, I / SCALE_K] (rounded up)."""
    expert, row_start, row_end = _expert_rows(counts_ptr, num_experts, BLOCK_M, BLOCK_E)
    if expert >= num_experts:
        return
    rows = row_start + tl.arange(0, BLOCK_M)  # [BM] int64
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    is_row = rows < row_end
    is_col = cols < hidden
    w_down = w_ptr + expert * stride_we  # [H, I]
    s = s_ptr + expert * stride_se
    out = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, inter, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        is_k = ks < inter
        h = _load_a(h_ptr, stride_hm, stride_hi, rows, is_row, ks, is_k, UPCAST_DOT)  # [BM, BK]
        out = tl.dot(h, _load_b(w_down, stride_wn, stride_wi, s, stride_sn, stride_sk, 0, cols, is_col, ks, is_k,
                                k, h_ptr, SCALED, SCALE_N, SCALE_K, UPCAST_DOT), out, input_precision="ieee")
    if HAS_BIAS:
        out += tl.load(b_ptr + expert * stride_be + cols, mask=is_col, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oh, out.to(out_ptr.dtype.element_ty),
             mask=is_row[:, None] & is_col[None, :])


def _check(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor,
           activation: GatedActivation, b_gate_up: torch.Tensor | None, b_down: torch.Tensor | None,
           scales: BlockScales | None) -> None:
    """What the kernels need beyond `kernels.expert_mlp`'s shape checks: one float dtype (block fp8
    weights: theirs, scaled into x's), integer counts."""
    check_shapes(x, w_gate_up, w_down, counts, b_gate_up, b_down, activation.projections)
    if scales is not None:
        scales.check(w_gate_up, w_down)
        if scales.block[1] % 16:
            raise ValueError(f"block fp8 blocks must hold a multiple of 16 columns, got {list(scales.block)}")
        w_gate_up, w_down = x, x  # the weights' dtype is fp8: x's is the one the rest must share
    if activation.name not in KERNEL_ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(KERNEL_ACTIVATIONS)}, got {activation.name!r}")
    if counts.is_floating_point():
        raise ValueError(f"counts must be integers, got {counts.dtype}")
    dtypes = {t.dtype for t in (x, w_gate_up, w_down, b_gate_up, b_down) if t is not None}
    if len(dtypes) != 1 or not x.is_floating_point():
        raise ValueError(f"x, the weights and the biases must share one float dtype, got {sorted(map(str, dtypes))}")


def _check_counts(counts: torch.Tensor, num_rows: int) -> None:
    """Rows per expert must be >= 0 and sum to N (one host sync when counts live on the GPU)."""
    if not counts.numel():
        total, least = 0, 0
    else:
        total, least = torch.stack([counts.sum(), counts.min()]).tolist()
    if least < 0:
        raise ValueError(f"counts must be >= 0, got {counts.tolist()}")
    if total != num_rows:
        raise ValueError(f"counts sum to {total} but x has {num_rows} rows")


def grouped_mlp_triton(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor,
    activation: str | GatedActivation = "silu", b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None, scales: BlockScales | None = None,
) -> torch.Tensor:
    """Gated (or, as `activation` says, non-gated) MLP of each expert over its contiguous rows.

    x: [N, H] sorted by expert; w_gate_up: [E, 2I, H] ([E, I, H] non-gated); w_down: [E, H, I]; b_gate_up [E, 2I] and
    b_down [E, H] or None (one float dtype); counts: [E] integers, sum == N, on any device; `scales`:
    the weights are block fp8, read as stored and scaled tile by tile (the dequantized weights,
    rounded to x's dtype, are what the GEMMs multiply). Returns [N, H] in x.dtype.
    """
    activation = gated(activation)
    _check(x, w_gate_up, w_down, counts, activation, b_gate_up, b_down, scales)
    has_bias = b_gate_up is not None
    check_device(_gate_up_kernel, x=x, w_gate_up=w_gate_up, w_down=w_down, b_gate_up=b_gate_up, b_down=b_down,
                 scales_gate_up=scales and scales.gate_up, scales_down=scales and scales.down)
    _check_counts(counts, x.shape[0])
    num_rows, hidden = x.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    out = torch.empty_like(x)
    if not num_rows or not hidden:
        return out
    counts = counts.to(device=x.device)
    h = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)  # [N, I]
    # Row blocks near the mean rows per expert: small for decode (few rows each), 64 for prefill.
    block_m = tile(num_rows // num_experts, 16, 64)
    num_blocks = triton.cdiv(num_rows, block_m) + min(num_experts, num_rows)
    common = dict(HAS_BIAS=has_bias, UPCAST_DOT=is_interpreted(_gate_up_kernel), BLOCK_M=block_m,
                  BLOCK_E=triton.next_power_of_2(num_experts))
    b_gate_up, b_down = (b_gate_up, b_down) if has_bias else (x, x)  # never read without HAS_BIAS
    max_k = 64 if x.element_size() <= 2 else 32  # keeps the pipelined float32 tiles within shared memory
    # block fp8: a k tile within one scale block (block[1] a multiple of 16: gcd >= 16)
    k_divides = scales.block[1] if scales is not None else max_k
    s_gate_up, s_down = (scales.gate_up, scales.down) if scales is not None else (x.new_empty(1, 1, 1),) * 2
    scaled = dict(SCALED=scales is not None, SCALE_N=scales.block[0] if scales else 1,
                  SCALE_K=scales.block[1] if scales else 1)
    block_n, block_k = tile(inter, 16, 64), math.gcd(tile(hidden, 16, max_k), k_divides)
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n))](
        x, w_gate_up, b_gate_up, h, counts, s_gate_up, num_experts, hidden, inter,
        *x.stride(), *w_gate_up.stride(), b_gate_up.stride(0), *h.stride(), *s_gate_up.stride(),
        ACTIVATION=activation.name, ALPHA=float(activation.alpha), LIMIT=float(activation.limit),
        UP_OFFSET=float(activation.up_offset), GATED=activation.gated, BLOCK_N=block_n, BLOCK_K=block_k,
        **scaled, **common,
    )
    block_n, block_k = tile(hidden, 16, 64), math.gcd(tile(inter, 16, max_k), k_divides)
    _down_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        h, w_down, b_down, out, counts, s_down, num_experts, hidden, inter,
        *h.stride(), *w_down.stride(), b_down.stride(0), *out.stride(), *s_down.stride(),
        BLOCK_N=block_n, BLOCK_K=block_k, **scaled, **common,
    )
    return out
