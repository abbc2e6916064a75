"""Elastic behaviour of the mesh, in figures. One part per question; run one with --part.

(a) balance: per layer, expert popularity ~ 1 / rank^alpha under a random permutation, 32,768 token
    copies drawn multinomially; 58 layers x 256 experts in 8 expert groups, 32 devices on 4 nodes,
    288 slots. Prints max/mean device load (mean over layers) before any replication (one copy per
    expert, experts packed contiguously), after EPLB's published algorithm (global and hierarchical,
    the plain implementation in bench/eplb_reference.py) and after mesh.replication's policy (global,
    and with every expert group kept on one node); the slots EPLB spends on a second copy of an expert
    on the same device; and each policy's run time per call (min over --reps calls).

Device load = sum over the device's slots of (expert load / expert's copy count).

    .venv/bin/python bench/bench_elastic.py [--part a] [--reps 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
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
          f"(mean over layers); 'ours node' keeps each group on one node; time = min of {reps} calls, "
          f"{torch.get_num_threads()} thread(s)")
    names = list(policies)
    print(f"{'alpha':>5} | {'before':>6} | " + " | ".join(f"{n:>9}" for n in names)
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
              + f" | {dup:>31} | " + " | ".join(f"{time_ms[n]:>12.1f}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a"], default="a", help="which part to run (b and c come later)")
    parser.add_argument("--reps", type=int, default=5, help="calls per policy for the run time (min is shown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the policies are small)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"a": part_a}[args.part](args.reps, args.seed)


if __name__ == "__main__":
    main()
