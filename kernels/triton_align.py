"""Triton kernels for `kernels.align.align_tokens`: a stable counting sort of the token copies by expert.

[topk_ids] -> [per-block histograms] -> [per-expert scan over blocks] -> [stable placement] -> order

The N = T*k copies are cut into blocks of BLOCK_N. The rank of a copy among the copies of its expert
is (copies of that expert in earlier blocks) + (copies of it earlier in its own block), so each block
places its copies independently and the result keeps token order within an expert, as the reference's
stable argsort does. Everything runs in Triton; the launcher only allocates, checks the ids' range
(one host sync, the price of the reference's ValueError) and picks tile sizes.

Shapes: N = token copies, E = experts, B = blocks of BLOCK_N copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_common import check_device, tile

__all__ = ["align_tokens_triton"]


@triton.jit
def _block_one_hot(ids_ptr, num_copies, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """Copies of this program's block and their one-hot experts: ([BN] copy index, [BN] valid, [BN, BE] int32)."""
    copies = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    is_copy = copies < num_copies
    ids = tl.load(ids_ptr + copies, mask=is_copy, other=0).to(tl.int32)
    one_hot = ((ids[:, None] == tl.arange(0, BLOCK_E)[None, :]) & is_copy[:, None]).to(tl.int32)
    return copies, is_copy, one_hot


@triton.jit
def _histogram_kernel(ids_ptr, block_counts_ptr, num_copies, num_experts,
                      BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """block_counts[b, e] = copies of expert e in block b."""
    _, _, one_hot = _block_one_hot(ids_ptr, num_copies, BLOCK_N, BLOCK_E)
    experts = tl.arange(0, BLOCK_E)
    tl.store(block_counts_ptr + tl.program_id(0) * num_experts + experts, tl.sum(one_hot, axis=0),
             mask=experts < num_experts)


@triton.jit
def _scan_blocks_kernel(block_counts_ptr, counts_ptr, num_blocks, num_experts, BLOCK_B: tl.constexpr):
    """For expert e (one program each): block_counts[:, e] becomes its exclusive prefix sum; counts[e] the total."""
    expert = tl.program_id(0)
    total = tl.zeros((), tl.int32)
    for start in range(0, num_blocks, BLOCK_B):
        blocks = start + tl.arange(0, BLOCK_B)
        ptrs = block_counts_ptr + blocks * num_experts + expert
        counts = tl.load(ptrs, mask=blocks < num_blocks, other=0)
        tl.store(ptrs, total + tl.cumsum(counts, axis=0) - counts, mask=blocks < num_blocks)
        total += tl.sum(counts, axis=0)
    tl.store(counts_ptr + expert, total.to(tl.int64))


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, block_starts_ptr, order_ptr, offsets_ptr, num_copies, num_experts,
                  BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """order[offsets[e] + block_starts[b, e] + rank in block] = copy, for every copy of block b."""
    copies, is_copy, one_hot = _block_one_hot(ids_ptr, num_copies, BLOCK_N, BLOCK_E)  # [BN], [BN], [BN, BE]
    experts = tl.arange(0, BLOCK_E)
    is_expert = experts < num_experts
    # Step 1: where each expert's rows start (every program derives it; program 0 writes it out).
    counts = tl.load(counts_ptr + experts, mask=is_expert, other=0)  # [BE] int64
    ends = tl.cumsum(counts, axis=0)
    if tl.program_id(0) == 0:
        tl.store(offsets_ptr + 1 + experts, ends, mask=is_expert)  # offsets[0] = 0 already
    block_starts = tl.load(block_starts_ptr + tl.program_id(0) * num_experts + experts, mask=is_expert, other=0)
    starts = ends - counts + block_starts  # [BE]
    # Step 2: rank within the block among copies of the same expert, in copy order.
    ranks = tl.cumsum(one_hot, axis=0) - one_hot  # [BN, BE]
    rows = tl.sum(tl.where(one_hot != 0, starts[None, :] + ranks, 0), axis=1)  # [BN] int64
    tl.store(order_ptr + rows, copies.to(tl.int64), mask=is_copy)


def align_tokens_triton(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort token copies by expert.

    topk_ids: [T, k] integer expert ids in [0, num_experts).
    Returns (order [T*k] int64: flat copy index of each sorted row,
             counts [E] int64: copies per expert,
             offsets [E+1] int64: exclusive prefix sum of counts).
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.is_floating_point() or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if num_experts < 0:
        raise ValueError(f"num_experts must be >= 0, got {num_experts}")
    check_device(_place_kernel, topk_ids=topk_ids)
    flat = topk_ids.reshape(-1).contiguous()
    num_copies, device = flat.numel(), flat.device
    if num_copies:
        lo, hi = torch.aminmax(flat)
        if int(lo) < 0 or int(hi) >= num_experts:
            raise ValueError(f"topk_ids must lie in [0, {num_experts}), got [{int(lo)}, {int(hi)}]")
    order = torch.empty(num_copies, dtype=torch.int64, device=device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    if not num_copies:
        return order, counts, offsets
    block_n = tile(num_copies, 16, 128)
    block_e = triton.next_power_of_2(num_experts)
    num_blocks = triton.cdiv(num_copies, block_n)
    block_counts = torch.empty(num_blocks, num_experts, dtype=torch.int32, device=device)  # [B, E]
    _histogram_kernel[(num_blocks,)](flat, block_counts, num_copies, num_experts, BLOCK_N=block_n, BLOCK_E=block_e)
    _scan_blocks_kernel[(num_experts,)](block_counts, counts, num_blocks, num_experts,
                                        BLOCK_B=tile(num_blocks, 16, 1024))
    _place_kernel[(num_blocks,)](flat, counts, block_counts, order, offsets, num_copies, num_experts,
                                 BLOCK_N=block_n, BLOCK_E=block_e)
    return order, counts, offsets
