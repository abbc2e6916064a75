"""Checkpoints of every served family, built once per test session (seeded random weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from experts.builtin import FAMILIES, VOCAB_SIZE, build_model, save_checkpoint
from router_service.patching import decoder_layers

LAYOUTS = ("legacy", "fused")


PROMPT = [[1, 17, 42, 99, 5, 63, 8, 120, 33]]
NUM_NEW_TOKENS = 20


def generate_greedy(model: torch.nn.Module, num_new_tokens: int = NUM_NEW_TOKENS) -> list[int]:
    """`num_new_tokens` greedy tokens after PROMPT (Qwen3-Omni's text comes from its thinker, whose
    generate takes the usual arguments)."""
    input_ids = torch.tensor(PROMPT)
    with torch.no_grad():
        out = getattr(model, "thinker", model).generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                                        max_new_tokens=num_new_tokens, do_sample=False)
    return out[0, input_ids.shape[1]:].tolist()


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
