"""gpu_check's two-process check: a group's worker (ExpertGroupServer, every expert of one layer on
the device, behind its ExpertWorker port with the mesh's secret) and the router core (Router with
GrpcTransport and a fixed routing table) in two plain processes over grpc on 127.0.0.1, no Ray.
The hidden states start and end on the device. The router core gates, plans and combines on the
device (`router.device`; its rows cross the host through pinned buffers, grpc's), then again on
the host (a CPU router with GPU groups). Each answer is checked against MoELayer on the device.

It needs pydantic (the configs are pydantic models): on the GPU machine, carry its wheels
(bench/gpu_wheels.sh). Prints `RESULT <error> <tolerance>` and `FIGURE ...` lines for gpu_check.

    python bench/gpu_two_processes.py --device cuda|cpu
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SECRET = "gpu-check"
TOKENS = (64, 256)
REPS = 20
TOLERANCE = 1e-5  # fp32: the same device computes both answers


def _worker(path: str, device: str, ports) -> None:
    from experts import load_spec
    from experts.actor import ExpertGroupServer
    from experts.group import ExpertGroup
    from protos.serving import bind, worker_server

    spec = load_spec(path)
    layer = spec.moe_layers[-1]
    group = ExpertGroup.from_checkpoint(path, {layer: list(range(spec.num_experts))}, device=device)

    async def serve() -> None:
        server = worker_server(SECRET, ExpertGroupServer("group-0", group))
        port = bind(server, "127.0.0.1:0")
        await server.start()
        ports.put((port, [group.version(layer, e) for e in range(spec.num_experts)]))
        await server.wait_for_termination()

    asyncio.run(serve())


async def _route(path: str, device: torch.device, port: int, versions: list[str]) -> None:
    from experts import MoELayer, load_spec
    from router_service.config import RouterConfig
    from router_service.router import Router, RouterWeights
    from router_service.routing import Copy, RoutingTable
    from router_service.transport import GrpcTransport

    spec = load_spec(path)
    layer = spec.moe_layers[-1]
    table = RoutingTable(1, {layer: [[Copy("group-0", f"127.0.0.1:{port}", v)] for v in versions]})
    reference = MoELayer.from_pretrained(path, layer, device=device)
    worst = 0.0
    for router_device in dict.fromkeys([device, torch.device("cpu")]):
        router = Router(RouterWeights.from_checkpoint(path), RouterConfig(transport="grpc"), GrpcTransport(SECRET),
                        device=router_device)
        router.set_table(table)

        async def forward(x: torch.Tensor) -> torch.Tensor:
            return (await router.forward(layer, x))[0]  # on x's device, whatever the router's

        try:
            for num_tokens in TOKENS:
                x = torch.randn(num_tokens, spec.hidden_size,
                                generator=torch.Generator().manual_seed(num_tokens)).to(device)
                out, ref = await forward(x), reference(x)
                if out.device != x.device:
                    raise AssertionError(f"the answer is on {out.device}, not {x.device}")
                worst = max(worst, float((out - ref).abs().max() / ref.abs().max()))
                print(f"FIGURE two processes over grpc, router on {router_device.type}, T={num_tokens}: "
                      f"{await _ms(forward, x, device):.2f} ms per layer, beside "
                      f"{await _ms(_sync_call(reference), x, device):.2f} ms in-process on {device.type}", flush=True)
        finally:
            await router.close()
    print(f"RESULT {worst:.3e} {TOLERANCE:.0e}", flush=True)


def _sync_call(layer):
    async def call(x: torch.Tensor) -> torch.Tensor:
        return layer(x)
    return call


async def _ms(call, x: torch.Tensor, device: torch.device) -> float:
    """Median ms of REPS calls (after one), synchronised with the device."""
    await call(x)
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        await call(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    device = torch.device(parser.parse_args().device)
    from experts.builtin import build_model, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="gpu_two_processes-") as tmp:
        path = str(save_checkpoint(build_model("mixtral", seed=3), Path(tmp) / "mixtral"))
        ctx = mp.get_context("spawn")
        ports = ctx.Queue()
        worker = ctx.Process(target=_worker, args=(path, device.type, ports), daemon=True)
        worker.start()
        try:
            port, versions = ports.get(timeout=120)
            asyncio.run(_route(path, device, port, versions))
        finally:
            worker.terminate()
            worker.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
