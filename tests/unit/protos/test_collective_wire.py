"""The collective channel's wire contract: headers round-trip; the backend follows the device."""

from __future__ import annotations

import pytest
import torch

from protos.collective import backend_for, decode_header, encode_header, header_size, version_to_int


def test_header_round_trips():
    header = torch.empty(header_size(8), dtype=torch.int64)
    encode_header(header, 3, 17, [1, 5, 7], [4, 2, 9], ["0123456789ab", "ffffffffffff", "000000000000"], 15, True)
    assert decode_header(header) == (3, 17, 15, [1, 5, 7], [4, 2, 9],
                                     ["0123456789ab", "ffffffffffff", "000000000000"], True)


def test_a_version_that_is_not_a_sha_prefix_is_refused():
    with pytest.raises(ValueError, match="12 hex digits"):
        version_to_int("simulated")


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("cuda", "nccl"), ("cuda:1", "nccl")])
def test_backend_follows_the_tensors_device(device, backend):
    assert backend_for(torch.device(device)) == backend


def test_a_reused_header_keeps_nothing_of_the_previous_batch():
    header = torch.full((header_size(8),), -1, dtype=torch.int64)
    encode_header(header, 0, 1, [0, 1, 2, 3], [1, 1, 1, 1], ["0123456789ab"] * 4, 4, True)
    encode_header(header, 2, 5, [6], [3], ["ffffffffffff"], 3, False)
    assert decode_header(header) == (2, 5, 3, [6], [3], ["ffffffffffff"], False)
    assert header[5 + 3:].eq(0).all()  # past the one expert's fields: zeros, not the last batch's
