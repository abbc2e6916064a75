"""Top-k gating: which experts each token goes to, and with what weight.

Seven scoring rules cover the supported families:

- `topk_softmax`: softmax over all experts, top-k, optional renormalisation by the weights' sum or
  their p-norm (Mixtral, Qwen-MoE, OLMoE; DBRX's moe_normalize_expert_weights).
- `topk_sigmoid_grouped`: sigmoid scores (of logits soft-capped first where `softcap` > 0, Laguna),
  a per-expert score-correction bias used only for the choice, group-limited selection (best
  `topk_groups` of `num_groups` groups, a group scored by the sum of its two best experts), optional
  renormalisation, then `scaling` (DeepSeek-V3).
- `topk_softmax_grouped`: softmax over all experts, a bias used only for the choice (Ernie 4.5),
  group-limited selection (a group scored by its best expert, DeepSeek-V2, or the sum of its best
  two, Mistral Large 3), optional renormalisation, then `scaling`.
- `topk_then_sigmoid`: top-k over raw logits (+ a bias for the choice, Kolibri), then sigmoid of the
  chosen logits, optionally renormalised (Llama 4, Cohere2-MoE's sigmoid selection, Kolibri).
- `topk_sparsemixer`: PhiMoE's sparsemixer at inference: two experts, each the best one left,
  weighted by its softmax among the experts within a relative `2 * jitter_eps` of it.
- `topk_sigmoid_sink`: Inkling's: sigmoid scores of the routed and the shared experts' logits, top-k
  routed by score + bias, then the chosen routed and every shared expert's score normalised
  together (the shared experts are a sink in the sum), x `scaling`.
- `topk_sqrtsoftplus`: scores sqrt(softplus(logits)), a score-correction bias used only for the
  choice, top-k, optional renormalisation, then `scaling` (DeepSeek-V4); `hashed_sqrtsoftplus`
  weighs experts picked elsewhere (V4's hash layers pick them by token id) with the same scores.

Ties go to the lower expert index in every rule, in the reference and in the Triton kernels. The
grouped rules renormalise by max(sum of the top-k weights, `renorm_min`): RENORM_MIN (1e-20, which
leaves any sum of float32 scores as it is) unless a model says otherwise (Ernie 4.5's moe_norm_min).

Shapes: T = tokens, E = experts, k = top_k.
"""

from __future__ import annotations

import torch

__all__ = ["RENORM_MIN", "check_grouped", "hashed_sqrtsoftplus", "sqrtsoftplus_scores", "topk_sigmoid_grouped",
           "topk_sigmoid_sink", "topk_softmax", "topk_softmax_grouped", "topk_sparsemixer", "topk_sqrtsoftplus",
           "topk_then_sigmoid"]


RENORM_MIN = 1e-20


def _stable_topk(scores: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, ties broken towards the lower index: ([T, k] values, [T, k] int64)."""
    values, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :top_k], ids[..., :top_k]


def _check_logits(logits: torch.Tensor, top_k: int) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    if not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"top_k must be in [1, {logits.shape[1]}] (number of experts), got {top_k}")


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool,
                 renorm_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k gate; renormalised by the top-k weights' `renorm_p`-norm (1: their sum).

    logits: [T, E] any float dtype. Returns (weights [T, k] float32, ids [T, k] int64).
    """
    _check_logits(logits, top_k)
    if renorm_p <= 0:
        raise ValueError(f"renorm_p must be > 0, got {renorm_p}")
    if logits.is_cuda:
        from kernels.triton_gating import topk_softmax_triton

        return topk_softmax_triton(logits, top_k, renormalize, renorm_p)
    return topk_softmax_reference(logits, top_k, renormalize, renorm_p)


def topk_softmax_reference(logits: torch.Tensor, top_k: int, renormalize: bool,
                           renorm_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = _stable_topk(probs, top_k)
    if renormalize:
        norm = weights.sum(dim=-1, keepdim=True) if renorm_p == 1 else \
            torch.linalg.vector_norm(weights, ord=renorm_p, dim=-1, keepdim=True)
        weights = weights / norm
    return weights, ids


def topk_sigmoid_grouped(
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
    """DeepSeek-V3 gate; `softcap` > 0: the logits become softcap * tanh(logits / softcap) first.

    logits: [T, E] (scored in float32); bias: [E] float32 or None (added for the choice only).
    Returns (weights [T, k] float32, ids [T, k] int64).
    """
    if logits.is_cuda:
        from kernels.triton_gating import topk_sigmoid_grouped_triton

        return topk_sigmoid_grouped_triton(logits, bias, top_k, num_groups, topk_groups, renormalize, scaling,
                                           renorm_min, softcap)
    check_grouped(logits, bias, top_k, num_groups, topk_groups)
    return topk_sigmoid_grouped_reference(logits, bias, top_k, num_groups, topk_groups, renormalize, scaling,
                                          renorm_min, softcap)


def check_grouped(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_groups: int,
                  topk_groups: int, group_best: int = 2) -> None:
    """ValueError naming the argument of a group-limited gate that does not fit the logits [T, E]."""
    if group_best not in (1, 2):
        raise ValueError(f"group_best must be 1 or 2 (a group scored by its best expert or two), got {group_best}")
    _check_logits(logits, top_k)
    num_experts = logits.shape[1]
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups must divide the {num_experts} experts, got {num_groups}")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be in [1, {num_groups}] (num_groups), got {topk_groups}")
    if top_k > topk_groups * (num_experts // num_groups):
        raise ValueError(f"top_k={top_k} exceeds the experts of {topk_groups} selected groups")
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"bias must be [{num_experts}], got shape {tuple(bias.shape)}")


def topk_sigmoid_grouped_reference(
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
    logits = logits.float()
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return _biased_topk(logits.sigmoid(), bias, top_k, num_groups, topk_groups, 2, renormalize, scaling, renorm_min)


def topk_softmax_grouped(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_groups: int,
                         topk_groups: int, group_best: int, renormalize: bool, scaling: float,
                         renorm_min: float = RENORM_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited softmax gate: softmax over all experts in float32, + bias [E] (or None) for the
    choice only (Ernie 4.5); the best `topk_groups` of `num_groups` groups kept, a group scored by
    the sum of its `group_best` best experts (DeepSeek-V2: 1, Mistral Large 3: 2; one group: top-k
    over all); top-k among them, optional renormalisation, then `scaling`.

    logits: [T, E]. Returns (weights [T, k] float32, ids [T, k] int64).
    """
    if logits.is_cuda:
        from kernels.triton_gating import topk_softmax_grouped_triton

        return topk_softmax_grouped_triton(logits, bias, top_k, num_groups, topk_groups, group_best, renormalize,
                                           scaling, renorm_min)
    check_grouped(logits, bias, top_k, num_groups, topk_groups, group_best)
    return topk_softmax_grouped_reference(logits, bias, top_k, num_groups, topk_groups, group_best, renormalize,
                                          scaling, renorm_min)


def topk_softmax_grouped_reference(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_groups: int,
                                   topk_groups: int, group_best: int, renormalize: bool, scaling: float,
                                   renorm_min: float = RENORM_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return _biased_topk(probs, bias, top_k, num_groups, topk_groups, group_best, renormalize, scaling, renorm_min)


def _biased_topk(scores: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_groups: int, topk_groups: int,
                 group_best: int, renormalize: bool, scaling: float,
                 renorm_min: float = RENORM_MIN) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of scores [T, E] float32 (+ bias [E] for the choice), among the best groups."""
    # Step 1: the biased scores that only decide the choice.
    choice = scores if bias is None else scores + bias.float()
    return _grouped_topk(scores, choice, top_k, num_groups, topk_groups, group_best, renormalize, scaling, renorm_min)


def _grouped_topk(scores: torch.Tensor, choice: torch.Tensor, top_k: int, num_groups: int, topk_groups: int,
                  group_best: int, renormalize: bool, scaling: float,
                  renorm_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of choice [T, E] among the best `topk_groups` groups (a group scored by the sum of its
    `group_best` best choices); weights from scores [T, E]."""
    num_tokens, num_experts = scores.shape
    # Step 2: keep the best `topk_groups` groups.
    grouped = choice.view(num_tokens, num_groups, num_experts // num_groups)
    group_scores = _stable_topk(grouped, min(group_best, grouped.shape[-1]))[0].sum(dim=-1)  # [T, G]
    group_ids = _stable_topk(group_scores, topk_groups)[1]  # [T, topk_groups]
    is_kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
    choice = choice.masked_fill(~is_kept.repeat_interleave(num_experts // num_groups, dim=1), float("-inf"))
    # Step 3: top-k experts among the kept groups; weights are the unbiased scores.
    ids = _stable_topk(choice, top_k)[1]
    weights = scores.gather(1, ids)
    return _normalized(weights, renormalize, scaling, renorm_min), ids


def _normalized(weights: torch.Tensor, renormalize: bool, scaling: float,
                renorm_min: float = RENORM_MIN) -> torch.Tensor:
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=renorm_min)
    return weights * scaling


def topk_then_sigmoid(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None,
                      renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4 gate: top-k of the raw logits (+ bias [E] float32, for the choice only: Kolibri),
    weights = sigmoid(chosen logits), optionally renormalised.

    logits: [T, E]. Returns (weights [T, k] in logits.dtype, ids [T, k] int64).
    """
    _check_logits(logits, top_k)
    if bias is not None and bias.shape != (logits.shape[1],):
        raise ValueError(f"bias must be [{logits.shape[1]}], got shape {tuple(bias.shape)}")
    if logits.is_cuda:
        from kernels.triton_gating import topk_then_sigmoid_triton

        return topk_then_sigmoid_triton(logits, top_k, bias, renormalize)
    return topk_then_sigmoid_reference(logits, top_k, bias, renormalize)


def topk_then_sigmoid_reference(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None,
                                renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    choice = logits if bias is None else logits.float() + bias.float()
    ids = _stable_topk(choice, top_k)[1]
    weights = logits.gather(1, ids).float().sigmoid()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def check_sink(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_shared: int) -> None:
    """ValueError unless logits [T, E + num_shared] and bias [E] or None fit a sink gate of top_k."""
    if num_shared < 1:
        raise ValueError(f"num_shared must be >= 1, got {num_shared}")
    if logits.dim() != 2 or logits.shape[1] <= num_shared:
        raise ValueError(f"logits must be [T, E + {num_shared}] with E >= 1, got shape {tuple(logits.shape)}")
    num_experts = logits.shape[1] - num_shared
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (number of routed experts), got {top_k}")
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"bias must be [{num_experts}], got shape {tuple(bias.shape)}")


def topk_sigmoid_sink(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_shared: int,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inkling gate: the routed experts' top-k by sigmoid score + bias (the bias only for the
    choice); the chosen and the `num_shared` shared experts' sigmoid scores normalised by their
    sum together, x `scaling`.

    logits: [T, E + S] float32 (the routed experts', then the shared ones'); bias: [E] or None.
    Returns (weights [T, k + S] float32: the routed experts', then the shared ones'; ids [T, k] int64).
    """
    check_sink(logits, bias, top_k, num_shared)
    if logits.is_cuda:
        from kernels.triton_gating import topk_sigmoid_sink_triton

        return topk_sigmoid_sink_triton(logits, bias, top_k, num_shared, scaling)
    return topk_sigmoid_sink_reference(logits, bias, top_k, num_shared, scaling)


def topk_sigmoid_sink_reference(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, num_shared: int,
                                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.float().sigmoid()
    routed, shared = scores[:, :-num_shared], scores[:, -num_shared:]
    ids = _stable_topk(routed if bias is None else routed + bias.float(), top_k)[1]
    weights = torch.cat([routed.gather(1, ids), shared], dim=1)
    return weights / weights.sum(dim=-1, keepdim=True) * scaling, ids


def topk_sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer gate at inference (top-2). Round j picks the best expert m_j left (ties to
    the lower index); an expert e stays in that round's softmax unless (m_j - logit_e) / max(|logit_e|,
    m_j) > 2 * jitter_eps; its weight is m_j's share of that softmax; round 2 leaves the first pick out.
    Computed in the logits' dtype, as PhiMoE does (a bfloat16 band edge falls where the model's does).

    logits: [T, E]. Returns (weights [T, 2] float32, ids [T, 2] int64).
    """
    _check_logits(logits, 2)
    if logits.is_cuda:
        from kernels.triton_gating import topk_sparsemixer_triton

        return topk_sparsemixer_triton(logits, jitter_eps)
    return topk_sparsemixer_reference(logits, jitter_eps)


def topk_sparsemixer_reference(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    scores, weights, ids = logits, [], []
    for _ in range(2):
        best, best_id = _stable_topk(scores, 1)  # [T, 1]
        is_far = (best - logits) / logits.abs().clamp(min=best) > 2 * jitter_eps  # [T, E]
        gates = torch.softmax(scores.masked_fill(is_far, float("-inf")), dim=-1)
        weights.append(gates.gather(1, best_id))
        ids.append(best_id)
        scores = scores.scatter(1, best_id, float("-inf"))  # the next round leaves this one out
    return torch.cat(weights, dim=1).float(), torch.cat(ids, dim=1)


def sqrtsoftplus_scores(logits: torch.Tensor) -> torch.Tensor:
    """sqrt(softplus(logits)) [T, E], computed in logits.dtype as DeepSeek-V4 does, returned as float32."""
    return torch.nn.functional.softplus(logits).sqrt().float()


def topk_sqrtsoftplus(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, renormalize: bool,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4 gate: top-k of sqrt(softplus(logits)) + bias (the bias only for the choice).

    logits: [T, E] (scored in their dtype, as the model does); bias: [E] float32 or None.
    Returns (weights [T, k] float32: the chosen scores, renormalised, x scaling; ids [T, k] int64).
    """
    _check_logits(logits, top_k)
    if bias is not None and bias.shape != (logits.shape[1],):
        raise ValueError(f"bias must be [{logits.shape[1]}], got shape {tuple(bias.shape)}")
    if logits.is_cuda:
        from kernels.triton_gating import topk_sqrtsoftplus_triton

        return topk_sqrtsoftplus_triton(logits, bias, top_k, renormalize, scaling)
    return topk_sqrtsoftplus_reference(logits, bias, top_k, renormalize, scaling)


def topk_sqrtsoftplus_reference(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, renormalize: bool,
                                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _biased_topk(sqrtsoftplus_scores(logits), bias, top_k, 1, 1, 2, renormalize, scaling)


def hashed_sqrtsoftplus(logits: torch.Tensor, ids: torch.Tensor, renormalize: bool,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V4's hash-layer gate: the experts `ids` [T, k] int64 are given (picked by token id);
    their weights are the sqrt(softplus(logits [T, E])) scores, renormalised, x scaling.
    Returns (weights [T, k] float32, ids)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    if ids.dim() != 2 or ids.shape[0] != logits.shape[0] or ids.dtype != torch.int64:
        raise ValueError(f"ids must be [{logits.shape[0]}, k] int64, got {tuple(ids.shape)} {ids.dtype}")
    weights = sqrtsoftplus_scores(logits).gather(1, ids)
    return _normalized(weights, renormalize, scaling), ids
