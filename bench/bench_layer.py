"""Tokens/s of expert-mesh's MoELayer vs the transformers block at the same shape, in one run.

Prints one table: per shape, both throughputs, their ratio, and each as a fraction of this
machine's roofline bound = max(active FLOPs / peak FLOP/s, touched expert bytes / copy bandwidth).
Peaks default to what was measured on the 2-core CI machine (fp32 210 GFLOP/s, bf16 910 GFLOP/s,
copy 40 GB/s); override with --peak-fp32-gflops, --peak-bf16-gflops, --bandwidth-gbs.

    .venv/bin/python bench/bench_layer.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from experts import MoELayer
from experts.builtin import build_model, save_checkpoint

H, I = 1024, 2816
EXPERT_SHAPES = [(8, 2), (64, 8)]
TOKENS = [16, 256, 2048]
DTYPES = [torch.float32, torch.bfloat16]


def _time_per_call_s(fn, x: torch.Tensor, min_total_s: float = 1.0, min_reps: int = 3) -> float:
    """Median seconds per call after one warm-up."""
    with torch.inference_mode():
        fn(x)
        times, start = [], time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - start < min_total_s:
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _transformers_call(block):
    def call(x):
        out = block(x)
        return out[0] if isinstance(out, tuple) else out
    return call


def _bound_s(layer: MoELayer, x: torch.Tensor, peak_flops: float, bandwidth: float) -> float:
    spec = layer.spec
    _, ids = layer.gate(x.reshape(-1, H).to(layer.dtype))
    touched = int(torch.unique(ids).numel())
    itemsize = torch.finfo(layer.dtype).bits // 8
    flops = 2.0 * ids.numel() * 3 * H * spec.intermediate_size + 2.0 * x.shape[1] * H * spec.num_experts
    weight_bytes = touched * 3 * H * spec.intermediate_size * itemsize
    return max(flops / peak_flops, weight_bytes / bandwidth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="E=8 only, T in {16, 256}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-fp32-gflops", type=float, default=210.0)
    parser.add_argument("--peak-bf16-gflops", type=float, default=910.0)
    parser.add_argument("--bandwidth-gbs", type=float, default=40.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = EXPERT_SHAPES[:1] if args.quick else EXPERT_SHAPES
    tokens = TOKENS[:2] if args.quick else TOKENS
    peaks = {torch.float32: args.peak_fp32_gflops * 1e9, torch.bfloat16: args.peak_bf16_gflops * 1e9}

    print(f"MoELayer vs transformers block, H={H} I={I}, {torch.get_num_threads()} threads")
    print(f"{'E':>3} {'k':>2} {'dtype':>8} {'T':>5} | {'mesh tok/s':>11} {'hf tok/s':>11} {'mesh/hf':>8} |"
          f" {'mesh %bound':>11} {'hf %bound':>10}")
    for num_experts, top_k in shapes:
        model = build_model("mixtral", seed=0, hidden_size=H, intermediate_size=I, num_hidden_layers=1,
                            num_local_experts=num_experts, num_experts_per_tok=top_k)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(model, tmp, fused=True)
            for dtype in DTYPES:
                block = model.model.layers[0].mlp.to(dtype)
                layer = MoELayer.from_pretrained(tmp, layer=0, dtype=dtype)
                for num_tokens in tokens:
                    x = torch.randn(1, num_tokens, H, generator=torch.Generator().manual_seed(0)).to(dtype)
                    mesh_s = _time_per_call_s(layer, x)
                    hf_s = _time_per_call_s(_transformers_call(block), x)
                    bound = _bound_s(layer, x, peaks[dtype], args.bandwidth_gbs * 1e9)
                    print(f"{num_experts:>3} {top_k:>2} {str(dtype)[6:]:>8} {num_tokens:>5} |"
                          f" {num_tokens / mesh_s:>11,.0f} {num_tokens / hf_s:>11,.0f} {hf_s / mesh_s:>8.2f} |"
                          f" {bound / mesh_s:>10.0%} {bound / hf_s:>10.0%}", flush=True)
        del model


if __name__ == "__main__":
    main()
