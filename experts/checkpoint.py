"""Reading MoE weights from safetensors checkpoints, only the bytes asked for.

Layouts read (per layer, detected from the tensor names):
- per-expert ("legacy", what `save_pretrained` writes by default):
  `<block>.experts.<e>.{gate_proj,up_proj,down_proj}.weight` (Mixtral, MiniMax-M2: `w1, w3, w2` under
  `block_sparse_moe`; Mistral Large 3: `w1, w3, w2` with no block segment, `layers.N.experts.E.w1`,
  its shared experts' too: the spec names them);
- fused (`save_pretrained(..., save_original_format=False)`, Llama 4 and gpt-oss always):
  `<block>.experts.gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`
  (Llama 4, Qwen3-VL as published: `[E, H, 2I]` and `[E, I, H]`, transposed, told from the stored
  shapes; gpt-oss: transposed with gate and up
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
from pathlib import Path

import torch

from protos.errors import CheckpointError
from experts.quantized import QuantizationConfig, QuantizedTensor
from kernels.expert_mlp import BlockScales, dequantize_blocks
from experts.safetensors import CheckpointLayout, SafetensorsHeader
from experts.spec import MoESpec, load_config, spec_from_config

__all__ = ["CheckpointReader", "ExpertWeights", "GateWeights", "LatentWeights", "SafetensorsFile", "SharedWeights"]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


_HF_NAMES = ("gate_proj", "up_proj", "down_proj")  # transformers' names of an MLP's gate, up, down


class SafetensorsFile(SafetensorsHeader):
    """A checked .safetensors file whose tensors come back as torch tensors."""

    def read(self, name: str, rows: int | None = None,
             dtypes: tuple[torch.dtype, ...] = ()) -> tuple[torch.Tensor, bytearray]:
        """Tensor `name` (or its row `rows` along dim 0) and the raw bytes it came from (the tensor's
        own buffer: one copy). It must be floating point, or one of `dtypes` (MXFP4's uint8 blocks
        and scales)."""
        dtype = _DTYPES[self.entries[name]["dtype"]]
        if not dtype.is_floating_point and dtype not in dtypes:
            raise CheckpointError(f"tensor {name!r} in {self.path} is {self.entries[name]['dtype']}: weights must "
                                  f"be floating point")
        shape = self.span(name, rows)[2]
        raw = self.raw(name, rows)
        tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return tensor.reshape(shape), raw


@dataclasses.dataclass
class GateWeights:
    weight: torch.Tensor                 # [E, H]
    bias: torch.Tensor | None = None     # [E] float32, DeepSeek-V3 score correction (for the choice only)
    logit_bias: torch.Tensor | None = None   # [E], gpt-oss: the router linear's bias
    token_experts: torch.Tensor | None = None  # [vocab, k] int64, DeepSeek-V4's hash layers: experts per token id
    top_k: int = 0                       # experts per token of this layer (0: the spec's top_k)
    scale: float = 1.0                   # Inkling: the layer's learned gate.global_scale, on every weight


@dataclasses.dataclass
class SharedWeights:
    w_gate_up: torch.Tensor              # [2S, H] (Inkling's n experts: gate rows expert by expert, then up rows)
    w_down: torch.Tensor                 # [H, S]
    gate: torch.Tensor | None = None     # [1, H], Qwen2-MoE shared_expert_gate


@dataclasses.dataclass
class LatentWeights:
    """Nemotron-H's projections around the experts, run where the gate runs."""
    into: torch.Tensor                   # [L, H]: tokens to the experts' width (fc1_latent_proj)
    out_of: torch.Tensor                 # [H, L]: the combined expert output back (fc2_latent_proj)


@dataclasses.dataclass
class ExpertWeights:
    experts: list[int]                   # which experts of the layer, in this order
    w_gate_up: torch.Tensor              # [n, 2I, H] ([n, I, H], up only, for non-gated experts; H: the
                                         # experts' width, the latent one where the model has one)
    w_down: torch.Tensor                 # [n, H, I]
    checksums: list[str]                 # sha256 of each expert's source bytes
    b_gate_up: torch.Tensor | None = None    # [n, 2I], gpt-oss
    b_down: torch.Tensor | None = None       # [n, H]
    scales: BlockScales | None = None        # block fp8 weights kept as stored (float8_e4m3fn: fp8_on)

    def select(self, rows: list[int]) -> "ExpertWeights":
        """The experts at positions `rows`, in that order (itself, not a copy, for all in order)."""
        if rows == list(range(len(self.experts))):
            return self
        pick = (lambda t: None if t is None else t[rows])
        scales = self.scales and BlockScales(self.scales.gate_up[rows], self.scales.down[rows], self.scales.block)
        return ExpertWeights([self.experts[i] for i in rows], self.w_gate_up[rows], self.w_down[rows],
                             [self.checksums[i] for i in rows], pick(self.b_gate_up), pick(self.b_down), scales)

    def cast(self, dtype: torch.dtype | None, device: torch.device | str | None = None) -> "ExpertWeights":
        """The same experts in `dtype`, contiguous, on `device` (None: where they are); dtype None:
        the weights' dtype, which the biases take too (an MXFP4 checkpoint's weights are dequantized,
        its biases stored as they are). Block fp8 weights stay fp8 (and their scales float32): only moved."""
        dtype = dtype or self.w_gate_up.dtype
        to = (lambda t, kind=dtype: None if t is None else t.to(device=device, dtype=kind).contiguous())
        if self.scales is None:
            return ExpertWeights(self.experts, to(self.w_gate_up), to(self.w_down), self.checksums,
                                 to(self.b_gate_up), to(self.b_down))
        s = self.scales
        return ExpertWeights(self.experts, to(self.w_gate_up, None), to(self.w_down, None), self.checksums,
                             to(self.b_gate_up), to(self.b_down), BlockScales(to(s.gate_up, None), to(s.down, None),
                                                                              s.block))

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> "ExpertWeights":
        """Block fp8 weights in `dtype` (itself where they are not fp8)."""
        if self.scales is None:
            return self
        s = self.scales
        return ExpertWeights(self.experts, dequantize_blocks(self.w_gate_up, s.gate_up, s.block, dtype),
                             dequantize_blocks(self.w_down, s.down, s.block, dtype), self.checksums,
                             self.b_gate_up, self.b_down)

    def concat(self, other: "ExpertWeights") -> "ExpertWeights":
        """These experts, then `other`'s (in this one's dtype; fp8 beside another form or block size:
        both dequantized)."""
        if (self.scales and self.scales.block) != (other.scales and other.scales.block):
            dtype = next((w.w_gate_up.dtype for w in (self, other) if w.scales is None), torch.bfloat16)
            return self.dequantized(dtype).concat(other.dequantized(dtype))
        cat = (lambda a, b: None if a is None else torch.cat([a, b.to(a.dtype)]))
        scales = self.scales and BlockScales(cat(self.scales.gate_up, other.scales.gate_up),
                                             cat(self.scales.down, other.scales.down), self.scales.block)
        return ExpertWeights(self.experts + other.experts, cat(self.w_gate_up, other.w_gate_up),
                             cat(self.w_down, other.w_down), self.checksums + other.checksums,
                             cat(self.b_gate_up, other.b_gate_up), cat(self.b_down, other.b_down), scales)


# one expert as read: (gate_up [2I, H], down [H, I], b_gate_up [2I] | None, b_down [H] | None, checksum)
_OneExpert = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", str]


class CheckpointReader:
    """The MoE tensors of one checkpoint folder; reads lazily and only what is asked for.

    `dtype`: what quantized weights are dequantized to (default bfloat16); others come as stored.
    `keep_fp8`: block fp8 experts come as stored, with their scales (`ExpertWeights.scales`), where
    the layout allows (see `_fp8_layout`); what will compute them is a device with fp8 (`fp8_on`).
    """

    def __init__(self, path: str | Path, spec: MoESpec | None = None, dtype: torch.dtype | None = None,
                 keep_fp8: bool = False):
        self.path = Path(path)
        self.keep_fp8 = keep_fp8
        config = load_config(self.path)
        self.spec = spec or spec_from_config(config)
        try:
            self.quantization = QuantizationConfig.from_config(config)
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from exc
        self.dequantize_dtype = dtype or torch.bfloat16
        self.layout = CheckpointLayout(self.path, self.spec, opener=SafetensorsFile)
        self._files = self.layout.files

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far (headers excluded), across every file opened."""
        return self.layout.bytes_read

    def close(self) -> None:
        self.layout.close()

    # -- tensor access ---------------------------------------------------------------------------

    def _file(self, name: str) -> SafetensorsFile:
        return self.layout.file(name)

    def _read(self, name: str, shape: tuple[int, ...], rows: int | None = None,
              dtypes: tuple[torch.dtype, ...] = ()) -> tuple[torch.Tensor, bytearray]:
        file = self._file(name)
        full = file.shape(name)
        want = shape if rows is None else (full[0], *shape)
        if full != want:
            raise CheckpointError(f"tensor {name!r} has shape {list(full)}, expected {list(want)}")
        if rows is not None and not 0 <= rows < full[0]:
            raise CheckpointError(f"tensor {name!r} has {full[0]} experts, asked for expert {rows}")
        return file.read(name, rows, dtypes)

    def _weight(self, name: str, shape: tuple[int, int],
                rows: int | None = None) -> tuple[torch.Tensor, list[bytearray]]:
        """Weight `name` [R, C] (row `rows` of a fused [E, R, C] when given) and the bytes it came
        from (data, then scales: `CheckpointLayout.stored`'s order): as stored, or dequantized to
        `dequantize_dtype` where the checkpoint quantized it."""
        stored = self.quantized(name, shape, rows)
        if stored is None:
            weight, raw = self._read(name, shape, rows)
            if weight.dtype == torch.float8_e4m3fn:
                raise CheckpointError(f"tensor {name!r} is float8_e4m3fn, but config.json has no fp8 "
                                      f"quantization_config or the tensor no {name}_scale_inv beside it")
            return weight, [raw]
        weight, raws = stored
        return weight.dequantize(self.dequantize_dtype), raws

    def quantized(self, name: str, shape: tuple[int, int],
                  rows: int | None = None) -> tuple[QuantizedTensor, list[bytearray]] | None:
        """Weight `name` [R, C] in its stored quantized form and its bytes (data, then scales);
        None where it is stored unquantized."""
        method, (rows_per, cols_per) = self.quantization.method, self.quantization.block
        if method == "fp8" and f"{name}_scale_inv" in self._files:
            data, raw = self._read(name, shape, rows)
            if data.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"tensor {name!r} has a weight_scale_inv but is {data.dtype}, not float8_e4m3fn")
            grid = (-(-shape[0] // rows_per), -(-shape[1] // cols_per))
            scales, raw_s = self._read(f"{name}_scale_inv", grid, rows)
            return QuantizedTensor("fp8", data, scales, (rows_per, cols_per)), [raw, raw_s]
        if method == "mxfp4" and f"{name}_blocks" in self._files:
            if shape[1] % 32:
                raise CheckpointError(f"tensor {name!r}: mxfp4 needs columns divisible by 32, the shape is {list(shape)}")
            blocks, raw = self._read(f"{name}_blocks", (shape[0], shape[1] // 32, 16), rows, (torch.uint8,))
            scales, raw_s = self._read(f"{name}_scales", (shape[0], shape[1] // 32), rows, (torch.uint8,))
            return QuantizedTensor("mxfp4", blocks, scales), [raw, raw_s]
        return None

    def _block(self, layer: int) -> str:
        return self.layout.block(layer)

    def _first_present(self, prefix: str, names: list[str]) -> str:
        """prefix + the first of `names` that the checkpoint has (the last one, to name it in the
        error, when none is there)."""
        return next((prefix + n for n in names if prefix + n in self._files), prefix + names[-1])

    def _under(self, block: str, layer: int, name: str) -> str:
        """The full name of `name` under `block`, or (a name starting "../") under the decoder layer."""
        return f"{self.layout.layer_prefix}{layer}.{name[3:]}" if name.startswith("../") else block + name

    # -- MoE parts -------------------------------------------------------------------------------

    def gate(self, layer: int) -> GateWeights:
        spec, block = self.spec, self._block(layer)
        gate = self._first_present(block, [f"{name}.weight" for name in (*spec.checkpoint_gates, spec.gate_attr)])
        rows, hidden = spec.gate_rows, spec.hidden_size
        if rows != hidden and self._file(gate).shape(gate) == (hidden, rows):  # Ernie 4.5-VL's, published [H, E]
            weight = self._weight(gate, (hidden, rows))[0].t().contiguous()
        else:
            weight = self._weight(gate, (rows, hidden))[0]
        if layer in spec.hash_layers:  # no score bias: the experts come from the token table
            return GateWeights(weight, token_experts=self._token_experts(f"{block}{spec.gate_attr}.tid2eid"))
        bias = logit_bias = None
        if spec.has_score_bias:
            names = [self._under(block, layer, name) for name in spec.score_bias]
            bias = self._vector(self._first_present("", names), spec.num_scored)
        if spec.has_gate_bias:
            logit_bias = self._read(f"{block}{spec.gate_attr}.bias", (spec.num_experts,))[0]
        scale = float(self._read(f"{block}{spec.gate_attr}.global_scale", (1,))[0]) if spec.num_shared_scored else 1.0
        return GateWeights(weight, bias, logit_bias, top_k=spec.top_k_of(layer), scale=scale)

    def _vector(self, name: str, size: int) -> torch.Tensor:
        """A [size] float32 vector stored as [size], or the first row of [n, size] (Ernie 4.5's score
        bias [1, E]; Ernie 4.5-VL's [2, E]: the text experts', then the vision experts')."""
        stored = self._file(name).shape(name)
        shape = stored if len(stored) == 2 and stored[1] == size else (size,)
        return self._read(name, shape)[0].reshape(-1, size)[0].float()

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
        if spec.num_shared_scored:
            return self._stacked_shared(f"{block}{spec.shared_attr}.")
        stored = (lambda names: names if spec.gated_experts else names[1:])  # non-gated: up and down only
        mlp, names = next(((f"{prefix}.", stored(n)) for attr in (*spec.checkpoint_shared, spec.shared_attr)
                           for prefix in [self._under(block, layer, attr)]
                           for n in (spec.shared_expert_names, _HF_NAMES)
                           if f"{prefix}.{stored(n)[0]}.weight" in self._files),
                          (f"{block}{spec.shared_attr}.", stored(_HF_NAMES)))
        gate_up = [self._weight(f"{mlp}{name}.weight", (size, hidden))[0] for name in names[:-1]]
        down = self._weight(f"{mlp}{names[-1]}.weight", (hidden, size))[0]
        gate = self._weight(f"{block}shared_expert_gate.weight", (1, hidden))[0] if spec.has_shared_gate else None
        return SharedWeights(torch.cat(gate_up), down, gate)

    def latent(self, layer: int) -> LatentWeights | None:
        """The latent projections of `layer` (None: the model has none)."""
        spec, block = self.spec, self._block(layer)
        if not spec.latent_size:
            return None
        hidden, latent = spec.hidden_size, spec.latent_size
        return LatentWeights(self._weight(f"{block}fc1_latent_proj.weight", (latent, hidden))[0],
                             self._weight(f"{block}fc2_latent_proj.weight", (hidden, latent))[0])

    def _stacked_shared(self, mlp: str) -> SharedWeights:
        """Inkling's shared experts, stored stacked: `gate_proj`, `up_proj` [n, I, H] and `down_proj`
        [n, H, I] (no `.weight`), as one MLP of n * I: gate rows expert by expert, then up rows."""
        spec = self.spec
        n, hidden = spec.num_shared_scored, spec.hidden_size
        inter = spec.shared_intermediate_size // n
        gate_proj = self._read(f"{mlp}gate_proj", (n, inter, hidden))[0].reshape(n * inter, hidden)
        up_proj = self._read(f"{mlp}up_proj", (n, inter, hidden))[0].reshape(n * inter, hidden)
        down = self._read(f"{mlp}down_proj", (n, hidden, inter))[0].permute(1, 0, 2).reshape(hidden, n * inter)
        return SharedWeights(torch.cat([gate_proj, up_proj]), down)

    def experts(self, layer: int, experts: list[int] | None = None,
                device: torch.device | str | None = None) -> ExpertWeights:
        """Weights of `experts` (default: all) of `layer`, reading only their bytes, on `device`
        (default: the host): each expert goes there as it is read, so the host holds one at a time."""
        spec, block = self.spec, self._block(layer)
        experts = list(range(spec.num_experts)) if experts is None else [int(e) for e in experts]
        bad = [e for e in experts if not 0 <= e < spec.num_experts]
        if bad:
            raise ValueError(f"experts {bad} out of range: layer {layer} has {spec.num_experts} experts")
        fp8 = bool(experts) and self._fp8_layout(block, experts[0])
        read_one = (self._fp8_expert if fp8 else self._stacked_expert if spec.checkpoint_stacked
                    else self._fused_expert if self.layout.is_fused(block) else self._legacy_expert)
        width, inter, rows = spec.expert_width, spec.intermediate_size, spec.gate_up_rows
        shapes = [(rows, width), (width, inter)] + ([(rows,), (width,)] if spec.has_expert_bias else [])
        shapes += [()] * 2 if fp8 else []  # the scale grids
        stacks, checksums = [], []
        for i, expert in enumerate(experts):  # into one tensor each, as they are read: no second copy
            *tensors, checksum = read_one(block, expert)
            checksums.append(checksum)
            if len(experts) == 1:  # the one read itself
                stacks = [t.unsqueeze(0).to(device) for t in tensors[:len(shapes)]]
                break
            if not stacks:
                stacks = [t.new_empty(len(experts), *t.shape, device=device) for t in tensors[:len(shapes)]]
            for stack, tensor in zip(stacks, tensors):
                stack[i] = tensor
        stacks = stacks or [torch.empty(0, *shape, device=device) for shape in shapes]
        if fp8:
            return ExpertWeights(experts, stacks[0], stacks[1], checksums,
                                 scales=BlockScales(stacks[2], stacks[3], self.quantization.block))
        return ExpertWeights(experts, stacks[0], stacks[1], checksums, *stacks[2:])

    def fp8_block(self, layer: int) -> tuple[int, int] | None:
        """The block of `layer`'s experts where they come as stored block fp8 (`keep_fp8`), else None."""
        return self.quantization.block if self._fp8_layout(self._block(layer), 0) else None

    def _fp8_layout(self, block: str, expert: int) -> bool:
        """Whether `block`'s experts come as stored block fp8 (`keep_fp8`): an fp8 checkpoint whose
        expert weights are stored [R, C] as the kernels read them (fused [E, 2I, H] / [E, H, I], or per
        expert with the gate and up blocks meeting at a block boundary: I a multiple of the block's
        rows), and `expert`'s weights are quantized."""
        spec, rows_per = self.spec, self.quantization.block[0]
        fused = self.layout.is_fused(block)
        if (not self.keep_fp8 or self.quantization.method != "fp8" or spec.checkpoint_stacked
                or spec.interleaved_gate_up or spec.has_expert_bias or (fused and self.layout.is_transposed(block))
                or (not fused and spec.intermediate_size % rows_per)):
            return False
        names = self.layout.fused_names(block) if fused else [
            f"{block}experts.{expert}.{name}.weight" for name in spec.stored_expert_names]
        return all(f"{name}_scale_inv" in self._files for name in names)

    def _fp8_expert(self, block: str, expert: int) -> tuple:
        """(gate_up fp8 [2I, H], down fp8 [H, I], their scales float32, checksum) of one expert as
        stored (`_fp8_layout`); the checksum is the dequantizing read's (the same bytes, in order)."""
        hidden, inter, rows = self.spec.expert_width, self.spec.intermediate_size, self.spec.gate_up_rows
        if self.layout.is_fused(block):
            name_gu, name_d = self.layout.fused_names(block)
            parts = [self.quantized(name_gu, (rows, hidden), expert), self.quantized(name_d, (hidden, inter), expert)]
        else:
            *names, down_name = self.spec.stored_expert_names
            prefix = f"{block}experts.{expert}."
            parts = [self.quantized(f"{prefix}{name}.weight", (inter, hidden)) for name in names]
            parts.append(self.quantized(f"{prefix}{down_name}.weight", (hidden, inter)))
        if any(part is None for part in parts):
            raise CheckpointError(f"{block} expert {expert}: some of its weights are not block fp8, its first "
                                  f"expert's are")
        raws = [raw for _, stored in parts for raw in stored]
        *gate_up, down = [q for q, _ in parts]
        return (torch.cat([q.data for q in gate_up]), down.data, torch.cat([q.scales for q in gate_up]).float(),
                down.scales.float(), _sha256(raws))

    def _fused_expert(self, block: str, expert: int) -> _OneExpert:
        """(gate_up [2I, H] ([I, H] non-gated), down [H, I], b_gate_up [2I] | None, b_down [H] | None,
        checksum) of one expert."""
        hidden, inter = self.spec.expert_width, self.spec.intermediate_size
        rows = self.spec.gate_up_rows
        name_gu, name_d = self.layout.fused_names(block)
        if not self.layout.is_transposed(block):  # stored [E, 2I, H] and [E, H, I]
            gate_up, raw_gu = self._weight(name_gu, (rows, hidden), rows=expert)
            down, raw_d = self._weight(name_d, (hidden, inter), rows=expert)
        else:  # stored [E, H, 2I] and [E, I, H]
            gate_up, raw_gu = self._weight(name_gu, (hidden, rows), rows=expert)
            down, raw_d = self._weight(name_d, (inter, hidden), rows=expert)
            gate_up, down = gate_up.t().contiguous(), down.t().contiguous()
        raws, b_gate_up, b_down = raw_gu + raw_d, None, None
        if self.spec.has_expert_bias:
            b_gate_up, raw_bgu = self._read(f"{block}experts.gate_up_proj_bias", (rows,), rows=expert)
            b_down, raw_bd = self._read(f"{block}experts.down_proj_bias", (hidden,), rows=expert)
            raws += [raw_bgu, raw_bd]
        if self.spec.interleaved_gate_up:  # gate, up, gate, up, ... -> gate rows, then up rows
            gate_up = torch.cat([gate_up[0::2], gate_up[1::2]])
            b_gate_up = None if b_gate_up is None else torch.cat([b_gate_up[0::2], b_gate_up[1::2]])
        return gate_up, down, b_gate_up, b_down, _sha256(raws)

    def _stacked_expert(self, block: str, expert: int) -> _OneExpert:
        """As `_fused_expert`, from DBRX's stacked gate, up and down (each expert's rows [I, H])."""
        hidden, inter = self.spec.hidden_size, self.spec.intermediate_size
        (gate, raw_g), (up, raw_u), (down, raw_d) = (self._weight(f"{block}{name}", (inter, hidden), rows=expert)
                                                     for name in self.spec.checkpoint_stacked)
        return torch.cat([gate, up]), down.t().contiguous(), None, None, _sha256(raw_g + raw_u + raw_d)

    def _legacy_expert(self, block: str, expert: int) -> _OneExpert:
        """As `_fused_expert`, from per-expert names (no biases): gate, up, down (up, down non-gated)."""
        hidden, inter = self.spec.expert_width, self.spec.intermediate_size
        *names, down_name = self.spec.stored_expert_names
        prefix = f"{block}experts.{expert}."
        gate_up = [self._weight(f"{prefix}{name}.weight", (inter, hidden)) for name in names]
        down, raw_d = self._weight(f"{prefix}{down_name}.weight", (hidden, inter))
        raws = [raw for _, parts in gate_up for raw in parts] + raw_d
        return torch.cat([w for w, _ in gate_up]), down, None, None, _sha256(raws)


def _sha256(raws: list[bytearray]) -> str:
    """The checksum of an expert read whole: its stored parts in `CheckpointLayout.expert_parts`'s order."""
    digest = hashlib.sha256()
    for raw in raws:
        digest.update(raw)
    return digest.hexdigest()
