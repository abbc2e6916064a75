"""gpu_check's two-process check: a group's worker (ExpertGroupServer, every expert of one layer on
the device, behind its ExpertWorker port with the mesh's secret) and the router core (Router with
GrpcTransport and a fixed routing table) in two plain processes over grpc on 127.0.0.1, no Ray.

Three layers: one of a small Mixtral checkpoint in fp32, then random bf16 layers at Mixtral's and
DeepSeek-V3's expert shapes (tiny ones on the CPU), made on the device from one seed in both
processes (no checkpoint of that size). The hidden states start and end on the device. The router
core gates, plans and combines on the device (`router.device`; its rows cross the host through
pinned buffers, grpc's), then on the host (a CPU router with GPU groups). Each answer is checked
against MoELayer in-process on the device, and ms per layer at T = 64 and 256 are printed beside it.

It needs pydantic (the configs are pydantic models): on the GPU machine, carry its wheels
(bench/gpu_wheels.sh). Prints `RESULT <layer> <error> <tolerance>` and `FIGURE ...` lines for gpu_check.

    python bench/gpu_two_processes.py --device cuda|cpu
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
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
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # as gpu_check's: the same device computes both answers
SEED = 11
# the expert shapes of the issue on a GPU; tiny ones on the CPU (sizes replaced in the small checkpoint's spec)
SHAPES = {
    "cuda": {"Mixtral": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_experts=8, top_k=2)),
             "DeepSeek-V3": ("deepseek_v3", dict(hidden_size=7168, intermediate_size=2048, num_experts=256, top_k=8,
                                                 num_groups=8, topk_groups=4, shared_intermediate_size=2048))},
    "cpu": {"tiny Mixtral": ("mixtral", dict(hidden_size=64, intermediate_size=96, num_experts=8, top_k=2)),
            "tiny V3": ("deepseek_v3", dict(hidden_size=64, intermediate_size=32, num_experts=32, top_k=8,
                                            num_groups=8, topk_groups=4, shared_intermediate_size=32))},
}


@dataclasses.dataclass
class Source:
    """One layer to serve: a checkpoint's last MoE layer as stored (`sizes` None), or random weights
    at `sizes` in bf16 under that checkpoint's family."""

    name: str
    path: str
    sizes: dict | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.sizes is None else torch.bfloat16


def layer_parts(source: Source, device: torch.device):
    """(spec, layer, GateWeights, SharedWeights | None, LayerExperts) of `source` on `device`: the
    same in every process (a seeded generator on the device; each expert made in place)."""
    from experts import CheckpointReader, load_spec
    from experts.checkpoint import GateWeights, SharedWeights
    from experts.group import LayerExperts

    if source.sizes is None:
        reader = CheckpointReader(source.path, dtype=source.dtype)
        try:
            layer = reader.spec.moe_layers[-1]
            held = LayerExperts.from_weights(reader.experts(layer, device=device), source.dtype, device)
            return reader.spec, layer, reader.gate(layer), reader.shared(layer), held
        finally:
            reader.close()
    spec = dataclasses.replace(load_spec(source.path), **source.sizes)
    hidden, inter, num_experts, shared = (spec.hidden_size, spec.intermediate_size, spec.num_experts,
                                          spec.shared_intermediate_size)
    gen = torch.Generator(device).manual_seed(SEED)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) / shape[-1] ** 0.5).to(source.dtype)

    gate = GateWeights(rand(num_experts, hidden),
                       torch.zeros(num_experts, device=device) if spec.has_score_bias else None)
    w_gate_up = torch.empty(num_experts, spec.gate_up_rows, hidden, dtype=source.dtype, device=device)
    w_down = torch.empty(num_experts, hidden, inter, dtype=source.dtype, device=device)
    for expert in range(num_experts):  # one expert at a time: no float32 copy of the whole layer
        w_gate_up[expert], w_down[expert] = rand(spec.gate_up_rows, hidden), rand(hidden, inter)
    checksums = [hashlib.sha256(f"{source.name}/{e}".encode()).hexdigest() for e in range(num_experts)]
    shared_weights = SharedWeights(rand(2 * shared, hidden), rand(hidden, shared)) if shared else None
    return spec, spec.moe_layers[-1], gate, shared_weights, LayerExperts(list(range(num_experts)), w_gate_up,
                                                                         w_down, checksums)


def _worker(sources: list[Source], device: str, ports) -> None:
    """Serve every source's layer behind an ExpertWorker port of its own; tell (port, versions) each."""
    from experts.actor import ExpertGroupServer
    from experts.group import ExpertGroup
    from protos.serving import bind, worker_server

    async def serve() -> None:
        servers = []
        for source in sources:
            spec, layer, _, _, held = layer_parts(source, torch.device(device))
            group = ExpertGroup(spec, {layer: held}, source.dtype, device)
            servers.append(worker_server(SECRET, ExpertGroupServer(source.name, group)))
            port = bind(servers[-1], "127.0.0.1:0")
            await servers[-1].start()
            ports.put((port, [group.version(layer, e) for e in range(spec.num_experts)]))
        await servers[-1].wait_for_termination()

    asyncio.run(serve())


async def _route(source: Source, device: torch.device, port: int, versions: list[str]) -> tuple[float, float]:
    """The router core on the device, then on the host, against MoELayer in-process on the device;
    returns (worst error relative to max |reference|, tolerance)."""
    from experts import Gate, MoELayer, SharedExpert
    from experts.group import ExpertGroup
    from router_service.config import RouterConfig
    from router_service.router import Router, RouterWeights
    from router_service.routing import Copy, RoutingTable
    from router_service.transport import GrpcTransport

    spec, layer, gate, shared, held = layer_parts(source, device)
    dtype = source.dtype
    reference = MoELayer(spec, layer, Gate(spec, gate, dtype, device), ExpertGroup(spec, {layer: held}, dtype, device),
                         SharedExpert(spec, shared, dtype, device) if shared else None)
    weights = RouterWeights(spec, {layer: gate}, {layer: shared} if shared else {})
    table = RoutingTable(1, {layer: [[Copy("group-0", f"127.0.0.1:{port}", v)] for v in versions]})
    worst = 0.0
    for router_device in dict.fromkeys([device, torch.device("cpu")]):
        router = Router(weights, RouterConfig(transport="grpc"), GrpcTransport(SECRET), dtype, device=router_device)
        router.set_table(table)

        async def forward(x: torch.Tensor) -> torch.Tensor:
            return (await router.forward(layer, x))[0]  # on x's device, whatever the router's

        try:
            for num_tokens in TOKENS:
                x = torch.randn(num_tokens, spec.hidden_size, generator=torch.Generator().manual_seed(num_tokens))
                x = x.to(device, dtype)
                out, ref = await forward(x), reference(x)
                if out.device != x.device:
                    raise AssertionError(f"the answer is on {out.device}, not {x.device}")
                worst = max(worst, float((out.float() - ref.float()).abs().max() / ref.float().abs().max()))
                print(f"FIGURE {source.name} {dtype}, router core on {router_device.type} and a group's worker "
                      f"over grpc, T={num_tokens}: {await _ms(forward, x, device):.2f} ms per layer, beside "
                      f"{await _ms(_sync_call(reference), x, device):.2f} ms in-process on {device.type}", flush=True)
        finally:
            await router.close()
    return worst, TOL[dtype]


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
        paths = {family: str(save_checkpoint(build_model(family, seed=3), Path(tmp) / family))
                 for family in ("mixtral", "deepseek_v3")}
        sources = [Source("small Mixtral checkpoint", paths["mixtral"])]
        sources += [Source(name, paths[family], sizes) for name, (family, sizes) in SHAPES[device.type].items()]
        ctx = mp.get_context("spawn")
        ports = ctx.Queue()
        worker = ctx.Process(target=_worker, args=(sources, device.type, ports), daemon=True)
        worker.start()
        try:
            for source in sources:
                port, versions = ports.get(timeout=120)
                error, tolerance = asyncio.run(_route(source, device, port, versions))
                print(f"RESULT {source.name.replace(' ', '_')} {error:.3e} {tolerance:.0e}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # this layer's reference, before the next one's
        finally:
            worker.terminate()
            worker.join(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
