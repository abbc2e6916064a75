"""Tensors on the wire: round trips per dtype, errors naming the field, one copy per decode."""

from __future__ import annotations

import pytest
import torch

from protos import expert_mesh_pb2 as pb
from protos.wire import decode_into, from_proto, to_proto
from protos.errors import WireError


def _parsed(tensor: torch.Tensor) -> pb.Tensor:
    """`tensor` encoded, serialised and parsed again, as a receiver sees it."""
    message = pb.Tensor()
    message.ParseFromString(to_proto(tensor).SerializeToString())
    return message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype_round_trips_bit_for_bit(dtype):
    x = torch.randn(5, 3).to(dtype)
    assert torch.equal(from_proto(_parsed(x)), x)
    out = torch.empty_like(x)
    decode_into(_parsed(x), out)
    assert torch.equal(out, x)


def test_a_copy_is_the_callers_own_to_write():
    message = _parsed(torch.ones(4, 2))
    mine = from_proto(message, copy=True)
    mine += 1
    assert torch.equal(from_proto(message), torch.ones(4, 2))


def test_wrong_bytes_shapes_and_dtypes_name_the_field():
    message = _parsed(torch.ones(4, 2))
    message.data = message.data[:-1]
    with pytest.raises(WireError, match="ExpertResult.hidden.data has 31 bytes, expected 32"):
        from_proto(message, "ExpertResult.hidden")
    with pytest.raises(WireError, match=r"ExpertResult.hidden must be float32 \[4, 3\]"):
        decode_into(_parsed(torch.ones(4, 2)), torch.empty(4, 3), "ExpertResult.hidden")
    empty = pb.Tensor(dtype="float32", shape=[0, 2**31 - 1, 2**31 - 1, 64])  # strides past int64
    with pytest.raises(WireError, match="hidden.shape .* more elements than a tensor can address"):
        from_proto(empty, "hidden")
    with pytest.raises(WireError, match=r"hidden.shape must have at most 8 dims, each in \[0, 2147483647\]"):
        from_proto(pb.Tensor(dtype="float32", shape=[0, 2**61, 64]), "hidden")
    message = _parsed(torch.ones(2))
    message.dtype = "int8"
    with pytest.raises(WireError, match="hidden.dtype must be one of"):
        from_proto(message, "hidden")

