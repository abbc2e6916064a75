"""Top-k gates: the Triton kernels (interpreted) against the torch references, and the references' rules."""

from __future__ import annotations

import pytest
import torch

from kernels import gating
from tests.unit.kernels.numerics import relative_error

# max |got - ref| / max |ref|. bfloat16 outputs may differ by one ulp (2^-8 relative): the interpreter
# rounds float32 -> bfloat16 toward zero, and its sigmoid is not torch's to the last bit.
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_logits(num_tokens: int, num_experts: int, dtype=torch.float32, ties: bool = False, seed: int = 0):
    """[T, E] logits; with ties, row 0 is constant and every other row's maximum appears twice."""
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(seed))
    if ties:
        logits[0] = 0.25
        logits[1:, -1] = logits[1:].max(dim=1).values  # the best expert ties with the last one
        logits[1:, num_experts // 2] = logits[1:, 0]
    return logits.to(dtype)


def assert_gate_matches(got, ref, dtype):
    (weights, ids), (ref_weights, ref_ids) = got, ref
    assert torch.equal(ids, ref_ids), f"ids differ:\n{ids}\n{ref_ids}"
    assert relative_error(weights, ref_weights) <= TOL[dtype]


SOFTMAX_CASES = [
    # T, E, k, renormalize, dtype, ties, renorm_p
    (5, 6, 2, True, torch.float32, False, 1.0),
    (5, 6, 2, False, torch.float32, True, 1.0),
    (3, 8, 8, True, torch.float32, True, 1.0),  # k == E
    (1, 3, 1, False, torch.float32, False, 1.0),
    (7, 20, 4, True, torch.bfloat16, True, 1.0),
    (9, 6, 1, False, torch.bfloat16, False, 1.0),
    (1100, 6, 2, True, torch.float32, True, 1.0),  # three programs of 512 tokens
    (5, 16, 4, True, torch.float32, True, 2.0),  # DBRX-style p-norm
    (6, 8, 3, True, torch.bfloat16, False, 1.5),
]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,renormalize,dtype,ties,renorm_p", SOFTMAX_CASES)
def test_topk_softmax_triton_matches_reference(triton_gating, num_tokens, num_experts, top_k, renormalize, dtype, ties,
                                               renorm_p):
    logits = make_logits(num_tokens, num_experts, dtype, ties)
    got = triton_gating.topk_softmax_triton(logits, top_k, renormalize, renorm_p)
    ref = gating.topk_softmax_reference(logits, top_k, renormalize, renorm_p)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert_gate_matches(got, ref, torch.float32)


GROUPED_CASES = [
    # T, E, k, groups, topk_groups, bias, renormalize, scaling, ties, softcap
    (5, 6, 2, 2, 1, False, True, 1.0, False, 0.0),  # 3 experts per group
    (5, 6, 3, 3, 2, True, False, 2.5, True, 0.0),
    (4, 16, 4, 4, 2, True, True, 2.5, False, 0.0),  # DeepSeek-V3 shaped
    (4, 16, 4, 4, 2, False, True, 2.5, True, 0.0),
    (3, 8, 3, 8, 3, False, True, 1.0, False, 0.0),  # one expert per group
    (2, 12, 5, 3, 2, True, False, 1.0, True, 0.0),
    (6, 8, 2, 1, 1, False, True, 1.0, True, 0.0),  # one group: plain sigmoid top-k
    (4, 16, 4, 4, 2, True, True, 2.5, False, 1.5),  # Laguna: logits soft-capped before the sigmoid
    (6, 8, 3, 1, 1, True, True, 1.0, True, 0.5),
]


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,num_groups,topk_groups,has_bias,renormalize,scaling,ties,softcap", GROUPED_CASES
)
def test_topk_sigmoid_grouped_triton_matches_reference(
    triton_gating, num_tokens, num_experts, top_k, num_groups, topk_groups, has_bias, renormalize, scaling, ties,
    softcap
):
    logits = make_logits(num_tokens, num_experts, ties=ties)
    bias = 0.1 * torch.randn(num_experts, generator=torch.Generator().manual_seed(1)) if has_bias else None
    args = (logits, bias, top_k, num_groups, topk_groups, renormalize, scaling, 1e-20, softcap)
    got = triton_gating.topk_sigmoid_grouped_triton(*args)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert_gate_matches(got, gating.topk_sigmoid_grouped_reference(*args), torch.float32)


SOFTMAX_GROUPED_CASES = [
    # T, E, k, groups, topk_groups, group_best, renormalize, scaling, dtype, ties, bias, renorm_min
    (5, 6, 2, 2, 1, 1, False, 1.0, torch.float32, False, False, 1e-20),  # 3 experts per group
    (5, 6, 3, 3, 2, 1, True, 2.5, torch.float32, True, False, 1e-20),
    (4, 16, 4, 4, 2, 1, False, 16.0, torch.float32, False, False, 1e-20),  # DeepSeek-V2 shaped (its scaling 16)
    (4, 16, 4, 4, 2, 1, False, 1.0, torch.bfloat16, True, False, 1e-20),
    (6, 8, 2, 1, 1, 1, False, 1.0, torch.float32, True, False, 1e-20),  # one group: V2's "greedy"
    (600, 8, 2, 2, 1, 1, False, 1.0, torch.float32, False, False, 1e-20),  # two programs
    (4, 16, 4, 4, 2, 2, True, 1.5, torch.float32, False, False, 1e-20),  # Mistral Large 3 with groups
    (5, 6, 3, 3, 2, 2, True, 1.0, torch.bfloat16, True, False, 1e-20),
    (6, 8, 3, 1, 1, 2, True, 1.0, torch.float32, True, True, 1e-12),  # Ernie 4.5: a bias for the choice
    (6, 8, 2, 1, 1, 2, True, 1.0, torch.float32, False, True, 0.9),  # a clamp that bites: sums < 0.9
]


@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,num_groups,topk_groups,group_best,renormalize,scaling,dtype,ties,has_bias,"
    "renorm_min", SOFTMAX_GROUPED_CASES)
def test_topk_softmax_grouped_triton_matches_reference(triton_gating, num_tokens, num_experts, top_k, num_groups,
                                                       topk_groups, group_best, renormalize, scaling, dtype, ties,
                                                       has_bias, renorm_min):
    logits = make_logits(num_tokens, num_experts, dtype, ties)
    bias = 0.1 * torch.randn(num_experts, generator=torch.Generator().manual_seed(1)) if has_bias else None
    args = (logits, bias, top_k, num_groups, topk_groups, group_best, renormalize, scaling, renorm_min)
    got = triton_gating.topk_softmax_grouped_triton(*args)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert_gate_matches(got, gating.topk_softmax_grouped_reference(*args), torch.float32)


SPARSEMIXER_CASES = [
    # T, E, jitter_eps, dtype, ties
    (5, 6, 0.01, torch.float32, False),
    (5, 16, 0.01, torch.float32, True),
    (7, 8, 0.3, torch.float32, False),  # a wide band: several experts in each softmax
    (4, 16, 0.0, torch.bfloat16, True),
    (6, 16, 0.3, torch.bfloat16, False),
    (600, 8, 0.05, torch.float32, False),  # two programs
]


@pytest.mark.parametrize("num_tokens,num_experts,jitter_eps,dtype,ties", SPARSEMIXER_CASES)
def test_topk_sparsemixer_triton_matches_reference(triton_gating, num_tokens, num_experts, jitter_eps, dtype, ties):
    logits = make_logits(num_tokens, num_experts, dtype, ties)
    got = triton_gating.topk_sparsemixer_triton(logits, jitter_eps)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert_gate_matches(got, gating.topk_sparsemixer_reference(logits, jitter_eps), dtype)


def test_sparsemixer_reference_is_phimoes_at_inference():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    logits = make_logits(64, 16) * 0.2  # close logits: several experts within the band of each round
    for jitter_eps, dtype in [(0.01, torch.float32), (0.3, torch.float32), (0.3, torch.bfloat16)]:
        ref_weights, ref_ids = sparsemixer(logits.to(dtype), jitter_eps=jitter_eps, training=False)
        weights, ids = gating.topk_sparsemixer_reference(logits.to(dtype), jitter_eps)
        assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights.float()), (jitter_eps, dtype)
    assert (weights < 1).any() and (weights == 1).any()  # both cases occur: some experts in band, some alone


THEN_SIGMOID_CASES = [
    # T, E, k, dtype, ties, bias, renormalize
    (5, 6, 1, torch.float32, True, False, False),
    (5, 6, 2, torch.float32, False, False, False),
    (4, 16, 3, torch.bfloat16, True, False, False),
    (3, 5, 5, torch.float16, False, False, False),
    (3, 7, 2, torch.float64, True, False, False),
    (6, 16, 3, torch.float32, True, True, True),  # Kolibri: a bias for the choice, renormalised
    (5, 8, 2, torch.float32, False, True, False),
    (4, 8, 3, torch.float32, False, False, True),
]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,dtype,ties,has_bias,renormalize", THEN_SIGMOID_CASES)
def test_topk_then_sigmoid_triton_matches_reference(triton_gating, num_tokens, num_experts, top_k, dtype, ties,
                                                    has_bias, renormalize):
    logits = make_logits(num_tokens, num_experts, dtype, ties)
    bias = 0.5 * torch.randn(num_experts, generator=torch.Generator().manual_seed(1)) if has_bias else None
    got = triton_gating.topk_then_sigmoid_triton(logits, top_k, bias, renormalize)
    assert got[0].dtype == dtype and got[1].dtype == torch.int64
    assert_gate_matches(got, gating.topk_then_sigmoid_reference(logits, top_k, bias, renormalize), dtype)


SINK_CASES = [
    # T, E, S (shared experts), k, bias, scaling, ties
    (5, 8, 2, 3, True, 2.5, False),  # Inkling shaped
    (5, 8, 2, 3, False, 1.0, True),
    (4, 6, 1, 6, True, 8.0, True),  # k == E
    (3, 16, 3, 4, True, 1.0, False),
    (1100, 8, 2, 2, True, 2.5, False),  # several programs
]


@pytest.mark.parametrize("num_tokens,num_experts,num_shared,top_k,has_bias,scaling,ties", SINK_CASES)
def test_topk_sigmoid_sink_triton_matches_reference(triton_gating, num_tokens, num_experts, num_shared, top_k,
                                                    has_bias, scaling, ties):
    logits = make_logits(num_tokens, num_experts + num_shared, ties=ties)
    bias = 0.1 * torch.randn(num_experts, generator=torch.Generator().manual_seed(1)) if has_bias else None
    got = triton_gating.topk_sigmoid_sink_triton(logits, bias, top_k, num_shared, scaling)
    ref = gating.topk_sigmoid_sink_reference(logits, bias, top_k, num_shared, scaling)
    assert got[0].shape == (num_tokens, top_k + num_shared) and got[1].shape == (num_tokens, top_k)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert_gate_matches(got, ref, torch.float32)


def test_sigmoid_sink_reference_is_inklings_router():
    """The reference's weights and choice are Inkling's router's (its log-sigmoid softmax over the
    chosen routed and the shared logits, x route_scale x global_scale): checked on its own module."""
    from transformers import InklingTextConfig
    from transformers.models.inkling.modeling_inkling import InklingTopkRouter

    config = InklingTextConfig(hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
                               route_scale=2.5)
    router = InklingTopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0.0, 0.5)
        router.e_score_correction_bias.uniform_(-0.1, 0.1)
        router.global_scale.fill_(1.5)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    _, ref_weights, ref_ids, ref_shared = router(x)
    weights, ids = gating.topk_sigmoid_sink_reference(x @ router.weight.t(), router.e_score_correction_bias, 3, 2,
                                                      2.5 * 1.5)
    order = ref_ids.argsort(dim=1)  # Inkling's top-k is unsorted
    assert torch.equal(ids.sort(dim=1).values, ref_ids.gather(1, order))
    assert relative_error(weights[:, :3].gather(1, ids.argsort(dim=1)), ref_weights.gather(1, order)) <= 1e-5
    assert relative_error(weights[:, 3:], ref_shared) <= 1e-5


SQRTSOFTPLUS_CASES = [
    # T, E, k, bias, renormalize, scaling, dtype, ties
    (5, 8, 2, True, True, 1.5, torch.float32, False),  # DeepSeek-V4 shaped
    (5, 8, 2, False, True, 1.0, torch.float32, True),
    (3, 6, 6, True, False, 2.5, torch.float32, True),  # k == E
    (7, 16, 4, True, True, 1.5, torch.bfloat16, False),  # scored in bf16, as the model does
    (1100, 8, 2, True, True, 1.5, torch.float32, False),  # several programs
]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,has_bias,renormalize,scaling,dtype,ties", SQRTSOFTPLUS_CASES)
def test_topk_sqrtsoftplus_triton_matches_reference(triton_gating, num_tokens, num_experts, top_k, has_bias,
                                                    renormalize, scaling, dtype, ties):
    logits = 4 * make_logits(num_tokens, num_experts, ties=ties).to(dtype)  # beyond softplus' bend both ways
    bias = 0.1 * torch.randn(num_experts, generator=torch.Generator().manual_seed(1)) if has_bias else None
    args = (logits, bias, top_k, renormalize, scaling)
    got = triton_gating.topk_sqrtsoftplus_triton(*args)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert_gate_matches(got, gating.topk_sqrtsoftplus_reference(*args), dtype)


def test_sqrtsoftplus_scores_are_those_of_the_formula_in_float64():
    logits = torch.tensor([[-30.0, -16.0, -1.0, 0.0, 1.0, 19.0, 25.0]], dtype=torch.float64)
    expected = torch.log1p(torch.exp(logits)).sqrt()
    assert torch.allclose(gating.sqrtsoftplus_scores(logits.float()).double(), expected, rtol=1e-6, atol=0)


def test_sqrtsoftplus_bias_steers_the_choice_not_the_weight():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = gating.topk_sqrtsoftplus_reference(logits, torch.tensor([0.0, 0.0, 0.0, 5.0]), 2, False, 2.0)
    assert ids.tolist() == [[3, 0]]
    assert torch.allclose(weights, 2.0 * gating.sqrtsoftplus_scores(logits)[:, [3, 0]])


def test_hashed_gate_weighs_the_given_experts_with_renormalised_scores():
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[0, 7], [3, 3], [5, 1], [2, 6]])
    weights, got_ids = gating.hashed_sqrtsoftplus(logits, ids, renormalize=True, scaling=1.5)
    scores = gating.sqrtsoftplus_scores(logits).gather(1, ids)
    assert got_ids is ids and torch.allclose(weights, 1.5 * scores / scores.sum(1, keepdim=True))
    with pytest.raises(ValueError, match=r"ids must be \[4, k\] int64"):
        gating.hashed_sqrtsoftplus(logits, ids.int(), True, 1.5)


def test_no_tokens_gives_empty_gates(triton_gating):
    logits = torch.empty(0, 6)
    for weights, ids in (triton_gating.topk_softmax_triton(logits, 2, True),
                         triton_gating.topk_sigmoid_grouped_triton(logits, None, 2, 2, 1, True, 1.0),
                         triton_gating.topk_then_sigmoid_triton(logits, 2),
                         triton_gating.topk_sqrtsoftplus_triton(logits, None, 2, True, 1.5)):
        assert weights.shape == ids.shape == (0, 2) and ids.dtype == torch.int64


# The references' own rules, on hand-checked inputs.


def test_softmax_ties_go_to_the_lower_expert():
    weights, ids = gating.topk_softmax_reference(torch.zeros(1, 5), 3, renormalize=False)
    assert ids.tolist() == [[0, 1, 2]]
    assert torch.allclose(weights, torch.full((1, 3), 0.2))
    weights, _ = gating.topk_softmax_reference(torch.zeros(1, 5), 3, renormalize=True)
    assert torch.allclose(weights, torch.full((1, 3), 1 / 3))


def test_grouped_gate_keeps_the_group_with_the_best_two():
    # Group 0 holds the single best expert (3.0) but group 1 has the larger sum of two (2 * sigmoid(1)).
    logits = torch.tensor([[3.0, -3.0, 1.0, 1.0]])
    weights, ids = gating.topk_sigmoid_grouped_reference(logits, None, 1, 2, 1, renormalize=False, scaling=2.0)
    assert ids.tolist() == [[2]]  # experts 2 and 3 tie: the lower wins
    assert torch.allclose(weights, 2.0 * torch.sigmoid(torch.tensor([[1.0]])))


def test_softmax_grouped_gate_keeps_the_group_with_the_best_expert():
    # Group 1 has the larger sum of two (as DeepSeek-V3 would score it), group 0 the single best
    # expert: DeepSeek-V2 keeps group 0. Weights are the softmax over all four, not renormalised.
    logits = torch.tensor([[3.0, -3.0, 2.5, 2.5]])
    probs = torch.softmax(logits, dim=-1)
    weights, ids = gating.topk_softmax_grouped_reference(logits, None, 2, 2, 1, 1, renormalize=False, scaling=2.0)
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(weights, 2.0 * probs[:, :2])
    weights, ids = gating.topk_softmax_grouped_reference(logits, None, 2, 1, 1, 1, renormalize=False, scaling=1.0)
    assert ids.tolist() == [[0, 2]] and torch.allclose(weights, probs[:, [0, 2]])  # one group: greedy
    _, ids = gating.topk_softmax_grouped_reference(logits, None, 2, 2, 1, 2, renormalize=True, scaling=1.0)
    assert ids.tolist() == [[2, 3]]  # Mistral Large 3 scores a group by its best two


def test_renormalisation_divides_by_at_least_renorm_min():
    """Ernie 4.5 divides the chosen softmax weights by max(their sum, moe_norm_min)."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, dim=-1)
    weights, _ = gating.topk_softmax_grouped_reference(logits, None, 2, 1, 1, 2, True, 1.0, renorm_min=0.95)
    assert torch.allclose(weights, probs[:, :2] / 0.95)  # their sum, 0.91, is under the clamp
    weights, _ = gating.topk_softmax_grouped_reference(logits, None, 2, 1, 1, 2, True, 1.0)
    assert torch.allclose(weights, probs[:, :2] / probs[:, :2].sum())


def test_a_p_norm_renormalises_as_dbrx_does():
    logits = make_logits(7, 8)
    for p in (1.0, 2.0):
        weights, ids = gating.topk_softmax_reference(logits, 3, True, p)
        top = torch.softmax(logits, dim=-1).gather(1, ids)
        assert torch.allclose(weights, top / torch.norm(top, p=p, dim=-1, keepdim=True))
    assert torch.allclose(weights.norm(dim=-1), torch.ones(7))  # p = 2: unit length, not unit sum


def test_a_softcap_bounds_the_logits_before_the_sigmoid():
    """Laguna: scores sigmoid(cap * tanh(logits / cap)); a cap that bites changes the weights."""
    logits = torch.tensor([[4.0, 3.0, 0.5, -1.0]])
    weights, ids = gating.topk_sigmoid_grouped_reference(logits, None, 2, 1, 1, False, 1.0, softcap=1.0)
    assert ids.tolist() == [[0, 1]] and torch.allclose(weights, torch.sigmoid(torch.tanh(logits[:, :2])))
    uncapped, _ = gating.topk_sigmoid_grouped_reference(logits, None, 2, 1, 1, False, 1.0)
    assert not torch.allclose(weights, uncapped)


def test_grouped_gate_bias_steers_the_choice_not_the_weight():
    logits = torch.tensor([[0.0, 0.5, 0.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])
    weights, ids = gating.topk_sigmoid_grouped_reference(logits, bias, 1, 1, 1, renormalize=False, scaling=1.0)
    assert ids.tolist() == [[3]] and weights.item() == pytest.approx(0.5)


def test_then_sigmoid_weights_are_sigmoid_of_the_top_logits():
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0]], dtype=torch.bfloat16)
    weights, ids = gating.topk_then_sigmoid_reference(logits, 2)
    assert ids.tolist() == [[1, 3]] and weights.dtype == torch.bfloat16
    assert torch.equal(weights, torch.sigmoid(torch.tensor([[2.0, 2.0]])).bfloat16())


ERROR_CASES = [
    # scoring rule, arguments after logits [4, 6], message
    ("softmax", (0, True), r"top_k must be in \[1, 6\]"),
    ("softmax", (7, True), r"top_k must be in \[1, 6\]"),
    ("then_sigmoid", (7,), r"top_k must be in \[1, 6\]"),
    ("grouped", (None, 2, 4, 1, True, 1.0), "num_groups must divide the 6 experts"),
    ("grouped", (None, 2, 3, 4, True, 1.0), r"topk_groups must be in \[1, 3\]"),
    ("grouped", (None, 5, 3, 2, True, 1.0), "top_k=5 exceeds the experts of 2 selected groups"),
    ("grouped", (torch.zeros(5), 2, 3, 2, True, 1.0), r"bias must be \[6\]"),
    ("softmax_grouped", (None, 2, 4, 1, 1, False, 1.0), "num_groups must divide the 6 experts"),
    ("softmax_grouped", (None, 5, 3, 2, 1, False, 1.0), "top_k=5 exceeds the experts of 2 selected groups"),
    ("softmax_grouped", (None, 2, 3, 2, 3, False, 1.0), "group_best must be 1 or 2"),
    ("softmax_grouped", (torch.zeros(5), 2, 1, 1, 2, True, 1.0), r"bias must be \[6\]"),
    ("sqrtsoftplus", (None, 7, True, 1.0), r"top_k must be in \[1, 6\]"),
    ("sqrtsoftplus", (torch.zeros(5), 2, True, 1.0), r"bias must be \[6\]"),
]
FUNCTIONS = {"softmax": "topk_softmax", "grouped": "topk_sigmoid_grouped", "then_sigmoid": "topk_then_sigmoid",
             "sqrtsoftplus": "topk_sqrtsoftplus", "softmax_grouped": "topk_softmax_grouped"}


@pytest.mark.parametrize("scoring,args,message", ERROR_CASES)
def test_bad_arguments_raise_value_error(triton_gating, scoring, args, message):
    name = FUNCTIONS[scoring]
    for function in (getattr(gating, name), getattr(triton_gating, f"{name}_triton")):
        with pytest.raises(ValueError, match=message):
            function(torch.zeros(4, 6), *args)


@pytest.mark.parametrize("name,args", [("topk_softmax", (1, True)), ("topk_then_sigmoid", (1,)),
                                       ("topk_sigmoid_grouped", (None, 1, 1, 1, True, 1.0)),
                                       ("topk_sqrtsoftplus", (None, 1, True, 1.0))])
def test_logits_must_be_two_dimensional(triton_gating, name, args):
    for function in (getattr(gating, name), getattr(triton_gating, f"{name}_triton")):
        with pytest.raises(ValueError, match=r"logits must be \[T, E\], got shape \(6,\)"):
            function(torch.zeros(6), *args)
