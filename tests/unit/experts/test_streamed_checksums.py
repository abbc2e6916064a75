"""An expert's checksum streamed from its stored bytes (experts/safetensors.py, no torch, a megabyte
at a time) equals the one the reader computes from the bytes it turns into weights, in every layout
the reader knows: per-expert names, fused, transposed and interleaved with biases, fp8 and MXFP4."""

from __future__ import annotations

import hashlib

import pytest

from experts.builtin import build_model, save_checkpoint
from experts.checkpoint import CheckpointReader
from protos.errors import CheckpointError
from experts.quantized import quantize_checkpoint
from experts.safetensors import CheckpointLayout
from tests.checkpoints import LAYOUTS, zoo  # noqa: F401

CASES = [(family, layout) for family in ("mixtral", "deepseek_v3", "llama4", "gpt_oss", "granitemoe", "dbrx")
         for layout in LAYOUTS]  # granitemoe: vendor fused names; dbrx: stacked experts


def _assert_same(path) -> None:
    reader = CheckpointReader(path)
    layout = CheckpointLayout(path)
    try:
        layer = reader.spec.moe_layers[-1]
        experts = [0, reader.spec.num_experts - 1]
        assert [layout.checksum(layer, e) for e in experts] == reader.experts(layer, experts).checksums
        assert layout.checksum(layer, 0) != layout.checksum(layer, 1)
    finally:
        reader.close()
        layout.close()


@pytest.mark.parametrize("family,layout", CASES)
def test_streamed_equals_read(zoo, family, layout):
    _assert_same(zoo.checkpoint(family, layout))


@pytest.mark.parametrize("family,method,overrides", [("qwen3_moe", "fp8", {}),
                                                     ("gpt_oss", "mxfp4", dict(hidden_size=64, intermediate_size=32))])
def test_streamed_equals_read_quantized(tmp_path, family, method, overrides):
    plain = save_checkpoint(build_model(family, **overrides), tmp_path / "plain")
    _assert_same(quantize_checkpoint(plain, tmp_path / method, method))


def test_the_stream_reads_only_that_expert_in_chunks(zoo, monkeypatch):
    """One expert's checksum reads exactly its parts' bytes, at most HASH_CHUNK_BYTES at a time."""
    import experts.safetensors as st

    monkeypatch.setattr(st, "HASH_CHUNK_BYTES", 100)
    layout = CheckpointLayout(zoo.checkpoint("mixtral"))
    layer = layout.spec.moe_layers[0]
    parts = layout.expert_parts(layer, 3)
    digest = hashlib.sha256()
    for name, row in parts:
        file = layout.file(name)
        offset, nbytes, _ = file.span(name, row)
        digest.update(open(file.path, "rb").read()[offset:offset + nbytes])
    before = layout.bytes_read
    assert layout.checksum(layer, 3) == digest.hexdigest()
    assert layout.bytes_read - before == sum(layout.file(n).span(n, r)[1] for n, r in parts)
    layout.close()


def test_an_unknown_expert_or_layer_is_refused_by_name(zoo):
    layout = CheckpointLayout(zoo.checkpoint("mixtral", "fused"))
    with pytest.raises(ValueError, match="expert 99 out of range"):
        layout.checksum(layout.spec.moe_layers[0], 99)
    with pytest.raises(ValueError, match="layer"):
        layout.checksum(10_000, 0)
    layout.close()


def test_a_truncated_file_is_a_checkpoint_error(zoo, tmp_path):
    import shutil

    folder = tmp_path / "cut"
    shutil.copytree(zoo.checkpoint("mixtral"), folder)
    layout = CheckpointLayout(folder)
    layer = layout.spec.moe_layers[-1]
    name, row = layout.expert_parts(layer, layout.spec.num_experts - 1)[-1]
    file = layout.file(name)
    offset, nbytes, _ = file.span(name, row)
    layout.close()
    with open(file.path, "r+b") as f:  # the header stays, the data ends inside that tensor
        f.truncate(offset + nbytes // 2)
    with pytest.raises(CheckpointError):
        CheckpointLayout(folder).checksum(layer, layout.spec.num_experts - 1)
