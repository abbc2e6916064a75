"""The collective channel's wire contract: what a router and an expert group send each other over
one 2-rank torch.distributed process group (rank 0: the router, rank 1: the group).

gloo moves each tensor with a three-message rendezvous (ready to send, ready to receive, the
bytes) that wakes a thread on each side, so a small batch travels as one message each way,
copied into a buffer; a large one (rows of SPLIT_MIN_BYTES or more, where the copy would cost
more than the rendezvous) travels split, each tensor straight from and into place:

    one message  router -> group:  uint8 = header + rows (8-byte aligned) + scale (with has scale)
                 group -> router:  uint8 [reply_nbytes] = status + rows (ok) or message (error)
    split        router -> group:  header, then rows, then scale (with has scale)
                 group -> router:  status + message [status_nbytes], then rows (the sent rows
                                   back, unread, when the status is an error)

    header int64 [HEADER_FIXED + 3 * E]: layer, epoch, rows, experts in it, has scale, split;
                 then experts, counts, versions (12 hex digits of a sha256, as integers)
    status int64 [2]: ok 1 / error 0, then rows or the message's bytes

E is the model's number of experts (both sides know it), so every header has one size. The group
posts the receive of a request at its whole buffer's size (gloo accepts a shorter message; the
header says how much came). NCCL needs equal counts at both ends, so over NCCL (`exact_counts`)
the group posts the header's size and every request is split. The sizes of a reply follow from
the rows sent, so both ends know them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import struct

import torch

__all__ = ["HEADER_FIXED", "MESSAGE_BYTES", "SPLIT_MIN_BYTES", "Header", "backend_for", "check_status", "device_id",
           "exact_counts", "header_nbytes", "pack_error", "pack_header", "pack_reply", "pack_request", "pack_status",
           "process_group", "reply_nbytes", "request_nbytes", "request_views", "status_nbytes", "unpack_header",
           "unpack_reply", "version_from_int", "version_to_int", "wire_device"]

HEADER_FIXED = 6
STATUS_BYTES = 16
MESSAGE_BYTES = 512  # an error message is cut to this
SPLIT_MIN_BYTES = 256 * 1024  # rows from this size travel split: their own message, no copy
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


def status_nbytes() -> int:
    """Bytes of a split reply's status message (room for an error's message)."""
    return STATUS_BYTES + MESSAGE_BYTES


def request_nbytes(num_experts: int, num_rows: int, hidden: int, dtype: torch.dtype, has_scale: bool = True) -> int:
    """Bytes of the buffer a request of `num_rows` rows fills (with room for the scale when `has_scale`)."""
    return header_nbytes(num_experts) + _aligned(num_rows * hidden * dtype.itemsize) + 4 * num_rows * has_scale


def reply_nbytes(num_rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the one-message reply to a request of `num_rows` rows (room for an error's message)."""
    return STATUS_BYTES + max(num_rows * hidden * dtype.itemsize, MESSAGE_BYTES)


def exact_counts(device: torch.device) -> bool:
    """Whether a receive must be posted at the sent size (NCCL), not at the buffer's (gloo)."""
    return backend_for(device) == "nccl"


@dataclasses.dataclass(frozen=True)
class Header:
    layer: int
    epoch: int
    num_rows: int
    experts: list[int]
    counts: list[int]
    versions: list[str]
    has_scale: bool
    split: bool


def _write(buf: torch.Tensor, raw: bytes, offset: int = 0) -> None:
    """`raw` into buf[offset:] (a contiguous uint8 buffer): one memmove on the host (no torch op),
    one copy onto a device."""
    if offset + len(raw) > buf.shape[0]:
        raise ValueError(f"{len(raw)} bytes at {offset} do not fit a buffer of {buf.shape[0]}")
    if buf.is_cuda:
        buf[offset:offset + len(raw)].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    else:
        ctypes.memmove(buf.data_ptr() + offset, raw, len(raw))


def _read(buf: torch.Tensor, nbytes: int, offset: int = 0) -> bytes:
    """buf[offset:offset + nbytes] as bytes (read in place on the host)."""
    if offset + nbytes > buf.shape[0]:
        raise ValueError(f"{nbytes} bytes at {offset} lie past a buffer of {buf.shape[0]}")
    if buf.is_cuda:
        buf = buf[offset:offset + nbytes].cpu()
        offset = 0
    return ctypes.string_at(buf.data_ptr() + offset, nbytes)


def _int64s(raw: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(raw) // 8}q", raw)


def pack_header(buf: torch.Tensor, num_experts: int, layer: int, epoch: int, experts, counts, versions,
                num_rows: int, has_scale: bool, split: bool) -> torch.Tensor:
    """Write a header at the start of `buf` (uint8); returns it (a view: the split framing's first message)."""
    size = header_nbytes(num_experts)
    values = [layer, epoch, num_rows, len(experts), int(has_scale), int(split), *experts, *counts,
              *map(version_to_int, versions)]
    raw = struct.pack(f"<{len(values)}q", *values)
    _write(buf, raw + bytes(size - len(raw)))  # zeros past the experts' fields: nothing of an earlier batch
    return buf[:size]


def unpack_header(buf: torch.Tensor, num_experts: int, hidden: int, dtype: torch.dtype) -> Header:
    """The header at the start of `buf`; ValueError when the request it announces would not fit."""
    layer, epoch, num_rows, n, has_scale, split = _int64s(_read(buf, 8 * HEADER_FIXED))
    if not 0 <= n <= num_experts or num_rows < 0 or request_nbytes(num_experts, num_rows, hidden, dtype,
                                                                   bool(has_scale)) > buf.shape[0]:
        raise ValueError(f"a request of {num_rows} rows and {n} experts does not fit this channel's buffer")
    rest = _int64s(_read(buf, 8 * 3 * n, 8 * HEADER_FIXED))
    return Header(layer, epoch, num_rows, list(rest[:n]), list(rest[n:2 * n]),
                  [version_from_int(v) for v in rest[2 * n:]], bool(has_scale), bool(split))


def request_views(buf: torch.Tensor, num_experts: int, num_rows: int, hidden: int, dtype: torch.dtype,
                  has_scale: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows [n, H], scale [n] or None): where a request's rows and scale lie in `buf`."""
    start, row_bytes = header_nbytes(num_experts), num_rows * hidden * dtype.itemsize
    rows = buf[start:start + row_bytes].view(dtype).view(num_rows, hidden)
    start += _aligned(row_bytes)
    return rows, (buf[start:start + 4 * num_rows].view(torch.float32) if has_scale else None)


def pack_request(buf: torch.Tensor, num_experts: int, layer: int, epoch: int, experts, counts, versions,
                 rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A whole request written into `buf` (large enough); returns the filled prefix: one message.
    rows: [n, H]; scale: [n] float32 or None."""
    pack_header(buf, num_experts, layer, epoch, experts, counts, versions, rows.shape[0], scale is not None, False)
    into_rows, into_scale = request_views(buf, num_experts, rows.shape[0], rows.shape[1], rows.dtype, scale is not None)
    into_rows.copy_(rows)
    if scale is not None:
        into_scale.copy_(scale)
    return buf[:request_nbytes(num_experts, rows.shape[0], rows.shape[1], rows.dtype, scale is not None)]


def pack_status(buf: torch.Tensor, num_rows: int) -> torch.Tensor:
    """An ok status for `num_rows` rows at the start of `buf`; returns the split reply's status message."""
    _write(buf, struct.pack("<2q", 1, num_rows))
    return buf[:status_nbytes()]


def pack_reply(buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An ok status and the outputs [n, H] written into `buf`; returns the one-message reply (reply_nbytes)."""
    nbytes = out.numel() * out.element_size()
    pack_status(buf, out.shape[0])
    buf[STATUS_BYTES:STATUS_BYTES + nbytes].view(out.dtype).view(out.shape).copy_(out)
    return buf[:reply_nbytes(out.shape[0], out.shape[1], out.dtype)]


def pack_error(buf: torch.Tensor, message: str, nbytes: int) -> torch.Tensor:
    """An error status and `message` (cut to MESSAGE_BYTES) written into `buf`; returns its first
    `nbytes` (reply_nbytes of the request's rows, or status_nbytes when it came split)."""
    raw = message.encode()[:MESSAGE_BYTES]
    _write(buf, struct.pack("<2q", 0, len(raw)) + raw)
    return buf[:nbytes]


def check_status(buf: torch.Tensor, num_rows: int) -> None:
    """ValueError with the group's message when the status at the start of `buf` is an error, or
    when it answers another number of rows than `num_rows`."""
    ok, size = _int64s(_read(buf, STATUS_BYTES))
    if ok != 1:
        raise ValueError(_read(buf, min(max(size, 0), MESSAGE_BYTES), STATUS_BYTES).decode(errors="replace"))
    if size != num_rows:
        raise ValueError(f"the group answered {size} rows for {num_rows}")


def unpack_reply(buf: torch.Tensor, num_rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """The outputs [num_rows, H] (a view of `buf`) of a one-message reply; ValueError as check_status."""
    check_status(buf, num_rows)
    return buf[STATUS_BYTES:STATUS_BYTES + num_rows * hidden * dtype.itemsize].view(dtype).view(num_rows, hidden)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors: one code path, the backend by the device."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def device_id(device: torch.device | str) -> str:
    """What a channel's end tells the other of its device: "cpu", or "cuda:" and the GPU's UUID (two
    processes on one GPU see different indices for it, never different UUIDs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return f"cuda:{torch.cuda.get_device_properties(device).uuid}"  # CUDA only: not run here


def wire_device(router_id: str, group_id: str) -> tuple[str, str]:
    """The device type a channel's tensors travel on, and why: "cuda" (NCCL, GPU to GPU, no host copy)
    where both ends compute on distinct GPUs; else "cpu" (gloo; rows on a GPU cross the host). NCCL
    refuses two ranks on one GPU: such a pair falls back to gloo. Pure policy (ids: `device_id`)."""
    if not (router_id.startswith("cuda:") and group_id.startswith("cuda:")):
        return "cpu", "gloo: an end computes on the host"
    if router_id == group_id:
        return "cpu", "gloo: both ends on one GPU (NCCL refuses two ranks on one device)"
    return "cuda", "nccl"


def process_group(store, rank: int, device: torch.device, timeout_s: float):
    """The 2-rank process group of one channel over `store` (blocks until both ranks joined)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if backend_for(device) == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    return dist.ProcessGroupGloo(store, rank, 2, timeout)
