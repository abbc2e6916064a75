"""Quantized checkpoints as published (block fp8, MXFP4) against transformers' own dequantizing load.

Each case builds a tiny seeded model, writes it in the published quantized layout
(`experts.quantized.quantize_checkpoint`: tensor names, dtypes, shapes, `quantization_config`; the
tiny dimensions are not multiples of 128) and loads that checkpoint with transformers, which
dequantizes on CPU. The mesh must equal that model: both dequantize the same bytes.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from cluster.local import start_mesh
from experts import ExpertGroup, MoELayer, load_spec
from experts.builtin import build_model, save_checkpoint
from experts.checkpoint import SafetensorsFile
from experts.quantized import quantize_checkpoint
from mesh.config import MeshConfig
from router_service import MeshClient, patch_model
from tests.checkpoints import block_output, moe_block

FP32_TOL = 1e-5   # the same bytes dequantized on both sides: fp32 differs only by summation order
BF16_TOL = 3e-2   # as tests/integration/test_layer_matches_transformers.py

CASES = {
    # name: (family, method, overrides); gpt-oss's MXFP4 needs H and I divisible by 32
    "deepseek_v3-fp8": ("deepseek_v3", "fp8", {}),
    "qwen3_moe-fp8": ("qwen3_moe", "fp8", {}),
    "gpt_oss-mxfp4": ("gpt_oss", "mxfp4", dict(hidden_size=64, intermediate_size=32)),
}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


class QuantizedZoo:
    """Per case: the quantized checkpoint and transformers' dequantized model of it (fp32)."""

    def __init__(self, root):
        self.root, self.built = root, {}

    def get(self, case: str):
        if case not in self.built:
            import transformers

            family, method, overrides = CASES[case]
            plain = save_checkpoint(build_model(family, **overrides), self.root / f"{case}-plain")
            path = quantize_checkpoint(plain, self.root / case, method)
            model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                            output_loading_info=True)
            assert not any(info.values()), info  # every tensor of the checkpoint loaded, none missing
            self.built[case] = path, model.eval()
        return self.built[case]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> QuantizedZoo:
    return QuantizedZoo(tmp_path_factory.mktemp("quantized"))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_layer_equals_transformers_dequantized_load(quantized, case, dtype, tol):
    """In bf16 both sides compute in bf16 (an fp32 reference would route near-tied tokens otherwise)."""
    path, model = quantized.get(case)
    spec = load_spec(path)
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    x = torch.randn(3, 9, spec.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    for layer in spec.moe_layers:
        ref = block_output(moe_block(model, layer, spec.block_attr), x)
        out = MoELayer.from_pretrained(path, layer=layer, dtype=dtype)(x)
        assert out.dtype == dtype and _rel_err(out, ref) <= tol, (case, layer)


def test_with_no_dtype_given_a_quantized_checkpoint_is_served_in_bfloat16(quantized):
    """Dequantized weights come as bfloat16; gpt-oss's float32 biases follow them."""
    path, model = quantized.get("gpt_oss-mxfp4")
    spec = load_spec(path)
    layer = MoELayer.from_pretrained(path, layer=spec.moe_layers[0])
    held = layer.experts.layers[spec.moe_layers[0]]
    assert layer.dtype == held.b_gate_up.dtype == held.b_down.dtype == torch.bfloat16
    x = torch.randn(1, 9, spec.hidden_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ref = block_output(moe_block(copy.deepcopy(model).to(torch.bfloat16), spec.moe_layers[0], spec.block_attr), x)
    assert _rel_err(layer(x), ref) <= BF16_TOL


def _stored_bytes(path, names: list[str], per_row: bool = False) -> int:
    """Bytes of the named tensors (of one row along dim 0 of each, if `per_row`) as the header states them."""
    file = SafetensorsFile(path / "model.safetensors")
    file.close()
    total = 0
    for name in names:
        start, end = file.entries[name]["data_offsets"]
        total += (end - start) // (file.entries[name]["shape"][0] if per_row else 1)
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_a_group_reads_its_experts_quantized_bytes_and_scales_and_nothing_more(quantized, case):
    path, _ = quantized.get(case)
    spec = load_spec(path)
    layer, experts = spec.moe_layers[-1], [1, spec.num_experts - 1]
    group = ExpertGroup.from_checkpoint(path, {layer: experts}, torch.bfloat16)
    block = f"model.layers.{layer}.mlp.experts."
    if spec.interleaved_gate_up:  # gpt-oss: fused [E, ...] tensors, one row per expert
        names = [f"{block}{proj}{part}" for proj in ("gate_up_proj", "down_proj")
                 for part in ("_blocks", "_scales", "_bias")]
        expected = len(experts) * _stored_bytes(path, names, per_row=True)
    else:
        names = [f"{block}{e}.{proj}.weight{part}" for e in experts for proj in spec.expert_names
                 for part in ("", "_scale_inv")]
        expected = _stored_bytes(path, names)
    assert group.bytes_read == expected
    assert group.layers[layer].w_gate_up.dtype == torch.bfloat16 and group.layers[layer].experts == experts


def test_the_mesh_serves_an_fp8_checkpoint_and_generates_as_transformers_dequantized(quantized, ray_cluster):
    """DeepSeek-V3 in block fp8, shared experts included (the router dequantizes those): every MoE
    layer equals transformers' dequantized block, and 20 greedy tokens through patch_model equal the
    dequantized model's."""
    path, model = quantized.get("deepseek_v3-fp8")
    spec = load_spec(path)
    mesh = start_mesh(MeshConfig(name="fp8-deepseek", router={"port": 0}), path)
    try:
        x = torch.randn(2, 5, spec.hidden_size, generator=torch.Generator().manual_seed(3))
        patched = copy.deepcopy(model)
        prompt = torch.tensor([[1, 17, 42, 99, 5, 63, 8]])
        with MeshClient(mesh.address) as client:
            for layer in spec.moe_layers:
                ref = block_output(moe_block(model, layer, spec.block_attr), x)
                assert _rel_err(client.forward(layer, x), ref) <= FP32_TOL, layer
            patch_model(patched, client)
            with torch.no_grad():
                generate = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
                tokens = patched.generate(prompt, **generate)[0].tolist()
        with torch.no_grad():
            assert tokens == model.generate(prompt, **generate)[0].tolist()
    finally:
        mesh.stop()


# ---- memory: a group holds its experts' share, never the whole layer ----

MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from experts.group import ExpertGroup
    from experts.memory import keep_freed_memory

    def status_kib(field):  # of this process's own memory (ru_maxrss would count the forking parent's peak)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    keep_freed_memory()  # as the group actor does: freed memory stays with the process
    path, experts = sys.argv[1], json.loads(sys.argv[2])
    before = status_kib("VmRSS") * 1024
    group = ExpertGroup.from_checkpoint(path, {0: experts}, torch.bfloat16)
    peak = status_kib("VmHWM") * 1024
    print(json.dumps({"growth": peak - before, "held": group.nbytes(), "bytes_read": group.bytes_read,
                      "packed": group.layers[0].packed is not None}))
""")


def _write_large_fp8_checkpoint(path, hidden: int, inter: int, num_experts: int) -> None:
    """A one-layer qwen3_moe checkpoint in block fp8 with random e4m3 bytes (no NaN codes)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {"model.layers.0.mlp.gate.weight": torch.randn(num_experts, hidden, generator=gen)}
    for e in range(num_experts):
        for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
            codes = torch.randint(0, 0x7F, shape, dtype=torch.uint8, generator=gen)  # 0x7F / 0xFF are NaN
            codes |= torch.randint(0, 2, shape, dtype=torch.uint8, generator=gen) << 7
            name = f"model.layers.0.mlp.experts.{e}.{proj}.weight"
            tensors[name] = codes.view(torch.float8_e4m3fn)
            tensors[f"{name}_scale_inv"] = torch.rand(math.ceil(shape[0] / 128), math.ceil(shape[1] / 128),
                                                      generator=gen) * 1e-3
    save_file(tensors, path / "model.safetensors")
    config = dict(model_type="qwen3_moe", hidden_size=hidden, num_hidden_layers=1, num_experts=num_experts,
                  num_experts_per_tok=2, moe_intermediate_size=inter, intermediate_size=inter,
                  quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    (path / "config.json").write_text(json.dumps(config))


def test_loading_a_group_grows_its_memory_by_its_share_not_the_layer(tmp_path):
    """88 fp8 experts of H=2048, I=1056 (not a multiple of 128): 6.2 MiB each, 273 MiB for the 44 a
    group loads. The group's RSS grows by at most 1.5x the weights it then holds (bf16 and the
    oneDNN-packed copy), and it reads exactly its experts' bytes and scales."""
    hidden, inter, num_experts = 2048, 1056, 88
    _write_large_fp8_checkpoint(tmp_path, hidden, inter, num_experts)
    experts = list(range(0, num_experts, 2))
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), json.dumps(experts)],
                            capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    per_expert = 3 * hidden * inter + 3 * 16 * 9 * 4  # e4m3 bytes + float32 scales (16 x 9 blocks each)
    assert figures["bytes_read"] == len(experts) * per_expert
    assert figures["bytes_read"] >= 256 << 20
    layer_bf16 = num_experts * 3 * hidden * inter * 2
    assert figures["held"] >= len(experts) * 3 * hidden * inter * 2  # bf16, plus the packed copy when packed
    assert figures["growth"] <= 1.5 * figures["held"], figures
    assert figures["growth"] < layer_bf16 * (2 if figures["packed"] else 1), figures
