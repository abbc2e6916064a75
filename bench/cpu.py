"""CPU per call, summed over the processes on a path and read from /proc, beside the CPU of the
round trips the design makes (DESIGN.md, "One Forward": each hop should cost about what its wire
costs). CPU, not wall time: the machine is shared by every emulated node and is noisy.

    floor of one Forward = in-process MoELayer (this process)
                         + client hops x one grpc.aio echo round trip (both processes)
                         + destinations x one round trip of the transport's wire (grpc echo or gloo send/recv)

Every round trip carries TINY_BYTES (a tiny request: 8 tokens x H=64 fp32).

    .venv/bin/python bench/cpu.py       # prints the CPU floors alone
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import multiprocessing as mp
import os
import time
from typing import Callable

import floors  # bench/ is the script's folder

__all__ = ["CpuFloors", "CpuRow", "TINY_BYTES", "cpu_by_role", "cpu_per_call", "cpu_row", "cpu_s", "floor_us",
           "measure_cpu_floors", "median_window", "process_cpu_s", "torch_threads"]

TINY_BYTES = 8 * 64 * 4
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
WINDOWS = 5  # repeated windows of n calls each; their median is reported


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) since it started."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces; fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S  # utime, stime: fields 14, 15


def cpu_s(pids: list[int]) -> float:
    return sum(process_cpu_s(pid) for pid in pids)


def cpu_per_call_by_pid(pids: list[int], call: Callable[[], object], n: int,
                        idle_s: float | None = None) -> dict[int, float]:
    """CPU seconds per call of each of `pids` over n calls of call(), less what the same process
    takes when idle (measured right after, for `idle_s`, default the calls' wall time, and scaled
    to the calls' wall time)."""
    before, start = {pid: process_cpu_s(pid) for pid in pids}, time.perf_counter()
    for _ in range(n):
        call()
    wall_s = time.perf_counter() - start
    busy = {pid: process_cpu_s(pid) - before[pid] for pid in pids}
    idle_s = wall_s if idle_s is None else idle_s
    before = {pid: process_cpu_s(pid) for pid in pids}
    time.sleep(idle_s)
    idle = {pid: (process_cpu_s(pid) - before[pid]) * wall_s / idle_s for pid in pids}
    return {pid: (busy[pid] - idle[pid]) / n for pid in pids}


def cpu_per_call(pids: list[int], call: Callable[[], object], n: int, idle_s: float | None = None) -> float:
    """CPU seconds per call(), summed over `pids`: n calls less an idle interval (see
    cpu_per_call_by_pid)."""
    return sum(cpu_per_call_by_pid(pids, call, n, idle_s).values())


def median_window(pids: list[int], call: Callable[[], object], n: int, windows: int = WINDOWS) -> dict[int, float]:
    """cpu_per_call_by_pid over `windows` windows of n calls each: the window of median total. (On
    this 2-core VM a ping-pong between two processes sometimes costs ~10x the CPU for seconds at a
    time: kernel time of cross-core wake-ups. The median keeps such windows out while they are few.)"""
    runs = sorted((cpu_per_call_by_pid(pids, call, n) for _ in range(windows)), key=lambda r: sum(r.values()))
    return runs[len(runs) // 2]


# ---- floors: two plain processes ----

@dataclasses.dataclass(frozen=True)
class CpuFloors:
    """Microseconds of CPU per call: both processes of a round trip of TINY_BYTES, and the
    in-process layer (this process)."""

    grpc_us: float
    gloo_us: float
    layer_us: float


def grpc_echo_cpu_s(n: int, size: int = TINY_BYTES) -> float:
    """CPU (client and server) per grpc.aio echo round trip of `size` bytes (floors.py's server)."""
    import grpc

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=floors._grpc_server, args=(ports,), daemon=True)
    server.start()
    port = ports.get(timeout=60)
    loop = asyncio.new_event_loop()

    async def open_channel():
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    channel = loop.run_until_complete(open_channel())
    echo, payload = channel.unary_unary("/floor.Echo/Echo"), b"x" * size

    async def echoes(count: int) -> None:
        for _ in range(count):
            await echo(payload)

    try:
        loop.run_until_complete(echoes(n // 10 + 10))  # warm-up
        # the calls run inside one coroutine, as a server's do: n // 100 steps of 100 round trips
        steps = median_window([os.getpid(), server.pid], lambda: loop.run_until_complete(echoes(100)), n // 100)
        return sum(steps.values()) / 100
    finally:
        loop.run_until_complete(channel.close())
        loop.close()
        server.terminate()
        server.join(10)


def gloo_cpu_s(n: int, size: int = TINY_BYTES) -> float:
    """CPU (both ranks) per gloo send + recv round trip of `size` bytes (floors.py's peer)."""
    import torch
    import torch.distributed as dist

    warm = n // 10 + 10
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    peer = mp.get_context("spawn").Process(target=floors._gloo_peer, args=(store.port, [(size, warm + WINDOWS * n)]),
                                           daemon=True)
    peer.start()
    pg = dist.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=60))
    buf, back = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)

    def round_trip() -> None:
        pg.send([buf], 1, 0).wait()
        pg.recv([back], 1, 0).wait()

    try:
        for _ in range(warm):
            round_trip()
        return sum(median_window([os.getpid(), peer.pid], round_trip, n).values())
    finally:
        pg.send([torch.zeros(1, dtype=torch.uint8)], 1, 0).wait()  # the peer's last message: it exits
        peer.join(30)


@contextlib.contextmanager
def torch_threads(n: int):
    """This process at `n` torch threads inside the block. Every CPU figure is taken at one, as a Ray
    actor's default: at two, a tiny op's parallel region leaves a worker spinning for its turn, up
    to ~10x the op's CPU on this 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def layer_cpu_s(layer: Callable[[object], object], x, n: int, threads: int = 1) -> float:
    """CPU of this process per layer(x), on `threads` torch threads (see torch_threads)."""
    with torch_threads(threads):
        for _ in range(n // 10 + 2):
            layer(x)
        return sum(median_window([os.getpid()], lambda: layer(x), n).values())


def measure_cpu_floors(layer: Callable[[object], object], x, n: int = 2000) -> CpuFloors:
    return CpuFloors(grpc_echo_cpu_s(n) * 1e6, gloo_cpu_s(n) * 1e6, layer_cpu_s(layer, x, n) * 1e6)


# ---- one path ----

@dataclasses.dataclass(frozen=True)
class CpuRow:
    label: str
    cpu_us: dict[str, float]      # process role -> CPU microseconds per call
    destinations: float           # expert-group messages per call
    floor_us: float               # the design's floor for the same call

    @property
    def total_us(self) -> float:
        return sum(self.cpu_us.values())

    @property
    def ratio(self) -> float:
        return self.total_us / self.floor_us


def cpu_row(label: str, pids: dict[str, list[int]], call: Callable[[], object], n: int,
            destinations: Callable[[], int], client_hops: int, wire_floor_us: float, cpu_floors: CpuFloors) -> CpuRow:
    """CPU per call() summed over the processes `pids` ({role: pids}), beside its floor: the layer,
    `client_hops` grpc echoes and, per destination (the count `destinations()` grows by over the
    calls), one round trip of `wire_floor_us`."""
    sent = destinations()
    cpu_us = cpu_by_role(pids, call, n)
    per_call = (destinations() - sent) / (n * WINDOWS)
    return CpuRow(label, cpu_us, per_call, floor_us(cpu_floors, client_hops, per_call, wire_floor_us))


def cpu_by_role(pids: dict[str, list[int]], call: Callable[[], object], n: int) -> dict[str, float]:
    """CPU microseconds per call() of each role's processes ({role: pids}), median of WINDOWS windows."""
    roles = {pid: role for role, role_pids in pids.items() for pid in role_pids}
    cpu_us = dict.fromkeys(pids, 0.0)
    for pid, seconds in median_window(list(roles), call, n).items():
        cpu_us[roles[pid]] += seconds * 1e6
    return cpu_us


def floor_us(cpu_floors: CpuFloors, client_hops: int, destinations: float, wire_floor_us: float) -> float:
    """The design's floor of one call: the layer, `client_hops` grpc echoes, a wire round trip per destination."""
    return cpu_floors.layer_us + client_hops * cpu_floors.grpc_us + destinations * wire_floor_us


def print_rows(rows: list[CpuRow], cpu_floors: CpuFloors, title: str,
               skeletons: dict[str, CpuRow] | None = None) -> None:
    """The rows beside their floors and, where `skeletons` ({row label: row}) has one, beside the
    design's plainest implementation measured in the same run (bench/skeleton.py)."""
    skeletons = skeletons or {}
    roles = list(dict.fromkeys(role for row in rows for role in row.cpu_us))
    print(title)
    print(f"  floors (CPU us per call): grpc.aio echo {cpu_floors.grpc_us:.0f}, gloo send/recv {cpu_floors.gloo_us:.0f} "
          f"({TINY_BYTES} B, both processes); in-process MoELayer {cpu_floors.layer_us:.0f}")
    label_w = max(len("path"), *(len(row.label) for row in rows))
    head = [f"{'path':<{label_w}}", f"{'CPU us':>8}", *(f"{role:>8}" for role in roles), f"{'dests':>5}",
            f"{'floor us':>8}", f"{'x floor':>7}", f"{'x skeleton':>10}"]
    print("  " + " | ".join(head))
    for row in rows:
        cells = [f"{row.label:<{label_w}}", f"{row.total_us:>8.0f}",
                 *(f"{row.cpu_us[r]:>8.0f}" if r in row.cpu_us else f"{'':>8}" for r in roles),
                 f"{row.destinations:>5.2f}", f"{row.floor_us:>8.0f}", f"{row.ratio:>7.2f}",
                 f"{row.total_us / skeletons[row.label].total_us:>10.2f}" if row.label in skeletons else f"{'':>10}"]
        print("  " + " | ".join(cells))


if __name__ == "__main__":
    num_calls = 2000
    print(f"grpc.aio echo {TINY_BYTES} B: {grpc_echo_cpu_s(num_calls) * 1e6:.0f} us CPU per round trip (both processes)")
    print(f"gloo send/recv {TINY_BYTES} B: {gloo_cpu_s(num_calls) * 1e6:.0f} us CPU per round trip (both processes)")
