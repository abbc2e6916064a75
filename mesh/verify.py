"""Swap verification: the new weights as this controller reads them, a probe batch, and the check
of what every holder staged (sha256 of the source bytes, probe output equal to the in-process experts)."""

from __future__ import annotations

import torch

__all__ = ["PROBE_ROWS_PER_EXPERT", "SwapVerifier"]

PROBE_ROWS_PER_EXPERT = 4
PROBE_TOLERANCE = 1e-5  # max abs error <= this x max |reference|


class SwapVerifier:
    """New weights of `experts` of `layer` from checkpoint `source`, read in-process. Raises
    ValueError if `source` is another architecture than `spec`."""

    def __init__(self, spec, source: str, layer: int, experts: list[int], dtype: torch.dtype):
        from experts import CheckpointReader, ExpertGroup

        reader = CheckpointReader(source, dtype=dtype)
        try:
            if reader.spec != spec:
                raise ValueError(f"checkpoint {source} is a {reader.spec.model_type} of another shape, not this "
                                 f"{spec.model_type} (config hash {reader.spec.config_hash()[:12]} != "
                                 f"{spec.config_hash()[:12]})")
            self.expected = ExpertGroup.from_checkpoint(source, {layer: experts}, dtype, reader=reader)
        finally:
            reader.close()
        self.layer, self.experts = layer, list(experts)
        generator = torch.Generator().manual_seed(layer)
        self._probe = torch.randn(len(experts) * PROBE_ROWS_PER_EXPERT, spec.hidden_size, generator=generator).to(dtype)

    def versions(self) -> dict[int, str]:
        """expert -> version of its new weights."""
        return {e: self.expected.version(self.layer, e) for e in self.experts}

    def probe(self, layer: int, subset: list[int]) -> torch.Tensor:
        """Probe rows [len(subset) * PROBE_ROWS_PER_EXPERT, H] of the experts in `subset` (ascending)."""
        n = PROBE_ROWS_PER_EXPERT
        index = [self.experts.index(e) * n + r for e in subset for r in range(n)]
        return self._probe[torch.tensor(index)]

    def check(self, group: str, layer: int, subset: list[int], result: dict) -> None:
        """Raises ValueError naming the group if what it staged is not the source's weights."""
        held = self.expected.layers[layer]
        if result["checksums"] != [held.checksums[held.slot[e]] for e in subset]:
            raise ValueError(f"group {group}: sha256 of the source bytes differs from this controller's read "
                             f"(the files changed while loading?)")
        probe = self.probe(layer, subset)
        ref = self.expected.forward(layer, probe, subset, [PROBE_ROWS_PER_EXPERT] * len(subset))
        out = result["probe"]
        if not torch.isfinite(out).all():
            raise ValueError(f"group {group}: probe output of the new weights has NaN or Inf")
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
        if err > PROBE_TOLERANCE:
            raise ValueError(f"group {group}: probe output differs from the in-process experts (rel err {err:.1e})")
