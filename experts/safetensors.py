"""Where a checkpoint's MoE bytes lie, and their sha256, without torch.

`SafetensorsHeader` checks a .safetensors file's header and reads byte ranges with pread;
`CheckpointLayout` names the tensors of a checkpoint folder (single file or sharded) and the parts
of each expert, so an expert's checksum streams through sha256 256 KB at a time. Simulated
devices and the swap verifier hash sources here without loading a weight; `experts.checkpoint`
turns the same bytes into tensors.

An expert's checksum is the sha256 of its stored bytes in this order: gate_up (or gate, then up),
then down, each followed by its scales where quantized (fp8 `_scale_inv`, MXFP4 `_blocks` then
`_scales`), then the biases (gpt-oss).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import struct
from pathlib import Path

from protos.errors import CheckpointError
from experts.spec import MoESpec, load_config, spec_from_config

__all__ = ["ITEMSIZES", "MAX_HEADER_BYTES", "CheckpointLayout", "SafetensorsHeader", "weight_files"]

ITEMSIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "F8_E4M3": 1, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own bound
HASH_CHUNK_BYTES = 1 << 18    # what one pread of a streamed checksum holds


def regular_file(path: Path) -> None:
    """CheckpointError unless `path` is a regular file (a FIFO or device would block or never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file")


def _entries(path: Path, header: object, data_bytes: int) -> dict[str, dict]:
    """The tensor entries of a parsed header, each checked: a known dtype, a shape of non-negative
    ints, offsets inside the data and not overlapping, bytes = shape x dtype. One pass, no work but
    the checks per entry: a V3 checkpoint's headers name 90k tensors."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a {type(header).__name__}, not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        if type(entry) is not dict:
            raise CheckpointError(f"tensor {name!r} in {path}: an entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in ITEMSIZES:
            raise CheckpointError(f"tensor {name!r} in {path} has unsupported dtype {dtype!r}")
        if type(shape) is not list or not _dims(shape):
            raise CheckpointError(f"tensor {name!r} in {path}: shape {shape!r} is not a list of non-negative ints")
        if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int
                or type(offsets[1]) is not int or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise CheckpointError(f"tensor {name!r} in {path}: data_offsets {offsets!r} are not inside the file's "
                                  f"{data_bytes} bytes")
        expected = math.prod(shape) * ITEMSIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(f"tensor {name!r} in {path} has {offsets[1] - offsets[0]} bytes, shape {shape} "
                                  f"{dtype} needs {expected}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap")
    return header


def _dims(shape: list) -> bool:
    """Whether every dimension is an int in [0, 2^40) (a loop: twice as fast as all() on 2-3 dims)."""
    for d in shape:
        if type(d) is not int or not 0 <= d < 1 << 40:
            return False
    return True


class SafetensorsHeader:
    """One .safetensors file, read with pread: `raw(name, rows)` touches only those rows' bytes.
    Its header is checked whole when the file is opened (CheckpointError naming file and tensor)."""

    def __init__(self, path: Path):
        self.path = path
        self.bytes_read = 0
        regular_file(path)
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            size = os.fstat(self._fd).st_size
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if not 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: header length {header_len} does not fit the file's {size} bytes "
                                      f"(at most {MAX_HEADER_BYTES})")
            header = json.loads(os.pread(self._fd, header_len, 8))
            self.entries: dict[str, dict] = _entries(path, header, size - 8 - header_len)
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            os.close(self._fd)
            raise CheckpointError(f"{path} is not a safetensors file: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            os.close(self._fd)
            raise
        self._data_start = 8 + header_len

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def span(self, name: str, rows: int | None = None) -> tuple[int, int, list[int]]:
        """(file offset, bytes, shape) of tensor `name`, or of its row `rows` along dim 0."""
        entry = self.entries[name]
        start, end = entry["data_offsets"]
        shape = list(entry["shape"])
        if rows is not None:
            if not shape or not 0 <= rows < shape[0]:
                raise CheckpointError(f"tensor {name!r} in {self.path} has shape {shape}: no row {rows}")
            row_bytes = (end - start) // shape[0]
            start, end, shape = start + rows * row_bytes, start + (rows + 1) * row_bytes, shape[1:]
        return self._data_start + start, end - start, shape

    def raw(self, name: str, rows: int | None = None) -> bytearray:
        """The bytes of tensor `name` (or of its row `rows`), in one buffer of their own."""
        offset, nbytes, _ = self.span(name, rows)
        buffer = bytearray(nbytes)
        if nbytes and os.preadv(self._fd, [buffer], offset) != nbytes:
            raise CheckpointError(f"tensor {name!r} in {self.path} is truncated")
        self.bytes_read += nbytes
        return buffer

    def hash_into(self, digest, name: str, rows: int | None = None) -> None:
        """Feed the bytes of tensor `name` (or of its row `rows`) to `digest`, HASH_CHUNK_BYTES at a time."""
        offset, nbytes, _ = self.span(name, rows)
        for at in range(offset, offset + nbytes, HASH_CHUNK_BYTES):
            chunk = os.pread(self._fd, min(HASH_CHUNK_BYTES, offset + nbytes - at), at)
            if not chunk:
                raise CheckpointError(f"tensor {name!r} in {self.path} is truncated")
            digest.update(chunk)
        self.bytes_read += nbytes

    def close(self) -> None:
        os.close(self._fd)


def weight_files(path: Path, opener: type[SafetensorsHeader] = SafetensorsHeader,
                 opened: dict[Path, SafetensorsHeader] | None = None) -> dict[str, Path]:
    """tensor name -> file, for a single-file or sharded checkpoint folder. Without an index every
    file's header is read: kept open in `opened` when given (a header of 45k tensors takes 0.1 s to
    parse), else closed."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        regular_file(index)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            inside = {file: _confined(path, file) for file in set(weight_map.values())}
            files = {name: inside[file] for name, file in weight_map.items()}  # JSON keys are str
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index: {type(exc).__name__}: {exc}") from exc
        for file in inside.values():
            regular_file(file)
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {path}")
    names: dict[str, Path] = {}
    for file in files:
        header = opener(file)
        names.update(dict.fromkeys(header.entries, file))
        if opened is None:
            header.close()
        else:
            opened[file] = header
    return names


def _confined(folder: Path, file: object) -> Path:
    """`file` of an index, as a path inside `folder` (no absolute path, no way out with ..)."""
    if not isinstance(file, str) or not file or Path(file).is_absolute():
        raise CheckpointError(f"{folder}: index names {file!r}, not a file name inside the checkpoint")
    resolved = (folder / file).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise CheckpointError(f"{folder}: index names {file!r}, which is outside the checkpoint folder")
    return resolved


def _decoder_prefix(path: Path, names: list[str], gates: tuple[str, ...], root: str = "") -> str:
    """The name prefix of the decoder layers ('model.layers.', 'layers.',
    'model.language_model.layers.'): of the prefixes starting with `root` (the spec's
    `checkpoint_root`) followed by a layer index and, further on, the family's gate weight, the one
    with the most such layers. Published checkpoints carry other stacks beside it (multi-token-prediction
    heads: `mtp.layers.0...`); they hold fewer. Only gate names are matched: a regex over a V3
    index's 90k names took 40 ms at every group's stage."""
    indices: dict[str, set[str]] = {}
    match = re.compile(r"^(.*?\b(?:layers|blocks)\.)(\d+)\.").match
    suffixes = tuple(f".{gate}.weight" for gate in gates)
    for name in [name for name in names if name.endswith(suffixes) and name.startswith(root)]:
        if m := match(name):
            indices.setdefault(m.group(1), set()).add(m.group(2))
    ranked = sorted(indices, key=lambda prefix: len(indices[prefix]), reverse=True)
    if not ranked or (len(ranked) > 1 and len(indices[ranked[0]]) == len(indices[ranked[1]])):
        raise CheckpointError(f"cannot find the decoder layers in {path}: names ending "
                              f"{' or '.join(suffixes)} give the prefixes {sorted(indices)}")
    return ranked[0]


_FUSED_NAMES = ("experts.gate_up_proj", "experts.down_proj")  # transformers' fused experts, under the block


class CheckpointLayout:
    """The tensor names of one checkpoint folder: which file holds each, where a layer's MoE block
    is, which stored tensors make up an expert. Opens files lazily; `close()` them."""

    def __init__(self, path: str | Path, spec: MoESpec | None = None, opener: type = SafetensorsHeader):
        self.path = Path(path)
        self.spec = spec or spec_from_config(load_config(self.path))
        self.opener = opener  # SafetensorsHeader or a subclass (experts.checkpoint's, which makes tensors)
        self.opened: dict[Path, SafetensorsHeader] = {}
        self._closed_bytes_read = 0
        try:
            self.files = weight_files(self.path, opener, self.opened)
            for file in self.opened.values():  # headers read to list the names
                self._stacked_as_rows(file)
            self.layer_prefix = _decoder_prefix(self.path, list(self.files),
                                                (*self.spec.checkpoint_gates, self.spec.gate_attr),
                                                self.spec.checkpoint_root)
        except BaseException:
            self.close()
            raise

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far (headers excluded), across every file opened."""
        return self._closed_bytes_read + sum(f.bytes_read for f in self.opened.values())

    def file(self, name: str) -> SafetensorsHeader:
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}")
        path = self.files[name]
        if path not in self.opened:
            self.opened[path] = self._stacked_as_rows(self.opener(path))
        return self.opened[path]

    def _stacked_as_rows(self, file: SafetensorsHeader) -> SafetensorsHeader:
        """`file` with the spec's stacked expert tensors ([E * R, C], DBRX) described as [E, R, C]:
        the same bytes, so one expert reads as a row, as a fused tensor's does."""
        stacked, experts = self.spec.checkpoint_stacked, self.spec.num_experts
        for name, entry in file.entries.items():
            shape = entry["shape"]
            if stacked and name.endswith(stacked) and len(shape) == 2 and shape[0] % experts == 0:
                entry["shape"] = [experts, shape[0] // experts, shape[1]]
        return file

    def close(self) -> None:
        for file in self.opened.values():
            self._closed_bytes_read += file.bytes_read
            file.close()
        self.opened.clear()

    def block(self, layer: int) -> str:
        """Name prefix of the MoE block of `layer`, e.g. 'model.layers.3.mlp.'."""
        self.spec.check_layer(layer)
        candidates = [*self.spec.checkpoint_blocks, self.spec.block_attr]
        gate = self.spec.gate_attr
        for block in candidates:
            prefix = f"{self.layer_prefix}{layer}." + (f"{block}." if block else "")
            if any(f"{prefix}{name}.weight" in self.files for name in (*self.spec.checkpoint_gates, gate)):
                return prefix
        raise CheckpointError(f"checkpoint {self.path} has no tensor "
                              f"{self.layer_prefix}{layer}.{candidates[-1]}.{gate}.weight (gate of layer {layer})")

    def fused_names(self, block: str) -> tuple[str, str] | None:
        """(gate_up, down): the names of `block`'s experts stored fused ([E, ...] tensors), the
        vendor's (`spec.checkpoint_fused`) or transformers'; None where they are stored one name each."""
        for gate_up, down in [names for names in (self.spec.checkpoint_fused, _FUSED_NAMES) if names]:
            if any(f"{block}{gate_up}{suffix}" in self.files for suffix in ("", "_blocks")):
                return f"{block}{gate_up}", f"{block}{down}"
        return None

    def is_transposed(self, block: str) -> bool:
        """Whether `block`'s fused experts are stored [E, H, 2I] and [E, I, H] (Llama 4, gpt-oss,
        Qwen3-VL as published) rather than [E, 2I, H] and [E, H, I]: read from the stored shapes
        (MXFP4 stores rows)."""
        gate_up, down = self.fused_names(block)
        if f"{gate_up}_blocks" in self.files:
            return False
        hidden, inter = self.spec.expert_width, self.spec.intermediate_size
        rows = {gate_up: (self.spec.gate_up_rows, hidden), down: (hidden, inter)}
        return any(tuple(self.file(name).shape(name)[1:]) != shape for name, shape in rows.items())

    def is_fused(self, block: str) -> bool:
        """Whether `block`'s experts are stored fused rather than one name each."""
        return self.fused_names(block) is not None

    def stored(self, name: str) -> list[str]:
        """The stored tensors of weight `name`: itself and its fp8 scales, MXFP4 blocks and scales, or itself."""
        if f"{name}_scale_inv" in self.files:
            return [name, f"{name}_scale_inv"]
        if f"{name}_blocks" in self.files:
            return [f"{name}_blocks", f"{name}_scales"]
        return [name]

    def expert_parts(self, layer: int, expert: int) -> list[tuple[str, int | None]]:
        """(tensor name, row along dim 0 or None) of every stored tensor of `expert` of `layer`, in
        checksum order."""
        if not 0 <= expert < self.spec.num_experts:
            raise ValueError(f"expert {expert} out of range: layer {layer} has {self.spec.num_experts} experts")
        block = self.block(layer)
        if self.spec.checkpoint_stacked:
            return [(name, expert) for weight in self.spec.checkpoint_stacked for name in self.stored(block + weight)]
        if not self.is_fused(block):
            weights = [f"{block}experts.{expert}.{n}.weight" for n in self.spec.stored_expert_names]
            return [(name, None) for weight in weights for name in self.stored(weight)]
        parts = [(name, expert) for weight in self.fused_names(block) for name in self.stored(weight)]
        if self.spec.has_expert_bias:
            parts += [(f"{block}experts.gate_up_proj_bias", expert), (f"{block}experts.down_proj_bias", expert)]
        return parts

    def checksum(self, layer: int, expert: int) -> str:
        """sha256 of `expert`'s stored bytes, streamed (HASH_CHUNK_BYTES held at a time)."""
        digest = hashlib.sha256()
        for name, row in self.expert_parts(layer, expert):
            self.file(name).hash_into(digest, name, row)
        return digest.hexdigest()
