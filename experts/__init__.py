"""Expert weights and where they come from: spec, checkpoint reading, expert groups, the
in-process reference MoE layer.

Names are imported on first use, so that `experts.simulated` (a simulated device) runs in a process
that never imports torch.
"""

import importlib

_EXPORTS = {
    "CheckpointReader": "checkpoint", "ExpertWeights": "checkpoint", "GateWeights": "checkpoint",
    "SharedWeights": "checkpoint", "LatentWeights": "checkpoint", "Latent": "layer",
    "ExpertGroup": "group", "LayerExperts": "group",
    "Gate": "layer", "MoELayer": "layer", "SharedExpert": "layer", "dispatch": "layer",
    "split_shared": "layer",
    "QuantizedTensor": "quantized", "quantize_checkpoint": "quantized",
    "SUPPORTED_MODEL_TYPES": "spec", "MoESpec": "spec", "load_spec": "spec", "spec_from_config": "spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'experts' has no attribute {name!r}")
    return getattr(importlib.import_module(f"experts.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
