"""MoELayer: one MoE layer in one process (gate, routed and shared experts): the reference the
mesh must equal.

[Gate] -> [align: sort copies by expert] -> [ExpertGroup: grouped MLP] -> [combine] (+ shared experts)

Shape legend: T = tokens, H = hidden, E = experts, k = experts per token, N = T * k copies.
"""

from __future__ import annotations

from pathlib import Path

import torch

from experts.checkpoint import CheckpointReader, GateWeights, SharedWeights
from experts.group import ExpertGroup, LayerExperts
from experts.spec import MoESpec
from kernels import align_tokens, combine, grouped_mlp, topk_sigmoid_grouped, topk_softmax, topk_then_sigmoid

__all__ = ["Gate", "MoELayer", "SharedExpert", "DispatchedTokens", "dispatch"]


class Gate:
    """Top-k gate of one layer, per the model's scoring rule."""

    def __init__(self, spec: MoESpec, weights: GateWeights, dtype: torch.dtype | None = None):
        self.spec = spec
        self.weight = weights.weight if dtype is None else weights.weight.to(dtype)  # [E, H]
        self.bias = weights.bias  # [E] float32 or None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H]. Returns (weights [T, k] float, ids [T, k] int64)."""
        spec = self.spec
        if spec.scoring == "sigmoid_grouped":
            logits = x.float() @ self.weight.float().t()
            return topk_sigmoid_grouped(logits, self.bias, spec.top_k, spec.num_groups, spec.topk_groups,
                                        spec.renormalize, spec.scaling)
        if spec.is_router_fp32:
            logits = x.float() @ self.weight.float().t()  # [T, E]
        else:
            logits = x @ self.weight.to(x.dtype).t()
        if spec.scoring == "topk_then_sigmoid":
            return topk_then_sigmoid(logits, spec.top_k)
        weights, ids = topk_softmax(logits, spec.top_k, spec.renormalize)
        return (weights if spec.scaling == 1.0 else weights * spec.scaling), ids


class SharedExpert:
    """The always-on expert(s) of a layer (Qwen2-MoE with its sigmoid gate, DeepSeek-V3, Llama 4,
    Mistral Large 3)."""

    def __init__(self, spec: MoESpec, weights: SharedWeights, dtype: torch.dtype | None = None):
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        self.activation = spec.activation
        self.w_gate_up = cast(weights.w_gate_up).unsqueeze(0).contiguous()  # [1, 2S, H]
        self.w_down = cast(weights.w_down).unsqueeze(0).contiguous()        # [1, H, S]
        self.gate = None if weights.gate is None else cast(weights.gate)    # [1, H]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] in the weights' dtype. Returns [T, H]."""
        counts = torch.tensor([x.shape[0]], dtype=torch.int64)
        out = grouped_mlp(x, self.w_gate_up, self.w_down, counts, self.activation)
        if self.gate is not None:
            out = torch.sigmoid(x @ self.gate.t()) * out
        return out


class DispatchedTokens:
    """Token copies sorted by expert, and what `combine` needs to undo it."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                 gate_on_input: bool):
        self.num_tokens, self.top_k = ids.shape
        self.order, counts, _ = align_tokens(ids, num_experts)  # [N], [E]
        self.counts = counts.tolist()
        self.rows = x[self.order // self.top_k]  # [N, H] sorted by expert
        flat_weights = weights.reshape(-1)[self.order]  # [N]
        self.scale = flat_weights if gate_on_input else None
        self.combine_weights = None if gate_on_input else weights

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """y: [N, H] expert outputs in sorted order. Returns [T, H]."""
        return combine(y, self.order, self.combine_weights, self.num_tokens)


def dispatch(spec: MoESpec, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> DispatchedTokens:
    """Sort the copies of x [T, H] by the expert `ids` [T, k] picked, with their gate `weights`."""
    return DispatchedTokens(x, weights, ids, spec.num_experts, spec.gate_on_input)


class MoELayer(torch.nn.Module):
    """A whole MoE layer in-process; call on [T, H] or [B, S, H], output in the input's dtype."""

    def __init__(self, spec: MoESpec, layer: int, gate: Gate, experts: ExpertGroup, shared: SharedExpert | None):
        super().__init__()
        self.spec, self.layer = spec, layer
        self.gate, self.experts, self.shared = gate, experts, shared

    @classmethod
    def from_pretrained(cls, path: str | Path, layer: int, dtype: torch.dtype | None = None) -> "MoELayer":
        """Load decoder layer `layer` (as in model.model.layers[layer]) of the checkpoint at `path`."""
        reader = CheckpointReader(path)
        try:
            reader.spec.check_layer(layer)
            gate = Gate(reader.spec, reader.gate(layer), dtype)
            shared_weights = reader.shared(layer)
            shared = None if shared_weights is None else SharedExpert(reader.spec, shared_weights, dtype)
            held = LayerExperts.from_weights(reader.experts(layer), dtype)
        finally:
            reader.close()
        return cls(reader.spec, layer, gate, ExpertGroup(reader.spec, {layer: held}), shared)

    @property
    def dtype(self) -> torch.dtype:
        return self.experts.layers[self.layer].w_gate_up.dtype

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() not in (2, 3) or hidden.shape[-1] != self.spec.hidden_size:
            raise ValueError(f"hidden must be [T, {self.spec.hidden_size}] or [B, S, {self.spec.hidden_size}], "
                             f"got shape {tuple(hidden.shape)}")
        x = hidden.reshape(-1, self.spec.hidden_size).to(self.dtype)  # [T, H]
        weights, ids = self.gate(x)  # [T, k], [T, k]
        tokens = dispatch(self.spec, x, weights, ids)
        experts = [e for e, c in enumerate(tokens.counts) if c]
        y = self.experts.forward(self.layer, tokens.rows, experts, [tokens.counts[e] for e in experts], tokens.scale)
        out = tokens.combine(y)  # [T, H]
        if self.shared is not None:
            out = out + self.shared(x)
        return out.to(hidden.dtype).reshape(hidden.shape)
