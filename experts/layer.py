"""MoELayer: one MoE layer in one process (gate, routed and shared experts): the reference the
mesh must equal.

[Gate] -> [align: sort copies by expert] -> [ExpertGroup: grouped MLP] -> [combine] (+ shared experts)

Shape legend: T = tokens, H = hidden, E = experts, k = experts per token, N = T * k copies.
"""

from __future__ import annotations

from pathlib import Path

import torch

from experts.checkpoint import CheckpointReader, GateWeights, LatentWeights, SharedWeights
from experts.group import ExpertGroup, LayerExperts
from experts.quantized import fp8_on
from experts.spec import MoESpec
from kernels import (align_tokens, combine, grouped_mlp, hashed_sqrtsoftplus, topk_sigmoid_grouped, topk_sigmoid_sink,
                     topk_softmax, topk_softmax_grouped, topk_sparsemixer, topk_sqrtsoftplus, topk_then_sigmoid)

__all__ = ["Gate", "Latent", "MoELayer", "SharedExpert", "DispatchedTokens", "dispatch", "split_shared"]


def _mover(dtype: torch.dtype | None, device: torch.device | str | None):
    """t -> t in `dtype` on `device` (None: as it is), None -> None."""
    return lambda t: t if t is None else t.to(device=device, dtype=dtype or t.dtype)


class Gate:
    """Top-k gate of one layer, per the model's scoring rule, computed on the device its weights are on."""

    def __init__(self, spec: MoESpec, weights: GateWeights, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        self.spec = spec
        cast, move = _mover(dtype, device), _mover(None, device)
        self.weight = cast(weights.weight)  # [E, H]
        self.bias = move(weights.bias)  # [E] float32 or None: for the choice only
        self.logit_bias = cast(weights.logit_bias)  # [E] or None: added to the logits (gpt-oss)
        self.token_experts = move(weights.token_experts)  # [vocab, k] int64 or None: DeepSeek-V4's hash layers
        self.top_k = weights.top_k or spec.top_k  # this layer's experts per token
        self.scale = weights.scale  # Inkling's learned global_scale

    @property
    def vocab_size(self) -> int:
        """Token ids a hash-routed layer's table covers (0: the layer is not hash-routed)."""
        return 0 if self.token_experts is None else self.token_experts.shape[0]

    def __call__(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H]; token_ids: [T] int64, needed by a hash-routed layer (ignored by the others).
        Returns (weights [T, k] float, ids [T, k] int64); a gate that weighs the shared experts too
        (Inkling's) returns weights [T, k + S], the shared experts' last (`split_shared`)."""
        spec = self.spec
        if spec.scoring == "sigmoid_grouped":
            logits = x.float() @ self.weight.float().t()
            return topk_sigmoid_grouped(logits, self.bias, self.top_k, spec.num_groups, spec.topk_groups,
                                        spec.renormalize, spec.scaling, spec.renorm_min, spec.logit_softcap)
        logits = self._logits(x)  # [T, E]
        if spec.scoring == "sqrtsoftplus" and self.token_experts is not None:
            ids = self._hashed_ids(token_ids, x.shape[0]).to(logits.device)
            return hashed_sqrtsoftplus(logits, ids, spec.renormalize, spec.scaling)
        if spec.scoring == "sqrtsoftplus":
            return topk_sqrtsoftplus(logits, self.bias, self.top_k, spec.renormalize, spec.scaling)
        if spec.scoring == "sparsemixer":
            return topk_sparsemixer(logits, spec.jitter_eps)
        if spec.scoring == "sigmoid_sink":
            return topk_sigmoid_sink(logits.float(), self.bias, self.top_k, spec.num_shared_scored,
                                     spec.scaling * self.scale)
        if spec.scoring == "topk_then_sigmoid":
            weights, ids = topk_then_sigmoid(logits, self.top_k, self.bias, spec.renormalize)
            return (weights if spec.scaling == 1.0 else weights * spec.scaling), ids
        if spec.scoring == "softmax_grouped":
            return topk_softmax_grouped(logits, self.bias, self.top_k, spec.num_groups, spec.topk_groups,
                                        spec.group_best, spec.renormalize, spec.scaling, spec.renorm_min)
        weights, ids = topk_softmax(logits, self.top_k, spec.renormalize, spec.renorm_p)
        return (weights if spec.scaling == 1.0 else weights * spec.scaling), ids

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> router logits [T, E], in x's dtype or (`is_router_fp32`) float32."""
        dtype = torch.float32 if self.spec.is_router_fp32 else x.dtype
        bias = None if self.logit_bias is None else self.logit_bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), self.weight.to(dtype), bias)

    def _hashed_ids(self, token_ids: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
        """The experts [T, k] that the token table picks for token_ids [T]; ValueError naming token_ids."""
        if token_ids is None:
            raise ValueError("token_ids are needed: this layer routes tokens by their id")
        if token_ids.shape != (num_tokens,) or token_ids.dtype != torch.int64:
            raise ValueError(f"token_ids must be [{num_tokens}] int64, got {tuple(token_ids.shape)} {token_ids.dtype}")
        if num_tokens and not 0 <= int(token_ids.min()) <= int(token_ids.max()) < self.vocab_size:
            raise ValueError(f"token_ids must be in [0, {self.vocab_size}), got {int(token_ids.min())}.."
                             f"{int(token_ids.max())}")
        return self.token_experts[token_ids.to(self.token_experts.device)]


class SharedExpert:
    """The always-on expert(s) of a layer (Qwen2-MoE with its sigmoid gate, DeepSeek-V3, Llama 4,
    Mistral Large 3): one MLP; Inkling's n shared experts: n MLPs, each weighted by the gate."""

    def __init__(self, spec: MoESpec, weights: SharedWeights, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        cast = _mover(dtype, device)
        self.activation = spec.gated_activation(shared=True)
        n = max(1, spec.num_shared_scored)  # MLPs of S / n each
        size = weights.w_down.shape[1] // n
        projections = cast(weights.w_gate_up).reshape(self.activation.projections, n, size, -1).unbind(0)
        self.w_gate_up = torch.cat(projections, dim=1).contiguous()  # [n, 2S / n, H] (gate, up; up: not gated)
        self.w_down = cast(weights.w_down).reshape(-1, n, size).transpose(0, 1).contiguous()  # [n, H, S / n]
        self.gate = None if weights.gate is None else cast(weights.gate)    # [1, H]
        self.scale = spec.shared_scale  # Cohere2-MoE's average: 0.5

    def __call__(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, H] in the weights' dtype; weights: [T, n], each MLP's weight per token (Inkling's
        gate gives them; None for the others). Returns [T, H]."""
        n = self.w_down.shape[0]
        counts = torch.full((n,), x.shape[0], dtype=torch.int64, device=x.device)
        out = grouped_mlp(x if n == 1 else x.repeat(n, 1), self.w_gate_up, self.w_down, counts, self.activation)
        if weights is not None:  # [n * T, H] -> [T, H]
            out = (out.view(n, *x.shape) * weights.t().to(out.dtype).unsqueeze(-1)).sum(dim=0)
        if self.gate is not None:
            out = torch.sigmoid(x @ self.gate.t()) * out
        return out if self.scale == 1.0 else out * self.scale


class Latent:
    """Nemotron-H's projections around a layer's experts: tokens into the experts' width, the
    combined expert output back; run where the gate runs."""

    def __init__(self, weights: LatentWeights, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        cast = _mover(dtype, device)
        self.w_into, self.w_out_of = cast(weights.into), cast(weights.out_of)  # [L, H], [H, L]

    def into(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H]. Returns [T, L]."""
        return x @ self.w_into.t()

    def out_of(self, y: torch.Tensor) -> torch.Tensor:
        """y: [T, L]. Returns [T, H]."""
        return y @ self.w_out_of.t()


def split_shared(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A gate's weights [T, k] or [T, k + S] (ids [T, k]) as the routed experts' [T, k] and the shared
    experts' [T, S] (None: the gate weighs no shared expert)."""
    k = ids.shape[1]
    if weights.shape[1] == k:
        return weights, None
    return weights[:, :k].contiguous(), weights[:, k:]


class DispatchedTokens:
    """Token copies sorted by expert, and what `combine` needs to undo it; `shared_weights` [T, S]: the
    shared experts' weights where the gate gives them (Inkling), else None."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                 gate_on_input: bool):
        weights, self.shared_weights = split_shared(weights, ids)
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
    """Sort the copies of x [T, H] by the expert `ids` [T, k] picked, with their gate `weights` ([T, k],
    or [T, k + S] with the shared experts'); the copies of identity experts (ids >= num_experts) come last."""
    return DispatchedTokens(x, weights, ids, spec.num_scored, spec.gate_on_input)


class MoELayer(torch.nn.Module):
    """A whole MoE layer in-process; call on [T, H] or [B, S, H], output in the input's dtype."""

    def __init__(self, spec: MoESpec, layer: int, gate: Gate, experts: ExpertGroup, shared: SharedExpert | None,
                 latent: Latent | None = None):
        super().__init__()
        self.spec, self.layer = spec, layer
        self.gate, self.experts, self.shared, self.latent = gate, experts, shared, latent

    @classmethod
    def from_pretrained(cls, path: str | Path, layer: int, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> "MoELayer":
        """Load decoder layer `layer` (as in model.model.layers[layer]) of the checkpoint at `path`
        onto `device` (its experts one at a time)."""
        reader = CheckpointReader(path, dtype=dtype, keep_fp8=fp8_on(device))
        try:
            reader.spec.check_layer(layer)
            gate = Gate(reader.spec, reader.gate(layer), dtype, device)
            shared_weights = reader.shared(layer)
            shared = None if shared_weights is None else SharedExpert(reader.spec, shared_weights, dtype, device)
            latent_weights = reader.latent(layer)
            latent = None if latent_weights is None else Latent(latent_weights, dtype, device)
            held = LayerExperts.from_weights(reader.experts(layer, device=device), dtype, device)
        finally:
            reader.close()
        return cls(reader.spec, layer, gate, ExpertGroup(reader.spec, {layer: held}, device=device), shared, latent)

    @property
    def dtype(self) -> torch.dtype:
        return self.experts.layers[self.layer].dtype

    @property
    def device(self) -> torch.device:
        return self.experts.device

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [T, H] or [B, S, H], on any device (the layer computes on its own and answers on
        hidden's); token_ids: [T] or [B, S] int64 (hidden's leading dims), needed by a hash-routed
        layer (DeepSeek-V4) and ignored by the others."""
        if hidden.dim() not in (2, 3) or hidden.shape[-1] != self.spec.hidden_size:
            raise ValueError(f"hidden must be [T, {self.spec.hidden_size}] or [B, S, {self.spec.hidden_size}], "
                             f"got shape {tuple(hidden.shape)}")
        if token_ids is not None and token_ids.shape != hidden.shape[:-1]:
            raise ValueError(f"token_ids must have hidden's leading dims {list(hidden.shape[:-1])}, "
                             f"got {list(token_ids.shape)}")
        x = hidden.reshape(-1, self.spec.hidden_size).to(device=self.device, dtype=self.dtype)  # [T, H]
        weights, ids = self.gate(x, None if token_ids is None else token_ids.reshape(-1))  # [T, k], [T, k]
        tokens = dispatch(self.spec, x if self.latent is None else self.latent.into(x), weights, ids)
        counts = tokens.counts[:self.spec.num_experts]
        routed = sum(counts)  # the copies after these are identity experts': the token itself
        experts = [e for e, c in enumerate(counts) if c]
        y = self.experts.forward(self.layer, tokens.rows[:routed], experts, [counts[e] for e in experts],
                                 None if tokens.scale is None else tokens.scale[:routed])
        out = tokens.combine(torch.cat([y, tokens.rows[routed:]]))  # [T, H] ([T, L] latent)
        if self.latent is not None:
            out = self.latent.out_of(out)
        if self.shared is not None:
            out = out + self.shared(x, tokens.shared_weights)
        return out.to(device=hidden.device, dtype=hidden.dtype).reshape(hidden.shape)
