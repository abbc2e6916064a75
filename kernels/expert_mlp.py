"""Grouped expert MLP over aligned tokens: for each expert e, y = down_e(act(gate_e(x)) * up_e(x)), or
y = down_e(act(up_e(x))) for non-gated experts (Nemotron-H's relu^2).

Shapes: N = token copies (sorted by expert), H = hidden (the experts' input width), I = expert
intermediate size, E = experts held here. Weights use the transformers in-memory layout:
w_gate_up [E, 2I, H] (gate rows first, then up rows; [E, I, H], up rows only, for non-gated
experts), w_down [E, H, I]; optional biases b_gate_up [E, 2I] and b_down [E, H] (gpt-oss).

Block fp8 experts (DeepSeek-V3's published form) pass their weights as float8_e4m3fn with
`BlockScales`: on a GPU the Triton kernels read them as they are (half the bytes of bf16) and scale
each tile as they load it; elsewhere they are dequantized first (`dequantize_blocks`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "BlockScales", "GatedActivation", "check_shapes", "dequantize_blocks", "gated",
           "grouped_mlp"]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # Nemotron-H's experts (non-gated)
}


@dataclasses.dataclass(frozen=True)
class GatedActivation:
    """h = act(gate) * (up + up_offset), the gated activation of an expert; h = act(up) where not
    `gated` (Nemotron-H: its experts have no gate projection).

    With limit > 0, gate is first clamped to <= limit and up to [-limit, limit] (DeepSeek-V4,
    gpt-oss). For silu, alpha scales the sigmoid's input: gate * sigmoid(alpha * gate) (gpt-oss:
    alpha 1.702, up_offset 1).
    """

    name: str = "silu"
    limit: float = 0.0
    alpha: float = 1.0
    up_offset: float = 0.0
    gated: bool = True

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.name!r}")
        if self.limit < 0:
            raise ValueError(f"the clamp limit must be >= 0 (0: none), got {self.limit}")
        if self.alpha != 1.0 and self.name != "silu":
            raise ValueError(f"alpha applies to silu only, got alpha={self.alpha} with {self.name!r}")
        if not self.gated and (self.limit or self.alpha != 1.0 or self.up_offset):
            raise ValueError("a non-gated activation takes no limit, alpha or up_offset")

    @property
    def projections(self) -> int:
        """Rows of w_gate_up per intermediate unit: 2 (gate and up), or 1 (up) where not gated."""
        return 2 if self.gated else 1

    def of(self, gate_up: torch.Tensor) -> torch.Tensor:
        """h [n, I] from the gate_up projection [n, 2I] (gate columns first), or [n, I] (up) where not gated."""
        if not self.gated:
            return ACTIVATIONS[self.name](gate_up)
        inter = gate_up.shape[1] // 2
        return self(gate_up[:, :inter], gate_up[:, inter:])

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up: [n, I]. Returns h [n, I]."""
        if self.limit:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        if self.alpha != 1.0:
            act = gate * torch.sigmoid(self.alpha * gate)
        else:
            act = ACTIVATIONS[self.name](gate)
        return act * (up + self.up_offset) if self.up_offset else act * up


@dataclasses.dataclass(frozen=True)
class BlockScales:
    """The scales of block fp8 expert weights (`weight_scale_inv`): w[e, r, c] = q[e, r, c] *
    scale[e, r // block[0], c // block[1]], a dimension's last block partial where it does not divide.
    gate_up: [E, ceil(2I / b0), ceil(H / b1)] ([E, ceil(I / b0), ...] non-gated); down: [E, ceil(H / b0),
    ceil(I / b1)]; float32."""

    gate_up: torch.Tensor
    down: torch.Tensor
    block: tuple[int, int] = (128, 128)

    def check(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
        """ValueError naming what does not match: float8_e4m3fn weights, one scale per block."""
        for name, w, scale in (("w_gate_up", w_gate_up, self.gate_up), ("w_down", w_down, self.down)):
            grid = (w.shape[0], -(-w.shape[1] // self.block[0]), -(-w.shape[2] // self.block[1]))
            if w.dtype != torch.float8_e4m3fn or tuple(scale.shape) != grid or scale.dtype != torch.float32:
                raise ValueError(f"block fp8 {name} must be float8_e4m3fn with float32 scales {list(grid)} for "
                                 f"{list(self.block)} blocks; got {w.dtype} {list(w.shape)}, scales {scale.dtype} "
                                 f"{list(scale.shape)}")


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """q: float8_e4m3fn [E, R, C] (or [R, C]); scale: float [E, ceil(R / b0), ceil(C / b1)] (or [...]).
    Returns w in dtype: each value times its block's scale, in float32, then rounded."""
    rows, cols = q.shape[-2:]
    scales = scale.float().repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]
    return (q.float() * scales).to(dtype)


def gated(activation: str | GatedActivation) -> GatedActivation:
    """An activation name ("silu") stands for its plain gated form."""
    return activation if isinstance(activation, GatedActivation) else GatedActivation(activation)


def check_shapes(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor,
                 b_gate_up: torch.Tensor | None, b_down: torch.Tensor | None, projections: int = 2) -> None:
    """ValueError naming the shapes unless x [N, H], w_gate_up [E, 2I, H] ([E, I, H] with
    `projections` 1: non-gated), w_down [E, H, I], counts [E] and the biases (both or neither)
    [E, 2I], [E, H]."""
    rows = "2I" if projections == 2 else "I"
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"expected x [N, H], w_gate_up [E, {rows}, H], w_down [E, H, I]; got "
                         f"{tuple(x.shape)}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    num_experts, two_i, hidden = w_gate_up.shape
    if x.shape[1] != hidden or w_down.shape != (num_experts, hidden, two_i // projections) or two_i % projections:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w_gate_up {tuple(w_gate_up.shape)}, "
                         f"w_down {tuple(w_down.shape)} (want [N, H], [E, {rows}, H], [E, H, I])")
    if (b_gate_up is None) != (b_down is None):
        raise ValueError("b_gate_up and b_down come together (both or neither)")
    if b_gate_up is not None and (b_gate_up.shape != (num_experts, two_i) or b_down.shape != (num_experts, hidden)):
        raise ValueError(f"biases must be b_gate_up [{num_experts}, {two_i}] and b_down [{num_experts}, {hidden}], "
                         f"got {tuple(b_gate_up.shape)} and {tuple(b_down.shape)}")
    if counts.shape != (num_experts,):
        raise ValueError(f"counts must be [{num_experts}], got shape {tuple(counts.shape)}")


def grouped_mlp(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor,
    activation: str | GatedActivation = "silu", b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None, scales: BlockScales | None = None,
) -> torch.Tensor:
    """Gated (or, as `activation` says, non-gated) MLP of each expert over its contiguous rows.

    x: [N, H] sorted by expert; counts: [E] int64, sum == N; b_gate_up [E, 2I] and b_down [E, H]
    or None; `scales`: the weights are block fp8 (float8_e4m3fn). Returns [N, H] in x.dtype.
    """
    activation = gated(activation)
    check_shapes(x, w_gate_up, w_down, counts, b_gate_up, b_down, activation.projections)
    if scales is not None:
        scales.check(w_gate_up, w_down)
    if x.is_cuda:
        from kernels.triton_expert_mlp import grouped_mlp_triton

        return grouped_mlp_triton(x, w_gate_up, w_down, counts, activation, b_gate_up, b_down, scales)
    return grouped_mlp_reference(x, w_gate_up, w_down, counts, activation, b_gate_up, b_down, scales)


def grouped_mlp_reference(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts: torch.Tensor,
    activation: str | GatedActivation = "silu", b_gate_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None, scales: BlockScales | None = None,
) -> torch.Tensor:
    act = gated(activation)
    if scales is not None:  # block fp8: the weights dequantized to x's dtype first
        w_gate_up = dequantize_blocks(w_gate_up, scales.gate_up, scales.block, x.dtype)
        w_down = dequantize_blocks(w_down, scales.down, scales.block, x.dtype)
    out = torch.empty_like(x)
    start, per_expert = 0, counts.tolist()  # one host list: no torch op per check (small batches run cold)
    if min(per_expert, default=0) < 0:
        raise ValueError(f"counts must be >= 0, got {per_expert}")
    for expert, count in enumerate(per_expert):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gate_up = F.linear(x[rows], w_gate_up[expert])  # [n, 2I] ([n, I] non-gated)
        if b_gate_up is None:
            torch.mm(act.of(gate_up), w_down[expert].t(), out=out[rows])
        else:
            torch.addmm(b_down[expert], act.of(gate_up + b_gate_up[expert]), w_down[expert].t(), out=out[rows])
        start += count
    if start != x.shape[0]:
        raise ValueError(f"counts sum to {start} but x has {x.shape[0]} rows")
    return out
