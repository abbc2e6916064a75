"""Weighted combine: put expert outputs back in token order and sum each token's k copies.

Shapes: T = tokens, k = experts per token, N = T*k sorted copies, H = hidden.
"""

from __future__ import annotations

import torch

__all__ = ["combine"]


def combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[row of copy t*k+j].

    y: [N, H] expert outputs in sorted order; order: [N] int64 flat copy index of each row (from
    `align_tokens`); weights: [T, k] float (None: plain sum, for gates applied to the input).
    Returns [T, H] in y.dtype; products and sums are taken in float32.
    """
    if y.dim() != 2 or order.shape != (y.shape[0],):
        raise ValueError(f"expected y [N, H] and order [N]; got {tuple(y.shape)}, {tuple(order.shape)}")
    if num_tokens <= 0 or y.shape[0] % num_tokens:
        raise ValueError(f"num_tokens={num_tokens} does not divide the {y.shape[0]} rows of y")
    top_k = y.shape[0] // num_tokens
    if weights is not None and weights.shape != (num_tokens, top_k):
        raise ValueError(f"weights must be [{num_tokens}, {top_k}], got shape {tuple(weights.shape)}")
    if y.is_cuda:
        from kernels.triton_combine import combine_triton

        return combine_triton(y, order, weights, num_tokens)
    return combine_reference(y, order, weights, num_tokens)


def combine_reference(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    hidden = y.shape[1]
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    copies = unsorted.view(num_tokens, -1, hidden)  # [T, k, H]
    if weights is None:
        return copies.sum(dim=1, dtype=torch.float32).to(y.dtype)
    return torch.bmm(weights.float().unsqueeze(1), copies.float()).squeeze(1).to(y.dtype)  # [T, 1, k] @ [T, k, H]
