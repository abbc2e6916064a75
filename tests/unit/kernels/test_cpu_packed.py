"""The pre-packed CPU grouped MLP equals the torch reference."""

import pytest
import torch

from kernels import cpu_packed
from kernels.expert_mlp import GatedActivation, grouped_mlp_reference

pytestmark = pytest.mark.skipif(not cpu_packed.is_available(), reason="torch built without oneDNN")

CASES = [
    # dtype, tolerance (relative to max|ref|), counts (zeros: experts with no token)
    (torch.float32, 1e-5, [3, 0, 5, 1]),
    (torch.float32, 1e-5, [0, 0, 7, 0]),
    (torch.bfloat16, 1e-2, [2, 6, 0, 9]),
]


@pytest.mark.parametrize("dtype,tol,counts", CASES)
def test_packed_matches_reference(dtype, tol, counts):
    gen = torch.Generator().manual_seed(0)
    hidden, inter = 24, 20
    w_gate_up = (torch.randn(4, 2 * inter, hidden, generator=gen) * 0.3).to(dtype)
    w_down = (torch.randn(4, hidden, inter, generator=gen) * 0.3).to(dtype)
    x = torch.randn(sum(counts), hidden, generator=gen).to(dtype)
    counts = torch.tensor(counts)
    ref = grouped_mlp_reference(x, w_gate_up, w_down, counts)
    out = cpu_packed.grouped_mlp_packed(x, cpu_packed.PackedExperts(w_gate_up, w_down), counts)
    assert out.dtype == dtype
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_packed_with_biases_and_clamps_matches_reference(dtype, tol):
    """gpt-oss's experts: biases on both projections, clamped SwiGLU with alpha and (up + 1)."""
    gen = torch.Generator().manual_seed(1)
    hidden, inter, counts = 24, 20, torch.tensor([3, 0, 5, 2])
    w_gate_up = (torch.randn(4, 2 * inter, hidden, generator=gen) * 0.6).to(dtype)
    w_down = (torch.randn(4, hidden, inter, generator=gen) * 0.3).to(dtype)
    b_gate_up, b_down = (torch.randn(4, 2 * inter, generator=gen) * 4).to(dtype), torch.randn(4, hidden).to(dtype)
    x = torch.randn(int(counts.sum()), hidden, generator=gen).to(dtype)
    act = GatedActivation("silu", limit=7.0, alpha=1.702, up_offset=1.0)
    ref = grouped_mlp_reference(x, w_gate_up, w_down, counts, act, b_gate_up, b_down)
    packed = cpu_packed.PackedExperts(w_gate_up, w_down, b_gate_up, b_down)
    out = cpu_packed.grouped_mlp_packed(x, packed, counts, act)
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_packed_non_gated_matches_reference(dtype, tol):
    """Nemotron-H's experts: up rows only, relu^2, no gate."""
    gen = torch.Generator().manual_seed(2)
    hidden, inter, counts = 24, 20, torch.tensor([3, 0, 5, 2])
    w_up = (torch.randn(4, inter, hidden, generator=gen) * 0.3).to(dtype)
    w_down = (torch.randn(4, hidden, inter, generator=gen) * 0.3).to(dtype)
    x = torch.randn(int(counts.sum()), hidden, generator=gen).to(dtype)
    act = GatedActivation("relu2", gated=False)
    ref = grouped_mlp_reference(x, w_up, w_down, counts, act)
    out = cpu_packed.grouped_mlp_packed(x, cpu_packed.PackedExperts(w_up, w_down), counts, act)
    assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()) <= tol


def test_bad_counts_are_refused():
    packed = cpu_packed.PackedExperts(torch.randn(2, 8, 6), torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="counts must be"):
        cpu_packed.grouped_mlp_packed(torch.randn(5, 6), packed, torch.tensor([1, 1]))
