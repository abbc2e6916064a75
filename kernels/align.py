"""Token alignment: sort the T*k token copies by expert (the `moe_align_block_size` idea).

A token copy is identified by its flat index c = t * k + j (token t, j-th choice). After alignment,
copies of expert e occupy rows offsets[e]:offsets[e+1] of the sorted order, in token order.
"""

from __future__ import annotations

import torch

__all__ = ["align_tokens"]


def align_tokens(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort token copies by expert.

    topk_ids: [T, k] integer expert ids in [0, num_experts).
    Returns (order [T*k] int64: flat copy index of each sorted row,
             counts [E] int64: copies per expert,
             offsets [E+1] int64: exclusive prefix sum of counts).
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.is_floating_point():
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if topk_ids.is_cuda:
        from kernels.triton_align import align_tokens_triton

        return align_tokens_triton(topk_ids, num_experts)
    return align_tokens_reference(topk_ids, num_experts)


def align_tokens_reference(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = topk_ids.reshape(-1).long()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"topk_ids must lie in [0, {num_experts}), got [{int(flat.min())}, {int(flat.max())}]")
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    return order, counts, offsets
