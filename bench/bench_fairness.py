"""Fairness under a flood: one caller keeps 64 Forwards in flight on its own connection while
another sends one request at a time; prints the second caller's p50 unloaded and flooded, their
ratio (the goal: at most 3x) and the flood's tokens per second meanwhile. Mixtral-shaped layer,
H=1024, on an emulated 3-node cluster.

    .venv/bin/python bench/bench_fairness.py [--flood-tokens 64] [--tokens 8] [--calls 60]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402

from cluster.local import start_local_cluster, start_mesh  # noqa: E402
from experts.builtin import build_model, save_checkpoint  # noqa: E402
from mesh.config import MeshConfig  # noqa: E402
from mesh.controller import NAMESPACE  # noqa: E402
from router_service import AsyncMeshClient, MeshClient  # noqa: E402

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=1)


def p50_ms(client: MeshClient, x: torch.Tensor, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        client.forward(0, x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def flood(address: str, x: torch.Tensor, stop: threading.Event, served: list, in_flight: int = 64) -> None:
    """Keeps `in_flight` Forwards of x going until `stop`; appends each answer's time to `served`."""
    async def main():
        client = AsyncMeshClient(address, timeout_s=120)

        async def one_slot():
            while not stop.is_set():
                await client.forward(0, x)
                served.append(time.perf_counter())

        await asyncio.gather(*(one_slot() for _ in range(in_flight)))
        await client.close()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--calls", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_fairness-") as tmp:
        path = save_checkpoint(build_model("mixtral", seed=0, **SHAPE), Path(tmp) / "big")
        cluster = start_local_cluster(num_nodes=3)
        try:
            ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
            mesh = start_mesh(MeshConfig(name="fair", router={"port": 0}), path)
            x = torch.randn(args.tokens, SHAPE["hidden_size"])
            with MeshClient(mesh.address, timeout_s=120) as client:
                p50_ms(client, x, 10)
                alone = p50_ms(client, x, args.calls)
                stop, served = threading.Event(), []
                flooder = threading.Thread(target=flood, args=(mesh.address, torch.randn(args.flood_tokens, 1024), stop,
                                                               served))
                flooder.start()
                time.sleep(2.0)
                start = time.perf_counter()
                flooded = p50_ms(client, x, args.calls)
                window = time.perf_counter() - start
                flood_rate = sum(start <= t for t in served) * args.flood_tokens / window
                stop.set()
                flooder.join()
            mesh.stop()
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(f"caller of {args.tokens} tokens, one at a time: p50 {alone:.1f} ms alone, {flooded:.1f} ms beside a "
          f"caller holding 64 x {args.flood_tokens} tokens in flight: {flooded / alone:.2f}x (goal <= 3x); "
          f"the flood meanwhile got {flood_rate:.0f} tokens/s")


if __name__ == "__main__":
    main()
