"""The expert group's end of a collective channel (protos/collective.py): one thread per channel
receives a batch into a buffer allocated once, computes it, sends the outputs back.

Shapes: R = max rows per batch (the router's max_batch_tokens x top_k), H = hidden.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from typing import Callable

import torch

from protos.collective import (exact_counts, header_nbytes, pack_error, pack_reply, pack_status, process_group,
                               reply_nbytes, request_nbytes, request_views, status_nbytes, unpack_header)

__all__ = ["ChannelWorker", "channel_nbytes"]

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 7 * 24 * 3600.0  # a group waits for the next batch this long; the router bounds each call

Compute = Callable[[int, torch.Tensor, list[int], list[int], torch.Tensor | None, list[str]], torch.Tensor]


def channel_nbytes(num_experts: int, max_rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of a channel's buffers: the largest request (R rows, scale) and the largest reply."""
    return request_nbytes(num_experts, max_rows, hidden, dtype) + reply_nbytes(max_rows, hidden, dtype)


class ChannelWorker:
    """Serves one (router, group) channel. `compute(layer, rows [n, H], experts, counts, scale [n] |
    None, versions) -> [n, H]` is the group's expert computation."""

    def __init__(self, channel_id: str, host: str, port: int, compute: Compute, num_experts: int, hidden: int,
                 dtype: torch.dtype, max_rows: int, stats=None, device: torch.device = torch.device("cpu")):
        self.channel_id, self.host, self.port = channel_id, host, port
        self.stats = stats  # a Counter: seconds of "compute" and "calls", as the grpc Compute counts them
        self.compute = compute
        self.num_experts, self.hidden, self.dtype, self.device = num_experts, hidden, dtype, device
        self.exact = exact_counts(device)  # the header first, then the rest at its announced size
        self.request = torch.empty(request_nbytes(num_experts, max_rows, hidden, dtype), dtype=torch.uint8,
                                   device=device)  # reused by every batch
        self.reply = torch.empty(reply_nbytes(max_rows, hidden, dtype), dtype=torch.uint8, device=device)
        self.pg = None
        self.closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def nbytes(self) -> int:
        """Bytes this channel's buffers hold."""
        return self.request.nbytes + self.reply.nbytes

    def connect(self, timeout_s: float = 30.0) -> None:
        """Join the router's store and process group (blocks until the router has joined too)."""
        import torch.distributed as dist

        store = dist.TCPStore(self.host, self.port, 2, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        self.pg = process_group(dist.PrefixStore(self.channel_id + "/", store), 1, self.device, IDLE_TIMEOUT_S)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=f"channel {self.channel_id}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self.closed.is_set():
                self._serve_one()
        except (RuntimeError, ValueError) as exc:  # the router closed the channel (or died), or broke the contract
            logger.info("channel %s closed: %s", self.channel_id, str(exc).splitlines()[0][:200])
        finally:
            self.closed.set()

    def _serve_one(self) -> None:
        """One request in, computed, its reply out (protos/collective.py: one message, or split)."""
        first = self.request[:header_nbytes(self.num_experts)] if self.exact else self.request
        self.pg.recv([first], 0, 0).wait()
        header = unpack_header(self.request, self.num_experts, self.hidden, self.dtype)
        rows, scale = request_views(self.request, self.num_experts, header.num_rows, self.hidden, self.dtype,
                                    header.has_scale)
        if header.split:
            for work in [self.pg.recv([t], 0, 0) for t in (rows, scale) if t is not None]:
                work.wait()
        start = time.perf_counter()
        try:
            out = self.compute(header.layer, rows, header.experts, header.counts, scale, header.versions)
        except (KeyError, ValueError, RuntimeError) as exc:  # the group's own error: the router gets its message
            message = f"{type(exc).__name__}: {exc}"
            size = status_nbytes() if header.split else reply_nbytes(rows.shape[0], self.hidden, self.dtype)
            self._send([pack_error(self.reply, message, size)] + ([rows] if header.split else []))
            return
        if self.stats is not None:
            self.stats["compute"] += time.perf_counter() - start
            self.stats["calls"] += 1
        self._send([pack_status(self.reply, out.shape[0]), out.contiguous()] if header.split
                   else [pack_reply(self.reply, out)])

    def _send(self, tensors: list[torch.Tensor]) -> None:
        for work in [self.pg.send([t], 0, 0) for t in tensors]:
            work.wait()

    def close(self) -> None:
        self.closed.set()
        self.pg = None
