"""The wire floors, measured between two plain processes on this machine in the same run as the
mesh figures: a grpc.aio generic echo and a torch.distributed gloo send/recv round trip, each at
64 B and 8 MB. Every mesh figure in bench_mesh.py is also shown as a multiple of its floor.

    .venv/bin/python bench/floors.py       # prints the floors alone
"""

from __future__ import annotations

import asyncio
import datetime
import multiprocessing as mp
import statistics
import time

SIZES = {"64 B": 64, "8 MB": 8 << 20}
REPS = {"64 B": 400, "8 MB": 20}


def _grpc_server(port_queue) -> None:
    import grpc

    async def main():
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 1 << 30),
                                          ("grpc.max_receive_message_length", 1 << 30)])

        async def echo(request: bytes, context) -> bytes:
            return request

        handler = grpc.method_handlers_generic_handler(
            "floor.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_queue.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def grpc_echo_floor() -> dict[str, float]:
    """p50 round trip (ms) of a grpc.aio echo, per payload size."""
    import grpc

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_grpc_server, args=(ports,), daemon=True)
    server.start()
    port = ports.get(timeout=60)

    async def measure() -> dict[str, float]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]) as channel:
            echo = channel.unary_unary("/floor.Echo/Echo")
            out = {}
            for label, size in SIZES.items():
                payload = b"x" * size
                await echo(payload)
                times = []
                for _ in range(REPS[label]):
                    start = time.perf_counter()
                    await echo(payload)
                    times.append((time.perf_counter() - start) * 1e3)
                out[label] = statistics.median(times)
            return out

    try:
        return asyncio.run(measure())
    finally:
        server.terminate()


def concurrent_echo_ms(num_servers: int, size: int, reps: int) -> float:
    """p50 (ms) of `num_servers` grpc.aio echoes of `size` bytes sent at once from this process, one to
    each of as many plain echo servers (one process each): the floor of a batch fanned out to that
    many destinations."""
    import grpc

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    servers = [ctx.Process(target=_grpc_server, args=(ports,), daemon=True) for _ in range(num_servers)]
    for server in servers:
        server.start()
    addresses = [f"127.0.0.1:{ports.get(timeout=120)}" for _ in servers]

    async def measure() -> float:
        channels = [grpc.aio.insecure_channel(a) for a in addresses]
        echoes, payload = [c.unary_unary("/floor.Echo/Echo") for c in channels], b"x" * size
        times = []
        for i in range(reps + 10):
            start = time.perf_counter()
            await asyncio.gather(*(echo(payload) for echo in echoes))
            if i >= 10:  # the first ones connect
                times.append((time.perf_counter() - start) * 1e3)
        for channel in channels:
            await channel.close()
        return statistics.median(times)

    try:
        return asyncio.run(measure())
    finally:
        for server in servers:
            server.terminate()


def _gloo_peer(port: int, rounds: list[tuple[int, int]] | None = None) -> None:
    """Rank 1: echoes `rounds` [(bytes, round trips)] (default: REPS of each of SIZES, + 1 warm-up),
    then waits for one last message before it exits (so that a caller can read its CPU idle)."""
    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=datetime.timedelta(seconds=60))
    pg = dist.ProcessGroupGloo(store, 1, 2, datetime.timedelta(seconds=60))
    for size, reps in rounds or [(size, REPS[label] + 1) for label, size in SIZES.items()]:
        buf = torch.empty(size, dtype=torch.uint8)
        for _ in range(reps):
            pg.recv([buf], 0, 0).wait()
            pg.send([buf], 0, 0).wait()
    if rounds:
        pg.recv([torch.empty(1, dtype=torch.uint8)], 0, 0).wait()


def gloo_floor() -> dict[str, float]:
    """p50 round trip (ms) of a gloo send + recv of the same tensor, per payload size."""
    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    peer = mp.get_context("spawn").Process(target=_gloo_peer, args=(store.port,), daemon=True)
    peer.start()
    pg = dist.ProcessGroupGloo(store, 0, 2, datetime.timedelta(seconds=60))
    out = {}
    for label, size in SIZES.items():
        buf = torch.ones(size, dtype=torch.uint8)
        back = torch.empty_like(buf)
        times = []
        for i in range(REPS[label] + 1):
            start = time.perf_counter()
            pg.send([buf], 1, 0).wait()
            pg.recv([back], 1, 0).wait()
            if i:
                times.append((time.perf_counter() - start) * 1e3)
        out[label] = statistics.median(times)
    peer.join(30)
    return out


def measure_floors() -> dict[str, dict[str, float]]:
    """{"grpc": {size: ms}, "gloo": {size: ms}}"""
    return {"grpc": grpc_echo_floor(), "gloo": gloo_floor()}


def gb_per_s(size_label: str, rtt_ms: float) -> float:
    """Round-trip bandwidth: the payload both ways over the round trip."""
    return 2 * SIZES[size_label] / (rtt_ms / 1e3) / 1e9


if __name__ == "__main__":
    for kind, figures in measure_floors().items():
        for label, ms in figures.items():
            print(f"{kind} {label}: p50 {ms:.3f} ms" + (f", {gb_per_s(label, ms):.2f} GB/s" if label == "8 MB" else ""))
