"""The checkpoint reader does not trust its input: every malformed file, header or index is a
CheckpointError naming the file (and the tensor), the file is closed after it, nothing blocks."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from experts.checkpoint import CheckpointReader, SafetensorsFile
from protos.errors import CheckpointError


def write(path: Path, header, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def entry(dtype="F32", shape=(2, 2), start=0, end=16):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


CASES = {  # case -> (header, data, header_len or None, words the error must hold)
    "a header length of 2**63": ({"w": entry()}, bytes(16), 1 << 63, ["header length", "does not fit"]),
    "a header length past the end": ({"w": entry()}, bytes(16), 10_000, ["header length 10000"]),
    "a header that is a list": ([1, 2], b"", None, ["header is a list", "not a JSON object"]),
    "a header that is not JSON": (b"{not json", b"", None, ["not a safetensors file", "JSONDecodeError"]),
    "a header nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, b"", None, ["not a safetensors file"]),
    "an entry that is a string": ({"w": "x"}, b"", None, ["'w'", "dtype, shape and data_offsets"]),
    "an unknown dtype": ({"w": entry(dtype="F8_E9")}, bytes(16), None, ["'w'", "unsupported dtype 'F8_E9'"]),
    "a negative dim": ({"w": entry(shape=(-2, 2))}, bytes(16), None, ["'w'", "non-negative ints"]),
    "offsets past the data": ({"w": entry(start=0, end=32)}, bytes(16), None, ["'w'", "not inside", "16 bytes"]),
    "offsets reversed": ({"w": entry(start=16, end=0)}, bytes(16), None, ["'w'", "not inside"]),
    "bytes short of the shape": ({"w": entry(shape=(2, 3))}, bytes(16), None, ["'w'", "16 bytes", "needs 24"]),
    "overlapping tensors": ({"a": entry(), "b": entry(start=8, end=24)}, bytes(24), None, ["'a'", "'b'", "overlap"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_file_is_a_checkpoint_error_naming_it_and_is_closed(tmp_path, case):
    header, data, header_len, words = CASES[case]
    path = write(tmp_path / "model.safetensors", header, data, header_len)
    before = open_fds()
    with pytest.raises(CheckpointError) as error:
        SafetensorsFile(path)
    assert str(path) in str(error.value) and all(w in str(error.value) for w in words), str(error.value)
    assert open_fds() == before


def test_integer_tensors_are_not_weights(tmp_path):
    path = write(tmp_path / "model.safetensors", {"ids": entry(dtype="I32")}, bytes(16))
    file = SafetensorsFile(path)
    with pytest.raises(CheckpointError, match="'ids'.*I32: weights must be floating point"):
        file.read("ids")
    file.close()


def test_a_well_formed_file_still_reads(tmp_path):
    values = torch.arange(4, dtype=torch.float32).reshape(2, 2)
    path = write(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}, "w": entry()},
                 values.numpy().tobytes())
    file = SafetensorsFile(path)
    assert torch.equal(file.read("w")[0], values) and torch.equal(file.read("w", rows=1)[0], values[1])
    file.close()


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsFile(fifo)


@pytest.mark.parametrize("target,words", [("/etc/passwd", "not a file name inside"),
                                          ("../outside.safetensors", "outside the checkpoint folder"),
                                          ("sub/../../outside.safetensors", "outside the checkpoint folder"),
                                          (7, "not a file name inside")])
def test_index_paths_stay_inside_the_checkpoint_folder(zoo, tmp_path, target, words):
    folder = tmp_path / "ckpt"
    shutil.copytree(zoo.checkpoint("mixtral"), folder)
    single = next(folder.glob("*.safetensors"))
    names = list(SafetensorsFile(single).entries)
    weight_map = {name: single.name for name in names}
    weight_map[names[0]] = target
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=words):
        CheckpointReader(folder)


def test_an_index_that_is_not_json_names_the_index(zoo, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(zoo.checkpoint("mixtral"), folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": [')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not a safetensors index"):
        CheckpointReader(folder)
