"""Token alignment: the Triton counting sort (interpreted) against the torch reference, and its invariants."""

from __future__ import annotations

import pytest
import torch

from kernels import align

ALIGN_CASES = [
    # T, k, E, experts used (None: all), dtype
    (5, 2, 6, None, torch.int64),
    (5, 2, 6, [1, 4], torch.int64),  # four experts receive nothing
    (1, 1, 1, None, torch.int64),
    (7, 3, 20, None, torch.int32),  # more experts than copies
    (75, 2, 6, [0, 2, 3, 5], torch.int64),  # 150 copies: two blocks of 128
    (100, 3, 5, None, torch.int32),  # 300 copies: three blocks
]


def make_ids(num_tokens: int, top_k: int, num_experts: int, used: list[int] | None, dtype, seed: int = 0):
    """[T, k] expert ids drawn from `used` (all experts if None); repeats within a token are allowed."""
    pool = torch.tensor(used if used is not None else range(num_experts))
    picks = torch.randint(0, len(pool), (num_tokens, top_k), generator=torch.Generator().manual_seed(seed))
    return pool[picks].to(dtype)


@pytest.mark.parametrize("num_tokens,top_k,num_experts,used,dtype", ALIGN_CASES)
def test_align_triton_matches_reference(triton_align, num_tokens, top_k, num_experts, used, dtype):
    ids = make_ids(num_tokens, top_k, num_experts, used, dtype)
    got = triton_align.align_tokens_triton(ids, num_experts)
    ref = align.align_tokens_reference(ids, num_experts)
    for name, g, r in zip(("order", "counts", "offsets"), got, ref):
        assert g.dtype == r.dtype == torch.int64, name
        assert torch.equal(g, r), f"{name} differs:\n{g}\n{r}"


@pytest.mark.parametrize("num_tokens,top_k,num_experts,used,dtype", ALIGN_CASES)
def test_reference_sorts_stably_by_expert(num_tokens, top_k, num_experts, used, dtype):
    ids = make_ids(num_tokens, top_k, num_experts, used, dtype)
    order, counts, offsets = align.align_tokens_reference(ids, num_experts)
    flat = ids.reshape(-1).long()
    assert sorted(order.tolist()) == list(range(num_tokens * top_k))  # a permutation
    assert counts.sum() == flat.numel() and offsets[0] == 0 and torch.equal(offsets.diff(), counts)
    for expert in range(num_experts):
        rows = order[offsets[expert]:offsets[expert + 1]]
        assert (flat[rows] == expert).all()
        assert rows.tolist() == sorted(rows.tolist())  # token order within the expert
        if used is not None and expert not in used:
            assert counts[expert] == 0


def test_hand_checked_alignment(triton_align):
    ids = torch.tensor([[2, 0], [0, 2], [1, 2]])  # flat copies: 2 0 0 2 1 2
    expected = ([1, 2, 4, 0, 3, 5], [2, 1, 3, 0], [0, 2, 3, 6, 6])
    for function in (align.align_tokens, triton_align.align_tokens_triton):
        assert [t.tolist() for t in function(ids, 4)] == list(expected)


def test_no_tokens(triton_align):
    order, counts, offsets = triton_align.align_tokens_triton(torch.empty(0, 2, dtype=torch.int64), 3)
    assert order.shape == (0,) and counts.tolist() == [0, 0, 0] and offsets.tolist() == [0, 0, 0, 0]


ERROR_CASES = [
    # topk_ids, num_experts, message
    (torch.tensor([0, 1]), 2, r"topk_ids must be \[T, k\], got shape \(2,\)"),
    (torch.tensor([[0.0, 1.0]]), 2, "topk_ids must be an integer tensor, got torch.float32"),
    (torch.tensor([[0, 2]]), 2, r"topk_ids must lie in \[0, 2\), got \[0, 2\]"),
    (torch.tensor([[-1, 1]]), 2, r"topk_ids must lie in \[0, 2\), got \[-1, 1\]"),
]


@pytest.mark.parametrize("topk_ids,num_experts,message", ERROR_CASES)
def test_bad_ids_raise_value_error(triton_align, topk_ids, num_experts, message):
    for function in (align.align_tokens, triton_align.align_tokens_triton):
        with pytest.raises(ValueError, match=message):
            function(topk_ids, num_experts)
