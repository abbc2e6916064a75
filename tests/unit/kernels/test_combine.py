"""Weighted combine: the Triton kernel (interpreted) against the torch reference and a plain loop."""

from __future__ import annotations

import pytest
import torch

from kernels import align
from kernels.combine import combine, combine_reference  # `kernels.combine` is the function
from tests.unit.kernels.numerics import relative_error

# max |got - ref| / max |ref|: both sum in float32 and round once to y.dtype (the interpreter rounds
# toward zero, hence one bfloat16 ulp).
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


def make_combine(num_tokens: int, top_k: int, hidden: int, weights_dtype, dtype=torch.float32, seed: int = 0):
    """(y [N, H], order [N] a random permutation, weights [T, k] or None)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(num_tokens * top_k, hidden, generator=gen).to(dtype)
    order = torch.randperm(num_tokens * top_k, generator=gen)
    weights = None if weights_dtype is None else torch.rand(num_tokens, top_k, generator=gen).to(weights_dtype)
    return y, order, weights


COMBINE_CASES = [
    # T, k, H, weights dtype (None: plain sum), y dtype
    (5, 2, 24, torch.float32, torch.float32),
    (5, 2, 24, None, torch.float32),
    (1, 1, 16, torch.float32, torch.bfloat16),
    (3, 4, 40, None, torch.bfloat16),
    (4, 3, 1100, torch.bfloat16, torch.float32),  # two H blocks of 1024
    (6, 3, 20, torch.float32, torch.bfloat16),
]


@pytest.mark.parametrize("num_tokens,top_k,hidden,weights_dtype,dtype", COMBINE_CASES)
def test_combine_triton_matches_reference(triton_combine, num_tokens, top_k, hidden, weights_dtype, dtype):
    y, order, weights = make_combine(num_tokens, top_k, hidden, weights_dtype, dtype)
    got = triton_combine.combine_triton(y, order, weights, num_tokens)
    ref = combine_reference(y, order, weights, num_tokens)
    assert got.dtype == dtype and got.shape == (num_tokens, hidden)
    assert relative_error(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("num_tokens,top_k,hidden,weights_dtype,dtype", COMBINE_CASES)
def test_reference_matches_a_loop_over_copies(num_tokens, top_k, hidden, weights_dtype, dtype):
    y, order, weights = make_combine(num_tokens, top_k, hidden, weights_dtype, dtype)
    expected = torch.zeros(num_tokens, hidden, dtype=torch.float64)
    for row, copy in enumerate(order.tolist()):
        token, slot = divmod(copy, top_k)
        weight = 1.0 if weights is None else weights[token, slot].double()
        expected[token] += weight * y[row].double()
    got = combine_reference(y, order, weights, num_tokens)
    assert relative_error(got.double(), expected.to(dtype).double()) <= TOL[dtype]


def test_align_then_combine_gives_back_the_weighted_tokens(triton_align, triton_combine):
    # Each sorted row carries its own token's x: the combine must return x * (sum of that token's weights).
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 3], [3, 1], [1, 0], [2, 3], [3, 0]])
    weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    expected = x * weights.sum(dim=1, keepdim=True)
    for align_fn, combine_fn in ((align.align_tokens_reference, combine_reference),
                                 (triton_align.align_tokens_triton, triton_combine.combine_triton)):
        order, _, _ = align_fn(ids, 4)
        y = x[order // 2]  # [N, H] sorted by expert
        assert relative_error(combine_fn(y, order, weights, 5), expected) <= 1e-6


ERROR_CASES = [
    # y, order, weights, num_tokens, message
    (torch.zeros(6), torch.arange(6), None, 3, r"expected y \[N, H\] and order \[N\]; got \(6,\), \(6,\)"),
    (torch.zeros(6, 4), torch.arange(5), None, 3, r"expected y \[N, H\] and order \[N\]"),
    (torch.zeros(6, 4), torch.arange(6), None, 4, "num_tokens=4 does not divide the 6 rows of y"),
    (torch.zeros(6, 4), torch.arange(6), None, 0, "num_tokens=0 does not divide"),
    (torch.zeros(6, 4), torch.arange(6), torch.zeros(3, 3), 3, r"weights must be \[3, 2\], got shape \(3, 3\)"),
]


@pytest.mark.parametrize("y,order,weights,num_tokens,message", ERROR_CASES)
def test_bad_arguments_raise_value_error(triton_combine, y, order, weights, num_tokens, message):
    for function in (combine, triton_combine.combine_triton):
        with pytest.raises(ValueError, match=message):
            function(y, order, weights, num_tokens)


def test_launcher_rejects_a_float_order(triton_combine):
    with pytest.raises(ValueError, match="order must be an integer tensor"):
        triton_combine.combine_triton(torch.zeros(6, 4), torch.arange(6.0), None, 3)


def test_launcher_reads_an_unclaimed_copy_as_zero(triton_combine):
    # order is not a permutation (copy 1 twice, copy 0 never): no stray reads, copy 0 counts as zeros.
    y = torch.ones(2, 4)
    out = triton_combine.combine_triton(y, torch.tensor([1, 1]), None, 1)
    assert out.tolist() == [[1.0] * 4]
