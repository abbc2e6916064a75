"""Which implementation runs: CUDA tensors go to the Triton launchers, others to the torch references."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels.expert_mlp import GatedActivation
from kernels.triton_common import check_device


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on the GPU, to see which path the public functions take."""

    @property
    def is_cuda(self):
        return True


class FakeLauncher:
    """Records its calls and returns a fixed result; stands in for a launcher or a reference."""

    def __init__(self, result=None):
        self.calls = []
        self.result = result

    def __call__(self, *args):
        self.calls.append(args)
        return self.result


def _cuda(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_subclass(FakeCudaTensor)


ROUTES = [
    # public module, function, Triton module, launcher, reference, arguments (first tensor decides)
    ("gating", "topk_softmax", "triton_gating", "topk_softmax_triton", "topk_softmax_reference",
     lambda cast: (cast(torch.zeros(3, 4)), 2, True, 1.0)),
    ("gating", "topk_sigmoid_grouped", "triton_gating", "topk_sigmoid_grouped_triton",
     "topk_sigmoid_grouped_reference",
     lambda cast: (cast(torch.zeros(3, 4)), None, 2, 2, 1, True, 1.0, 1e-20, 0.0)),
    ("gating", "topk_sigmoid_sink", "triton_gating", "topk_sigmoid_sink_triton", "topk_sigmoid_sink_reference",
     lambda cast: (cast(torch.zeros(3, 6)), None, 2, 2, 1.0)),
    ("gating", "topk_sparsemixer", "triton_gating", "topk_sparsemixer_triton", "topk_sparsemixer_reference",
     lambda cast: (cast(torch.zeros(3, 4)), 0.01)),
    ("gating", "topk_softmax_grouped", "triton_gating", "topk_softmax_grouped_triton",
     "topk_softmax_grouped_reference", lambda cast: (cast(torch.zeros(3, 4)), None, 2, 2, 1, 2, True, 1.0, 1e-20)),
    ("gating", "topk_then_sigmoid", "triton_gating", "topk_then_sigmoid_triton", "topk_then_sigmoid_reference",
     lambda cast: (cast(torch.zeros(3, 4)), 1, None, False)),
    ("align", "align_tokens", "triton_align", "align_tokens_triton", "align_tokens_reference",
     lambda cast: (cast(torch.zeros(3, 2, dtype=torch.int64)), 4)),
    ("expert_mlp", "grouped_mlp", "triton_expert_mlp", "grouped_mlp_triton", "grouped_mlp_reference",
     lambda cast: (cast(torch.zeros(2, 8)), torch.zeros(2, 6, 8), torch.zeros(2, 8, 3), torch.tensor([1, 1]),
                    GatedActivation(), None, None, None)),
    ("combine", "combine", "triton_combine", "combine_triton", "combine_reference",
     lambda cast: (cast(torch.zeros(4, 8)), torch.arange(4), None, 2)),
]


@pytest.mark.parametrize("on_cuda", [True, False], ids=["cuda", "cpu"])
@pytest.mark.parametrize("module,function,triton_module,launcher,reference,make_args", ROUTES,
                         ids=[route[1] for route in ROUTES])
def test_cuda_tensors_go_to_the_triton_launcher(monkeypatch, on_cuda, module, function, triton_module, launcher,
                                                 reference, make_args):
    public = importlib.import_module(f"kernels.{module}")
    fake_launcher, fake_reference = FakeLauncher("triton"), FakeLauncher("reference")
    monkeypatch.setattr(importlib.import_module(f"kernels.{triton_module}"), launcher, fake_launcher)
    monkeypatch.setattr(public, reference, fake_reference)
    args = make_args(_cuda if on_cuda else (lambda t: t))
    assert getattr(public, function)(*args) == ("triton" if on_cuda else "reference")
    called, idle = (fake_launcher, fake_reference) if on_cuda else (fake_reference, fake_launcher)
    assert len(called.calls) == 1 and not idle.calls
    assert all(got is given for got, given in zip(called.calls[0], args, strict=True))  # passed through as is


def test_kernels_are_interpreted_here(triton_gating, triton_align, triton_expert_mlp, triton_combine):
    # The fixtures import each module and check that its kernels were decorated under TRITON_INTERPRET=1.
    from kernels.triton_common import is_interpreted

    assert is_interpreted(triton_combine._combine_kernel)


def test_compiled_kernels_refuse_cpu_tensors():
    compiled_kernel = object()  # anything but an interpreted kernel
    with pytest.raises(ValueError, match="need CUDA tensors .*TRITON_INTERPRET=1.*got cpu"):
        check_device(compiled_kernel, x=torch.zeros(2))


def test_tensors_must_share_a_device(triton_combine):
    y = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="must share one device, got y on cpu, order on meta"):
        triton_combine.combine_triton(y, torch.arange(4, device="meta"), None, 2)
