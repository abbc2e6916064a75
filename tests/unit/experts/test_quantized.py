"""Block fp8 and MXFP4: dequantization against the formats' definitions, written out element by element."""

from __future__ import annotations

import json

import pytest
import torch

from experts.checkpoint import CheckpointReader
from protos.errors import CheckpointError
from experts.quantized import (E2M1_VALUES, QuantizationConfig, dequantize_fp8_block, dequantize_mxfp4,
                               quantize_fp8_block, quantize_mxfp4)


def test_fp8_blocks_scale_by_their_own_entry_and_the_last_blocks_are_partial():
    """R=200, C=300 with 128 x 128 blocks: a 2 x 3 grid whose last row and column of blocks are partial."""
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(200, 300, generator=gen) * 50).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3, generator=gen) + 0.5
    out = dequantize_fp8_block(data, scale_inv, (128, 128), torch.float32)
    expected = torch.empty(200, 300)
    for block_row in range(2):
        for block_col in range(3):
            tile = (slice(128 * block_row, 128 * (block_row + 1)), slice(128 * block_col, 128 * (block_col + 1)))
            expected[tile] = data[tile].float() * scale_inv[block_row, block_col]
    assert torch.equal(out, expected)


def test_fp8_quantization_keeps_each_block_within_e4m3_precision():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(130, 260, generator=gen) * torch.logspace(-3, 2, 260)  # blocks of very different sizes
    data, scale_inv = quantize_fp8_block(weight)
    assert data.dtype == torch.float8_e4m3fn and scale_inv.shape == (2, 3)
    back = dequantize_fp8_block(data, scale_inv, (128, 128), torch.float32)
    blocks = [(slice(r, r + 128), slice(c, c + 128)) for r in (0, 128) for c in (0, 128, 256)]
    for rows, cols in blocks:  # e4m3 keeps 3 mantissa bits: error <= 1/16 of each value, plus subnormals
        err = (back[rows, cols] - weight[rows, cols]).abs()
        assert (err <= weight[rows, cols].abs() / 16 + weight[rows, cols].abs().max() / 2**9).all()


def test_mxfp4_nibbles_are_low_first_and_the_exponent_is_shared_by_32_values():
    blocks = torch.zeros(1, 2, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21   # values 0 and 1 of group 0: low nibble 1 (0.5), high nibble 2 (1.0)
    blocks[0, 1, 15] = 0xF7  # values 30 and 31 of group 1: 7 (6.0), 15 (-6.0)
    scales = torch.tensor([[127 + 1, 127 - 2]], dtype=torch.uint8)  # x2 for group 0, x1/4 for group 1
    out = dequantize_mxfp4(blocks, scales, torch.float32)
    expected = torch.zeros(1, 64)
    expected[0, 0], expected[0, 1] = 0.5 * 2, 1.0 * 2
    expected[0, 62], expected[0, 63] = 6.0 / 4, -6.0 / 4
    assert out.shape == (1, 64) and torch.equal(out, expected)


def test_mxfp4_quantization_rounds_to_the_nearest_e2m1_of_the_shared_scale():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(5, 64, generator=gen) * 3
    blocks, scales = quantize_mxfp4(weight)
    assert blocks.shape == (5, 2, 16) and scales.shape == (5, 2)
    back = dequantize_mxfp4(blocks, scales, torch.float32)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=1)  # one e2m1 unit per group
    grid = torch.tensor(E2M1_VALUES[:8])
    nearest = (weight.abs() / step).unsqueeze(-1).sub(grid).abs().min(dim=-1).values * step
    assert torch.allclose((back - weight).abs(), nearest, atol=1e-6)


@pytest.mark.parametrize("quant,match", [
    ({"quant_method": "gptq"}, "quant_method 'gptq' is not read"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2' is not read"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be two positive ints"),
    ("fp8", "quantization_config must be an object"),
])
def test_unread_quantization_configs_are_refused_by_name(quant, match):
    with pytest.raises(ValueError, match=match):
        QuantizationConfig.from_config({"quantization_config": quant})


def _checkpoint(tmp_path, tensors: dict[str, torch.Tensor], quant: dict | None):
    from safetensors.torch import save_file

    config = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 1, "num_experts_per_tok": 1,
              "num_local_experts": 1, "intermediate_size": 8}
    if quant:
        config["quantization_config"] = quant
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, tmp_path / "model.safetensors")
    return CheckpointReader(tmp_path)


def test_fp8_weights_without_their_scales_are_refused(tmp_path):
    reader = _checkpoint(tmp_path, {"model.layers.0.mlp.gate.weight": torch.zeros(1, 64).to(torch.float8_e4m3fn)},
                         None)
    with pytest.raises(CheckpointError, match="float8_e4m3fn, but config.json has no fp8 quantization_config"):
        reader.gate(0)


def test_a_wrong_scale_grid_is_refused_naming_the_tensor(tmp_path):
    name = "model.layers.0.mlp.gate.weight"
    reader = _checkpoint(tmp_path, {name: torch.zeros(1, 64).to(torch.float8_e4m3fn),
                                    f"{name}_scale_inv": torch.ones(2, 2)}, {"quant_method": "fp8"})
    with pytest.raises(CheckpointError, match=r"weight_scale_inv' has shape \[2, 2\], expected \[1, 1\]"):
        reader.gate(0)


def test_unknown_quantization_in_a_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="quant_method 'awq' is not read"):
        _checkpoint(tmp_path, {"x": torch.zeros(1)}, {"quant_method": "awq"})
