"""Triton kernels for `kernels.combine.combine`: gather each token's k expert outputs and sum them.

[order] -> [invert: row of each copy] -> [per token x H-block: sum_j w[t, j] * y[row of t*k+j] in fp32] -> out

`order` maps sorted rows to copies; the combine needs the other direction, so a first kernel inverts
it (rows[order[r]] = r). A copy that no row claims (order not a permutation) reads as zeros instead
of stray memory; the reference leaves such output undefined.

Shapes: T = tokens, k = experts per token, N = T*k sorted copies, H = hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import check_device, tile

__all__ = ["combine_triton"]


@triton.jit
def _invert_kernel(order_ptr, rows_ptr, num_copies, BLOCK: tl.constexpr):
    """rows[order[r]] = r for the rows r of this block; out-of-range entries of order are skipped."""
    sorted_rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    is_row = sorted_rows < num_copies
    copies = tl.load(order_ptr + sorted_rows, mask=is_row, other=-1)
    is_copy = is_row & (copies >= 0) & (copies < num_copies)
    tl.store(rows_ptr + copies, sorted_rows.to(tl.int64), mask=is_copy)


@triton.jit
def _combine_kernel(y_ptr, rows_ptr, weights_ptr, out_ptr, hidden, top_k, stride_ym, stride_yh, stride_ot,
                    HAS_WEIGHTS: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t, cols] = sum_j weights[t, j] * y[rows[t * k + j], cols], accumulated in float32."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    is_col = cols < hidden
    acc = tl.zeros((BLOCK_H,), tl.float32)
    for j in range(top_k):
        copy = token * top_k + j
        row = tl.load(rows_ptr + copy + tl.zeros((BLOCK_H,), tl.int64))  # [BH], one value; -1: no row holds it
        values = tl.load(y_ptr + row * stride_ym + cols * stride_yh, mask=is_col & (row >= 0), other=0.0)
        if HAS_WEIGHTS:
            acc += tl.load(weights_ptr + copy).to(tl.float32) * values.to(tl.float32)
        else:
            acc += values.to(tl.float32)
    tl.store(out_ptr + token * stride_ot + cols, acc.to(out_ptr.dtype.element_ty), mask=is_col)


def _check(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, num_tokens: int) -> int:
    """Validate the arguments; returns k."""
    if y.dim() != 2 or order.shape != (y.shape[0],):
        raise ValueError(f"expected y [N, H] and order [N]; got {tuple(y.shape)}, {tuple(order.shape)}")
    if order.is_floating_point() or order.dtype == torch.bool:
        raise ValueError(f"order must be an integer tensor, got {order.dtype}")
    if num_tokens <= 0 or y.shape[0] % num_tokens:
        raise ValueError(f"num_tokens={num_tokens} does not divide the {y.shape[0]} rows of y")
    top_k = y.shape[0] // num_tokens
    if weights is not None and weights.shape != (num_tokens, top_k):
        raise ValueError(f"weights must be [{num_tokens}, {top_k}], got shape {tuple(weights.shape)}")
    return top_k


def combine_triton(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[row of copy t*k+j].

    y: [N, H] expert outputs in sorted order; order: [N] integer flat copy index of each row (a
    permutation, from `align_tokens`); weights: [T, k] float or None (plain sum).
    Returns [T, H] in y.dtype; products and sums are taken in float32.
    """
    top_k = _check(y, order, weights, num_tokens)
    check_device(_combine_kernel, y=y, order=order, weights=weights)
    num_copies, hidden = y.shape
    out = torch.empty(num_tokens, hidden, dtype=y.dtype, device=y.device)
    if not hidden:
        return out
    rows = torch.full((num_copies,), -1, dtype=torch.int64, device=y.device)  # [N] row of each copy
    if num_copies:
        block = tile(num_copies, 16, 1024)
        _invert_kernel[(triton.cdiv(num_copies, block),)](order.contiguous(), rows, num_copies, BLOCK=block)
    block_h = tile(hidden, 16, 1024)
    _combine_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, rows, y if weights is None else weights.contiguous(), out, hidden, top_k, *y.stride(), out.stride(0),
        HAS_WEIGHTS=weights is not None, BLOCK_H=block_h,
    )
    return out
