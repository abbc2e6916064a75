"""Block fp8 experts kept as stored (what a GPU with fp8 holds): the reader gives the stored bytes
and scales, which dequantize to exactly what the dequantizing read gives, under the same checksums;
the held experts compute what the dequantized ones do; on the CPU they are dequantized at load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from experts.builtin import build_model, save_checkpoint
from experts.checkpoint import CheckpointReader
from experts.group import LayerExperts, expert_nbytes
from experts.spec import load_spec
from experts.quantized import fp8_on, quantize_checkpoint
from kernels.expert_mlp import GatedActivation

LAYER = 1  # deepseek_v3's first MoE layer (layer 0 is dense)
EXPERTS = [5, 1, 6]


@pytest.fixture(scope="module")
def fp8_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    plain = save_checkpoint(build_model("deepseek_v3", seed=2), root / "plain")  # H=48, I=24: per-expert names
    return quantize_checkpoint(plain, root / "fp8", "fp8", block=(8, 16))


def _read(path, **reader):
    reader = CheckpointReader(path, dtype=torch.float32, **reader)
    try:
        return reader.experts(LAYER, EXPERTS)
    finally:
        reader.close()


def test_kept_fp8_experts_dequantize_to_the_dequantizing_read(fp8_path):
    kept, plain = _read(fp8_path, keep_fp8=True), _read(fp8_path)
    assert kept.w_gate_up.dtype == kept.w_down.dtype == torch.float8_e4m3fn and plain.scales is None
    assert kept.scales.block == (8, 16) and tuple(kept.scales.gate_up.shape) == (3, 48 // 8, 48 // 16)
    assert kept.checksums == plain.checksums  # the same stored bytes, in the same order
    back = kept.dequantized(torch.float32)
    assert torch.equal(back.w_gate_up, plain.w_gate_up) and torch.equal(back.w_down, plain.w_down)
    assert kept.w_gate_up.nbytes * 4 == plain.w_gate_up.nbytes  # one byte a weight, as published


def test_held_fp8_experts_compute_what_the_dequantized_ones_do(fp8_path):
    kept, plain = _read(fp8_path, keep_fp8=True), _read(fp8_path)
    fp8 = LayerExperts(kept.experts, kept.w_gate_up, kept.w_down, kept.checksums, scales=kept.scales,
                       compute_dtype=torch.float32)
    dense = LayerExperts(plain.experts, plain.w_gate_up, plain.w_down, plain.checksums)
    x, counts = torch.randn(7, 48, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 0, 4])
    assert fp8.dtype == torch.float32 and fp8.nbytes < dense.nbytes
    assert torch.equal(fp8.mlp(x, counts, GatedActivation("silu")), dense.mlp(x, counts, GatedActivation("silu")))


def test_fp8_weights_select_concat_and_dequantize_together(fp8_path):
    kept, plain = _read(fp8_path, keep_fp8=True), _read(fp8_path)
    picked = kept.select([2, 0])
    assert picked.experts == [6, 5] and torch.equal(picked.scales.gate_up, kept.scales.gate_up[[2, 0]])
    both = kept.concat(kept.select([1]))
    assert both.scales is not None and both.w_gate_up.shape[0] == 4
    mixed = kept.concat(plain.select([0]))  # fp8 beside dequantized weights (a swap from another checkpoint)
    assert mixed.scales is None and mixed.w_gate_up.dtype == torch.float32
    assert torch.equal(mixed.w_gate_up[:3], plain.w_gate_up)


def test_on_the_cpu_fp8_experts_are_dequantized_at_load(fp8_path):
    assert not fp8_on("cpu")
    held = LayerExperts.from_weights(_read(fp8_path, keep_fp8=True), torch.float32, "cpu")
    assert held.scales is None and held.w_gate_up.dtype == torch.float32
    assert torch.equal(held.w_gate_up, LayerExperts.from_weights(_read(fp8_path), torch.float32, "cpu").w_gate_up)


def test_blocks_that_split_gate_from_up_are_dequantized(tmp_path):
    plain = save_checkpoint(build_model("deepseek_v3", seed=2), tmp_path / "plain")
    path = quantize_checkpoint(plain, tmp_path / "fp8", "fp8", block=(16, 16))  # I=24: a block spans gate and up
    assert _read(path, keep_fp8=True).scales is None


def test_the_memory_estimate_is_what_a_group_holds(fp8_path):
    """The controller's estimate per expert copy (expert_nbytes) against the bytes the held experts
    take: fp8 kept as stored (one byte a weight, a float32 scale a block) and dequantized fp32."""
    reader = CheckpointReader(fp8_path, keep_fp8=True)
    try:
        spec, block = reader.spec, reader.fp8_block(LAYER)
    finally:
        reader.close()
    kept, plain = _read(fp8_path, keep_fp8=True), _read(fp8_path)
    fp8 = LayerExperts(kept.experts, kept.w_gate_up, kept.w_down, kept.checksums, scales=kept.scales)
    dense = LayerExperts.from_weights(plain, torch.float32, "cpu")
    assert block == (8, 16)
    assert expert_nbytes(spec, torch.bfloat16, on_gpu=True, fp8_block=block) * len(EXPERTS) == fp8.nbytes
    assert expert_nbytes(spec, torch.float32, on_gpu=False) * len(EXPERTS) == dense.nbytes
    assert expert_nbytes(spec, torch.float32, on_gpu=True) * len(EXPERTS) == dense.nbytes  # too small to pack


def test_the_host_estimate_counts_the_packed_copy_of_large_experts(fp8_path):
    spec = dataclasses.replace(load_spec(fp8_path), hidden_size=4096, intermediate_size=2048)  # V3's I, H < 7168
    weights = 3 * 4096 * 2048
    assert expert_nbytes(spec, torch.bfloat16, on_gpu=True) == 2 * weights
    assert expert_nbytes(spec, torch.bfloat16, on_gpu=False) == 2 * 2 * weights  # and oneDNN's packed copy
    assert expert_nbytes(spec, torch.bfloat16, on_gpu=True, fp8_block=(128, 128)) == weights + 4 * 3 * 32 * 16


def test_only_a_kept_layout_reports_an_fp8_block(fp8_path, tmp_path):
    plain = save_checkpoint(build_model("deepseek_v3", seed=2), tmp_path / "plain")
    split = quantize_checkpoint(plain, tmp_path / "fp8", "fp8", block=(16, 16))
    for path, block, keep in [(fp8_path, (8, 16), True), (fp8_path, None, False), (split, None, True),
                              (plain, None, True)]:
        reader = CheckpointReader(path, keep_fp8=keep)
        try:
            assert reader.fp8_block(LAYER) == block, (path, keep)
        finally:
            reader.close()
