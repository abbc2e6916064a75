"""How far a kernel's output is from its reference."""

import torch


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 for an all-zero or empty ref), computed in float64."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    if not ref.numel():
        return 0.0
    scale = ref.double().abs().max().item() or 1.0
    return (got.double() - ref.double()).abs().max().item() / scale
