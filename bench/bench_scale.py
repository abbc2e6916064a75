"""The control plane at DeepSeek-V3's shape, in figures.

58 MoE layers x 256 experts (top-8, H=64, moe_intermediate_size 16) on 64 simulated groups
(experts/simulated.py: no weights, no compute; stage, commit and release as bookkeeping, versions
from the source bytes' sha256) over 8 emulated nodes, every expert on 2 groups, while callers send
Forward through the router the whole time. Each step goes the way a user's would (the router's
MeshAdmin service, with the admin token) and is timed:

    mesh up                      start_mesh, from nothing to serving
    mesh status                  one Status call, and its reply's size
    table push                   the controller's last push to the router (its `last_push`)
    mesh scale                   one expert to 3 copies
    mesh swap                    a whole layer (256 experts) from a second checkpoint, beside the time to
                                 sha256 those experts' bytes once, and the whole files once, in this process
    node's groups killed         the 8 groups of one node killed at once (ray.kill), until all 8 serve again

and, over the whole run: requests sent, failed (by error), epochs seen; groups restarted that were
not killed (a false death); the controller's RssAnon, idle and at its peak during the swap (sampled
every 10 ms from /proc).

Both checkpoints are written in shards of 4 MB (one per layer) with an index, as DeepSeek-V3's is
published (163 shards): a group reads the index and its layer's shard header. From one file whose
header names all 45k tensors, each of the 64 groups parses that whole header at every stage (0.1 s
of CPU each, on the same 2 cores).

    .venv/bin/python bench/bench_scale.py [--groups 64] [--nodes 8] [--callers 4]

Minutes on 2 cores (64 group processes start); not part of `make test`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

import msgpack  # noqa: E402
import ray  # noqa: E402

from bench.bench_mesh import V3  # noqa: E402
from cluster.local import start_local_cluster, start_mesh  # noqa: E402
from experts.builtin import build_model, save_checkpoint  # noqa: E402
from experts.safetensors import CheckpointLayout  # noqa: E402
from experts.simulated import SimulatedGroupFactory  # noqa: E402
from mesh.config import MeshConfig  # noqa: E402
from mesh.controller import NAMESPACE  # noqa: E402
from protos import expert_mesh_pb2 as pb  # noqa: E402
from protos import expert_mesh_pb2_grpc as pb_grpc  # noqa: E402
from protos.serving import channel  # noqa: E402
from router_service import MeshClient  # noqa: E402

TOKEN = "bench"
SHARD = "4MB"  # one shard of the checkpoint per layer and an index, as published checkpoints are sharded
REQUEST_TOKENS = 16


def progress(message: str) -> None:
    print(f"[bench_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Traffic:
    """`callers` threads, each sending Forward (REQUEST_TOKENS tokens, the MoE layers in turn) back to
    back through the router; every request counted by outcome and epoch."""

    def __init__(self, address: str, layers: list[int], callers: int):
        self.address, self.layers = address, layers
        self.sent, self.failed, self.epochs = 0, Counter(), Counter()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(callers)]

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, seed: int) -> None:
        x = torch.randn(REQUEST_TOKENS, V3["hidden_size"], generator=torch.Generator().manual_seed(seed))
        x = x.to(torch.bfloat16)
        with MeshClient(self.address, timeout_s=60) as client:
            i = 0
            while not self._stop.is_set():
                layer = self.layers[i % len(self.layers)]
                i += 1
                try:
                    _, epoch = client.forward_with_epoch(layer, x)
                    outcome = None
                except Exception as exc:  # noqa: BLE001 - counted: the figure is how many
                    outcome, epoch = f"{type(exc).__name__}: {str(exc)[:80]}", None
                with self._lock:
                    self.sent += 1
                    if outcome:
                        self.failed[outcome] += 1
                    else:
                        self.epochs[epoch] += 1


class RssSampler:
    """RssAnon of one process every `period_s` while active: `peak` (bytes) since `reset()`."""

    def __init__(self, pid: int, period_s: float = 0.01):
        self.pid, self.period_s, self.peak = pid, period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon"))

    def reset(self) -> None:
        self.peak = self.now()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.period_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def hash_seconds(path: Path, layer: int, experts: list[int]) -> tuple[float, float, int]:
    """(seconds to sha256 the experts' stored bytes once, seconds to sha256 the checkpoint's
    .safetensors files whole, those files' bytes), measured here."""
    layout = CheckpointLayout(path)
    start = time.perf_counter()
    for expert in experts:
        layout.checksum(layer, expert)
    experts_s = time.perf_counter() - start
    layout.close()
    files = sorted(path.glob("*.safetensors"))
    start = time.perf_counter()
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return experts_s, time.perf_counter() - start, sum(f.stat().st_size for f in files)


def restarted(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Groups whose endpoint changed (a new process) between two status snapshots."""
    return sorted(name for name, endpoint in before.items() if after.get(name) != endpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--callers", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    progress("writing two checkpoints of the V3 shape (seeds 0 and 1)")
    save_checkpoint(build_model("deepseek_v3", seed=0, **V3), root / "old", max_shard_size=SHARD)
    save_checkpoint(build_model("deepseek_v3", seed=1, **V3), root / "new", max_shard_size=SHARD)
    cluster = start_local_cluster(num_nodes=args.nodes)
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    config = MeshConfig(name="bench-scale", admin_token=TOKEN, router={"port": 0}, router_dtype="bfloat16",
                        swap_probe_experts=0, groups={"num_groups": args.groups, "replicas": 2})
    progress(f"mesh up: {args.groups} simulated groups on {args.nodes} nodes, replicas 2")
    up_s, mesh = timed(lambda: start_mesh(config, root / "old", progress, SimulatedGroupFactory(latency_ms=0.0)))
    figures: dict[str, str] = {"mesh up": f"{up_s:.1f} s"}
    controller_pid = ray.get(mesh.controller.__ray_call__.remote(lambda self: os.getpid()))
    rss = RssSampler(controller_pid)
    try:
        run_steps(mesh, root, args, figures, rss)
    finally:
        rss.close()
        mesh.stop()
        ray.shutdown()
        cluster.shutdown()
    print(f"DeepSeek-V3 shape ({len(range(V3['first_k_dense_replace'], V3['num_hidden_layers']))} MoE layers x "
          f"{V3['n_routed_experts']} experts, top-{V3['num_experts_per_tok']}, H={V3['hidden_size']}) on "
          f"{args.groups} simulated groups, {args.nodes} nodes, replicas 2, {args.callers} callers throughout")
    for name, value in figures.items():
        print(f"  {name:<28} {value}")


def run_steps(mesh, root: Path, args, figures: dict[str, str], rss: RssSampler) -> None:
    admin = pb_grpc.MeshAdminStub(channel(mesh.address, None, aio=False))
    bearer = [("authorization", f"Bearer {TOKEN}")]
    layers = list(MeshClient(mesh.address).info().moe_layers)

    def status() -> dict:
        reply = admin.Status(pb.StatusRequest(), timeout=30, metadata=bearer)
        return msgpack.unpackb(reply.snapshot, strict_map_key=False) | {"_bytes": len(reply.snapshot)}

    def endpoints() -> dict[str, str]:
        return {g["name"]: g["endpoint"] for g in status()["groups"]}

    with Traffic(mesh.address, layers, args.callers) as traffic:
        time.sleep(3)
        status_s = [timed(status)[0] for _ in range(5)]
        snapshot = status()
        figures["mesh status"] = (f"{sorted(status_s)[2] * 1e3:.0f} ms (median of 5, goal <= 1 s), "
                                  f"{snapshot['_bytes'] / 1e3:.0f} KB")
        first = endpoints()

        progress("mesh scale: layer 3 expert 7 to 3 copies")
        scale_s, reply = timed(lambda: admin.Scale(pb.ScaleRequest(layer=layers[0], expert=7, replicas=3),
                                                   timeout=300, metadata=bearer))
        push = status()["last_push"]
        figures["mesh scale"] = f"{scale_s:.2f} s ({reply.message})"
        figures["table push"] = (f"{push['seconds'] * 1e3:.0f} ms, {push['bytes'] / 1e3:.0f} KB to "
                                 f"{push['routers']} router(s)")

        layer, experts = layers[len(layers) // 2], list(range(V3["n_routed_experts"]))
        experts_s, files_s, nbytes = hash_seconds(root / "new", layer, experts)
        rss.reset()
        idle = rss.now()
        progress(f"mesh swap: layer {layer}, all {len(experts)} experts")
        swap_s, reply = timed(lambda: admin.Swap(pb.SwapRequest(layer=layer, experts=experts,
                                                                source_dir=str(root / "new")),
                                                 timeout=600, metadata=bearer))
        bound = 1.5 * files_s + 10
        figures["mesh swap (256 experts)"] = (f"{swap_s:.2f} s (goal <= 1.5 x {files_s:.2f} s + 10 = {bound:.1f} s: "
                                              f"{'met' if swap_s <= bound else 'NOT met'}); "
                                              f"{'ok' if reply.ok else reply.message}")
        figures["sha256 once, here"] = (f"the 256 experts' bytes {experts_s:.3f} s; the files whole "
                                        f"({nbytes / 1e6:.0f} MB) {files_s:.2f} s")
        figures["controller RssAnon"] = (f"idle {idle / 2**20:.1f} MiB, peak during the swap "
                                         f"{rss.peak / 2**20:.1f} MiB (+{(rss.peak - idle) / 2**10:.0f} KiB)")

        node = status()["groups"][0]["node"]
        victims = [g["name"] for g in status()["groups"] if g["node"] == node]
        before = endpoints()
        progress(f"killing the {len(victims)} groups of node {node[:12]} at once")
        start = time.perf_counter()
        for name in victims:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        while True:
            now = status()
            back = [g for g in now["groups"]
                    if g["name"] in victims and g["alive"] and g["endpoint"] != before[g["name"]]]
            if len(back) == len(victims) and not now.get("change"):
                break
            time.sleep(0.05)
        restore_s = time.perf_counter() - start
        figures["node's groups restored"] = (f"{len(victims)} groups in {restore_s:.1f} s (goal <= 20 s: "
                                             f"{'met' if restore_s <= 20 else 'NOT met'})")
        time.sleep(2)
        false_deaths = [g for g in restarted(first, endpoints()) if g not in victims]
    failed = sum(traffic.failed.values())
    figures["requests"] = (f"{traffic.sent} sent, {failed} failed{' ' + str(dict(traffic.failed)) if failed else ''}, "
                           f"epochs {min(traffic.epochs)}..{max(traffic.epochs)}")
    figures["false deaths"] = f"{len(false_deaths)} {false_deaths if false_deaths else ''}".strip()


if __name__ == "__main__":
    main()
