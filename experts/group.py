"""ExpertGroup: the expert copies that one process hosts, computing its share of a dispatched batch.

Shapes: N = token copies sent here (sorted by expert), H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from experts.checkpoint import CheckpointReader, ExpertWeights
from experts.quantized import fp8_on
from experts.spec import MoESpec
from kernels import cpu_packed, grouped_mlp
from kernels.expert_mlp import BlockScales, GatedActivation

__all__ = ["ExpertGroup", "LayerExperts", "expert_nbytes"]

# Pack weights for oneDNN only from this size of one expert's down matrix (H * I elements): below
# it a packed call costs more than it saves (measured: 3x slower at H=64, I=128).
PACK_MIN_ELEMENTS = 1 << 20


def expert_nbytes(spec: MoESpec, dtype: torch.dtype, on_gpu: bool, fp8_block: tuple[int, int] | None = None) -> int:
    """Bytes one expert copy of `spec` takes where a group holds it, before loading it: block fp8 kept
    as stored (`fp8_block`: rows x columns per scale, on a GPU with fp8) one byte a weight and a
    float32 scale a block; else `dtype`'s bytes a weight, twice on the host where the CPU path packs
    a copy (PACK_MIN_ELEMENTS). Biases are not counted (H + 2I values)."""
    gate_up, down = (spec.gate_up_rows, spec.expert_width), (spec.expert_width, spec.intermediate_size)
    if on_gpu and fp8_block is not None:
        rows, cols = fp8_block
        return sum(r * c + 4 * -(-r // rows) * -(-c // cols) for r, c in (gate_up, down))
    weights = (gate_up[0] * gate_up[1] + down[0] * down[1]) * dtype.itemsize
    is_packed = not on_gpu and down[0] * down[1] >= PACK_MIN_ELEMENTS and dtype in (torch.float32, torch.bfloat16)
    return weights * (2 if is_packed else 1)


@dataclasses.dataclass
class LayerExperts:
    """The experts of one layer held by a group, in ascending expert id (the dispatch order)."""

    experts: list[int]
    w_gate_up: torch.Tensor        # [n, 2I, H]
    w_down: torch.Tensor           # [n, H, I]
    checksums: list[str]
    b_gate_up: torch.Tensor | None = None  # [n, 2I], gpt-oss
    b_down: torch.Tensor | None = None     # [n, H]
    scales: BlockScales | None = None      # the weights are block fp8, kept as stored (a GPU with fp8)
    compute_dtype: torch.dtype = torch.bfloat16  # what block fp8 weights compute in (the rows' dtype)
    slot: dict[int, int] = dataclasses.field(init=False)
    packed: cpu_packed.PackedExperts | None = dataclasses.field(init=False, default=None)

    def __post_init__(self):
        self.slot = {e: i for i, e in enumerate(self.experts)}
        if not self.w_gate_up.is_cuda and self.w_gate_up.dtype in (torch.float32, torch.bfloat16) \
                and self.w_down[0].numel() >= PACK_MIN_ELEMENTS and cpu_packed.is_available():
            self.packed = cpu_packed.PackedExperts(self.w_gate_up, self.w_down, self.b_gate_up, self.b_down)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows are computed in: the weights' (block fp8: `compute_dtype`)."""
        return self.w_gate_up.dtype if self.scales is None else self.compute_dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: weights, biases, block scales and the packed copy of the CPU path."""
        parts = [self.b_gate_up, self.b_down] + ([self.scales.gate_up, self.scales.down] if self.scales else [])
        weights = (self.w_gate_up.nbytes + self.w_down.nbytes) * (2 if self.packed else 1)
        return weights + sum(t.nbytes for t in parts if t is not None)

    def version(self, expert: int) -> str:
        """Weight version of a held expert: the first 12 hex digits of its source bytes' sha256."""
        return self.checksums[self.slot[expert]][:12]

    def mlp(self, x: torch.Tensor, counts: torch.Tensor, activation: GatedActivation) -> torch.Tensor:
        """Grouped MLP of x [N, H] sorted by slot, counts [n] rows per held expert."""
        if self.packed is not None:
            return cpu_packed.grouped_mlp_packed(x, self.packed, counts, activation)
        return grouped_mlp(x, self.w_gate_up, self.w_down, counts, activation, self.b_gate_up, self.b_down,
                           self.scales)

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.experts, self.w_gate_up, self.w_down, self.checksums, self.b_gate_up, self.b_down,
                             self.scales)

    @classmethod
    def from_weights(cls, weights: ExpertWeights, dtype: torch.dtype | None,
                     device: torch.device | str | None = None) -> "LayerExperts":
        """Held in ascending expert order, in `dtype` (None: as given), on `device` (None: where given);
        block fp8 weights stay fp8 where the device has fp8 (`fp8_on`), computing in `dtype` (None:
        bfloat16), and are dequantized to it elsewhere."""
        order = sorted(range(len(weights.experts)), key=weights.experts.__getitem__)
        target = torch.device(device) if device is not None else weights.w_gate_up.device
        held = weights.select(order)
        held = (held if fp8_on(target) else held.dequantized(dtype or torch.bfloat16)).cast(dtype, device)
        return cls(held.experts, held.w_gate_up, held.w_down, held.checksums, held.b_gate_up, held.b_down,
                   held.scales, dtype or torch.bfloat16)


class ExpertGroup:
    """Experts of one or several layers held in one process.

    Every expert copy carries a checksum of its source bytes; `version(layer, expert)` is its
    first 12 hex digits, so two loads of the same bytes have the same version.
    """

    def __init__(self, spec: MoESpec, layers: dict[int, LayerExperts], dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu"):
        self.spec = spec
        self.layers = layers
        self.dtype = dtype  # None: the checkpoint's
        self.device = torch.device(device)  # where the weights are held and the experts compute
        self.staged: dict[int, LayerExperts] = {}  # layer -> new weights of some experts (hot swap)
        self.bytes_read = 0  # checkpoint bytes its first load read (quantized data and scales as stored)
        self.activation = spec.gated_activation()

    @classmethod
    def from_checkpoint(cls, path: str | Path, assignment: dict[int, list[int]],
                        dtype: torch.dtype | None = None, reader: CheckpointReader | None = None,
                        device: torch.device | str = "cpu") -> "ExpertGroup":
        """Load only the experts in `assignment` ({layer: [expert ids]}) from a checkpoint folder onto
        `device`, one expert at a time."""
        reader = reader or CheckpointReader(path, dtype=dtype, keep_fp8=fp8_on(device))
        try:
            layers = {layer: LayerExperts.from_weights(reader.experts(layer, sorted(ids), device), dtype, device)
                      for layer, ids in assignment.items()}
        finally:
            reader.close()
        group = cls(reader.spec, layers, dtype, device)
        group.bytes_read = reader.bytes_read
        return group

    def add_experts(self, layer: int, weights: ExpertWeights) -> None:
        """Hold more experts of `layer` (new copies); the layer's table is swapped in one assignment,
        so a batch in flight keeps computing on the one it started with."""
        held = self.layers.get(layer)
        if held is not None:
            clash = sorted(set(held.experts) & set(weights.experts))
            if clash:
                raise ValueError(f"this group already holds experts {clash} of layer {layer}")
            weights = held.weights().concat(weights)
        self.layers[layer] = LayerExperts.from_weights(weights, self.dtype, self.device)

    def remove_experts(self, layer: int, experts: list[int]) -> None:
        """Release copies of `experts` of `layer` (the caller has drained their traffic)."""
        held = self._held(layer, experts)
        keep = [i for i, e in enumerate(held.experts) if e not in set(experts)]
        if not keep:
            del self.layers[layer]
            return
        self.layers[layer] = LayerExperts.from_weights(held.weights().select(keep), self.dtype)

    def version(self, layer: int, expert: int) -> str:
        return self.layers[layer].version(expert)

    def checksum(self) -> str:
        """One digest over every expert copy held: equal groups have equal checksums."""
        digest = hashlib.sha256()
        for layer in sorted(self.layers):
            for expert, checksum in zip(self.layers[layer].experts, self.layers[layer].checksums):
                digest.update(f"{layer}/{expert}/{checksum};".encode())
        return digest.hexdigest()

    def nbytes(self) -> int:
        """Bytes of expert weights held, counting the packed copy that the CPU path keeps."""
        return sum(held.nbytes for held in self.layers.values())

    def forward(self, layer: int, x: torch.Tensor, experts: list[int], counts: list[int],
                scale: torch.Tensor | None = None, versions: list[str] | None = None) -> torch.Tensor:
        """Expert outputs for a batch sorted by expert.

        x: [N, H] rows of experts[0] first, then experts[1], ... (ascending expert ids, all held
        here); counts: rows per expert, sum N; scale: [N] gate weights applied to the input
        (Llama 4) or None; versions: the weight version each expert must be computed with (the
        routing table's; during a hot swap the staged new weights or the current ones), None:
        current. x may be on any device: it computes on the group's. Returns [N, H] in the weights'
        dtype, on x's device.
        """
        if sum(counts) != x.shape[0] or len(counts) != len(experts):
            raise ValueError(f"counts {counts} do not match {x.shape[0]} rows for experts {experts}")
        if x.dim() != 2 or x.shape[1] != self.spec.expert_width:
            raise ValueError(f"x must be [N, {self.spec.expert_width}], got shape {tuple(x.shape)}")
        if experts != sorted(experts):
            raise ValueError(f"experts must come in ascending order, got {experts}")
        runs = self._runs(layer, experts, counts, versions)
        given = x.device
        x = x.to(device=self.device, dtype=runs[0][0].dtype)
        if scale is not None:
            x = x * scale.to(x.dtype).unsqueeze(1)
        outs, start = [], 0
        for held, run_experts, run_counts in runs:
            rows = sum(run_counts)
            local_counts = [0] * len(held.experts)  # rows per held expert, in slot order
            for expert, count in zip(run_experts, run_counts):
                local_counts[held.slot[expert]] = count
            outs.append(held.mlp(x[start:start + rows], torch.tensor(local_counts), self.activation))
            start += rows
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(given)

    def _runs(self, layer: int, experts: list[int], counts: list[int],
              versions: list[str] | None) -> list[tuple[LayerExperts, list[int], list[int]]]:
        """Consecutive experts computed by the same weights: (held, experts, counts) runs."""
        active = self._held(layer, experts)
        staged = self.staged.get(layer)
        runs: list[tuple[LayerExperts, list[int], list[int]]] = []
        for i, (expert, count) in enumerate(zip(experts, counts)):
            held = active
            if versions and versions[i] != active.version(expert):
                if staged is None or expert not in staged.slot or versions[i] != staged.version(expert):
                    raise ValueError(f"expert {expert} of layer {layer}: version {versions[i]} is not held "
                                     f"(current {active.version(expert)})")
                held = staged
            if runs and runs[-1][0] is held:
                runs[-1][1].append(expert)
                runs[-1][2].append(count)
            else:
                runs.append((held, [expert], [count]))
        return runs or [(active, [], [])]

    # -- hot swap: new weights beside the old ----------------------------------------------------

    def stage(self, layer: int, weights: ExpertWeights) -> None:
        """Hold new weights of some experts of `layer` beside the current ones (not yet served)."""
        self._held(layer, weights.experts)
        self.staged[layer] = LayerExperts.from_weights(weights, self.dtype, self.device)

    def commit(self, layer: int) -> None:
        """The staged weights of `layer` become the current ones, the old ones released, in one
        assignment of the layer: a forward in another thread sees the old layer (with the staged
        weights beside it) or the new one, never experts missing."""
        staged, held = self.staged[layer], self.layers[layer]
        keep = [i for i, e in enumerate(held.experts) if e not in staged.slot]
        weights = held.weights().select(keep).concat(staged.weights()) if keep else staged.weights()
        self.layers[layer] = LayerExperts.from_weights(weights, self.dtype, self.device)
        del self.staged[layer]

    def unstage(self, layer: int) -> None:
        self.staged.pop(layer, None)

    def _held(self, layer: int, experts: list[int]) -> LayerExperts:
        held = self.layers.get(layer)
        if held is None:
            raise ValueError(f"this group holds no expert of layer {layer} (it holds layers {sorted(self.layers)})")
        missing = [e for e in experts if e not in held.slot]
        if missing:
            raise ValueError(f"this group does not hold experts {missing} of layer {layer} (it holds {held.experts})")
        return held
