"""The collective channel's wire contract: what a router and an expert group send each other over
one 2-rank torch.distributed process group (rank 0: the router, rank 1: the group). One message
each way: gloo moves each tensor with a three-message rendezvous (ready to send, ready to
receive, the bytes), so every tensor more per call costs a round of wake-ups on both sides.

    router -> group:  uint8 [request_nbytes]  = header int64 [HEADER_FIXED + 3 * E]  (layer, epoch,
                                                  rows, experts in it, has scale; then experts,
                                                  counts, versions)
                                              + rows [rows, H] in the model's dtype (8-byte aligned)
                                              + scale [rows] float32                 (only with has scale)
    group -> router:  uint8 [reply_nbytes]    = status int64 [2]  (ok 1 / error 0, rows or message bytes)
                                              + rows [rows, H]    (ok)  or  message utf-8 (error)

E is the model's number of experts (both sides know it), so every header has one size. The group
receives a request into a buffer as large as the largest it may get (gloo accepts a shorter
message; the header says how much is filled). NCCL needs equal counts at both ends, so over NCCL
(`exact_counts`) the header goes first and the rest follows at the size it announced. A reply's
size follows from the rows sent, so both ends know it. Weight versions (12 hex digits of a
sha256) travel as integers.
"""

from __future__ import annotations

import datetime

import torch

__all__ = ["HEADER_FIXED", "MESSAGE_BYTES", "announced_nbytes", "backend_for", "exact_counts", "header_nbytes",
           "pack_error", "pack_reply", "pack_request", "process_group", "reply_nbytes", "request_nbytes", "unpack_reply",
           "unpack_request", "version_from_int", "version_to_int"]

HEADER_FIXED = 5
STATUS_BYTES = 16
MESSAGE_BYTES = 512  # an error message is cut to this
VERSION_HEX = 12


def version_to_int(version: str) -> int:
    if len(version) != VERSION_HEX:
        raise ValueError(f"weight version {version!r} is not {VERSION_HEX} hex digits")
    return int(version, 16)


def version_from_int(value: int) -> str:
    return f"{value:0{VERSION_HEX}x}"


def _aligned(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8


def header_nbytes(num_experts: int) -> int:
    return 8 * (HEADER_FIXED + 3 * num_experts)


def exact_counts(device: torch.device) -> bool:
    """Whether a receive must be posted at the sent size (NCCL), not at the buffer's (gloo)."""
    return backend_for(device) == "nccl"


def request_nbytes(num_experts: int, num_rows: int, hidden: int, dtype: torch.dtype, has_scale: bool = True) -> int:
    """Bytes of a request of `num_rows` rows (with room for the scale when `has_scale`)."""
    return header_nbytes(num_experts) + _aligned(num_rows * hidden * dtype.itemsize) + 4 * num_rows * has_scale


def reply_nbytes(num_rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the reply to a request of `num_rows` rows (room for an error's message too)."""
    return STATUS_BYTES + max(num_rows * hidden * dtype.itemsize, MESSAGE_BYTES)


def pack_request(buf: torch.Tensor, num_experts: int, layer: int, epoch: int, experts, counts, versions,
                 rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Write a request into `buf` (uint8, large enough); returns the filled prefix to send.
    rows: [n, H]; scale: [n] float32 or None."""
    n, header = len(experts), header_nbytes(num_experts)
    values = [layer, epoch, rows.shape[0], n, int(scale is not None), *experts, *counts, *map(version_to_int, versions)]
    values += [0] * (header // 8 - len(values))
    buf[:header].view(torch.int64).copy_(torch.tensor(values, dtype=torch.int64))
    end = header + _aligned(rows.numel() * rows.element_size())
    buf[header:header + rows.numel() * rows.element_size()].view(rows.dtype).view(rows.shape).copy_(rows)
    if scale is not None:
        buf[end:end + 4 * scale.shape[0]].view(torch.float32).copy_(scale)
        end += 4 * scale.shape[0]
    return buf[:end]


def announced_nbytes(buf: torch.Tensor, num_experts: int, hidden: int, dtype: torch.dtype) -> int:
    """The size of the request whose header is at the start of `buf` (ValueError past `buf`)."""
    _layer, _epoch, num_rows, n, has_scale = buf[:8 * HEADER_FIXED].view(torch.int64).tolist()
    nbytes = request_nbytes(num_experts, num_rows, hidden, dtype, bool(has_scale))
    if not 0 <= n <= num_experts or num_rows < 0 or nbytes > buf.shape[0]:
        raise ValueError(f"a request of {num_rows} rows and {n} experts does not fit this channel's buffer")
    return nbytes


def unpack_request(buf: torch.Tensor, num_experts: int, hidden: int,
                   dtype: torch.dtype) -> tuple[int, int, list[int], list[int], list[str], torch.Tensor, torch.Tensor | None]:
    """(layer, epoch, experts, counts, versions, rows [n, H], scale [n] or None) of a received
    request; rows and scale are views of `buf`. ValueError when the header does not fit the buffer."""
    announced_nbytes(buf, num_experts, hidden, dtype)
    header = header_nbytes(num_experts)
    layer, epoch, num_rows, n, has_scale = buf[:8 * HEADER_FIXED].view(torch.int64).tolist()
    rest = buf[8 * HEADER_FIXED:8 * (HEADER_FIXED + 3 * n)].view(torch.int64).tolist()
    row_bytes = num_rows * hidden * dtype.itemsize
    rows = buf[header:header + row_bytes].view(dtype).view(num_rows, hidden)
    start = header + _aligned(row_bytes)
    scale = buf[start:start + 4 * num_rows].view(torch.float32) if has_scale else None
    return layer, epoch, rest[:n], rest[n:2 * n], [version_from_int(v) for v in rest[2 * n:]], rows, scale


def pack_reply(buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the outputs [n, H] into `buf` after an ok status; returns the prefix to send (reply_nbytes)."""
    nbytes = out.numel() * out.element_size()
    buf[:STATUS_BYTES].view(torch.int64).copy_(torch.tensor([1, out.shape[0]]))
    buf[STATUS_BYTES:STATUS_BYTES + nbytes].view(out.dtype).view(out.shape).copy_(out)
    return buf[:reply_nbytes(out.shape[0], out.shape[1], out.dtype)]


def pack_error(buf: torch.Tensor, message: str, num_rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """Write an error status and `message` (cut to MESSAGE_BYTES) into `buf`, as the reply to a
    request of `num_rows` rows; returns the prefix to send (reply_nbytes)."""
    raw = message.encode()[:MESSAGE_BYTES]
    buf[:STATUS_BYTES].view(torch.int64).copy_(torch.tensor([0, len(raw)]))
    buf[STATUS_BYTES:STATUS_BYTES + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return buf[:reply_nbytes(num_rows, hidden, dtype)]


def unpack_reply(buf: torch.Tensor, num_rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """The outputs [num_rows, H] (a view of `buf`) of a received reply; ValueError with the group's
    message when it answered with an error, or with another number of rows."""
    ok, size = buf[:STATUS_BYTES].view(torch.int64).tolist()
    if ok != 1:
        raise ValueError(bytes(buf[STATUS_BYTES:STATUS_BYTES + min(size, MESSAGE_BYTES)].tolist()).decode(
            errors="replace"))
    if size != num_rows:
        raise ValueError(f"the group answered {size} rows for {num_rows}")
    return buf[STATUS_BYTES:STATUS_BYTES + num_rows * hidden * dtype.itemsize].view(dtype).view(num_rows, hidden)


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
