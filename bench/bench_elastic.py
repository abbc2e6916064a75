"""Elastic behaviour of the mesh, in figures. One part per question; run one with --part.

(a) balance: per layer, expert popularity ~ 1 / rank^alpha under a random permutation, 32,768 token
    copies drawn multinomially; 58 layers x 256 experts in 8 expert groups, 32 devices on 4 nodes,
    288 slots. Prints max/mean device load (mean over layers) before any replication (one copy per
    expert, experts packed contiguously), after EPLB's published algorithm (global and hierarchical,
    the plain implementation in bench/eplb_reference.py) and after mesh.replication's policy (global,
    and with every expert group kept on one node); the node bound, below which no plan that keeps every
    group on one node can go; the slots EPLB spends on a second copy of an expert
    on the same device; and each policy's run time per call (min over --reps calls).

Device load = sum over the device's slots of (expert load / expert's copy count).

(b) scaling under skew: a real mesh (4 emulated nodes, one router, real gating and gRPC) whose 16
    expert groups are simulated devices (experts/simulated.py: each batch sleeps as long as a cost
    model says, one batch at a time per device). Callers send 32-token requests whose first expert
    choice follows 1 / rank^alpha; throughput (tokens/s) and p50 / p99 latency with auto-replication
    off, then on (after a warm-up in which the autoscaler adds copies of the hot experts).

(c) timings on real experts (a small Mixtral, 2 copies of every expert, continuous load): from
    `mesh swap` to the first answer computed with the new weights, and to the call's return; from
    killing an expert group to its restored count serving.

    .venv/bin/python bench/bench_elastic.py [--part a|b|c|all] [--reps 5] [--seed 0] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.eplb_reference import rebalance_experts as eplb_rebalance  # noqa: E402
from mesh.replication import rebalance_experts  # noqa: E402

ALPHAS = (0.6, 1.0, 1.4)
NUM_LAYERS, NUM_EXPERTS, NUM_GROUPS = 58, 256, 8
NUM_DEVICES, NUM_NODES, NUM_SLOTS = 32, 4, 288
NUM_TOKENS = 32_768


def zipf_loads(num_layers: int, num_experts: int, alpha: float, num_tokens: int, seed: int) -> torch.Tensor:
    """Tokens per expert, [L, E] float: per layer, popularity ~ 1 / rank^alpha under a random
    permutation of the experts, num_tokens token copies drawn multinomially."""
    generator = torch.Generator().manual_seed(seed)
    popularity = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -alpha  # [E] by rank
    ranks = torch.stack([torch.randperm(num_experts, generator=generator) for _ in range(num_layers)])  # [L, E]
    picks = torch.multinomial(popularity[ranks], num_tokens, replacement=True, generator=generator)  # [L, T]
    return torch.zeros(num_layers, num_experts).scatter_add_(1, picks, torch.ones(picks.shape))


def device_load(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor, num_devices: int) -> torch.Tensor:
    """weight: [L, E]; phy2log: [L, P]; logcnt: [L, E]. Returns load per device [L, D]."""
    copy_load = (weight / logcnt).gather(1, phy2log)  # [L, P]
    return copy_load.view(weight.shape[0], num_devices, -1).sum(-1)


def max_over_mean(load: torch.Tensor) -> float:
    """load: [L, D]. Mean over layers of max / mean device load."""
    return float((load.max(1).values / load.mean(1)).mean())


def duplicate_slots(phy2log: torch.Tensor, num_devices: int) -> int:
    """Slots holding a second (third, ...) copy of an expert on the same device, over all layers."""
    per_device = phy2log.view(phy2log.shape[0], num_devices, -1).sort(-1).values  # [L, D, S]
    return int((per_device[..., 1:] == per_device[..., :-1]).sum())


def node_bound(weight: torch.Tensor) -> float:
    """Mean over layers of the lowest max/mean device load of any plan that keeps every expert group on
    one node: the busiest node's load spread over its devices. A node's slots (72) hold the single
    copies of at most two groups of 32 experts, so each of the 4 nodes hosts exactly two of the 8 groups,
    and pairing the heaviest group with the lightest, and so on, gives the lowest busiest pair.

    weight: [L, E]."""
    assert NUM_GROUPS == 2 * NUM_NODES and NUM_SLOTS // NUM_NODES < 3 * (NUM_EXPERTS // NUM_GROUPS)
    group_load = weight.view(weight.shape[0], NUM_GROUPS, -1).sum(-1).sort(1).values  # [L, G]
    busiest_pair = (group_load + group_load.flip(1)).max(1).values  # [L]
    return float((busiest_pair * NUM_NODES / weight.sum(1)).mean())


def min_time_ms(fn, reps: int) -> float:
    """Min wall time of `reps` calls, in ms (the machine is shared: the min is the least disturbed)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def part_a(reps: int, seed: int) -> None:
    """Balance: EPLB's algorithm vs mesh.replication on Zipf-like loads."""
    policies = {
        "EPLB glob": lambda w: eplb_rebalance(w, NUM_SLOTS, 1, 1, NUM_DEVICES),
        "EPLB hier": lambda w: eplb_rebalance(w, NUM_SLOTS, NUM_GROUPS, NUM_NODES, NUM_DEVICES),
        "ours glob": lambda w: rebalance_experts(w, NUM_SLOTS, NUM_GROUPS, NUM_NODES, NUM_DEVICES),
        "ours node": lambda w: rebalance_experts(w, NUM_SLOTS, NUM_GROUPS, NUM_NODES, NUM_DEVICES,
                                                 keep_groups_on_node=True),
    }
    print(f"(a) balance: {NUM_LAYERS} layers x {NUM_EXPERTS} experts in {NUM_GROUPS} groups, {NUM_DEVICES} devices "
          f"on {NUM_NODES} nodes, {NUM_SLOTS} slots, {NUM_TOKENS} token copies per layer; max/mean device load "
          f"(mean over layers); 'ours node' keeps each group on one node, 'node bound' is the lowest any such "
          f"plan can reach; time = min of {reps} calls, "
          f"{torch.get_num_threads()} thread(s)")
    names = list(policies)
    print(f"{'alpha':>5} | {'before':>6} | " + " | ".join(f"{n:>9}" for n in names) + f" | {'node bound':>10}"
          + f" | {'dup slots EPLB glob/hier (ours)':>31} | " + " | ".join(f"{n + ' ms':>12}" for n in names))
    for alpha in ALPHAS:
        weight = zipf_loads(NUM_LAYERS, NUM_EXPERTS, alpha, NUM_TOKENS, seed)
        before = max_over_mean(weight.view(NUM_LAYERS, NUM_DEVICES, -1).sum(-1))  # one copy each, contiguous
        ratio, duplicates, time_ms = {}, {}, {}
        for name, policy in policies.items():
            phy2log, _, logcnt = policy(weight)
            ratio[name] = max_over_mean(device_load(weight, phy2log, logcnt, NUM_DEVICES))
            duplicates[name] = duplicate_slots(phy2log, NUM_DEVICES)
            time_ms[name] = min_time_ms(lambda: policy(weight), reps)
        dup = (f"{duplicates['EPLB glob']}/{duplicates['EPLB hier']} "
               f"({duplicates['ours glob'] + duplicates['ours node']})")
        print(f"{alpha:>5} | {before:>6.3f} | " + " | ".join(f"{ratio[n]:>9.3f}" for n in names)
              + f" | {node_bound(weight):>10.3f} | {dup:>31} | " + " | ".join(f"{time_ms[n]:>12.1f}" for n in names))
    print("ours glob given the placement in force (planned on an earlier sample of the same popularity): "
          "max/mean, slots whose expert stays, time")
    for alpha in ALPHAS:
        weight = zipf_loads(NUM_LAYERS, NUM_EXPERTS, alpha, NUM_TOKENS, seed)
        earlier = torch.zeros_like(weight).scatter_add_(  # the same experts hot, other tokens drawn
            1, torch.multinomial(weight, NUM_TOKENS, replacement=True, generator=torch.Generator().manual_seed(seed + 1)),
            torch.ones(NUM_LAYERS, NUM_TOKENS))
        current = rebalance_experts(earlier, NUM_SLOTS, NUM_GROUPS, NUM_NODES, NUM_DEVICES)[0]

        def keep(w=weight, c=current):
            return rebalance_experts(w, NUM_SLOTS, NUM_GROUPS, NUM_NODES, NUM_DEVICES, current_phy2log=c)

        phy2log, _, logcnt = keep()
        kept = float((phy2log == current).float().mean())
        print(f"{alpha:>5} | {max_over_mean(device_load(weight, phy2log, logcnt, NUM_DEVICES)):.3f} | "
              f"{kept:.0%} kept | {min_time_ms(keep, reps):.1f} ms")


# -- (b) and (c): real meshes on a local 4-node Ray cluster -------------------------------------------

SIM = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_local_experts=16, num_experts_per_tok=2)
SIM_COST = {"tflops": 0.0004, "latency_ms": 0.5}  # ~2 ms per token copy: devices scaled to what 2 cores feed
REQUEST_TOKENS = 32
TARGET_LOAD = 0.2
"""Autoscale target per copy, as a share of a device's capacity. A layer waits for its slowest device,
so devices idle between batches and measured rates understate the need: balance pays, not utilisation."""


def _local_cluster(num_nodes: int = 4):
    import ray

    from cluster.local import start_local_cluster
    from mesh.controller import NAMESPACE

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = start_local_cluster(num_nodes=num_nodes)
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    return cluster


def skewed_requests(path: Path, alpha: float, count: int, seed: int) -> list[torch.Tensor]:
    """`count` requests [REQUEST_TOKENS, H] whose tokens' first expert follows 1 / rank^alpha over a
    random permutation of the experts (tokens drawn from a pool by their gate's top-1)."""
    from experts import CheckpointReader, Gate

    reader = CheckpointReader(path)
    gate = Gate(reader.spec, reader.gate(0))
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(40_000, reader.spec.hidden_size, generator=generator)
    first = gate(pool)[1][:, 0]
    experts = reader.spec.num_experts
    popularity = torch.arange(1, experts + 1, dtype=torch.float64)[torch.randperm(experts, generator=generator)] ** -alpha
    picks = torch.multinomial(popularity, count * REQUEST_TOKENS, replacement=True, generator=generator)
    by_expert = [pool[first == e] for e in range(experts)]
    rows = [by_expert[e][torch.randint(len(by_expert[e]), (1,), generator=generator)] for e in picks.tolist()]
    return list(torch.cat(rows).split(REQUEST_TOKENS))


async def _closed_loop(address: str, requests: list[torch.Tensor], callers: int, seconds: float) -> list[float]:
    """`callers` async callers send requests back to back for `seconds`; returns each latency (s)."""
    from router_service import AsyncMeshClient

    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        async with AsyncMeshClient(address) as client:
            i = k
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                await client.forward(0, requests[i % len(requests)])
                latencies.append(time.perf_counter() - start)
                i += callers

    await asyncio.gather(*(caller(k) for k in range(callers)))
    return latencies


def _load_figures(latencies: list[float], seconds: float) -> dict:
    ordered = sorted(latencies)
    return {"tokens_per_s": len(ordered) * REQUEST_TOKENS / seconds, "p50_ms": ordered[len(ordered) // 2] * 1e3,
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3, "requests": len(ordered)}


def _hot_copies(mesh, top: int = 4) -> str:
    status = mesh.status()
    hot = sorted(status["tokens_per_s"].items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"E{k.split('/')[1]} {r:.0f}/s x{status['copies'][k]}" for k, r in hot)


def part_b(args) -> None:
    """Throughput and p99 under skew, auto-replication off vs on, on simulated devices."""
    import ray

    from experts.builtin import build_model, save_checkpoint
    from experts.simulated import SimulatedGroupFactory
    from cluster.local import start_mesh
    from mesh.config import MeshConfig

    path = Path(tempfile.mkdtemp(prefix="bench-elastic-")) / "mixtral"
    save_checkpoint(build_model("mixtral", seed=args.seed, **SIM), path)
    requests = skewed_requests(path, args.alpha, 256, args.seed)
    cost_ms = 6 * SIM["hidden_size"] * SIM["intermediate_size"] / (SIM_COST["tflops"] * 1e12) * 1e3
    print(f"(b) {SIM['num_local_experts']} experts (top-{SIM['num_experts_per_tok']}) on 16 simulated devices, 4 nodes; "
          f"cost model {cost_ms:.2f} ms per token copy + {SIM_COST['latency_ms']} ms per batch; {args.callers} callers "
          f"x {REQUEST_TOKENS}-token requests, first choice ~ 1/rank^{args.alpha}; {args.seconds:.0f} s per phase; "
          f"autoscale target {TARGET_LOAD:.0%} of a device's capacity per copy")
    cluster = _local_cluster()
    try:
        config = MeshConfig(name="bench-b", admin_token="bench", router={"port": 0, "load_window_s": 4},
                            groups={"num_groups": 16},
                            autoscale={"target_tokens_per_s": TARGET_LOAD * 1e3 / cost_ms, "period_s": 2, "max_copies": 8})
        mesh = start_mesh(config, path, lambda m: print(f"  {m}", flush=True), SimulatedGroupFactory(**SIM_COST))
        figures = {}
        asyncio.run(_closed_loop(mesh.address, requests, args.callers, 3))  # connect, warm up
        figures["off"] = _load_figures(asyncio.run(_closed_loop(mesh.address, requests, args.callers, args.seconds)),
                                       args.seconds)
        print(f"  off: hottest {_hot_copies(mesh)}", flush=True)
        ray.get(mesh.controller.set_autoscale.remote("bench", True))
        asyncio.run(_closed_loop(mesh.address, requests, args.callers, args.warmup))  # the autoscaler follows
        epoch = mesh.status()["epoch"]
        figures["on"] = _load_figures(asyncio.run(_closed_loop(mesh.address, requests, args.callers, args.seconds)),
                                      args.seconds)
        status = mesh.status()
        print(f"  on:  hottest {_hot_copies(mesh)}; copies in all: {sum(status['copies'].values())}; "
              f"{status['epoch'] - epoch} table changes while measuring")
        print(f"{'replication':>11} | {'tokens/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | requests")
        for name, f in figures.items():
            print(f"{name:>11} | {f['tokens_per_s']:>9.0f} | {f['p50_ms']:>7.1f} | {f['p99_ms']:>7.1f} | {f['requests']}")
        print(f"throughput on/off: {figures['on']['tokens_per_s'] / figures['off']['tokens_per_s']:.2f}x; "
              f"p99 off/on: {figures['off']['p99_ms'] / figures['on']['p99_ms']:.2f}x")
        mesh.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()


def part_c(args) -> None:
    """Swap-to-serving and kill-to-restored times on real experts under load."""
    import ray

    from cluster.local import start_mesh
    from experts import MoELayer
    from experts.builtin import build_model, save_checkpoint
    from mesh.config import MeshConfig
    from router_service import MeshClient

    small = dict(SIM, num_local_experts=8)
    root = Path(tempfile.mkdtemp(prefix="bench-elastic-"))
    save_checkpoint(build_model("mixtral", seed=args.seed, **small), root / "old")
    save_checkpoint(build_model("mixtral", seed=args.seed + 1, **small), root / "new")
    x = torch.randn(16, small["hidden_size"], generator=torch.Generator().manual_seed(args.seed))
    old_layer = MoELayer.from_pretrained(root / "old", layer=0)
    old_ref = old_layer(x)
    old_layer.experts = MoELayer.from_pretrained(root / "new", layer=0).experts  # the old gate, new experts
    new_ref = old_layer(x)
    cluster = _local_cluster()
    try:
        config = MeshConfig(name="bench-c", admin_token="bench", router={"port": 0},
                            drain_s=0.5, groups={"num_groups": 4, "replicas": 2})
        mesh = start_mesh(config, root / "old")
        print(f"(c) 8 experts x 2 copies on 4 groups (4 nodes), health period {config.health_period_s} s, "
              f"drain {config.drain_s} s; {args.reps} rounds, a caller sending 16 tokens back to back")
        swaps, first_new, restores, failures = [], [], [], []
        for round_ in range(args.reps):
            source = root / ("new" if round_ % 2 == 0 else "old")
            ref = new_ref if round_ % 2 == 0 else old_ref
            seen, seen_at = threading.Event(), []
            done = threading.Event()

            def watch() -> None:
                with MeshClient(mesh.address) as client:
                    while not done.is_set() and not seen.is_set():
                        try:
                            out = client.forward(0, x)
                        except Exception as exc:  # noqa: BLE001 - counted, the bench goes on
                            failures.append(repr(exc))
                            continue
                        if ((out - ref).abs().max() <= 1e-5 * ref.abs().max()).item():
                            seen_at.append(time.perf_counter())
                            seen.set()

            watcher = threading.Thread(target=watch)
            start = time.perf_counter()
            watcher.start()
            reply = ray.get(mesh.controller.swap.remote("bench", 0, list(range(8)), str(source)))
            swaps.append(time.perf_counter() - start)
            seen.wait(30)
            first_new.append(seen_at[0] - start if seen_at else float("inf"))
            done.set()
            watcher.join()
            assert reply["ok"], reply["message"]
            restores.append(_kill_and_restore(mesh, f"bench-c/group-{round_ % 4}"))
        print(f"swap of 8 experts: first new answer after {_spread(first_new)} s, call returned after {_spread(swaps)} s")
        print(f"kill -> restored count serving: {_spread(restores)} s; failed requests: {len(failures)} "
              f"{failures[:2]}")
        mesh.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()


def _kill_and_restore(mesh, name: str) -> float:
    import ray

    before = next(g["endpoint"] for g in mesh.status()["groups"] if g["name"] == name)
    start = time.perf_counter()
    ray.kill(ray.get_actor(name))
    while True:
        group = next(g for g in mesh.status()["groups"] if g["name"] == name)
        if group["alive"] and group["endpoint"] != before:
            return time.perf_counter() - start
        time.sleep(0.05)


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    return f"median {ordered[len(ordered) // 2]:.2f} (min {ordered[0]:.2f}, max {ordered[-1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "c", "all"], default="all")
    parser.add_argument("--reps", type=int, default=5, help="(a) calls per policy for the run time; (c) rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--seconds", type=float, default=15.0, help="(b) measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=30.0, help="(b) seconds the autoscaler gets before measuring")
    parser.add_argument("--callers", type=int, default=16, help="(b) concurrent callers")
    parser.add_argument("--alpha", type=float, default=1.2, help="(b) skew of the first expert choice")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for part in ("a", "b", "c") if args.part == "all" else (args.part,):
        if part == "a":
            part_a(args.reps, args.seed)
        else:
            {"b": part_b, "c": part_c}[part](args)


if __name__ == "__main__":
    main()
