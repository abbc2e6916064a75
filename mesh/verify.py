"""Swap verification without the layer in the controller: the sha256 of each swapped expert's source
bytes, streamed one expert at a time, and a probe batch through a sample of the experts, whose
reference the controller computes one expert at a time. Every holder must report the same hashes of
the bytes it read, and for the sampled experts it holds, the same probe outputs."""

from __future__ import annotations

import ctypes
import logging
import random
import time

import torch

__all__ = ["PROBE_ROWS_PER_EXPERT", "SwapVerifier", "hand_back_large_frees", "probe_sample"]

logger = logging.getLogger(__name__)

PROBE_ROWS_PER_EXPERT = 4
PROBE_TOLERANCE = 1e-5  # max abs error <= this x max |reference|


def hand_back_large_frees() -> None:
    """Have glibc serve allocations of 128 KB or more with mmap, returned to the system when freed.
    By default its threshold rises after the first large free and the heap then keeps such memory:
    measured, 2.3 experts' bytes still held after a verification that peaked at 2.9. The
    controller calls this once; elsewhere (not glibc) it does nothing."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def probe_sample(experts: list[int], num_sampled: int, seed: int) -> list[int]:
    """The experts (ascending) whose probe output is checked: `num_sampled` of `experts` drawn with
    `seed` (all of them when there are fewer). Pure policy."""
    pool = sorted(set(experts))
    return sorted(random.Random(seed).sample(pool, min(num_sampled, len(pool))))


class SwapVerifier:
    """New weights of `experts` of `layer` in checkpoint `source`: their checksums and the probe's
    reference outputs for `num_sampled` of them. Raises ValueError if `source` is another
    architecture than `spec`. Holds one expert's weights at a time, never the layer."""

    def __init__(self, spec, source: str, layer: int, experts: list[int], dtype: torch.dtype, num_sampled: int = 8):
        from experts.safetensors import CheckpointLayout

        start = time.perf_counter()
        layout = CheckpointLayout(source)
        try:
            if layout.spec != spec:
                raise ValueError(f"checkpoint {source} is a {layout.spec.model_type} of another shape, not this "
                                 f"{spec.model_type} (config hash {layout.spec.config_hash()[:12]} != "
                                 f"{spec.config_hash()[:12]})")
            self.checksums = {e: layout.checksum(layer, e) for e in sorted(set(experts))}
            nbytes = layout.bytes_read
        finally:
            layout.close()
        self.layer, self.source, self.dtype = layer, source, dtype
        self.sampled = probe_sample(experts, num_sampled, seed=layer)
        generator = torch.Generator().manual_seed(layer)
        rows = torch.randn(len(self.sampled) * PROBE_ROWS_PER_EXPERT, spec.expert_width, generator=generator)
        self._probe = dict(zip(self.sampled, rows.to(dtype).split(PROBE_ROWS_PER_EXPERT)))
        self._expected = {e: self._reference(e) for e in self.sampled}
        logger.info("swap of layer %d: %d experts hashed (%.1f MB), %d probed, in %.1f s", layer,
                    len(self.checksums), nbytes / 1e6, len(self.sampled), time.perf_counter() - start)

    def _reference(self, expert: int) -> torch.Tensor:
        """[PROBE_ROWS_PER_EXPERT, H]: the probe through `expert`'s new weights, read alone."""
        from experts import ExpertGroup

        held = ExpertGroup.from_checkpoint(self.source, {self.layer: [expert]}, self.dtype)
        if held.layers[self.layer].checksums[0] != self.checksums[expert]:
            raise ValueError(f"expert {expert}'s bytes in {self.source} changed while this controller read them")
        with torch.inference_mode():
            return held.forward(self.layer, self._probe[expert], [expert], [PROBE_ROWS_PER_EXPERT])

    def versions(self) -> dict[int, str]:
        """expert -> version of its new weights."""
        return {e: checksum[:12] for e, checksum in self.checksums.items()}

    def probe(self, subset: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """(the sampled experts of `subset`, ascending; their probe rows [n * PROBE_ROWS_PER_EXPERT, H],
        None when no expert of `subset` is sampled)."""
        probed = [e for e in sorted(subset) if e in self._probe]
        return probed, torch.cat([self._probe[e] for e in probed]) if probed else None

    def check(self, group: str, subset: list[int], result: dict) -> None:
        """Raises ValueError naming the group if what it staged is not the source's weights."""
        if result["checksums"] != [self.checksums[e] for e in sorted(subset)]:
            raise ValueError(f"group {group}: sha256 of the source bytes differs from this controller's read "
                             f"(the files changed while loading?)")
        probed, _ = self.probe(subset)
        if not probed:
            return
        out = result["probe"]
        if out is None:
            raise ValueError(f"group {group} ran no probe through experts {probed}")
        ref = torch.cat([self._expected[e] for e in probed])
        if out.shape != ref.shape:
            raise ValueError(f"group {group}: probe output is {tuple(out.shape)}, expected {tuple(ref.shape)}")
        if not torch.isfinite(out).all():
            raise ValueError(f"group {group}: probe output of the new weights has NaN or Inf")
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
        if err > PROBE_TOLERANCE:
            raise ValueError(f"group {group}: probe output differs from the in-process experts (rel err {err:.1e})")
