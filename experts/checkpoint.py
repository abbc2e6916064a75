"""Reading MoE weights from safetensors checkpoints, only the bytes asked for.

Layouts read (per layer, detected from the tensor names):
- per-expert ("legacy", what `save_pretrained` writes by default):
  `<block>.experts.<e>.{gate_proj,up_proj,down_proj}.weight` (Mixtral, MiniMax-M2: `w1, w3, w2` under
  `block_sparse_moe`; Mistral Large 3: `w1, w3, w2` with no block segment, `layers.N.experts.E.w1`,
  its shared experts' too: the spec names them);
- fused (`save_pretrained(..., save_original_format=False)`, Llama 4 and gpt-oss always):
  `<block>.experts.gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`
  (Llama 4: `[E, H, 2I]` and `[E, I, H]`, transposed; gpt-oss: transposed with gate and up
  interleaved, and biases `gate_up_proj_bias [E, 2I]`, `down_proj_bias [E, H]`).
Quantized checkpoints as published (`experts.quantized`): block fp8 (`X.weight` e4m3 with
`X.weight_scale_inv`) and MXFP4 (`X_blocks`, `X_scales`), dequantized one expert at a time to the
reader's dtype; the stored form stays readable through `quantized`.
Single-file and sharded (`model.safetensors.index.json`) checkpoints. Expert weights come back in
the canonical layout w_gate_up [n, 2I, H] (gate rows first), w_down [n, H, I] (biases
b_gate_up [n, 2I], b_down [n, H]).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import math
import re
import stat
import struct
from pathlib import Path

import torch

from experts.errors import CheckpointError
from experts.quantized import QuantizationConfig, QuantizedTensor
from experts.spec import MoESpec, load_config, spec_from_config

__all__ = ["CheckpointReader", "ExpertWeights", "GateWeights", "SafetensorsFile", "SharedWeights"]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own bound
_HF_NAMES = ("gate_proj", "up_proj", "down_proj")  # transformers' names of an MLP's gate, up, down


def _regular_file(path: Path) -> None:
    """CheckpointError unless `path` is a regular file (a FIFO or device would block or never end)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file")


def _entries(path: Path, header: object, data_bytes: int) -> dict[str, dict]:
    """The tensor entries of a parsed header, each checked: a known dtype, a shape of non-negative
    ints, offsets inside the data and not overlapping, bytes = shape x dtype."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a {type(header).__name__}, not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, entry in header.items():
        where = f"tensor {name!r} in {path}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: an entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative ints")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} are not inside the file's {data_bytes} bytes")
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(f"{where} has {offsets[1] - offsets[0]} bytes, shape {shape} {dtype} needs "
                                  f"{expected}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap")
    return header


class SafetensorsFile:
    """One .safetensors file, read with pread: `read(name, rows)` touches only those rows' bytes.
    Its header is checked whole when the file is opened (CheckpointError naming file and tensor)."""

    def __init__(self, path: Path):
        self.path = path
        self.bytes_read = 0
        _regular_file(path)
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

    def read(self, name: str, rows: int | None = None, dtypes: tuple[torch.dtype, ...] = ()) -> tuple[torch.Tensor, bytes]:
        """Tensor `name` (or its row `rows` along dim 0) and the raw bytes it came from. It must be
        floating point, or one of `dtypes` (MXFP4's uint8 blocks and scales)."""
        entry = self.entries[name]
        dtype = _DTYPES[entry["dtype"]]
        if not dtype.is_floating_point and dtype not in dtypes:
            raise CheckpointError(f"tensor {name!r} in {self.path} is {entry['dtype']}: weights must be floating point")
        start, end = entry["data_offsets"]
        shape = list(entry["shape"])
        if rows is not None:
            row_bytes = (end - start) // shape[0]
            start, end, shape = start + rows * row_bytes, start + (rows + 1) * row_bytes, shape[1:]
        raw = os.pread(self._fd, end - start, self._data_start + start)
        if len(raw) != end - start:
            raise CheckpointError(f"tensor {name!r} in {self.path} is truncated")
        self.bytes_read += len(raw)
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return tensor.reshape(shape), raw

    def close(self) -> None:
        os.close(self._fd)


@dataclasses.dataclass
class GateWeights:
    weight: torch.Tensor                 # [E, H]
    bias: torch.Tensor | None = None     # [E] float32, DeepSeek-V3 score correction (for the choice only)
    logit_bias: torch.Tensor | None = None   # [E], gpt-oss: the router linear's bias
    token_experts: torch.Tensor | None = None  # [vocab, k] int64, DeepSeek-V4's hash layers: experts per token id


@dataclasses.dataclass
class SharedWeights:
    w_gate_up: torch.Tensor              # [2S, H]
    w_down: torch.Tensor                 # [H, S]
    gate: torch.Tensor | None = None     # [1, H], Qwen2-MoE shared_expert_gate


@dataclasses.dataclass
class ExpertWeights:
    experts: list[int]                   # which experts of the layer, in this order
    w_gate_up: torch.Tensor              # [n, 2I, H]
    w_down: torch.Tensor                 # [n, H, I]
    checksums: list[str]                 # sha256 of each expert's source bytes
    b_gate_up: torch.Tensor | None = None    # [n, 2I], gpt-oss
    b_down: torch.Tensor | None = None       # [n, H]

    def select(self, rows: list[int]) -> "ExpertWeights":
        """The experts at positions `rows`, in that order (itself, not a copy, for all in order)."""
        if rows == list(range(len(self.experts))):
            return self
        pick = (lambda t: None if t is None else t[rows])
        return ExpertWeights([self.experts[i] for i in rows], self.w_gate_up[rows], self.w_down[rows],
                             [self.checksums[i] for i in rows], pick(self.b_gate_up), pick(self.b_down))

    def cast(self, dtype: torch.dtype | None) -> "ExpertWeights":
        """The same experts in `dtype`, contiguous; None: the weights' dtype, which the biases take
        too (an MXFP4 checkpoint's weights are dequantized, its biases stored as they are)."""
        dtype = dtype or self.w_gate_up.dtype
        to = (lambda t: None if t is None else t.to(dtype).contiguous())
        return ExpertWeights(self.experts, to(self.w_gate_up), to(self.w_down), self.checksums,
                             to(self.b_gate_up), to(self.b_down))

    def concat(self, other: "ExpertWeights") -> "ExpertWeights":
        """These experts, then `other`'s (in this one's dtype)."""
        cat = (lambda a, b: None if a is None else torch.cat([a, b.to(a.dtype)]))
        return ExpertWeights(self.experts + other.experts, cat(self.w_gate_up, other.w_gate_up),
                             cat(self.w_down, other.w_down), self.checksums + other.checksums,
                             cat(self.b_gate_up, other.b_gate_up), cat(self.b_down, other.b_down))


# one expert as read: (gate_up [2I, H], down [H, I], b_gate_up [2I] | None, b_down [H] | None, checksum)
_OneExpert = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", str]


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, for a single-file or sharded checkpoint folder."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        _regular_file(index)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {str(name): _confined(path, file) for name, file in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index: {type(exc).__name__}: {exc}") from exc
        for file in set(files.values()):
            _regular_file(file)
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors file in {path}")
    names: dict[str, Path] = {}
    for file in files:
        reader = SafetensorsFile(file)
        names.update(dict.fromkeys(reader.entries, file))
        reader.close()
    return names


def _confined(folder: Path, file: object) -> Path:
    """`file` of an index, as a path inside `folder` (no absolute path, no way out with ..)."""
    if not isinstance(file, str) or not file or Path(file).is_absolute():
        raise CheckpointError(f"{folder}: index names {file!r}, not a file name inside the checkpoint")
    resolved = (folder / file).resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise CheckpointError(f"{folder}: index names {file!r}, which is outside the checkpoint folder")
    return resolved


def _decoder_prefix(path: Path, names: list[str]) -> str:
    """The name prefix of the decoder layers ('model.layers.', 'layers.',
    'model.language_model.layers.'): of the prefixes followed by a layer index, the one with the
    most layers. Published checkpoints carry other stacks beside it (multi-token-prediction heads:
    `mtp.layers.0...`); they hold fewer."""
    indices: dict[str, set[str]] = {}
    for name in names:
        if m := re.match(r"^(.*?\blayers\.)(\d+)\.", name):
            indices.setdefault(m.group(1), set()).add(m.group(2))
    ranked = sorted(indices, key=lambda prefix: len(indices[prefix]), reverse=True)
    if not ranked or (len(ranked) > 1 and len(indices[ranked[0]]) == len(indices[ranked[1]])):
        raise CheckpointError(f"cannot find the decoder layers in {path} (prefixes {sorted(indices)})")
    return ranked[0]


class CheckpointReader:
    """The MoE tensors of one checkpoint folder; reads lazily and only what is asked for.

    `dtype`: what quantized weights are dequantized to (default bfloat16); others come as stored.
    """

    def __init__(self, path: str | Path, spec: MoESpec | None = None, dtype: torch.dtype | None = None):
        self.path = Path(path)
        config = load_config(self.path)
        self.spec = spec or spec_from_config(config)
        try:
            self.quantization = QuantizationConfig.from_config(config)
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from exc
        self.dequantize_dtype = dtype or torch.bfloat16
        self._files = _weight_files(self.path)
        self._open: dict[Path, SafetensorsFile] = {}
        self._closed_bytes_read = 0
        self._layer_prefix = _decoder_prefix(self.path, list(self._files))

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far (headers excluded), across every file opened."""
        return self._closed_bytes_read + sum(f.bytes_read for f in self._open.values())

    def close(self) -> None:
        for file in self._open.values():
            self._closed_bytes_read += file.bytes_read
            file.close()
        self._open.clear()

    # -- tensor access ---------------------------------------------------------------------------

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}")
        path = self._files[name]
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path]

    def _read(self, name: str, shape: tuple[int, ...], rows: int | None = None,
              dtypes: tuple[torch.dtype, ...] = ()) -> tuple[torch.Tensor, bytes]:
        file = self._file(name)
        full = file.shape(name)
        want = shape if rows is None else (full[0], *shape)
        if full != want:
            raise CheckpointError(f"tensor {name!r} has shape {list(full)}, expected {list(want)}")
        if rows is not None and not 0 <= rows < full[0]:
            raise CheckpointError(f"tensor {name!r} has {full[0]} experts, asked for expert {rows}")
        return file.read(name, rows, dtypes)

    def _weight(self, name: str, shape: tuple[int, int], rows: int | None = None) -> tuple[torch.Tensor, bytes]:
        """Weight `name` [R, C] (row `rows` of a fused [E, R, C] when given) and the bytes it came
        from: as stored, or dequantized to `dequantize_dtype` where the checkpoint quantized it."""
        stored = self.quantized(name, shape, rows)
        if stored is None:
            weight, raw = self._read(name, shape, rows)
            if weight.dtype == torch.float8_e4m3fn:
                raise CheckpointError(f"tensor {name!r} is float8_e4m3fn, but config.json has no fp8 "
                                      f"quantization_config or the tensor no {name}_scale_inv beside it")
            return weight, raw
        weight, raw = stored
        return weight.dequantize(self.dequantize_dtype), raw

    def quantized(self, name: str, shape: tuple[int, int],
                  rows: int | None = None) -> tuple[QuantizedTensor, bytes] | None:
        """Weight `name` [R, C] in its stored quantized form and its bytes (data, then scales);
        None where it is stored unquantized."""
        method, (rows_per, cols_per) = self.quantization.method, self.quantization.block
        if method == "fp8" and f"{name}_scale_inv" in self._files:
            data, raw = self._read(name, shape, rows)
            if data.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"tensor {name!r} has a weight_scale_inv but is {data.dtype}, not float8_e4m3fn")
            grid = (-(-shape[0] // rows_per), -(-shape[1] // cols_per))
            scales, raw_s = self._read(f"{name}_scale_inv", grid, rows)
            return QuantizedTensor("fp8", data, scales, (rows_per, cols_per)), raw + raw_s
        if method == "mxfp4" and f"{name}_blocks" in self._files:
            if shape[1] % 32:
                raise CheckpointError(f"tensor {name!r}: mxfp4 needs columns divisible by 32, the shape is {list(shape)}")
            blocks, raw = self._read(f"{name}_blocks", (shape[0], shape[1] // 32, 16), rows, (torch.uint8,))
            scales, raw_s = self._read(f"{name}_scales", (shape[0], shape[1] // 32), rows, (torch.uint8,))
            return QuantizedTensor("mxfp4", blocks, scales), raw + raw_s
        return None

    def _block(self, layer: int) -> str:
        """Name prefix of the MoE block of `layer`, e.g. 'model.layers.3.mlp.'."""
        self.spec.check_layer(layer)
        candidates = [*self.spec.checkpoint_blocks, self.spec.block_attr]
        gate = self.spec.gate_attr
        for block in candidates:
            prefix = f"{self._layer_prefix}{layer}." + (f"{block}." if block else "")
            if f"{prefix}{gate}.weight" in self._files:
                return prefix
        raise CheckpointError(f"checkpoint {self.path} has no tensor "
                              f"{self._layer_prefix}{layer}.{candidates[-1]}.{gate}.weight (gate of layer {layer})")

    def _first_present(self, prefix: str, names: list[str]) -> str:
        """prefix + the first of `names` that the checkpoint has (the last one, to name it in the
        error, when none is there)."""
        return next((prefix + n for n in names if prefix + n in self._files), prefix + names[-1])

    # -- MoE parts -------------------------------------------------------------------------------

    def gate(self, layer: int) -> GateWeights:
        spec, block = self.spec, self._block(layer)
        weight = self._weight(f"{block}{spec.gate_attr}.weight", (spec.num_experts, spec.hidden_size))[0]
        if layer in spec.hash_layers:  # no score bias: the experts come from the token table
            return GateWeights(weight, token_experts=self._token_experts(f"{block}{spec.gate_attr}.tid2eid"))
        bias = logit_bias = None
        if spec.has_score_bias:
            bias = self._read(self._first_present(block, list(spec.score_bias)), (spec.num_experts,))[0].float()
        if spec.has_gate_bias:
            logit_bias = self._read(f"{block}{spec.gate_attr}.bias", (spec.num_experts,))[0]
        return GateWeights(weight, bias, logit_bias)

    def _token_experts(self, name: str) -> torch.Tensor:
        """A hash layer's table [vocab, k] int64 of the experts each token id goes to, checked."""
        spec, file = self.spec, self._file(name)
        shape = file.shape(name)
        if len(shape) != 2 or shape[1] != spec.top_k:
            raise CheckpointError(f"tensor {name!r} has shape {list(shape)}, expected [vocab, {spec.top_k}]")
        if file.entries[name]["dtype"] != "I64":
            raise CheckpointError(f"tensor {name!r} in {self.path} is {file.entries[name]['dtype']}, expected I64")
        table = file.read(name, dtypes=(torch.int64,))[0]
        if table.numel() and not 0 <= int(table.min()) <= int(table.max()) < spec.num_experts:
            raise CheckpointError(f"tensor {name!r} names experts {int(table.min())}..{int(table.max())}, "
                                  f"outside [0, {spec.num_experts})")
        return table

    def shared(self, layer: int) -> SharedWeights | None:
        spec, block = self.spec, self._block(layer)
        if not spec.shared_intermediate_size:
            return None
        hidden, size = spec.hidden_size, spec.shared_intermediate_size
        mlp = f"{block}{spec.shared_attr}."
        names = next((n for n in (spec.shared_expert_names, _HF_NAMES) if f"{mlp}{n[0]}.weight" in self._files),
                     _HF_NAMES)
        gate_proj = self._weight(f"{mlp}{names[0]}.weight", (size, hidden))[0]
        up_proj = self._weight(f"{mlp}{names[1]}.weight", (size, hidden))[0]
        down = self._weight(f"{mlp}{names[2]}.weight", (hidden, size))[0]
        gate = self._weight(f"{block}shared_expert_gate.weight", (1, hidden))[0] if spec.has_shared_gate else None
        return SharedWeights(torch.cat([gate_proj, up_proj]), down, gate)

    def experts(self, layer: int, experts: list[int] | None = None) -> ExpertWeights:
        """Weights of `experts` (default: all) of `layer`, reading only their bytes."""
        spec, block = self.spec, self._block(layer)
        experts = list(range(spec.num_experts)) if experts is None else [int(e) for e in experts]
        bad = [e for e in experts if not 0 <= e < spec.num_experts]
        if bad:
            raise ValueError(f"experts {bad} out of range: layer {layer} has {spec.num_experts} experts")
        fused = {f"{block}experts.gate_up_proj{suffix}" for suffix in ("", "_blocks")} & self._files.keys()
        read_one = self._fused_expert if fused else self._legacy_expert
        hidden, inter = spec.hidden_size, spec.intermediate_size
        shapes = [(2 * inter, hidden), (hidden, inter)] + ([(2 * inter,), (hidden,)] if spec.has_expert_bias else [])
        stacks, checksums = [], []
        for i, expert in enumerate(experts):  # into one tensor each, as they are read: no second copy
            *tensors, checksum = read_one(block, expert)
            if not stacks:
                stacks = [t.new_empty(len(experts), *t.shape) for t in tensors[:len(shapes)]]
            for stack, tensor in zip(stacks, tensors):
                stack[i] = tensor
            checksums.append(checksum)
        stacks = stacks or [torch.empty(0, *shape) for shape in shapes]
        return ExpertWeights(experts, stacks[0], stacks[1], checksums, *stacks[2:])

    def _fused_expert(self, block: str, expert: int) -> _OneExpert:
        """(gate_up [2I, H], down [H, I], b_gate_up [2I] | None, b_down [H] | None, checksum) of one expert."""
        hidden, inter, layout = self.spec.hidden_size, self.spec.intermediate_size, self.spec.fused_layout
        name_gu, name_d = f"{block}experts.gate_up_proj", f"{block}experts.down_proj"
        if layout == "rows" or f"{name_gu}_blocks" in self._files:  # MXFP4 stores output rows first: [E, 2I, H]
            gate_up, raw_gu = self._weight(name_gu, (2 * inter, hidden), rows=expert)
            down, raw_d = self._weight(name_d, (hidden, inter), rows=expert)
        else:  # stored [E, H, 2I] and [E, I, H]
            gate_up, raw_gu = self._weight(name_gu, (hidden, 2 * inter), rows=expert)
            down, raw_d = self._weight(name_d, (inter, hidden), rows=expert)
            gate_up, down = gate_up.t().contiguous(), down.t().contiguous()
        raws, b_gate_up, b_down = [raw_gu, raw_d], None, None
        if self.spec.has_expert_bias:
            b_gate_up, raw_bgu = self._read(f"{block}experts.gate_up_proj_bias", (2 * inter,), rows=expert)
            b_down, raw_bd = self._read(f"{block}experts.down_proj_bias", (hidden,), rows=expert)
            raws += [raw_bgu, raw_bd]
        if layout == "transposed_interleaved":  # gate, up, gate, up, ... -> gate rows, then up rows
            gate_up = torch.cat([gate_up[0::2], gate_up[1::2]])
            b_gate_up = None if b_gate_up is None else torch.cat([b_gate_up[0::2], b_gate_up[1::2]])
        return gate_up, down, b_gate_up, b_down, hashlib.sha256(b"".join(raws)).hexdigest()

    def _legacy_expert(self, block: str, expert: int) -> _OneExpert:
        """As `_fused_expert`, from per-expert names (no biases)."""
        hidden, inter = self.spec.hidden_size, self.spec.intermediate_size
        names = self.spec.expert_names
        prefix = f"{block}experts.{expert}."
        gate, raw_g = self._weight(f"{prefix}{names[0]}.weight", (inter, hidden))
        up, raw_u = self._weight(f"{prefix}{names[1]}.weight", (inter, hidden))
        down, raw_d = self._weight(f"{prefix}{names[2]}.weight", (hidden, inter))
        return torch.cat([gate, up]), down, None, None, hashlib.sha256(raw_g + raw_u + raw_d).hexdigest()
