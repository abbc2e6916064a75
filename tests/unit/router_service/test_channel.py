"""A collective channel's two ends (router_service.collective.Channel, experts.channel.ChannelWorker)
over a real 2-rank gloo process group in this process: batches of changing sizes come back equal
to the computation, whichever way they travel (one message each way; split above a size; split
always, as over NCCL); a group's error reaches the router with its message and the channel keeps
serving."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time

import pytest
import torch
import torch.distributed as dist

from experts.channel import ChannelWorker
from protos.collective import process_group
from router_service.collective import Channel, CollectiveTransport
from router_service.routing import Destination
from router_service.transport import Transport

HIDDEN, EXPERTS, MAX_ROWS = 6, 8, 32
VERSION = "0123456789ab"


def compute(layer, rows, experts, counts, scale, versions):
    """A stand-in for the experts: refuses expert 7, else rows x (layer + 1) x scale."""
    if 7 in experts:
        raise KeyError(f"expert 7 of layer {layer} is not held here")
    out = rows * (layer + 1)
    return out if scale is None else out * scale[:, None]


@pytest.fixture(params=["one message", "split above 64 bytes", "split always"])
def channel(request, monkeypatch):
    if request.param == "split above 64 bytes":
        monkeypatch.setattr("router_service.collective.SPLIT_MIN_BYTES", 64)
    router_end, worker = _open_pair(compute, exact=request.param == "split always")
    yield router_end
    router_end.close()
    worker.close()


def _open_pair(compute_fn, exact: bool = False) -> tuple[Channel, ChannelWorker]:
    """A channel's two ends over a real gloo process group: the router's (rank 0) and the group's
    (rank 1, serving `compute_fn` from its thread)."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    worker = ChannelWorker("test/0", "127.0.0.1", store.port, compute_fn, EXPERTS, HIDDEN, torch.float32, MAX_ROWS)
    worker.exact = exact
    joined = threading.Thread(target=worker.connect)
    joined.start()
    pg = process_group(dist.PrefixStore("test/0/", store), 0, torch.device("cpu"), 30)
    joined.join()
    worker.start()
    router_end = Channel("group-0", pg, store, EXPERTS, 10.0)
    router_end.exact = exact
    return router_end, worker


def _dest(start: int, stop: int, experts: list[int]) -> Destination:
    counts = [(stop - start) // len(experts)] * len(experts)
    counts[-1] += (stop - start) - sum(counts)
    return Destination("group-0", "", start, stop, experts, counts, [VERSION] * len(experts))


def test_batches_of_changing_sizes_come_back_computed(channel):
    generator = torch.Generator().manual_seed(0)
    for layer, rows_in in [(0, 3), (2, 29), (1, 1), (3, 12)]:
        rows = torch.randn(rows_in + 2, HIDDEN, generator=generator)
        scale = torch.rand(rows_in + 2, generator=generator)
        out = torch.full_like(rows, float("nan"))
        dest = _dest(1, 1 + rows_in, [0, 3])
        channel.call(layer, 5, rows, scale if layer % 2 else None, dest, out)
        expected = compute(layer, rows[1:1 + rows_in], [0], None, scale[1:1 + rows_in] if layer % 2 else None, None)
        assert torch.equal(out[1:1 + rows_in], expected), layer
        assert out[0].isnan().all() and out[-1].isnan().all()  # only the destination's slice is written


def test_a_groups_error_reaches_the_router_and_the_channel_serves_on(channel):
    rows = torch.randn(4, HIDDEN)
    out = torch.empty_like(rows)
    with pytest.raises(ValueError, match="KeyError: 'expert 7 of layer 2 is not held here'"):
        channel.call(2, 5, rows, None, _dest(0, 4, [7]), out)
    channel.call(2, 5, rows, None, _dest(0, 4, [1]), out)
    assert torch.equal(out, rows * 3)


class FakeGrpcTransport(Transport):
    """The grpc fallback: computes as the channel's group would, and counts its slices."""

    def __init__(self):
        self.sent = []

    async def send(self, layer, epoch, rows, scale, dest, out, timeout_s=None):
        self.sent.append(dest.group)
        out[dest.start:dest.stop] = compute(layer, rows[dest.start:dest.stop], list(dest.experts), None, None, None)


def _transport() -> CollectiveTransport:
    transport = CollectiveTransport("router", "ns", EXPERTS, MAX_ROWS, torch.float32, "secret")
    transport.fallback = FakeGrpcTransport()
    return transport


def test_one_open_per_group_at_a_time_and_fresh_waits_for_the_one_in_flight():
    transport, opens, in_flight = _transport(), [], []

    async def fake_open(group):
        in_flight.append(group)
        assert in_flight.count(group) == 1, "a second channel opened while one was opening"
        opens.append(group)
        await asyncio.sleep(0.02)
        transport.channels[group] = Channel(group, object(), None, EXPERTS, 1.0)
        in_flight.remove(group)

    transport._open = fake_open

    async def main():
        transport._open_soon("group-0")  # a dispatch's background open
        await transport.open(["group-0"])  # the reconciler's connect step joins it
        assert opens == ["group-0"]
        transport.channels.pop("group-0")
        transport._open_soon("group-0")
        await transport.open(["group-0"], fresh=True)  # waits for that one, then opens anew
        assert opens == ["group-0"] * 3 and "group-0" in transport.channels

    asyncio.run(main())


def test_a_channel_closed_under_a_batch_sends_its_slice_over_grpc():
    transport = _transport()
    closed = Channel("group-0", None, None, EXPERTS, 1.0)  # closed: a table moved on meanwhile
    transport.channels["group-0"] = closed
    transport._open_soon = lambda group: None
    rows = torch.randn(4, HIDDEN)
    out = torch.empty_like(rows)
    errors, _ = asyncio.run(transport.dispatch(1, 5, rows, None, [_dest(0, 4, [2])], out))
    assert errors == {} and transport.fallback.sent == ["group-0"]
    assert torch.equal(out, rows * 2)
    assert transport.segments == {"collective": 0, "grpc": 1}


def test_a_channel_past_its_deadline_never_carries_the_next_batch():
    """A late reply never answers another batch: gloo closes a pair whose wait timed out, so a batch
    queued behind the one that timed out (same size, other rows) fails on it, or goes over grpc
    once the channel is dropped; either way it never takes the late reply for its own answer."""
    first = threading.Event()

    def slow_first(layer, rows, experts, counts, scale, versions):
        if not first.is_set():
            first.set()
            time.sleep(0.5)  # past the first batch's deadline; its reply comes late
        return compute(layer, rows, experts, counts, scale, versions)

    router_end, worker = _open_pair(slow_first)
    transport = _transport()
    transport.channels["group-0"] = router_end
    transport._open_soon = lambda group: None
    late, queued = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)
    out_late, out_queued = torch.empty_like(late), torch.empty_like(queued)

    async def main():
        return await asyncio.gather(
            transport.dispatch(1, 5, late, None, [_dest(0, 4, [2])], out_late, [0.1]),
            transport.dispatch(1, 5, queued, None, [_dest(0, 4, [2])], out_queued))

    (late_errors, _), (queued_errors, _) = asyncio.run(main())
    assert list(late_errors) == ["group-0"] and "group-0" not in transport.channels
    assert list(queued_errors) == ["group-0"] or torch.equal(out_queued, queued * 2)
    worker.close()


def test_a_channel_closed_while_another_is_resent_still_reports_its_error():
    """Each failed channel is either resent over grpc (closed under the batch) or reported failed,
    decided once: a channel closed during the resend of another is never left with neither (its
    slice of out unwritten and no error: an answer from garbage)."""
    refusing, worker = _open_pair(compute)  # its group refuses expert 7
    transport = _transport()
    transport.channels = {"group-0": refusing, "group-1": Channel("group-1", None, None, EXPERTS, 1.0)}
    transport._open_soon = lambda group: None
    resend = transport.fallback.send

    async def send_as_the_table_moves_on(*args, **kwargs):  # the group-0 channel closes meanwhile
        refusing.close()
        await resend(*args, **kwargs)

    transport.fallback.send = send_as_the_table_moves_on
    rows = torch.randn(8, HIDDEN)
    out = torch.full_like(rows, float("nan"))
    destinations = [_dest(0, 4, [7]), Destination("group-1", "", 4, 8, (1,), (4,), (VERSION,))]
    errors, seconds = asyncio.run(transport.dispatch(1, 5, rows, None, destinations, out))
    assert list(errors) == ["group-0"] and "expert 7 of layer 1 is not held here" in str(errors["group-0"])
    assert torch.equal(out[4:], rows[4:] * 2) and transport.fallback.sent == ["group-1"]
    worker.close()
