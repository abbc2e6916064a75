"""Checkpoints of every served family, built once per test session (seeded random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experts.builtin import FAMILIES, VOCAB_SIZE, build_model, save_checkpoint

LAYOUTS = ("legacy", "fused")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers: `model.model.layers`, the text model's of a composite model, or DBRX's
    `model.transformer.blocks`."""
    if hasattr(model, "transformer"):
        return model.transformer.blocks
    inner = model.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


def moe_block(model: torch.nn.Module, layer: int, block_attr: str) -> torch.nn.Module:
    return getattr(decoder_layers(model)[layer], block_attr)


def block_output(block: torch.nn.Module, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The transformers block's output for x [B, S, H] (Llama 4 returns (flat out, logits));
    token_ids [B, S] go to a block that picks experts by token id (DeepSeek-V4's `input_ids`)."""
    with torch.no_grad():
        out = block(x) if token_ids is None else block(x, input_ids=token_ids)
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


def token_ids_for(spec, layer: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor | None:
    """Random token ids of `shape` for a layer that picks experts by token id (DeepSeek-V4's hash
    layers); None for every other layer."""
    if layer not in spec.hash_layers:
        return None
    return torch.randint(0, VOCAB_SIZE, shape, generator=torch.Generator().manual_seed(seed))


class ModelZoo:
    """One model per family and its checkpoint in each layout, created lazily."""

    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, torch.nn.Module] = {}

    def model(self, family: str) -> torch.nn.Module:
        if family not in self.models:
            self.models[family] = build_model(family, seed=7)
        return self.models[family]

    def checkpoint(self, family: str, layout: str = "legacy") -> Path:
        path = self.root / f"{family}-{layout}"
        if not (path / "config.json").exists():
            save_checkpoint(self.model(family), path, fused=layout == "fused")
        return path


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> ModelZoo:
    return ModelZoo(tmp_path_factory.mktemp("zoo"))


__all__ = ["FAMILIES", "LAYOUTS", "ModelZoo", "block_output", "decoder_layers", "moe_block", "token_ids_for", "zoo"]
