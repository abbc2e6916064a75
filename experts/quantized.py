"""Quantized weights as checkpoints publish them, and their dequantization.

Two formats (config.json `quantization_config.quant_method`):

- "fp8", block fp8 (DeepSeek-V3/R1/V3.1, Qwen3-FP8): `X.weight` float8_e4m3fn [R, C] beside
  `X.weight_scale_inv` float32 [ceil(R / b0), ceil(C / b1)], one scale per b0 x b1 block
  (`weight_block_size`, [128, 128]); w[r, c] = q[r, c] * scale_inv[r // b0, c // b1]. The last
  block of a dimension not divisible by the block size is partial.
- "mxfp4" (gpt-oss): `X_blocks` uint8 [R, C / 32, 16], two e2m1 values a byte (low nibble first),
  beside `X_scales` uint8 [R, C / 32], e8m0 exponents; w[r, 32 g + j] = e2m1[g, j] * 2^(s[r, g] - 127).

`QuantizedTensor` keeps the stored form (for a GPU path to consume as it is); `dequantize` gives
the weight in a float dtype. The reader dequantizes one expert at a time, so a load holds at most
one expert's temporaries beside what it keeps. `quantize_fp8_block`, `quantize_mxfp4` and
`quantize_checkpoint` go the other way: they write a checkpoint in the published layout.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from kernels.expert_mlp import dequantize_blocks

__all__ = ["QuantizedTensor", "QuantizationConfig", "dequantize_fp8_block", "dequantize_mxfp4", "fp8_on",
           "quantize_checkpoint", "quantize_fp8_block", "quantize_mxfp4"]

Format = Literal["fp8", "mxfp4"]

# The 16 values of an e2m1 nibble: sign bit 3, exponent bits 2-1, mantissa bit 0.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32  # values sharing one exponent


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """The part of config.json's `quantization_config` that the reader needs."""

    method: Format | None = None            # None: the checkpoint is not quantized
    block: tuple[int, int] = (128, 128)     # fp8: rows x columns per scale

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizationConfig":
        """ValueError naming the field for a method or format that is not read."""
        quant = config.get("quantization_config")
        if not quant:
            return cls()
        if not isinstance(quant, dict):
            raise ValueError(f"quantization_config must be an object, got {quant!r}")
        method = quant.get("quant_method")
        if method not in ("fp8", "mxfp4"):
            raise ValueError(f"quantization_config.quant_method {method!r} is not read; expert-mesh reads "
                             f"'fp8' (block fp8 with weight_scale_inv) and 'mxfp4'")
        if method == "fp8" and quant.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"quantization_config.fmt {quant.get('fmt')!r} is not read; fp8 weights must be e4m3")
        block = quant.get("weight_block_size") or [128, 128]
        if (not isinstance(block, list) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ValueError(f"quantization_config.weight_block_size must be two positive ints, got {block!r}")
        return cls(method, (block[0], block[1]))


def fp8_on(device: torch.device | str | None) -> bool:
    """Whether block fp8 experts stay fp8 on `device` (the grouped GEMM reads them as stored): a
    CUDA device of compute capability 8.9 or later (Ada, Hopper, Blackwell). Elsewhere they are
    dequantized at load."""
    device = torch.device(device or "cpu")
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@dataclasses.dataclass
class QuantizedTensor:
    """One weight in its stored form: fp8 `data` [R, C] with float `scales` [ceil(R/b0), ceil(C/b1)],
    or mxfp4 `data` uint8 [R, C/32, 16] with uint8 `scales` [R, C/32]."""

    format: Format
    data: torch.Tensor
    scales: torch.Tensor
    block: tuple[int, int] = (128, 128)

    @property
    def shape(self) -> tuple[int, int]:
        """The [R, C] of the dequantized weight."""
        if self.format == "fp8":
            return tuple(self.data.shape)
        return self.data.shape[0], self.data.shape[1] * MXFP4_GROUP

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.format == "fp8":
            return dequantize_fp8_block(self.data, self.scales, self.block, dtype)
        return dequantize_mxfp4(self.data, self.scales, dtype)


def dequantize_fp8_block(data: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype) -> torch.Tensor:
    """data: float8_e4m3fn [R, C]; scale_inv: [ceil(R/b0), ceil(C/b1)] float. Returns [R, C] in dtype."""
    rows, cols = data.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    if data.dtype != torch.float8_e4m3fn or tuple(scale_inv.shape) != grid:
        raise ValueError(f"block fp8 needs float8_e4m3fn data with a {list(grid)} scale grid for {block} blocks; "
                         f"got {data.dtype} {list(data.shape)} with scales {list(scale_inv.shape)}")
    return dequantize_blocks(data, scale_inv, block, dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks: uint8 [R, G, 16]; scales: uint8 [R, G]. Returns [R, 32 G] in dtype."""
    if (blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 3
            or blocks.shape[2] != MXFP4_GROUP // 2 or tuple(scales.shape) != tuple(blocks.shape[:2])):
        raise ValueError(f"mxfp4 needs uint8 blocks [R, G, 16] and uint8 scales [R, G]; got {blocks.dtype} "
                         f"{list(blocks.shape)} and {scales.dtype} {list(scales.shape)}")
    values = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    pairs = torch.stack([values[(blocks & 0x0F).long()], values[(blocks >> 4).long()]], dim=-1)  # [R, G, 16, 2]
    exponents = scales.to(torch.int32) - 127  # [R, G]
    out = torch.ldexp(pairs.reshape(*scales.shape, MXFP4_GROUP), exponents.unsqueeze(-1))
    return out.reshape(blocks.shape[0], -1).to(dtype)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [R, C] float. Returns (float8_e4m3fn [R, C], scale_inv float32 [ceil(R/b0), ceil(C/b1)]),
    each block scaled so that its largest magnitude is FP8_MAX."""
    rows, cols = weight.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = weight.new_zeros(grid[0] * block[0], grid[1] * block[1], dtype=torch.float32)  # on its device
    padded[:rows, :cols] = weight.float()
    tiles = padded.reshape(grid[0], block[0], grid[1], block[1])
    amax = tiles.abs().amax(dim=(1, 3))  # [gr, gc]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    data = (tiles / scale_inv[:, None, :, None]).reshape_as(padded)[:rows, :cols]
    return data.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale_inv


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [R, C] float, C divisible by 32. Returns (blocks uint8 [R, C/32, 16], scales uint8
    [R, C/32]): each group of 32 shares the exponent that puts its largest magnitude in [4, 8),
    each value rounded to the nearest e2m1."""
    rows, cols = weight.shape
    if cols % MXFP4_GROUP:
        raise ValueError(f"mxfp4 needs columns divisible by {MXFP4_GROUP}, got shape {list(weight.shape)}")
    groups = weight.float().reshape(rows, cols // MXFP4_GROUP, MXFP4_GROUP)
    amax = groups.abs().amax(dim=-1)  # [R, G]
    exponents = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.zeros_like(amax)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponents).unsqueeze(-1)  # magnitudes <= 8
    magnitudes = torch.tensor(E2M1_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1) | ((scaled < 0).long() << 3)  # [R, G, 32]
    pairs = codes.to(torch.uint8).reshape(rows, cols // MXFP4_GROUP, MXFP4_GROUP // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4), (exponents + 127).to(torch.uint8)


def _is_linear_weight(name: str, tensor: torch.Tensor, keep: tuple[str, ...]) -> bool:
    """A decoder linear's weight that a published fp8 checkpoint quantizes (not routers, norms, embeddings)."""
    return tensor.dim() == 2 and name.endswith(".weight") and "layers." in name and not name.endswith(keep)


def quantize_checkpoint(src: str | Path, dst: str | Path, method: Format, block: tuple[int, int] = (128, 128),
                        keep: tuple[str, ...] = (".gate.weight", ".router.weight", "shared_expert_gate.weight")) -> Path:
    """Write checkpoint `src` again at `dst` quantized as published.

    fp8: every decoder linear's `X.weight` [R, C] (per-expert names included; names ending in
    `keep`, the routers, stay as they are) becomes e4m3 with `X.weight_scale_inv`. mxfp4 (gpt-oss):
    each fused `experts.gate_up_proj` [E, H, 2I] / `down_proj` [E, I, H] becomes `*_blocks`
    [E, out, in/32, 16] and `*_scales` [E, out, in/32] (output rows first); biases stay.
    config.json gains the `quantization_config` that transformers and the hub use.
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(file))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if method == "fp8" and _is_linear_weight(name, tensor, keep):
            out[name], out[f"{name}_scale_inv"] = quantize_fp8_block(tensor, block)
        elif method == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            rows = tensor.transpose(1, 2)  # [E, out, in]
            parts = [quantize_mxfp4(expert) for expert in rows]
            out[f"{name}_blocks"] = torch.stack([p[0] for p in parts])
            out[f"{name}_scales"] = torch.stack([p[1] for p in parts])
        else:
            out[name] = tensor
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
        if method == "fp8" else
        {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                              "model.embed_tokens", "lm_head"]})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)
    return dst
