"""Tensors on the wire: raw row-major bytes + dtype name + shape, never element by element."""

from __future__ import annotations

import math
import warnings

import torch

from protos.errors import WireError
from protos import expert_mesh_pb2 as pb

__all__ = ["DTYPES", "TOKEN_DTYPES", "WireError", "decode_into", "from_proto", "to_proto"]

MAX_DIMS, MAX_DIM = 8, (1 << 31) - 1  # no tensor of the mesh is bigger: element counts and strides fit int64

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKEN_DTYPES: dict[str, torch.dtype] = {"int64": torch.int64}  # ForwardRequest.token_ids
_NAMES = {v: k for k, v in {**DTYPES, **TOKEN_DTYPES}.items()}


def to_proto(tensor: torch.Tensor, out: pb.Tensor | None = None,
             dtypes: dict[str, torch.dtype] = DTYPES) -> pb.Tensor:
    """Encode a CPU tensor of one of `dtypes` (one copy into the message's bytes)."""
    if tensor.dtype not in dtypes.values():
        raise WireError(f"dtype {tensor.dtype} cannot be sent; supported: {', '.join(dtypes)}")
    out = pb.Tensor() if out is None else out
    raw = tensor.detach().contiguous()
    if raw.device.type != "cpu":
        raw = raw.cpu()
    # bytes through a uint8 view: works for bf16, which numpy cannot represent
    out.data = raw.view(torch.uint8).numpy().tobytes() if raw.numel() else b""
    out.dtype = _NAMES[tensor.dtype]
    out.shape[:] = list(tensor.shape)
    return out


def decode_into(message: pb.Tensor, out: torch.Tensor, field: str = "tensor") -> None:
    """Decode straight into `out` (contiguous, on CPU; one copy): WireError naming `field` unless
    the message has out's dtype and shape."""
    import numpy as np

    if message.dtype != _NAMES.get(out.dtype) or tuple(message.shape) != tuple(out.shape):
        raise WireError(f"{field} must be {_NAMES.get(out.dtype)} {list(out.shape)}, got {message.dtype} "
                        f"{list(message.shape)}")
    data = message.data  # upb copies the field's bytes on every access: once
    if len(data) != out.numel() * out.element_size():
        raise WireError(f"{field}.data has {len(data)} bytes, expected {out.numel() * out.element_size()}")
    if out.numel():
        out.view(torch.uint8).numpy().reshape(-1)[:] = np.frombuffer(data, dtype=np.uint8)


def from_proto(message: pb.Tensor, field: str = "tensor", copy: bool = False,
               dtypes: dict[str, torch.dtype] = DTYPES) -> torch.Tensor:
    """Decode; WireError naming `field` if dtype (one of `dtypes`), shape or byte count are wrong.
    The tensor is a read-only view of the message's bytes (no copy: the mesh never writes into its
    inputs); `copy`: a tensor of its own (what a client hands its caller)."""
    dtype = dtypes.get(message.dtype)
    if dtype is None:
        raise WireError(f"{field}.dtype must be one of {', '.join(dtypes)}, got {message.dtype!r}")
    shape = tuple(message.shape)
    if len(shape) > MAX_DIMS or any(not 0 <= d <= MAX_DIM for d in shape):
        raise WireError(f"{field}.shape must have at most {MAX_DIMS} dims, each in [0, {MAX_DIM}], "
                        f"got {list(shape)[:MAX_DIMS + 1]}")
    numel = math.prod(shape)
    itemsize = dtype.itemsize
    span = numel or math.prod(max(d, 1) for d in shape)  # the strides of an empty tensor too
    if span * itemsize >= 1 << 62:
        raise WireError(f"{field}.shape {list(shape)} has more elements than a tensor can address")
    data = message.data  # upb copies the field's bytes on every access: once
    if len(data) != numel * itemsize:
        raise WireError(f"{field}.data has {len(data)} bytes, expected {numel * itemsize} "
                        f"for shape {list(shape)} {message.dtype}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if copy:
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable": it is not written
        return torch.frombuffer(data, dtype=dtype).reshape(shape)
