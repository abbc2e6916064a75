"""The collective channel's wire contract: requests and replies round-trip through one buffer each,
a reused buffer keeps nothing of the last batch, an error reply carries the group's message, and
the backend follows the device."""

from __future__ import annotations

import pytest
import torch

from protos.collective import (MESSAGE_BYTES, backend_for, check_status, exact_counts, header_nbytes, pack_error,
                               pack_header, pack_reply, pack_request, pack_status, reply_nbytes, request_nbytes,
                               request_views, status_nbytes, unpack_header, unpack_reply, version_to_int)

VERSIONS = ["0123456789ab", "ffffffffffff", "000000000000"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_scale", [True, False])
def test_a_request_round_trips_through_one_message(dtype, with_scale):
    rows, scale = torch.randn(15, 7).to(dtype), torch.rand(15)  # 15 x 7 bf16: rows end off an 8-byte boundary
    buf = torch.empty(request_nbytes(8, 32, 7, dtype), dtype=torch.uint8)
    message = pack_request(buf, 8, 3, 17, [1, 5, 7], [4, 2, 9], VERSIONS, rows, scale if with_scale else None)
    assert message.shape[0] == request_nbytes(8, 15, 7, dtype, with_scale)
    header = unpack_header(buf, 8, 7, dtype)
    assert (header.layer, header.epoch, header.num_rows, header.experts, header.counts, header.versions,
            header.has_scale, header.split) == (3, 17, 15, [1, 5, 7], [4, 2, 9], VERSIONS, with_scale, False)
    got_rows, got_scale = request_views(buf, 8, 15, 7, dtype, with_scale)
    assert torch.equal(got_rows, rows)
    assert torch.equal(got_scale, scale) if with_scale else got_scale is None


def test_a_reused_buffer_keeps_nothing_of_the_previous_batch():
    buf = torch.full((request_nbytes(8, 8, 4, torch.float32),), 255, dtype=torch.uint8)
    pack_request(buf, 8, 0, 1, [0, 1, 2, 3], [1, 1, 1, 1], ["0123456789ab"] * 4, torch.ones(4, 4), torch.ones(4))
    pack_header(buf, 8, 2, 5, [6], [3], ["ffffffffffff"], 3, False, True)
    header = unpack_header(buf, 8, 4, torch.float32)
    assert (header.layer, header.experts, header.versions, header.has_scale, header.split) == (
        2, [6], ["ffffffffffff"], False, True)
    assert buf[:header_nbytes(8)].view(torch.int64)[6 + 3:].eq(0).all()  # past the one expert's fields: zeros


def test_a_header_announcing_more_than_the_buffer_holds_is_refused():
    buf = torch.empty(request_nbytes(8, 4, 4, torch.float32), dtype=torch.uint8)
    big = torch.empty(request_nbytes(8, 64, 4, torch.float32), dtype=torch.uint8)
    pack_request(big, 8, 0, 1, [0], [64], ["0" * 12], torch.ones(64, 4), None)
    buf.copy_(big[:buf.shape[0]])
    with pytest.raises(ValueError, match="64 rows"):
        unpack_header(buf, 8, 4, torch.float32)


def test_a_reply_carries_the_outputs_or_the_groups_error():
    out = torch.randn(6, 5)
    buf = torch.empty(reply_nbytes(16, 5, torch.float32), dtype=torch.uint8)
    assert pack_reply(buf, out).shape[0] == reply_nbytes(6, 5, torch.float32)
    assert torch.equal(unpack_reply(buf, 6, 5, torch.float32), out)
    with pytest.raises(ValueError, match="answered 6 rows for 7"):
        unpack_reply(buf, 7, 5, torch.float32)
    message = pack_error(buf, "KeyError: expert 9" + "!" * 2 * MESSAGE_BYTES, reply_nbytes(2, 5, torch.float32))
    assert message.shape[0] == reply_nbytes(2, 5, torch.float32)  # the size the router posted for 2 rows
    with pytest.raises(ValueError, match="KeyError: expert 9!!!") as error:
        unpack_reply(buf, 2, 5, torch.float32)
    assert len(str(error.value)) == MESSAGE_BYTES


def test_a_split_replys_status_says_ok_or_carries_the_error():
    buf = torch.empty(status_nbytes(), dtype=torch.uint8)
    assert pack_status(buf, 40).shape[0] == status_nbytes()
    check_status(buf, 40)
    pack_error(buf, "ValueError: layer 9", status_nbytes())
    with pytest.raises(ValueError, match="^ValueError: layer 9$"):
        check_status(buf, 40)


def test_a_version_that_is_not_a_sha_prefix_is_refused():
    with pytest.raises(ValueError, match="12 hex digits"):
        version_to_int("simulated")


@pytest.mark.parametrize("device,backend", [("cpu", "gloo"), ("cuda", "nccl"), ("cuda:1", "nccl")])
def test_backend_follows_the_tensors_device(device, backend):
    assert backend_for(torch.device(device)) == backend
    assert exact_counts(torch.device(device)) == (backend == "nccl")


def test_fields_are_written_and_read_within_the_buffer_only():
    """The header and status codec writes and reads the buffer in place (no torch op): never past its end."""
    small = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not fit a buffer of 8"):
        pack_status(small, 3)
    with pytest.raises(ValueError, match="lie past a buffer of 8"):
        check_status(small, 3)
    guard = torch.full((header_nbytes(8) + 8,), 7, dtype=torch.uint8)
    pack_header(guard, 8, 1, 2, [0], [1], VERSIONS[:1], 1, False, True)
    assert guard[header_nbytes(8):].eq(7).all()  # the byte after the header untouched
