"""Check a checkpoint's MoE layers, run in-process, against the transformers model they come from."""

from __future__ import annotations

from pathlib import Path

import torch

from experts import MoELayer, load_spec

__all__ = ["check_layers"]


def check_layers(path: str | Path, num_tokens: int = 32, seed: int = 0) -> list[tuple[int, float]]:
    """For every MoE layer: (layer, max |MoELayer(x) - transformers block(x)| / max |block(x)|)."""
    import transformers

    spec = load_spec(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.randn(1, num_tokens, spec.hidden_size, generator=torch.Generator().manual_seed(seed))
    results = []
    for layer in spec.moe_layers:
        with torch.no_grad():
            ref = getattr(model.model.layers[layer], spec.block_attr)(x)
        ref = (ref[0] if isinstance(ref, tuple) else ref).reshape(x.shape)
        out = MoELayer.from_pretrained(path, layer=layer)(x)
        results.append((layer, ((out - ref).abs().max() / ref.abs().max()).item()))
    return results
