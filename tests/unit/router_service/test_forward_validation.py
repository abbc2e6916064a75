"""`validate_forward` on token ids: a layer that picks experts by token id (DeepSeek-V4's hash
layers) needs them, checked like the hidden states; every other layer serves without them."""

from __future__ import annotations

import pytest
import torch

from protos.errors import InvalidRequestError
from protos import expert_mesh_pb2 as pb
from protos.wire import TOKEN_DTYPES, to_proto
from router_service.server import validate_forward

H, VOCAB = 8, 128
MOE_LAYERS, VOCAB_SIZES = (0, 1), {0: VOCAB}  # layer 0 is hash-routed


def request(layer: int, shape: list[int], token_ids: torch.Tensor | pb.Tensor | None = None) -> pb.ForwardRequest:
    message = pb.ForwardRequest(layer=layer, hidden=to_proto(torch.randn(*shape)))
    if isinstance(token_ids, torch.Tensor):
        to_proto(token_ids, out=message.token_ids, dtypes=TOKEN_DTYPES)
    elif token_ids is not None:
        message.token_ids.CopyFrom(token_ids)
    return message


def validate(message: pb.ForwardRequest):
    return validate_forward(message, MOE_LAYERS, H, max_request_tokens=64, vocab_sizes=VOCAB_SIZES)


def test_hash_layer_gets_its_token_ids_flat():
    ids = torch.randint(0, VOCAB, (2, 3))
    x, token_ids = validate(request(0, [2, 3, H], ids))
    assert x.shape == (6, H) and torch.equal(token_ids, ids.reshape(-1))


def test_other_layers_need_no_token_ids_and_ignore_them():
    assert validate(request(1, [4, H]))[1] is None
    assert validate(request(1, [4, H], pb.Tensor(dtype="float32", shape=[9])))[1] is None


BAD_TOKEN_IDS = [
    ("missing", None, ["token_ids are needed", "layer 0"]),
    ("too short", torch.zeros(3, dtype=torch.int64), ["token_ids.shape", "[4]", "got [3]"]),
    ("[B, S] for [T, H]", torch.zeros(2, 2, dtype=torch.int64), ["token_ids.shape", "[4]", "got [2, 2]"]),
    ("beyond the vocabulary", torch.tensor([0, 1, VOCAB, 2]), ["token_ids", f"[0, {VOCAB})", f"{VOCAB}"]),
    ("negative", torch.tensor([0, -1, 5, 2]), ["token_ids", f"[0, {VOCAB})", "-1..5"]),
    ("float32", pb.Tensor(dtype="float32", shape=[4], data=bytes(16)), ["token_ids.dtype", "int64", "'float32'"]),
    ("int32", pb.Tensor(dtype="int32", shape=[4], data=bytes(16)), ["token_ids.dtype", "int64", "'int32'"]),
    ("data short", pb.Tensor(dtype="int64", shape=[4], data=bytes(31)), ["token_ids.data", "31 bytes", "32"]),
]


@pytest.mark.parametrize("case,token_ids,words", BAD_TOKEN_IDS, ids=[c[0] for c in BAD_TOKEN_IDS])
def test_bad_token_ids_are_refused_naming_the_field(case, token_ids, words):
    with pytest.raises(InvalidRequestError) as error:
        validate(request(0, [4, H], token_ids))
    assert all(word in str(error.value) for word in words), (case, str(error.value))
