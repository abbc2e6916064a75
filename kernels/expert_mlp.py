"""Grouped expert MLP over aligned tokens: for each expert e, y = down_e(act(gate_e(x)) * up_e(x)).

Shapes: N = token copies (sorted by expert), H = hidden, I = expert intermediate size,
E = experts held here. Weights use the transformers in-memory layout:
w_gate_up [E, 2I, H] (gate rows first, then up rows), w_down [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "grouped_mlp"]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _check(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor, activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"expected x [N, H], w_gate_up [E, 2I, H], w_down [E, H, I]; got "
                         f"{tuple(x.shape)}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    num_experts, two_i, hidden = w_gate_up.shape
    if x.shape[1] != hidden or w_down.shape != (num_experts, hidden, two_i // 2) or two_i % 2:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, "
                         f"w_down {tuple(w_down.shape)} (want [N, H], [E, 2I, H], [E, H, I])")
    if counts.shape != (num_experts,):
        raise ValueError(f"counts must be [{num_experts}], got shape {tuple(counts.shape)}")
    if counts.numel() and int(counts.min()) < 0:
        raise ValueError(f"counts must be >= 0, got {counts.tolist()}")


def grouped_mlp(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor, activation: str = "silu"
) -> torch.Tensor:
    """Gated MLP of each expert over its contiguous rows.

    x: [N, H] sorted by expert; counts: [E] int64, sum == N. Returns [N, H] in x.dtype.
    """
    _check(x, w_gate_up, w_down, counts, activation)
    if x.is_cuda:
        from kernels.triton_expert_mlp import grouped_mlp_triton

        return grouped_mlp_triton(x, w_gate_up, w_down, counts, activation)
    return grouped_mlp_reference(x, w_gate_up, w_down, counts, activation)


def grouped_mlp_reference(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor, activation: str = "silu"
) -> torch.Tensor:
    act = ACTIVATIONS[activation]
    inter = w_down.shape[2]
    out = torch.empty_like(x)
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gate_up = x[rows] @ w_gate_up[expert].t()  # [n, 2I]
        torch.mm(act(gate_up[:, :inter]) * gate_up[:, inter:], w_down[expert].t(), out=out[rows])
        start += count
    if start != x.shape[0]:
        raise ValueError(f"counts sum to {start} but x has {x.shape[0]} rows")
    return out
