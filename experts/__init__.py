"""Expert weights and where they come from: spec, checkpoint reading, expert groups, the
in-process reference MoE layer."""

from experts.checkpoint import CheckpointReader, ExpertWeights, GateWeights, SharedWeights
from experts.errors import CheckpointError, MeshError, UnsupportedModelError
from experts.group import ExpertGroup, LayerExperts
from experts.layer import Gate, MoELayer, SharedExpert, dispatch
from experts.spec import SUPPORTED_MODEL_TYPES, MoESpec, load_spec, spec_from_config

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "CheckpointReader",
    "ExpertGroup",
    "ExpertWeights",
    "Gate",
    "GateWeights",
    "LayerExperts",
    "MeshError",
    "MoELayer",
    "MoESpec",
    "SharedExpert",
    "SharedWeights",
    "UnsupportedModelError",
    "dispatch",
    "load_spec",
    "spec_from_config",
]
