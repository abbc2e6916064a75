"""The math of one MoE layer as pure tensor functions.

[gate] -> [align] -> [grouped expert MLP] -> [combine]

Each public function checks its inputs, runs a Triton kernel for CUDA tensors and the torch
reference (`*_reference`, same signature) otherwise.
"""

from kernels.align import align_tokens
from kernels.combine import combine
from kernels.expert_mlp import ACTIVATIONS, GatedActivation, grouped_mlp
from kernels.gating import (hashed_sqrtsoftplus, topk_sigmoid_grouped, topk_sigmoid_sink, topk_softmax,
                            topk_softmax_grouped, topk_sparsemixer, topk_sqrtsoftplus, topk_then_sigmoid)

__all__ = [
    "ACTIVATIONS",
    "GatedActivation",
    "align_tokens",
    "combine",
    "grouped_mlp",
    "hashed_sqrtsoftplus",
    "topk_sigmoid_grouped",
    "topk_sigmoid_sink",
    "topk_softmax",
    "topk_softmax_grouped",
    "topk_sparsemixer",
    "topk_sqrtsoftplus",
    "topk_then_sigmoid",
]
