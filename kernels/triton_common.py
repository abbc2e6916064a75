"""What every Triton launcher in `kernels` shares: where a kernel may run, and tile sizes."""

from __future__ import annotations

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["check_device", "is_interpreted", "tile"]


def is_interpreted(kernel) -> bool:
    """Whether `kernel` was decorated under TRITON_INTERPRET=1 (numpy on the host, any device)."""
    return isinstance(kernel, InterpretedFunction)


def check_device(kernel, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless the named tensors share one device that `kernel` can run on.

    Compiled kernels need CUDA tensors; interpreted ones (TRITON_INTERPRET=1) also take CPU tensors.
    """
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listed = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"tensors must share one device, got {listed}")
    if not is_interpreted(kernel) and any(not t.is_cuda for t in present.values()):
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {devices.pop()}")


def tile(size: int, lo: int, hi: int) -> int:
    """A power-of-two tile for a dimension of `size`: next_power_of_2(size) clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(size, 1))))
