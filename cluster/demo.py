"""`make demo`: bring the mesh up on the built-in model, send traffic through the gRPC client (two
hops: client -> router -> groups) and through a DirectClient in this process (one hop: the router
core here, straight to the groups), show both equal the in-process MoELayer, and shut down.

Runs the real CLI (`mesh up` in a child process, `mesh down` at the end) on port 50051 or --port.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

TOLERANCE = 1e-5  # max abs error <= TOLERANCE * max|reference|, fp32


def _wait_ready(process: subprocess.Popen, timeout_s: float) -> str:
    """Echo `mesh up` output until its ready line; returns the router address."""
    found: list[str] = []
    ready = threading.Event()

    def pump():
        for line in process.stdout:
            if "Writing model shards" not in line:
                print(f"  [mesh up] {line.rstrip()}", flush=True)
            if line.startswith("expert-mesh ready at "):
                found.append(line.split()[-1])
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.time() + timeout_s
    while not ready.wait(0.5):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"`mesh up` did not become ready (exit code {process.poll()})")
    return found[0]


def _traffic(connect, model_dir: str, num_callers: int, requests_per_caller: int, label: str) -> float:
    """`num_callers` threads, each with the client `connect()` gives, send requests of 1..24 tokens
    over the MoE layers; returns the worst relative error against the in-process MoELayer."""
    from experts import MoELayer, load_spec

    spec = load_spec(model_dir)
    local = {layer: MoELayer.from_pretrained(model_dir, layer=layer) for layer in spec.moe_layers}
    worst, count = 0.0, 0
    lock = threading.Lock()

    def caller(index: int):
        nonlocal worst, count
        generator = torch.Generator().manual_seed(index)
        client = connect()
        for i in range(requests_per_caller):
            layer = spec.moe_layers[(index + i) % len(spec.moe_layers)]
            x = torch.randn(1 + (index * 7 + i) % 24, spec.hidden_size, generator=generator)
            out = client.forward(layer, x)
            ref = local[layer](x)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            with lock:
                worst, count = max(worst, err), count + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(num_callers) as pool:
        list(pool.map(caller, range(num_callers)))
    elapsed = time.perf_counter() - start
    print(f"{label}: {count} requests from {num_callers} concurrent callers in {elapsed:.2f} s; "
          f"worst max|mesh - local| / max|local| = {worst:.2e}")
    return worst


def _both_paths(address: str, model_dir: str, num_callers: int, requests_per_caller: int) -> float:
    """The router path (a MeshClient per caller), then the direct path (one DirectClient shared by
    this process's callers, on the Ray cluster `mesh up` started); returns the worst error of both."""
    from router_service import DirectClient, MeshClient

    clients = []

    def grpc_client():
        clients.append(MeshClient(address, timeout_s=60))
        return clients[-1]

    worst = _traffic(grpc_client, model_dir, num_callers, requests_per_caller, f"router at {address}")
    for client in clients:
        client.close()
    print("$ python -c 'DirectClient(\"demo\")'   # this process joins the Ray cluster and routes its own tokens")
    with DirectClient("demo") as direct:
        worst = max(worst, _traffic(lambda: direct, model_dir, num_callers, requests_per_caller,
                                    f"direct client {direct.name}"))
        print("$ mesh status   # lists the direct client beside the router while its lease lives")
        subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--name", "demo"], check=False)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16, help="requests per caller")
    args = parser.parse_args()

    from experts.builtin import builtin_model_dir

    model_dir = str(builtin_model_dir())
    print(f"$ mesh up --nodes {args.nodes} --port {args.port}")
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", "--nodes", str(args.nodes),
                                "--port", str(args.port), "--name", "demo"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = _wait_ready(process, timeout_s=300)
        print("$ mesh status")
        subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--name", "demo"], check=False)
        worst = _both_paths(address, model_dir, args.callers, args.requests)
    finally:
        print("$ mesh down")
        subprocess.run([sys.executable, "-m", "cluster.cli", "down", "--name", "demo"], check=False)
        process.wait(timeout=120)
    ok = worst <= TOLERANCE
    print(f"{'OK' if ok else 'MISMATCH'}: the mesh equals the in-process MoELayer (tolerance {TOLERANCE:g}, fp32)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
