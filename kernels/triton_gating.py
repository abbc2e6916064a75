"""Triton kernels for the top-k gates of `kernels.gating` (same signatures and results as the references).

[logits] -> [scores] -> [group mask (DeepSeek-V3)] -> [top-k, ties to the lower expert] -> (weights, ids)

DeepSeek-V4's sqrt(softplus) gate is the grouped kernel with one group and SQRT_SOFTPLUS; DeepSeek-V2's
and Mistral Large 3's softmax gates are the grouped kernel with SOFTMAX (V2's groups scored by their best
expert: GROUP_BY_BEST).

One program gates BLOCK_T tokens held as a [BLOCK_T, BLOCK_E] tile. The top-k (`_topk`) takes k rounds
of "row maximum, the lowest expert id among the lanes equal to it, mark that lane taken": the first k
entries of the references' stable descending sort, ties included. Scores are float32 as in the
references, so exact ties (equal logits) break the same way; two scores within one rounding error of
each other may still be ordered differently, where Triton's exp/sigmoid differ from torch's in the last bit.

Shapes: T = tokens, E = experts, k = top_k, G = groups, S = E // G experts per group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.gating import RENORM_MIN, check_grouped, check_sink
from kernels.triton_common import check_device, tile

__all__ = ["topk_sigmoid_grouped_triton", "topk_sigmoid_sink_triton", "topk_softmax_grouped_triton",
           "topk_softmax_triton", "topk_sparsemixer_triton", "topk_sqrtsoftplus_triton", "topk_then_sigmoid_triton"]

_NO_EXPERT = tl.constexpr(2**30)  # id of padding lanes: larger than any expert id, so never the lowest
_MAX_TILE = 4096  # elements of one program's logits tile


@triton.jit
def _topk(keys, payload, expert_ids, is_valid, top_k, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Top-k of each row of keys [BT, BE] among the lanes is_valid [BT, BE], ties to the lower expert id.

    Returns (payload at the chosen lanes [BT, BLOCK_K], their expert ids [BT, BLOCK_K] int32,
    chosen-lane mask [BT, BE]); slots >= top_k hold zeros.
    """
    slots = tl.arange(0, BLOCK_K)[None, :]
    chosen_payload = tl.zeros((BLOCK_T, BLOCK_K), payload.dtype)
    chosen_ids = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    is_free = is_valid
    for j in range(top_k):
        best = tl.max(tl.where(is_free, keys, float("-inf")), axis=1)  # [BT]
        best_id = tl.min(tl.where(is_free & (keys == best[:, None]), expert_ids, _NO_EXPERT), axis=1)  # [BT]
        is_pick = is_free & (expert_ids == best_id[:, None])  # [BT, BE], one lane per row
        picked = tl.sum(tl.where(is_pick, payload, 0.0), axis=1)  # [BT]
        chosen_payload = tl.where(slots == j, picked[:, None], chosen_payload)
        chosen_ids = tl.where(slots == j, best_id[:, None], chosen_ids)
        is_free = is_free & ~is_pick
    return chosen_payload, chosen_ids, is_valid & ~is_free


@triton.jit
def _store_topk(weights_ptr, ids_ptr, rows, is_row, weights, ids, top_k, BLOCK_K: tl.constexpr):
    """Write weights [BT, BLOCK_K] and ids [BT, BLOCK_K] to rows of the [T, k] outputs."""
    slots = tl.arange(0, BLOCK_K)[None, :]
    offsets = rows[:, None] * top_k + slots
    is_out = is_row[:, None] & (slots < top_k)
    tl.store(weights_ptr + offsets, weights.to(weights_ptr.dtype.element_ty), mask=is_out)
    tl.store(ids_ptr + offsets, ids.to(tl.int64), mask=is_out)


@triton.jit
def _topk_softmax_kernel(
    logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, top_k, renorm_p,
    RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    experts = tl.arange(0, BLOCK_E)[None, :]  # [1, BE]
    is_row = rows < num_tokens
    is_valid = tl.broadcast_to(experts < num_experts, (BLOCK_T, BLOCK_E))  # padding rows are gated too, not stored
    logits = tl.load(logits_ptr + rows[:, None] * num_experts + experts, mask=is_row[:, None] & is_valid,
                     other=float("-inf"))
    logits = tl.where(is_row[:, None], logits.to(tl.float32), 0.0)  # padding rows stay finite
    # Step 1: softmax in float32.
    exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = exps / tl.sum(exps, axis=1)[:, None]  # [BT, BE]
    # Step 2: top-k of the probabilities, as the reference sorts them (equal probabilities tie).
    expert_ids = tl.where(is_valid, experts, _NO_EXPERT)
    weights, ids, _ = _topk(probs, probs, expert_ids, is_valid, top_k, BLOCK_T, BLOCK_K)
    if RENORMALIZE:
        if renorm_p == 1.0:
            norm = tl.sum(weights, axis=1)
        else:  # (sum w^p)^(1/p); empty slots (w = 0) add nothing
            powers = tl.where(weights > 0, tl.exp(renorm_p * tl.log(tl.where(weights > 0, weights, 1.0))), 0.0)
            norm = tl.exp(tl.log(tl.sum(powers, axis=1)) / renorm_p)
        weights = weights / norm[:, None]
    _store_topk(weights_ptr, ids_ptr, rows, is_row, weights, ids, top_k, BLOCK_K)


@triton.jit
def _sqrt_softplus(logits):
    """sqrt(softplus(logits)) in float32, each step rounded to logits' dtype as torch computes it
    there. softplus(x) = max(x, 0) + log1p(exp(-|x|)), log1p(u) = log(w) * u / (w - 1) with w = 1 + u
    (exact to a few ulps where 1 + u rounds; u itself where w == 1)."""
    x = logits.to(tl.float32)
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    softplus = tl.maximum(x, 0.0) + tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
    softplus = softplus.to(logits.dtype).to(tl.float32)
    return tl.sqrt(softplus).to(logits.dtype).to(tl.float32)


@triton.jit
def _topk_sigmoid_grouped_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, top_k, num_groups, topk_groups, scaling,
    renorm_min, softcap, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, SQRT_SOFTPLUS: tl.constexpr,
    SOFTMAX: tl.constexpr, GROUP_BY_BEST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
):
    # The tile is [BT, BG, BS]: lane (g, s) holds expert g * S + s.
    group_size = num_experts // num_groups
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    groups = tl.arange(0, BLOCK_G)[None, :, None]  # [1, BG, 1]
    slots = tl.arange(0, BLOCK_S)[None, None, :]  # [1, 1, BS]
    experts = groups * group_size + slots  # [1, BG, BS]
    is_expert = (groups < num_groups) & (slots < group_size)
    is_row = rows < num_tokens
    is_valid = tl.broadcast_to(is_expert, (BLOCK_T, BLOCK_G, BLOCK_S))  # padding rows are gated too, not stored
    logits = tl.load(logits_ptr + rows[:, None, None] * num_experts + experts, mask=is_row[:, None, None] & is_valid,
                     other=0.0)
    # Step 1: scores (sigmoid, DeepSeek-V4's sqrt(softplus) or DeepSeek-V2's softmax over all experts),
    # and the biased scores that only decide the choice.
    if SQRT_SOFTPLUS:
        scores = _sqrt_softplus(logits)
    elif SOFTMAX:
        x = tl.where(is_valid, logits.to(tl.float32), float("-inf"))
        exps = tl.exp(x - tl.max(tl.max(x, axis=2), axis=1)[:, None, None])
        scores = exps / tl.sum(tl.sum(exps, axis=2), axis=1)[:, None, None]
    else:
        x = logits.to(tl.float32)
        if softcap > 0.0:  # softcap * tanh(x / softcap), tanh(u) = 2 / (1 + exp(-2u)) - 1
            x = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x / softcap)) - 1.0)
        scores = tl.sigmoid(x)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + experts, mask=is_expert, other=0.0).to(tl.float32)
    choice = tl.where(is_valid, choice, float("-inf"))
    # Step 2: keep the best `topk_groups` groups, a group scored by the sum of its two best experts
    # (GROUP_BY_BEST: by its best one).
    best = tl.max(choice, axis=2)  # [BT, BG]
    if GROUP_BY_BEST:
        group_scores = best
    else:
        first = tl.min(tl.where(choice == best[:, :, None], slots, BLOCK_S), axis=2)  # [BT, BG]
        second = tl.max(tl.where(slots == first[:, :, None], float("-inf"), choice), axis=2)  # [BT, BG]
        group_scores = tl.where(group_size > 1, best + second, best)
    group_ids = tl.broadcast_to(tl.arange(0, BLOCK_G)[None, :], (BLOCK_T, BLOCK_G))
    is_group = group_ids < num_groups
    _, _, is_kept = _topk(group_scores, group_scores, group_ids, is_group, topk_groups, BLOCK_T, BLOCK_KG)
    choice = tl.where(is_kept[:, :, None], choice, float("-inf"))
    # Step 3: top-k experts among the kept groups (a dropped group's experts stay candidates at -inf,
    # as in the reference); weights are the unbiased scores.
    BLOCK_GS: tl.constexpr = BLOCK_G * BLOCK_S
    expert_ids = tl.where(is_valid, experts, _NO_EXPERT)
    weights, ids, _ = _topk(tl.reshape(choice, (BLOCK_T, BLOCK_GS)), tl.reshape(scores, (BLOCK_T, BLOCK_GS)),
                            tl.reshape(expert_ids, (BLOCK_T, BLOCK_GS)), tl.reshape(is_valid, (BLOCK_T, BLOCK_GS)),
                            top_k, BLOCK_T, BLOCK_K)
    if RENORMALIZE:
        weights = weights / tl.maximum(tl.sum(weights, axis=1)[:, None], renorm_min)
    _store_topk(weights_ptr, ids_ptr, rows, is_row, weights * scaling, ids, top_k, BLOCK_K)


@triton.jit
def _topk_then_sigmoid_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, top_k,
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, IS_FP64: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    experts = tl.arange(0, BLOCK_E)[None, :]  # [1, BE]
    is_row = rows < num_tokens
    is_valid = tl.broadcast_to(experts < num_experts, (BLOCK_T, BLOCK_E))  # padding rows are gated too, not stored
    logits = tl.load(logits_ptr + rows[:, None] * num_experts + experts, mask=is_row[:, None] & is_valid,
                     other=float("-inf"))
    # Compare in a dtype that holds logits.dtype exactly, so the order (and ties) are the reference's.
    if IS_FP64:
        logits = logits.to(tl.float64)
    else:
        logits = logits.to(tl.float32)
    expert_ids = tl.where(is_valid, experts, _NO_EXPERT)
    keys = logits
    if HAS_BIAS:  # Kolibri: the bias decides the choice only, as the reference adds it in float32
        keys = logits.to(tl.float32) + tl.load(bias_ptr + experts, mask=experts < num_experts, other=0.0)
    values, ids, _ = _topk(keys, logits, expert_ids, is_valid, top_k, BLOCK_T, BLOCK_K)
    slots = tl.arange(0, BLOCK_K)[None, :]
    weights = tl.where(slots < top_k, tl.sigmoid(values.to(tl.float32)), 0.0)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    _store_topk(weights_ptr, ids_ptr, rows, is_row, weights, ids, top_k, BLOCK_K)


@triton.jit
def _topk_sigmoid_sink_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, num_shared, top_k, scaling,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # logits rows are [E + S]: the routed experts' lanes [BT, BE], then the shared experts' [BT, BS].
    width = num_experts + num_shared
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    experts = tl.arange(0, BLOCK_E)[None, :]  # [1, BE]
    shared = tl.arange(0, BLOCK_S)[None, :]  # [1, BS]
    is_row = rows < num_tokens
    is_valid = tl.broadcast_to(experts < num_experts, (BLOCK_T, BLOCK_E))  # padding rows are gated too, not stored
    is_shared = is_row[:, None] & (shared < num_shared)
    routed = tl.load(logits_ptr + rows[:, None] * width + experts, mask=is_row[:, None] & is_valid, other=0.0)
    sink = tl.load(logits_ptr + rows[:, None] * width + num_experts + shared, mask=is_shared, other=0.0)
    # Step 1: sigmoid scores; the routed experts' + bias decide the choice.
    scores = tl.sigmoid(routed.to(tl.float32))
    sink = tl.where(is_shared, tl.sigmoid(sink.to(tl.float32)), 0.0)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + experts, mask=experts < num_experts, other=0.0).to(tl.float32)
    expert_ids = tl.where(is_valid, experts, _NO_EXPERT)
    weights, ids, _ = _topk(choice, scores, expert_ids, is_valid, top_k, BLOCK_T, BLOCK_K)
    # Step 2: the chosen and the shared scores normalised together, x scaling.
    norm = (tl.sum(weights, axis=1) + tl.sum(sink, axis=1))[:, None] / scaling
    slots = tl.arange(0, BLOCK_K)[None, :]
    out = rows[:, None] * (top_k + num_shared)
    tl.store(weights_ptr + out + slots, weights / norm, mask=is_row[:, None] & (slots < top_k))
    tl.store(weights_ptr + out + top_k + shared, sink / norm, mask=is_shared)
    tl.store(ids_ptr + rows[:, None] * top_k + slots, ids.to(tl.int64), mask=is_row[:, None] & (slots < top_k))


@triton.jit
def _sparsemixer_kernel(
    logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, band,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Every step rounded to the logits' dtype, as torch computes it there; `band`: 2 * jitter_eps in that dtype.
    dtype = logits_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    experts = tl.arange(0, BLOCK_E)[None, :]  # [1, BE]
    is_row = rows < num_tokens
    is_valid = tl.broadcast_to(experts < num_experts, (BLOCK_T, BLOCK_E))  # padding rows are gated too, not stored
    logits = tl.load(logits_ptr + rows[:, None] * num_experts + experts, mask=is_row[:, None] & is_valid,
                     other=0.0).to(tl.float32)
    expert_ids = tl.where(is_valid, experts, _NO_EXPERT)
    is_free = is_valid
    for j in tl.static_range(2):
        # Step 1: the best expert left, ties to the lower id.
        best = tl.max(tl.where(is_free, logits, float("-inf")), axis=1)  # [BT]
        best_id = tl.min(tl.where(is_free & (logits == best[:, None]), expert_ids, _NO_EXPERT), axis=1)  # [BT]
        # Step 2: its share of the softmax over the experts left within the band of it (relative).
        gap = (best[:, None] - logits).to(dtype).to(tl.float32)
        scale = tl.maximum(tl.abs(logits), best[:, None])  # 0: torch's 0/0 or x/0 is never past the band
        ratio = (gap / tl.where(scale > 0, scale, 1.0)).to(dtype).to(tl.float32)
        is_far = (scale > 0) & (ratio > band)
        exps = tl.where(is_free & ~is_far, tl.exp(logits - best[:, None]), 0.0)
        weight = (1.0 / tl.sum(exps, axis=1)).to(dtype).to(tl.float32)  # [BT]: exp(0) over the sum
        tl.store(weights_ptr + rows * 2 + j, weight, mask=is_row)
        tl.store(ids_ptr + rows * 2 + j, best_id.to(tl.int64), mask=is_row)
        is_free = is_free & (expert_ids != best_id[:, None])


def _check_logits(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor, got {logits.dtype}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k must be in [1, {logits.shape[1]}] (number of experts), got {top_k}")


def _outputs(logits: torch.Tensor, top_k: int, weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens = logits.shape[0]
    weights = torch.empty(num_tokens, top_k, dtype=weight_dtype, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    return weights, ids


def _rows_per_program(num_tokens: int, lanes_per_row: int) -> int:
    return tile(num_tokens, 1, max(1, _MAX_TILE // lanes_per_row))


def topk_softmax_triton(logits: torch.Tensor, top_k: int, renormalize: bool,
                        renorm_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k gate, renormalised by the `renorm_p`-norm. logits: [T, E] any float dtype.
    Returns (weights [T, k] float32, ids [T, k] int64)."""
    _check_logits(logits, top_k)
    if renorm_p <= 0:
        raise ValueError(f"renorm_p must be > 0, got {renorm_p}")
    check_device(_topk_softmax_kernel, logits=logits)
    num_tokens, num_experts = logits.shape
    weights, ids = _outputs(logits, top_k, torch.float32)
    if num_tokens:
        block_e = triton.next_power_of_2(num_experts)
        block_t = _rows_per_program(num_tokens, block_e)
        _topk_softmax_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits.contiguous(), weights, ids, num_tokens, num_experts, top_k, float(renorm_p),
            RENORMALIZE=bool(renormalize), BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        )
    return weights, ids


def topk_sigmoid_grouped_triton(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
    renorm_min: float = RENORM_MIN,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 gate; `softcap` > 0: the logits soft-capped first (Laguna).

    logits: [T, E] (scored in float32); bias: [E] float or None (added for the choice only).
    Returns (weights [T, k] float32, ids [T, k] int64).
    """
    check_grouped(logits, bias, top_k, num_groups, topk_groups)
    return _launch_grouped(logits, bias, top_k, num_groups, topk_groups, renormalize, scaling, "sigmoid",
                           renorm_min=renorm_min, softcap=softcap)


def topk_softmax_grouped_triton(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_groups: int,
                                topk_groups: int, group_best: int, renormalize: bool, scaling: float,
                                renorm_min: float = RENORM_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited softmax gate (DeepSeek-V2: groups scored by their best expert, `group_best` 1;
    Mistral Large 3: by their best two, 2; Ernie 4.5: one group, a bias for the choice).

    logits: [T, E] (scored in float32); bias: [E] float or None. Returns (weights [T, k] float32,
    ids [T, k] int64).
    """
    check_grouped(logits, bias, top_k, num_groups, topk_groups, group_best)
    return _launch_grouped(logits, bias, top_k, num_groups, topk_groups, renormalize, scaling, "softmax",
                           group_best == 1, renorm_min)


def topk_sqrtsoftplus_triton(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, renormalize: bool,
                             scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4 gate: top-k of sqrt(softplus(logits)) + bias (the bias only for the choice).

    logits: [T, E] (scored in their dtype); bias: [E] float or None. Returns (weights [T, k] float32, ids [T, k] int64).
    """
    check_grouped(logits, bias, top_k, 1, 1)
    return _launch_grouped(logits, bias, top_k, 1, 1, renormalize, scaling, "sqrt_softplus")


def _launch_grouped(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_groups: int, topk_groups: int,
                    renormalize: bool, scaling: float, scoring: str, group_by_best: bool = False,
                    renorm_min: float = RENORM_MIN, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped kernel on checked arguments, scoring by "sigmoid", "sqrt_softplus" or "softmax"; a
    group scored by its best two experts or (group_by_best) its best one."""
    check_device(_topk_sigmoid_grouped_kernel, logits=logits, bias=bias)
    num_tokens, num_experts = logits.shape
    weights, ids = _outputs(logits, top_k, torch.float32)
    if num_tokens:
        block_g = triton.next_power_of_2(num_groups)
        block_s = triton.next_power_of_2(num_experts // num_groups)
        block_t = _rows_per_program(num_tokens, block_g * block_s)
        _topk_sigmoid_grouped_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits.contiguous(), logits if bias is None else bias.contiguous(), weights, ids,
            num_tokens, num_experts, top_k, num_groups, topk_groups, float(scaling), float(renorm_min), float(softcap),
            HAS_BIAS=bias is not None, RENORMALIZE=bool(renormalize), SQRT_SOFTPLUS=scoring == "sqrt_softplus",
            SOFTMAX=scoring == "softmax", GROUP_BY_BEST=group_by_best,
            BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_S=block_s, BLOCK_K=triton.next_power_of_2(top_k),
            BLOCK_KG=triton.next_power_of_2(topk_groups),
        )
    return weights, ids


def topk_then_sigmoid_triton(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None,
                             renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4 gate: top-k of the raw logits (+ bias [E] for the choice), weights = sigmoid(chosen
    logits), optionally renormalised.

    logits: [T, E]. Returns (weights [T, k] in logits.dtype, ids [T, k] int64).
    """
    _check_logits(logits, top_k)
    if bias is not None and bias.shape != (logits.shape[1],):
        raise ValueError(f"bias must be [{logits.shape[1]}], got shape {tuple(bias.shape)}")
    check_device(_topk_then_sigmoid_kernel, logits=logits, bias=bias)
    num_tokens, num_experts = logits.shape
    weights, ids = _outputs(logits, top_k, logits.dtype)
    if num_tokens:
        block_e = triton.next_power_of_2(num_experts)
        block_t = _rows_per_program(num_tokens, block_e)
        _topk_then_sigmoid_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits.contiguous(), logits if bias is None else bias.float().contiguous(), weights, ids, num_tokens,
            num_experts, top_k, HAS_BIAS=bias is not None, RENORMALIZE=bool(renormalize),
            IS_FP64=logits.dtype == torch.float64, BLOCK_T=block_t, BLOCK_E=block_e,
            BLOCK_K=triton.next_power_of_2(top_k),
        )
    return weights, ids


def topk_sigmoid_sink_triton(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_shared: int,
                             scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inkling gate (kernels.gating.topk_sigmoid_sink). logits: [T, E + S]; bias: [E] or None.
    Returns (weights [T, k + S] float32, ids [T, k] int64)."""
    check_sink(logits, bias, top_k, num_shared)
    check_device(_topk_sigmoid_sink_kernel, logits=logits, bias=bias)
    num_tokens, num_experts = logits.shape[0], logits.shape[1] - num_shared
    weights = torch.empty(num_tokens, top_k + num_shared, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens:
        block_e = triton.next_power_of_2(num_experts)
        block_t = _rows_per_program(num_tokens, block_e)
        _topk_sigmoid_sink_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits.contiguous(), logits if bias is None else bias.float().contiguous(), weights, ids, num_tokens,
            num_experts, num_shared, top_k, float(scaling), HAS_BIAS=bias is not None, BLOCK_T=block_t,
            BLOCK_E=block_e, BLOCK_S=triton.next_power_of_2(num_shared), BLOCK_K=triton.next_power_of_2(top_k),
        )
    return weights, ids


def topk_sparsemixer_triton(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer gate (kernels.gating.topk_sparsemixer). logits: [T, E] (scored in their
    dtype). Returns (weights [T, 2] float32, ids [T, 2] int64)."""
    _check_logits(logits, 2)
    check_device(_sparsemixer_kernel, logits=logits)
    num_tokens, num_experts = logits.shape
    weights, ids = _outputs(logits, 2, torch.float32)
    if num_tokens:
        block_e = triton.next_power_of_2(num_experts)
        block_t = _rows_per_program(num_tokens, block_e)
        _sparsemixer_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits.contiguous(), weights, ids, num_tokens, num_experts,
            float(torch.tensor(2 * jitter_eps, dtype=logits.dtype)),  # as torch compares with the scalar
            BLOCK_T=block_t, BLOCK_E=block_e,
        )
    return weights, ids
