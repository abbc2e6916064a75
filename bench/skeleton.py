"""The design's path in its plainest form, for the CPU table: plain processes, no Ray, no mesh
protocol (no epochs, versions, checks, secrets, failover, batching or metrics), the same math.

A client gates and sorts its tokens with the layer's own Gate and dispatch, sends each expert
group its rows (one message there, one back), and combines; each group process computes its
experts with ExpertGroup.forward. Over grpc: grpc.aio generic handlers, raw bytes. Over
collective: one gloo send and one recv per group, fixed-size buffers. The router variants put a
middle process behind one grpc.aio hop that does the same.

What it costs is the least any implementation of the design pays on this machine in Python and
torch; the mesh's rows are read beside it (bench_mesh.py (d)).

    .venv/bin/python bench/skeleton.py CHECKPOINT      # the four rows beside their floors
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import multiprocessing as mp
import os
import sys
import warnings
from pathlib import Path

import torch

import cpu  # bench/ is the script's folder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experts import MoELayer, load_spec  # noqa: E402
from experts.group import ExpertGroup  # noqa: E402
from experts.layer import dispatch  # noqa: E402

__all__ = ["Plan", "compute", "owned", "skeleton_rows"]

NUM_GROUPS = 3
TOKENS = 8
LAYER = 0
SERVICE = "skeleton.Mesh"


def owned(num_experts: int, group: int) -> range:
    """Group `group`'s experts: contiguous blocks, so its rows are one slice of the sorted batch."""
    per = -(-num_experts // NUM_GROUPS)
    return range(group * per, min(num_experts, (group + 1) * per))


def _frombuffer(data: bytes, dtype: torch.dtype, **kw) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only bytes: the tensor is only read
        warnings.simplefilter("ignore")
        return torch.frombuffer(data, dtype=dtype, **kw)


class Plan:
    """One Forward's tokens sorted by expert, and per group its slice: {group: (counts [E], rows)}."""

    def __init__(self, layer: MoELayer, x: torch.Tensor):
        weights, ids = layer.gate(x)
        self.tokens = dispatch(layer.spec, x, weights, ids)
        self.sends: dict[int, tuple[list[int], torch.Tensor]] = {}
        start, counts = 0, self.tokens.counts
        for group in range(NUM_GROUPS):
            mine = owned(len(counts), group)
            n = sum(counts[e] for e in mine)
            if n:
                self.sends[group] = ([c if e in mine else 0 for e, c in enumerate(counts)],
                                     self.tokens.rows[start:start + n])
            start += n

    def combine(self, ys: list[torch.Tensor]) -> torch.Tensor:
        return self.tokens.combine(torch.cat(ys))


def compute(group: ExpertGroup, counts: list[int], rows: torch.Tensor) -> torch.Tensor:
    experts = [e for e, c in enumerate(counts) if c]
    return group.forward(LAYER, rows, experts, [counts[e] for e in experts])


# ---- over grpc ----

def _grpc_group(path: str, index: int, ports) -> None:
    torch.set_num_threads(1)
    spec = load_spec(path)
    num_experts, hidden = spec.num_experts, spec.hidden_size
    group = ExpertGroup.from_checkpoint(path, {LAYER: list(owned(num_experts, index))})

    async def forward(request: bytes, context) -> bytes:
        counts = _frombuffer(request, torch.int32, count=num_experts).tolist()
        rows = _frombuffer(request, torch.float32, offset=4 * num_experts).view(-1, hidden)
        return compute(group, counts, rows).numpy().tobytes()

    _serve(forward, ports, index)


def _serve(forward, ports, index: int = 0) -> None:
    import grpc

    async def main():
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Forward": grpc.unary_unary_rpc_method_handler(forward)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put((index, port))
        await server.wait_for_termination()

    asyncio.run(main())


class GrpcFanout:
    """The client (or router) end over grpc: one channel per group."""

    def __init__(self, layer: MoELayer, ports: list[int]):
        import grpc

        self.layer = layer
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        self.calls = [channel.unary_unary(f"/{SERVICE}/Forward") for channel in self.channels]
        self.hidden = layer.spec.hidden_size

    async def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = Plan(self.layer, x)
        replies = await asyncio.gather(*(
            self.calls[g](torch.tensor(counts, dtype=torch.int32).numpy().tobytes() + rows.numpy().tobytes())
            for g, (counts, rows) in plan.sends.items()))
        return plan.combine([_frombuffer(r, torch.float32).view(-1, self.hidden) for r in replies])


# ---- over collective (gloo) ----

class GlooFanout:
    """The client (or router) end over gloo: rank 0 of a group with one rank per expert group;
    one fixed-size message each way per group called."""

    def __init__(self, layer: MoELayer, store_port: int):
        import torch.distributed as dist

        self.layer = layer
        spec = layer.spec
        store = dist.TCPStore("127.0.0.1", store_port, NUM_GROUPS + 1, is_master=False,
                              timeout=datetime.timedelta(seconds=60))
        self.pg = dist.ProcessGroupGloo(store, 0, NUM_GROUPS + 1, datetime.timedelta(seconds=60))
        sizes = message_sizes(spec.num_experts, spec.hidden_size, spec.top_k)
        self.requests = [torch.zeros(sizes[0], dtype=torch.uint8) for _ in range(NUM_GROUPS)]
        self.replies = [torch.zeros(sizes[1], dtype=torch.uint8) for _ in range(NUM_GROUPS)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = Plan(self.layer, x)
        num_experts = len(plan.tokens.counts)
        works = []
        for g, (counts, rows) in plan.sends.items():
            request = self.requests[g]
            request[:4 * num_experts].view(torch.int32).copy_(torch.tensor(counts, dtype=torch.int32))
            request[4 * num_experts:4 * num_experts + rows.numel() * 4].view(torch.float32).copy_(rows.reshape(-1))
            works.append(self.pg.send([request], g + 1, 0))
        receives = {g: self.pg.recv([self.replies[g]], g + 1, 0) for g in plan.sends}
        ys = []
        for g, (_, rows) in plan.sends.items():
            receives[g].wait()
            ys.append(self.replies[g][:rows.numel() * 4].view(torch.float32).view(rows.shape))
        for work in works:
            work.wait()
        return plan.combine(ys)

    def close(self) -> None:
        for g in range(NUM_GROUPS):
            self.requests[g][:4].view(torch.int32).fill_(-1)
            self.pg.send([self.requests[g]], g + 1, 0).wait()


def message_sizes(num_experts: int, hidden: int, top_k: int) -> tuple[int, int]:
    """Bytes of a request (counts [E] int32, then up to T x k rows fp32) and of a reply."""
    rows = TOKENS * top_k * hidden * 4
    return 4 * num_experts + rows, rows


def _gloo_group(path: str, index: int, store_port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    spec = load_spec(path)
    group = ExpertGroup.from_checkpoint(path, {LAYER: list(owned(spec.num_experts, index))})
    store = dist.TCPStore("127.0.0.1", store_port, NUM_GROUPS + 1, is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    pg = dist.ProcessGroupGloo(store, index + 1, NUM_GROUPS + 1, datetime.timedelta(seconds=60))
    sizes = message_sizes(spec.num_experts, spec.hidden_size, spec.top_k)
    request, reply = torch.zeros(sizes[0], dtype=torch.uint8), torch.zeros(sizes[1], dtype=torch.uint8)
    e = spec.num_experts
    while True:
        pg.recv([request], 0, 0).wait()
        counts = request[:4 * e].view(torch.int32).tolist()
        if counts[0] < 0:
            return
        n = sum(counts)
        rows = request[4 * e:4 * e + n * spec.hidden_size * 4].view(torch.float32).view(n, spec.hidden_size)
        reply[:n * spec.hidden_size * 4].view(torch.float32).copy_(compute(group, counts, rows).reshape(-1))
        pg.send([reply], 0, 0).wait()


# ---- the router's middle hop ----

def _router(path: str, transport: str, group_ports: list[int], store_port: int, ports) -> None:
    torch.set_num_threads(1)
    layer = MoELayer.from_pretrained(path, LAYER)
    hidden = layer.spec.hidden_size
    fanout = None if transport == "grpc" else GlooFanout(layer, store_port)

    async def forward(request: bytes, context) -> bytes:
        nonlocal fanout
        x = _frombuffer(request, torch.float32).view(-1, hidden)
        if transport == "grpc":
            fanout = fanout or GrpcFanout(layer, group_ports)  # channels on the server's loop
            out = await fanout.forward(x)
        else:
            out = fanout.forward(x)
        return out.numpy().tobytes()

    _serve(forward, ports)


# ---- a measured row ----

def _spawn(target, *args) -> mp.Process:
    process = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _store():
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, NUM_GROUPS + 2, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=60))


def skeleton_rows(path: str, x: torch.Tensor, n: int, floors: cpu.CpuFloors) -> dict[str, cpu.CpuRow]:
    """CPU per Forward of x through the skeleton's four paths, {"router, grpc": row, ...} (the
    mesh's row labels), each beside the same floor formula as the mesh's rows. This process (the
    client) runs at the caller's torch threads; the others at one."""
    layer = MoELayer.from_pretrained(path, LAYER)
    reference = layer(x)
    destinations = float(len(Plan(layer, x).sends))
    rows = {}
    for transport, wire_us in (("grpc", floors.grpc_us), ("collective", floors.gloo_us)):
        for role, hops in (("direct", 0), ("router", 1)):
            with _path(path, layer, x, transport, role) as (pids, call):
                torch.testing.assert_close(call(), reference, rtol=1e-5, atol=1e-5)
                for _ in range(n // 5 + 20):
                    call()
                label = f"{role}, {transport}"
                rows[label] = cpu.CpuRow(f"skeleton {label}", cpu.cpu_by_role(pids, call, n), destinations,
                                         cpu.floor_us(floors, hops, destinations, wire_us))
    return rows


@contextlib.contextmanager
def _path(path: str, layer: MoELayer, x: torch.Tensor, transport: str, role: str):
    """One path's processes started: yields ({role: pids}, call() -> the Forward of x); all stopped after."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # grpc.aio's stubs look the loop up when made
    store = _store() if transport == "collective" else None
    groups, group_ports = _start_groups(path, transport, store)
    processes, pids = list(groups), {"client": [os.getpid()], "groups": [g.pid for g in groups]}
    try:
        if role == "router":
            router_ports = mp.get_context("spawn").Queue()
            processes.append(_spawn(_router, path, transport, group_ports, store.port if store else 0, router_ports))
            pids["router"] = [processes[-1].pid]
            yield pids, _router_call(loop, router_ports.get(timeout=120)[1], x)
        elif transport == "grpc":
            fanout = loop.run_until_complete(_async(lambda: GrpcFanout(layer, group_ports)))
            yield pids, lambda: loop.run_until_complete(fanout.forward(x))
        else:
            fanout = GlooFanout(layer, store.port)
            yield pids, lambda: fanout.forward(x)
            fanout.close()
    finally:
        for process in processes:
            process.terminate()
        asyncio.set_event_loop(None)
        loop.close()


def _start_groups(path: str, transport: str, store) -> tuple[list[mp.Process], list[int]]:
    """The expert-group processes of `transport`, and their grpc ports in group order (none over gloo)."""
    if transport == "collective":
        return [_spawn(_gloo_group, path, g, store.port) for g in range(NUM_GROUPS)], []
    ports = mp.get_context("spawn").Queue()
    groups = [_spawn(_grpc_group, path, g, ports) for g in range(NUM_GROUPS)]
    return groups, [port for _, port in sorted(ports.get(timeout=120) for _ in groups)]


def _router_call(loop: asyncio.AbstractEventLoop, port: int, x: torch.Tensor):
    """call() -> the Forward of x through the router process on `port` (one grpc.aio hop)."""
    import grpc

    channel = loop.run_until_complete(_async(lambda: grpc.aio.insecure_channel(f"127.0.0.1:{port}")))
    stub = channel.unary_unary(f"/{SERVICE}/Forward")
    return lambda: _frombuffer(loop.run_until_complete(stub(x.numpy().tobytes())), torch.float32).view(x.shape)


async def _async(make):
    return make()


if __name__ == "__main__":
    checkpoint = sys.argv[1]
    torch.manual_seed(0)
    layer0 = MoELayer.from_pretrained(checkpoint, LAYER)
    tokens = torch.randn(TOKENS, layer0.spec.hidden_size)
    calls = int(os.environ.get("SKELETON_CALLS", "300"))
    with cpu.torch_threads(1):
        measured = cpu.measure_cpu_floors(layer0, tokens, 1000)
        cpu.print_rows(list(skeleton_rows(checkpoint, tokens, calls, measured).values()), measured,
                       f"CPU per Forward (T={TOKENS}), microseconds, the skeleton's processes")
