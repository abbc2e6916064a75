"""Grouped expert MLP on CPU with weights pre-packed once for oneDNN (the layout its GEMM wants).

A plain `x @ w.t()` repacks the weight matrix on every call; for the small per-expert row counts
of an MoE layer that repacking costs as much as the multiply. Packing once at load time measured
1.03-1.56x faster per layer on a 2-core x86 machine (bench/bench_layer.py). Same math and
signature as `grouped_mlp` otherwise; `is_available()` says whether this torch build has the ops.
"""

from __future__ import annotations

import torch

from kernels.expert_mlp import GatedActivation, gated

__all__ = ["PackedExperts", "grouped_mlp_packed", "is_available"]


def is_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedExperts:
    """w_gate_up [E, 2I, H] and w_down [E, H, I] packed per expert (CPU, fp32 or bf16); the
    biases b_gate_up [E, 2I] and b_down [E, H] (gpt-oss) or None, kept as they are."""

    def __init__(self, w_gate_up: torch.Tensor, w_down: torch.Tensor, b_gate_up: torch.Tensor | None = None,
                 b_down: torch.Tensor | None = None):
        if w_gate_up.is_cuda or w_gate_up.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"packing needs CPU fp32/bf16 weights, got {w_gate_up.device} {w_gate_up.dtype}")
        self.num_experts, self.hidden, self.inter = w_down.shape
        self.dtype = w_gate_up.dtype
        self.gate_up = [_pack(w) for w in w_gate_up]
        self.down = [_pack(w) for w in w_down]
        self.b_gate_up = [None] * self.num_experts if b_gate_up is None else list(b_gate_up)
        self.b_down = [None] * self.num_experts if b_down is None else list(b_down)


def grouped_mlp_packed(x: torch.Tensor, packed: PackedExperts, counts: torch.Tensor,
                       activation: str | GatedActivation = "silu"):
    """x: [N, H] sorted by expert (packed.dtype); counts: [E] int64 rows per expert. Returns [N, H]."""
    if x.dim() != 2 or x.shape[1] != packed.hidden or x.dtype != packed.dtype:
        raise ValueError(f"x must be [N, {packed.hidden}] {packed.dtype}, got {tuple(x.shape)} {x.dtype}")
    if counts.shape != (packed.num_experts,) or int(counts.sum()) != x.shape[0]:
        raise ValueError(f"counts must be [{packed.num_experts}] summing to {x.shape[0]}, got {counts.tolist()}")
    act = gated(activation)
    out = torch.empty_like(x)
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gate_up = _linear(x[rows], packed.gate_up[expert], packed.b_gate_up[expert])  # [n, 2I] ([n, I] non-gated)
        out[rows] = _linear(act.of(gate_up), packed.down[expert], packed.b_down[expert])
        start += count
    return out
