"""The expert group's end of a collective channel (protos/collective.py): one thread per channel
receives a batch into buffers allocated once, computes it, sends the outputs back.

Shapes: R = max rows per batch (the router's max_batch_tokens x top_k), H = hidden.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from typing import Callable

import torch

from protos.collective import MESSAGE_BYTES, decode_header, header_size, process_group

__all__ = ["ChannelWorker", "channel_nbytes"]

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 7 * 24 * 3600.0  # a group waits for the next batch this long; the router bounds each call

Compute = Callable[[int, torch.Tensor, list[int], list[int], torch.Tensor | None, list[str]], torch.Tensor]


def channel_nbytes(max_rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of the receive buffers of a channel of `max_rows` rows: rows [R, H] of dtype, scale [R] float32."""
    return max_rows * (hidden * dtype.itemsize + 4)


class ChannelWorker:
    """Serves one (router, group) channel. `compute(layer, rows [n, H], experts, counts, scale [n] |
    None, versions) -> [n, H]` is the group's expert computation."""

    def __init__(self, channel_id: str, host: str, port: int, compute: Compute, num_experts: int, hidden: int,
                 dtype: torch.dtype, max_rows: int, delay_s: float = 0.0, stats=None):
        self.channel_id, self.host, self.port = channel_id, host, port
        self.stats = stats  # a Counter: seconds of "compute" and "calls", as the grpc Compute counts them
        self.compute, self.delay_s = compute, delay_s
        self.header = torch.empty(header_size(num_experts), dtype=torch.int64)
        self.rows = torch.empty(max_rows, hidden, dtype=dtype)      # [R, H], reused by every batch
        self.scale = torch.empty(max_rows, dtype=torch.float32)     # [R]
        self.status = torch.empty(2, dtype=torch.int64)
        self._status = self.status.numpy()  # written through numpy: a torch setitem costs ~5 us each
        self.message = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
        self.pg = None
        self.closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def nbytes(self) -> int:
        """Bytes this channel's receive buffers hold (rows and scale)."""
        return self.rows.nbytes + self.scale.nbytes

    def connect(self, timeout_s: float = 30.0) -> None:
        """Join the router's store and process group (blocks until the router has joined too)."""
        import torch.distributed as dist

        store = dist.TCPStore(self.host, self.port, 2, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        self.pg = process_group(dist.PrefixStore(self.channel_id + "/", store), 1, self.rows.device, IDLE_TIMEOUT_S)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=f"channel {self.channel_id}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while not self.closed.is_set():
                self._serve_one()
        except RuntimeError as exc:  # the router closed the channel (or died): this thread ends
            logger.info("channel %s closed: %s", self.channel_id, str(exc).splitlines()[0][:200])
        finally:
            self.closed.set()

    def _serve_one(self) -> None:
        pg = self.pg
        pg.recv([self.header], 0, 0).wait()
        layer, _epoch, n, experts, counts, versions, has_scale = decode_header(self.header)
        if n > self.rows.shape[0]:
            raise RuntimeError(f"batch of {n} rows exceeds this channel's {self.rows.shape[0]}")
        rows, scale = self.rows[:n], (self.scale[:n] if has_scale else None)
        posted = [pg.recv([rows], 0, 0)] + ([pg.recv([scale], 0, 0)] if scale is not None else [])
        for work in posted:
            work.wait()
        start = time.perf_counter()
        try:
            out = self.compute(layer, rows, experts, counts, scale, versions)  # its own inference_mode
        except (KeyError, ValueError, RuntimeError) as exc:
            self._send_error(f"{type(exc).__name__}: {exc}")
            return
        if self.stats is not None:
            self.stats["compute"] += time.perf_counter() - start
            self.stats["calls"] += 1
        if self.delay_s > 0:  # the emulated link delay of this node (experts/links.py)
            time.sleep(self.delay_s)
        self._status[0], self._status[1] = 1, n
        posted = [pg.send([self.status], 0, 0), pg.send([out.contiguous()], 0, 0)]
        for work in posted:
            work.wait()

    def _send_error(self, message: str) -> None:
        raw = message.encode()[:MESSAGE_BYTES]
        self.message.zero_()
        self.message[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        self._status[0], self._status[1] = 0, len(raw)
        self.pg.send([self.status], 0, 0).wait()
        self.pg.send([self.message], 0, 0).wait()

    def close(self) -> None:
        self.closed.set()
        self.pg = None

