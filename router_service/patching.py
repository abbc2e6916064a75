"""Drop a mesh into a transformers model: each sparse MoE block becomes a `RemoteMoE` calling a client.

    [decoder layer] --hidden [B, S, H]--> RemoteMoE --client.forward(layer, hidden)--> hidden [B, S, H]

- `MoEClient`: what the patching needs of a client (`MeshClient` over gRPC, or one in this process).
- `RemoteMoE`: a torch module that stands in for one sparse MoE block and calls the client.
- `patch_model`: checks through `client.info()` that the client serves this model, then swaps every
  sparse MoE block of `model.model.layers` (a composite model's `model.model.language_model.layers`)
  for a `RemoteMoE`.

Shape legend: B = batch, S = sequence, T = tokens (B * S), H = hidden, E = experts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import grpc
import torch

from protos.errors import MeshClientError, MeshError
from experts.spec import BlockOutput, MoESpec, spec_from_config
from router_service.client import MeshInfo

__all__ = ["MoEClient", "RemoteMoE", "decoder_layers", "patch_model"]

logger = logging.getLogger(__name__)


class MoEClient(Protocol):
    """A client `patch_model` can use: `MeshClient`, or any object with these two calls. Its repr (or
    its `address`, where it has one) names it in errors and logs."""

    def info(self) -> MeshInfo:
        """What the client serves: the model's MoE spec hash, MoE layers, hidden size and dtypes."""

    def forward(self, layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The MoE layer `layer` applied to hidden [T, H] or [B, S, H]; same shape and dtype.
        token_ids: None, or [T] / [B, S] integer ids for layers that pick experts by token id."""


def _name(client: MoEClient) -> str:
    """The client as errors and logs name it: its address, or its repr."""
    return getattr(client, "address", None) or repr(client)


class RemoteMoE(torch.nn.Module):
    """Stands in for one sparse MoE block of a transformers model; the experts run behind `client`.

    forward(hidden_states [B, S, H]) returns what the replaced block returned (`block_output`, as
    `MoESpec.block_output`): [B, S, H], or the tuple (out, the router's second output or None):
    Llama 4's (out [T, H], logits [T, E]), gpt-oss's (out [B, S, H], top-k scores [T, k]). Their
    decoder layers discard the second element, so None is enough unless a `router` is kept.

    `router`: the original block's router module (optional). When kept it runs locally on every
    call, so that `output_router_logits=True` still records the logits (transformers hooks the
    router modules) and the tuple carries them. Expert weights are never kept. No gradient
    flows through the client call.

    `sends_token_ids`: the layer picks experts by token id (DeepSeek-V4's hash layers, whose decoder
    layer calls `mlp(hidden_states, input_ids=input_ids)`): the `input_ids` go with the request.
    """

    def __init__(self, client: MoEClient, layer: int, *, router: torch.nn.Module | None = None,
                 block_output: BlockOutput = "hidden", sends_token_ids: bool = False):
        super().__init__()
        self.client, self.layer = client, layer
        self.router = router
        self.block_output = block_output
        self.sends_token_ids = sends_token_ids

    def forward(self, hidden_states: torch.Tensor,
                input_ids: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states: [B, S, H]; input_ids: [B, S], used by a layer that `sends_token_ids`."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        token_ids = input_ids.cpu() if self.sends_token_ids and input_ids is not None else None
        router_out = None
        if self.router is not None:
            router_out = self.router(flat) if not self.sends_token_ids else self.router(flat, input_ids)
        out = self.client.forward(self.layer, hidden_states, token_ids).to(hidden_states.device)
        if self.block_output == "hidden":
            return out
        # Llama4Router returns (scores, logits), GptOssTopKRouter (logits, scores, ids): the blocks return the second
        out = out.reshape(flat.shape) if self.block_output == "flat_and_router" else out
        return out, None if router_out is None else router_out[1]

    def extra_repr(self) -> str:
        return f"layer={self.layer}, client={self.client!r}"


def _mismatch(spec: MoESpec, info: MeshInfo) -> str | None:
    """What differs between the local model's spec and what the mesh serves, or None."""
    if spec.config_hash() == info.config_hash and tuple(spec.moe_layers) == info.moe_layers:
        return None
    parts = []
    if spec.model_type != info.model_type:
        parts.append(f"model_type {spec.model_type!r} here, {info.model_type!r} on the mesh")
    if tuple(spec.moe_layers) != info.moe_layers:
        parts.append(f"moe_layers {list(spec.moe_layers)} here, {list(info.moe_layers)} on the mesh")
    if spec.hidden_size != info.hidden_size:
        parts.append(f"hidden_size {spec.hidden_size} here, {info.hidden_size} on the mesh")
    parts.append(f"config_hash {spec.config_hash()[:12]} here, {info.config_hash[:12]} on the mesh")
    return "the mesh serves a different model: " + "; ".join(parts)


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """`model.model.layers`, `model.model.language_model.layers` (the text model of a composite; of
    Qwen3-Omni's thinker: `model.thinker.model.language_model.layers`), or `model.transformer.blocks`
    (DBRX)."""
    inner = getattr(getattr(model, "thinker", model), "model", None)
    layers = getattr(getattr(inner, "language_model", inner), "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "transformer", None), "blocks", None)
    if layers is None:
        raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{type(model).__name__} has no model.layers (or model.language_model.layers, "
                              f"transformer.blocks) to patch")
    return layers


def _refuse_vision_tokens(layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Ernie 4.5-VL's decoder layers name image and video tokens (`moe_mm_token_type_ids` != 0); the
    mesh serves the text experts only, so such a forward is refused rather than answered by them."""
    types = kwargs.get("moe_mm_token_type_ids")
    if types is not None and bool(types.any()):
        raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{int((types != 0).sum())} image or video tokens in this forward: the mesh serves "
                              f"this model's text experts only (its vision experts are not served)")


def patch_model(model: torch.nn.Module, client: MoEClient, keep_router: bool = False) -> int:
    """Replace every sparse MoE block of `model` (in place) with a RemoteMoE calling `client`.

    Checks first, through `client.info()`, that the client serves this model (same MoE spec hash and
    MoE layers) and accepts its dtype; MeshClientError FAILED_PRECONDITION naming the difference
    otherwise. `keep_router` keeps each block's router module (see RemoteMoE). A model whose vision
    experts are not served (`MoESpec.text_experts_only`, Ernie 4.5-VL) refuses a forward with image or
    video tokens afterwards (MeshClientError FAILED_PRECONDITION). Returns the number of blocks replaced.
    """
    config = model.config.to_dict()
    try:
        spec = spec_from_config(config)
    except MeshError as exc:
        raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION, f"this model cannot be patched: {exc}") from exc
    info = client.info()
    difference = _mismatch(spec, info)
    dtype_name = str(getattr(model, "dtype", "")).removeprefix("torch.")
    if difference is None and info.dtypes and dtype_name not in info.dtypes:
        difference = f"the model is {dtype_name}; the mesh accepts {', '.join(info.dtypes)}"
    if difference is not None:
        raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION, difference, _name(client))
    layers = decoder_layers(model)
    if spec.text_experts_only:
        for i in spec.moe_layers:
            layers[i].register_forward_pre_hook(_refuse_vision_tokens, with_kwargs=True)
    for i in spec.moe_layers:
        block = getattr(layers[i], spec.block_attr)
        router = None
        if keep_router:
            router = block.router if isinstance(block, RemoteMoE) else getattr(block, spec.gate_attr)
        setattr(layers[i], spec.block_attr, RemoteMoE(client, i, router=router, block_output=spec.block_output,
                                                      sends_token_ids=i in spec.hash_layers))
    logger.info("patched %d MoE blocks of a %s model to call %s", len(spec.moe_layers), spec.model_type, _name(client))
    return len(spec.moe_layers)
