"""Grouped expert MLP: the Triton grouped GEMM (interpreted) against the torch reference and a dense loop."""

from __future__ import annotations

import pytest
import torch

from kernels import expert_mlp
from kernels.expert_mlp import ACTIVATIONS, GatedActivation
from tests.unit.kernels.numerics import relative_error

# max |got - ref| / max |ref|. In bfloat16 the reference rounds gate_up and the activation to bfloat16
# while the kernel keeps them in float32 until h, and the interpreter rounds toward zero.
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def make_mlp(counts: list[int], hidden: int, inter: int, dtype=torch.float32, seed: int = 0):
    """(x [N, H], w_gate_up [E, 2I, H], w_down [E, H, I], counts [E]) with O(1) outputs."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = len(counts)
    x = torch.randn(sum(counts), hidden, generator=gen)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    return x.to(dtype), w_gate_up.to(dtype), w_down.to(dtype), torch.tensor(counts)


MLP_CASES = [
    # counts per expert, H, I, activation, dtype
    ([3, 0, 2, 5, 0, 1], 24, 20, "silu", torch.float32),  # experts without rows
    ([3, 0, 2, 5, 0, 1], 24, 20, "silu", torch.bfloat16),
    ([20, 3], 24, 20, "gelu", torch.float32),  # expert 0 spans two row blocks of 16
    ([0, 0, 4], 72, 36, "gelu_pytorch_tanh", torch.float32),  # K loops of 3 tiles over H, 2 over I
    ([1], 16, 16, "relu", torch.float32),
    ([2, 2], 24, 20, "relu", torch.bfloat16),
    ([2, 3], 24, 20, "gelu", torch.bfloat16),
]


@pytest.mark.parametrize("counts,hidden,inter,activation,dtype", MLP_CASES)
def test_grouped_mlp_triton_matches_reference(triton_expert_mlp, counts, hidden, inter, activation, dtype):
    args = (*make_mlp(counts, hidden, inter, dtype), activation)
    got = triton_expert_mlp.grouped_mlp_triton(*args)
    ref = expert_mlp.grouped_mlp_reference(*args)
    assert got.dtype == dtype and got.shape == ref.shape
    assert relative_error(got, ref) <= TOL[dtype]


def test_strided_input_and_int32_counts(triton_expert_mlp):
    x, w_gate_up, w_down, counts = make_mlp([2, 0, 3], 24, 20)
    wide = torch.zeros(x.shape[0], 2 * x.shape[1])
    wide[:, ::2] = x
    got = triton_expert_mlp.grouped_mlp_triton(wide[:, ::2], w_gate_up, w_down, counts.int(), "silu")
    assert relative_error(got, expert_mlp.grouped_mlp_reference(x, w_gate_up, w_down, counts)) <= 1e-5


def test_every_activation_has_a_kernel(triton_expert_mlp):
    assert sorted(triton_expert_mlp.KERNEL_ACTIVATIONS) == sorted(ACTIVATIONS)


def test_no_rows(triton_expert_mlp):
    x, w_gate_up, w_down, counts = make_mlp([0, 0], 24, 20)
    assert triton_expert_mlp.grouped_mlp_triton(x, w_gate_up, w_down, counts).shape == (0, 24)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_reference_matches_a_dense_loop_over_rows(activation):
    counts = [2, 0, 3]
    x, w_gate_up, w_down, counts_t = make_mlp(counts, 12, 10)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts_t).tolist()
    act = ACTIVATIONS[activation]

    def expert(e: int, row: torch.Tensor) -> torch.Tensor:
        gate, up = (w_gate_up[e].double() @ row.double()).split(10)
        return w_down[e].double() @ (act(gate) * up)

    dense = torch.stack([expert(e, row) for row, e in zip(x, expert_of_row)])
    got = expert_mlp.grouped_mlp_reference(x, w_gate_up, w_down, counts_t, activation)
    assert relative_error(got.double(), dense) <= 1e-5


ERROR_CASES = [
    # change to the valid arguments (x [5, 24], w_gate_up [3, 40, 24], w_down [3, 24, 20], counts [2, 0, 3]), message
    (dict(activation="swish"), "activation must be one of"),
    (dict(x=torch.zeros(5, 23)), r"shape mismatch: x \(5, 23\)"),
    (dict(w_down=torch.zeros(3, 24, 19)), r"w_down \(3, 24, 19\)"),
    (dict(w_gate_up=torch.zeros(40, 24)), r"expected x \[N, H\], w_gate_up \[E, 2I, H\]"),
    (dict(counts=torch.tensor([2, 3])), r"counts must be \[3\]"),
    (dict(counts=torch.tensor([2, 0, 2])), "counts sum to 4 but x has 5 rows"),
]


@pytest.mark.parametrize("change,message", ERROR_CASES)
def test_bad_arguments_raise_value_error(triton_expert_mlp, change, message):
    x, w_gate_up, w_down, counts = make_mlp([2, 0, 3], 24, 20)
    args = dict(x=x, w_gate_up=w_gate_up, w_down=w_down, counts=counts, activation="silu") | change
    for function in (expert_mlp.grouped_mlp, triton_expert_mlp.grouped_mlp_triton):
        with pytest.raises(ValueError, match=message):
            function(**args)


@pytest.mark.parametrize("change,message", [
    (dict(counts=torch.tensor([3, -1, 3])), "counts must be >= 0"),
    (dict(w_down=torch.zeros(3, 24, 20, dtype=torch.float64)), "must share one float dtype"),
])
def test_launcher_rejects_what_the_reference_does_not_check(triton_expert_mlp, change, message):
    x, w_gate_up, w_down, counts = make_mlp([2, 0, 3], 24, 20)
    args = dict(x=x, w_gate_up=w_gate_up, w_down=w_down, counts=counts, activation="silu") | change
    with pytest.raises(ValueError, match=message):
        triton_expert_mlp.grouped_mlp_triton(**args)


GPT_OSS = GatedActivation("silu", limit=7.0, alpha=1.702, up_offset=1.0)
DEEPSEEK_V4 = GatedActivation("silu", limit=10.0)


def make_biases(num_experts: int, hidden: int, inter: int, dtype=torch.float32, seed: int = 1):
    """(b_gate_up [E, 2I], b_down [E, H]), large enough that the clamps bite."""
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(num_experts, 2 * inter, generator=gen) * 8).to(dtype),
            torch.randn(num_experts, hidden, generator=gen).to(dtype))


def _gpt_oss_expert(w_gate_up, b_gate_up, w_down, b_down, row, inter, act: GatedActivation):
    """One expert on one row, written out as gpt-oss writes it (float64)."""
    gate_up = w_gate_up.double() @ row.double() + b_gate_up.double()
    gate = gate_up[:inter].clamp(max=act.limit)
    up = gate_up[inter:].clamp(-act.limit, act.limit)
    return w_down.double() @ ((up + act.up_offset) * gate * torch.sigmoid(act.alpha * gate)) + b_down.double()


@pytest.mark.parametrize("act", [GPT_OSS, GatedActivation("silu", limit=10.0, up_offset=1.0)], ids=["gpt_oss", "v4+1"])
def test_clamped_biased_reference_matches_the_formula_row_by_row(act):
    counts = [2, 0, 3]
    x, w_gate_up, w_down, counts_t = make_mlp(counts, 12, 10)
    x = x * 4  # pre-activations beyond the limit
    b_gate_up, b_down = make_biases(3, 12, 10)
    expert_of_row = torch.repeat_interleave(torch.arange(3), counts_t).tolist()
    dense = torch.stack([_gpt_oss_expert(w_gate_up[e], b_gate_up[e], w_down[e], b_down[e], row, 10, act)
                         for row, e in zip(x, expert_of_row)])
    got = expert_mlp.grouped_mlp_reference(x, w_gate_up, w_down, counts_t, act, b_gate_up, b_down)
    assert relative_error(got.double(), dense) <= 1e-5


CLAMPED_CASES = [
    # counts, H, I, activation, biases, dtype
    ([3, 0, 2, 5], 24, 20, GPT_OSS, True, torch.float32),
    ([3, 0, 2, 5], 24, 20, GPT_OSS, True, torch.bfloat16),
    ([20, 3], 24, 20, DEEPSEEK_V4, False, torch.float32),
    ([0, 4], 72, 36, DEEPSEEK_V4, True, torch.bfloat16),
]


@pytest.mark.parametrize("counts,hidden,inter,act,has_bias,dtype", CLAMPED_CASES)
def test_grouped_mlp_triton_clamps_and_biases_like_the_reference(triton_expert_mlp, counts, hidden, inter, act,
                                                                  has_bias, dtype):
    x, w_gate_up, w_down, counts_t = make_mlp(counts, hidden, inter, dtype)
    x = x * 4
    biases = make_biases(len(counts), hidden, inter, dtype) if has_bias else (None, None)
    got = triton_expert_mlp.grouped_mlp_triton(x, w_gate_up, w_down, counts_t, act, *biases)
    ref = expert_mlp.grouped_mlp_reference(x, w_gate_up, w_down, counts_t, act, *biases)
    assert relative_error(got, ref) <= TOL[dtype]


RELU2 = GatedActivation("relu2", gated=False)  # Nemotron-H's experts: down(relu(up x)^2)

NON_GATED_CASES = [
    # counts, H, I, biases, dtype
    ([3, 0, 2, 5], 24, 20, False, torch.float32),
    ([20, 3], 32, 24, False, torch.bfloat16),
    ([0, 4, 1], 72, 36, True, torch.float32),
]


def _up_only(w_gate_up: torch.Tensor, b_gate_up: torch.Tensor | None):
    """The up half of gated weights [E, 2I, H] (and bias [E, 2I]): non-gated weights [E, I, H]."""
    inter = w_gate_up.shape[1] // 2
    return w_gate_up[:, inter:].contiguous(), None if b_gate_up is None else b_gate_up[:, inter:].contiguous()


@pytest.mark.parametrize("counts,hidden,inter,has_bias,dtype", NON_GATED_CASES)
def test_non_gated_triton_matches_reference(triton_expert_mlp, counts, hidden, inter, has_bias, dtype):
    x, w_gate_up, w_down, counts_t = make_mlp(counts, hidden, inter, dtype)
    b_gate_up, b_down = make_biases(len(counts), hidden, inter, dtype) if has_bias else (None, None)
    w_up, b_up = _up_only(w_gate_up, b_gate_up)
    got = triton_expert_mlp.grouped_mlp_triton(x, w_up, w_down, counts_t, RELU2, b_up, b_down)
    ref = expert_mlp.grouped_mlp_reference(x, w_up, w_down, counts_t, RELU2, b_up, b_down)
    assert got.dtype == dtype and relative_error(got, ref) <= TOL[dtype]


def test_non_gated_reference_is_nemotron_h_experts():
    """down(relu(up x)^2) per expert, as transformers' NemotronHExperts computes it (weight 1 per copy)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    config = NemotronHConfig(hidden_size=24, n_routed_experts=3, moe_intermediate_size=20, moe_latent_size=None,
                             layers_block_type=["moe"])
    experts = NemotronHExperts(config)
    x, w_gate_up, w_down, counts = make_mlp([2, 0, 3], 24, 20)
    with torch.no_grad():
        experts.up_proj.copy_(_up_only(w_gate_up, None)[0])
        experts.down_proj.copy_(w_down)
        ids = torch.repeat_interleave(torch.arange(3), counts)[:, None]  # one copy per row, in expert order
        ref = experts(x, ids, torch.ones(x.shape[0], 1))
    got = expert_mlp.grouped_mlp_reference(x, experts.up_proj.detach(), w_down, counts, RELU2)
    assert relative_error(got, ref) <= 1e-6


def test_weights_that_do_not_fit_the_activation_are_refused():
    x, w_gate_up, w_down, counts = make_mlp([1, 1], 12, 10)
    with pytest.raises(ValueError, match=r"\[E, I, H\]"):
        expert_mlp.grouped_mlp(x, w_gate_up, w_down, counts, RELU2)  # gated weights, non-gated activation
    with pytest.raises(ValueError, match=r"\[E, 2I, H\]"):
        expert_mlp.grouped_mlp(x, w_gate_up[:, 10:], w_down, counts, "silu")


@pytest.mark.parametrize("bad,match", [
    (dict(name="relu2", gated=False, limit=7.0), "non-gated activation takes no limit"),
    (dict(name="swish"), "activation must be one of"),
    (dict(limit=-1.0), "limit must be >= 0"),
    (dict(name="gelu", alpha=1.702), "alpha applies to silu only"),
])
def test_bad_gated_activations_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        GatedActivation(**bad)


def test_one_bias_without_the_other_is_refused():
    x, w_gate_up, w_down, counts = make_mlp([1, 1], 12, 10)
    b_gate_up, _ = make_biases(2, 12, 10)
    with pytest.raises(ValueError, match="both or neither"):
        expert_mlp.grouped_mlp(x, w_gate_up, w_down, counts, "silu", b_gate_up, None)
    with pytest.raises(ValueError, match=r"b_gate_up \[2, 20\]"):
        expert_mlp.grouped_mlp(x, w_gate_up, w_down, counts, "silu", b_gate_up[:, :4], torch.zeros(2, 12))


# -- block fp8 weights (DeepSeek-V3's published form), read as stored by the kernels ---------------

def make_fp8(counts: list[int], hidden: int, inter: int, block: tuple[int, int], dtype=torch.bfloat16, seed: int = 0):
    """(x [N, H] in dtype, fp8 w_gate_up [E, 2I, H], fp8 w_down [E, H, I], counts, BlockScales): each
    block's scale its max |w| / 448, as checkpoints quantize."""
    x, w_gate_up, w_down, counts = make_mlp(counts, hidden, inter, torch.float32, seed)
    quantized = [_quantize(w, block) for w in (w_gate_up, w_down)]
    scales = expert_mlp.BlockScales(quantized[0][1], quantized[1][1], block)
    return x.to(dtype), quantized[0][0], quantized[1][0], counts, scales


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    from experts.quantized import quantize_fp8_block

    pairs = [quantize_fp8_block(expert, block) for expert in w]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs]).float()


FP8_CASES = [
    # counts, H, I, block: partial blocks (H=40 over 16-column blocks, 2I=48 over 32-row ones), k tiles of one block
    ([3, 0, 2, 5], 40, 24, (32, 16), torch.bfloat16),
    ([20, 3], 32, 32, (16, 32), torch.float32),  # expert 0 over two row blocks; a k tile as wide as a block
]


@pytest.mark.parametrize("counts,hidden,inter,block,dtype", FP8_CASES)
def test_block_fp8_kernels_equal_the_dequantized_reference(triton_expert_mlp, counts, hidden, inter, block, dtype):
    x, w_gate_up, w_down, counts_t, scales = make_fp8(counts, hidden, inter, block, dtype)
    got = triton_expert_mlp.grouped_mlp_triton(x, w_gate_up, w_down, counts_t, "silu", scales=scales)
    ref = expert_mlp.grouped_mlp(x, w_gate_up, w_down, counts_t, "silu", scales=scales)  # dequantized, on the CPU
    assert got.dtype == dtype and got.shape == ref.shape
    assert relative_error(got, ref) <= TOL[dtype]
    unscaled = expert_mlp.grouped_mlp_reference(x, w_gate_up.to(dtype), w_down.to(dtype), counts_t)
    assert relative_error(unscaled, ref) > 100 * TOL[dtype]  # the scales matter: the test would see them missing


def test_block_fp8_dequantization_follows_the_block_grid():
    q = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])  # 2 x 2 blocks over 3 x 3: the last ones partial
    got = expert_mlp.dequantize_blocks(q, scale, (2, 2), torch.float32)
    assert torch.equal(got, torch.tensor([[1.0, 2.0, 30.0], [4.0, 5.0, 60.0], [700.0, 800.0, 9000.0]]))


def test_block_fp8_scales_of_another_grid_are_refused():
    x, w_gate_up, w_down, counts, scales = make_fp8([2, 1], 32, 16, (16, 16))
    wrong = expert_mlp.BlockScales(scales.gate_up[:, :1], scales.down, scales.block)
    with pytest.raises(ValueError, match="w_gate_up must be float8_e4m3fn with float32 scales"):
        expert_mlp.grouped_mlp(x, w_gate_up, w_down, counts, scales=wrong)
    with pytest.raises(ValueError, match="w_down must be float8_e4m3fn"):
        expert_mlp.grouped_mlp(x, w_gate_up, w_down.to(torch.bfloat16), counts, scales=scales)
