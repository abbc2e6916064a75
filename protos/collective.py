"""The collective channel's wire contract: what a router and an expert group send each other over
one 2-rank torch.distributed process group (rank 0: the router, rank 1: the group).

    router -> group:  header int64 [HEADER_FIXED + 3 * E]   (layer, epoch, rows, experts in it,
                                                            has scale; then experts, counts, versions)
                      rows [rows, H] in the model's dtype
                      scale [rows] float32                  (only when has scale)
    group -> router:  status int64 [2]                      (ok 1 / error 0, rows or message bytes)
                      rows [rows, H]                        (ok)  or  message uint8 [MESSAGE_BYTES] (error)

E is the model's number of experts (both sides know it), so every header has one size. Weight
versions (12 hex digits of a sha256) travel as integers.
"""

from __future__ import annotations

import datetime

import torch

__all__ = ["HEADER_FIXED", "MESSAGE_BYTES", "backend_for", "decode_header", "encode_header", "header_size",
           "process_group", "version_from_int", "version_to_int"]

HEADER_FIXED = 5
MESSAGE_BYTES = 512
VERSION_HEX = 12


def header_size(num_experts: int) -> int:
    return HEADER_FIXED + 3 * num_experts


def version_to_int(version: str) -> int:
    if len(version) != VERSION_HEX:
        raise ValueError(f"weight version {version!r} is not {VERSION_HEX} hex digits")
    return int(version, 16)


def version_from_int(value: int) -> str:
    return f"{value:0{VERSION_HEX}x}"


def encode_header(out: torch.Tensor, layer: int, epoch: int, experts, counts, versions, num_rows: int,
                  has_scale: bool) -> None:
    """Fill `out` (int64 [header_size(E)]) in place (one copy from one list)."""
    n = len(experts)
    values = [layer, epoch, num_rows, n, int(has_scale), *experts, *counts, *map(version_to_int, versions)]
    values += [0] * (out.shape[0] - len(values))
    out.copy_(torch.tensor(values, dtype=torch.int64))


def decode_header(header: torch.Tensor) -> tuple[int, int, int, list[int], list[int], list[str], bool]:
    """(layer, epoch, rows, experts, counts, versions, has_scale) of a received header."""
    values = header.tolist()
    layer, epoch, num_rows, n, has_scale = values[:HEADER_FIXED]
    rest = values[HEADER_FIXED:HEADER_FIXED + 3 * n]
    return (layer, epoch, num_rows, rest[:n], rest[n:2 * n], [version_from_int(v) for v in rest[2 * n:]],
            bool(has_scale))


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors: one code path, the backend by the device."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def process_group(store, rank: int, device: torch.device, timeout_s: float):
    """The 2-rank process group of one channel over `store` (blocks until both ranks joined)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend_for(device) == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    return dist.ProcessGroupGloo(store, rank, 2, timeout)
