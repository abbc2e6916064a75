"""The mesh vs the in-process MoELayer, plain Ray actors and plain Ray Serve, on one emulated 3-node cluster.

Prints one table (progress goes to stderr):
(a) Forward latency p50/p90 of the mesh and of the in-process MoELayer for T in {8, 64, 512}
    (Mixtral layer, H=1024, I=2816, E=8, k=2, fp32) and the fixed overhead at a tiny shape
    (H=64, I=128, E=8, k=2, T=8), also for the peers; each as a ratio to the in-process layer;
(b) 32 concurrent callers of 8 tokens each (big shape): tokens/s and p50 latency per request, for
    the mesh with batching on and off, the peers, and the in-process layer at T=256 (one call);
(c) the floors, measured in the same run between two plain processes (bench/floors.py: grpc.aio
    echo and gloo send/recv, 64 B and 8 MB), the slices a collective mesh sent over grpc after
    warm-up (must be 0), and the round-trip bandwidth of 8 MB of rows (2048 x 1024 fp32) through the
    transport boundary (plan_batch, Transport.dispatch to a group on another node that echoes the
    rows, combine) over grpc, ray and collective, as a share of its floor;
the "mesh collective" column is the mesh with router.transport: collective (gloo); "direct" and
"direct collective" are a DirectClient in this process (the router core here, one hop to the groups);
and the worst relative error of every implementation against MoELayer (a fast but wrong peer
cannot win), beside the issue's goals.
(d) CPU per tiny Forward (T=8, H=64), summed over the processes on the path (this process as the
    client, the router actor, the expert-group actors; from /proc), beside the design's floor from
    the same run: the in-process MoELayer + one grpc echo (client -> router) + per destination one
    grpc echo (grpc transport) or one gloo send/recv (collective); see bench/cpu.py. Beside it, the
    same four paths as the design's plainest implementation (bench/skeleton.py: plain processes,
    the same math, no mesh protocol), so "x skeleton" is what the mesh adds to what the design costs.
(e) one layer of DeepSeek-V3's shape (58 MoE layers x 256 experts, top-8, H=64, bf16) on 32 simulated
    groups over 4 nodes, T=64, router and direct, beside as many concurrent grpc echoes of the same
    bytes to as many plain servers.

Peers (bench/peers.py), same checkpoint, cluster and split of experts over 3 groups as the mesh:
"plain actors" = ray.remote actors holding an ExpertGroup, gate/dispatch/combine in the caller;
"Serve" = one deployment per group, a router deployment with @serve.batch(max_batch_size=32)
behind Serve's gRPC proxy, batch_wait_timeout_s 0.01 (Serve's default, "as configured") and 0.1
("tuned"). Everything runs on this machine: the 3 "nodes" share its cores.

    .venv/bin/python bench/bench_mesh.py [--quick] [--only mesh,collective,direct,cpu,actors,serve,v3] [--threads N]
"""

from __future__ import annotations

import os

for _key, _value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                     "RAY_AUTH_MODE": "disabled"}.items():
    os.environ.setdefault(_key, _value)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import grpc  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

import cpu  # noqa: E402  (bench/ is the script's folder)
import floors  # noqa: E402
import peers  # noqa: E402
import skeleton  # noqa: E402
from cluster.local import start_local_cluster, start_mesh  # noqa: E402
from experts import MoELayer  # noqa: E402
from experts.builtin import build_model, save_checkpoint  # noqa: E402
from mesh.config import MeshConfig  # noqa: E402
from mesh.controller import NAMESPACE  # noqa: E402
from mesh.handles import ExpertGroupFactory  # noqa: E402
from mesh.placement import initial_assignment, spread_groups  # noqa: E402
from protos import expert_mesh_pb2 as pb  # noqa: E402
from experts.actor import ExpertGroupActor, ExpertGroupServer  # noqa: E402
from experts.memory import keep_freed_memory  # noqa: E402
from experts.simulated import SimulatedGroupFactory  # noqa: E402
from kernels import combine  # noqa: E402
from router_service import MeshClient  # noqa: E402
from router_service.direct import DirectClient  # noqa: E402
from router_service.config import RouterConfig  # noqa: E402
from router_service.routing import Copy, plan_batch  # noqa: E402
from router_service.transport import make_transport  # noqa: E402

MODELS = {
    "big": dict(hidden_size=1024, intermediate_size=2816, num_local_experts=8, num_experts_per_tok=2,
                num_hidden_layers=1),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
                 num_hidden_layers=1),
}
LAYER = 0
NUM_NODES = 3
TOKENS = (8, 64, 512)
OVERHEAD_TOKENS = 8
NUM_CALLERS, CALLER_TOKENS = 32, 8
BATCHED_TOKENS = NUM_CALLERS * CALLER_TOKENS  # the in-process reference: the 32 requests as one batch
MIN_WINDOW_REQUESTS = 2 * NUM_CALLERS         # a load window lasts until this many requests ran inside it
MAX_WINDOW_S = 60.0
TRANSPORT_ROWS = 2048                         # x H=1024 fp32 = 8 MiB
TRANSPORT_GROUP = 1                           # group-1 sits on a node other than the caller's
TOLERANCE = 1e-5                              # max |out - ref| <= TOLERANCE * max |ref|, fp32
SERVE_WAIT_S = {"serve": 0.01, "serve_tuned": 0.1}

# columns of the table
MESH, MESH_COLL, DIRECT, DIRECT_COLL, MESH_NB, ACTORS, SERVE, SERVE_TUNED, LOCAL = (
    "mesh", "mesh_coll", "direct", "direct_coll", "mesh_nb", "actors", "serve", "serve_tuned", "local")
COLUMNS = {MESH: "mesh", MESH_COLL: "mesh collective", DIRECT: "direct", DIRECT_COLL: "direct collective",
           MESH_NB: "mesh no-batch", ACTORS: "plain actors", SERVE: "Serve as-cfg", SERVE_TUNED: "Serve tuned",
           LOCAL: "in-process"}


@dataclasses.dataclass(frozen=True)
class Effort:
    """How long each measurement runs."""

    latency_reps: dict[int, int]     # T -> Forward calls timed (big shape)
    overhead_reps: int               # tiny shape, T=8
    max_series_s: float              # a latency series stops after this long (>= 10 calls)
    warmup_s: float                  # closed-loop load: warm-up, then the measured window
    window_s: float
    transport_reps: int
    serve_tuned: bool
    cpu_calls: int                   # (d): tiny Forwards per CPU window (cpu.WINDOWS windows)
    cpu_floor_calls: int             # (d): round trips per floor window


FULL = Effort({8: 300, 64: 150, 512: 30, BATCHED_TOKENS: 30}, 500, 8.0, 2.0, 8.0, 30, True, 1000, 2000)
QUICK = Effort({8: 60, 64: 30, 512: 8, BATCHED_TOKENS: 8}, 100, 3.0, 1.0, 3.0, 8, False, 300, 1000)

NOTES = (
    "mesh: defaults (grpc transport, batching on, max_wait_ms 0); mesh no-batch: router.batching.enabled=False. "
    "plain actors: ray.remote actors, gate/dispatch/combine in each caller thread. "
    "Serve: @serve.batch(max_batch_size=32), batch_wait_timeout_s 0.01 (as-cfg) / 0.1 (tuned), "
    "router max_ongoing_requests=64, gRPC proxy ingress.",
    "in-process: MoELayer in the calling process; (a) its calls alternate with the measured implementation's, "
    "ratios use those pairs; (b) one call of all 32 x 8 tokens. MB = 1e6 bytes; MB/s = 2 x bytes / p50 round trip.",
)

_T0 = time.perf_counter()


@dataclasses.dataclass
class Model:
    name: str                 # "big" or "tiny"
    path: str                 # checkpoint folder
    reference: MoELayer       # the in-process layer every implementation must equal
    hidden_size: int


def progress(message: str) -> None:
    print(f"[bench_mesh {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---- measurements ----

def latencies_ms(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reps: int,
                 max_s: float) -> list[float]:
    """Milliseconds per call(x), sequential, after two warm-up calls: `reps` calls, or fewer (at
    least 10) if they take more than `max_s`."""
    call(x)
    call(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (len(times) < 10 or time.perf_counter() - start < max_s):
        t0 = time.perf_counter()
        call(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def paired_latencies_ms(call: Callable[[torch.Tensor], torch.Tensor], reference: Callable[[torch.Tensor], torch.Tensor],
                        x: torch.Tensor, reps: int, max_s: float) -> tuple[list[float], list[float]]:
    """Milliseconds per call(x) and per reference(x), the two alternating (so that both see the same
    load on a shared machine), after two warm-up calls of each: `reps` pairs, or fewer (at least 10)
    if they take more than `max_s`."""
    times: tuple[list[float], list[float]] = ([], [])
    for fn in (call, reference, call, reference):
        fn(x)
    start = time.perf_counter()
    while len(times[0]) < reps and (len(times[0]) < 10 or time.perf_counter() - start < max_s):
        for fn, out in ((call, times[0]), (reference, times[1])):
            t0 = time.perf_counter()
            fn(x)
            out.append((time.perf_counter() - t0) * 1e3)
    return times


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[8] if len(values) > 1 else values[0]


@dataclasses.dataclass
class Load:
    tokens_per_s: float
    p50_ms: float
    num_requests: int          # completed in the window
    window_s: float


def closed_loop(call: Callable[[torch.Tensor], torch.Tensor], hidden_size: int, effort: Effort) -> Load:
    """NUM_CALLERS threads, each sending CALLER_TOKENS-token requests back to back.

    After `effort.warmup_s`, a window of `effort.window_s`, extended (up to MAX_WINDOW_S) until at
    least MIN_WINDOW_REQUESTS requests started and ended in it. Throughput counts the requests
    completed in the window; latency is that of the requests that started and ended in it."""
    stop = threading.Event()
    records: list[list[tuple[float, float]]] = [[] for _ in range(NUM_CALLERS)]
    errors: list[BaseException] = []

    def caller(index: int) -> None:
        x = torch.randn(CALLER_TOKENS, hidden_size, generator=torch.Generator().manual_seed(100 + index))
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                call(x)
                records[index].append((t0, time.perf_counter()))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            stop.set()

    def num_inside() -> int:
        return sum(1 for rs in records for t0, _ in list(rs) if t0 >= window_start)

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(NUM_CALLERS)]
    window_start = time.perf_counter() + effort.warmup_s
    for thread in threads:
        thread.start()
    while not stop.wait(0.05):
        elapsed = time.perf_counter() - window_start
        if elapsed >= MAX_WINDOW_S or (elapsed >= effort.window_s and num_inside() >= MIN_WINDOW_REQUESTS):
            break
    window_end = time.perf_counter()
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    done = [(t0, t1) for rs in records for t0, t1 in rs if window_start <= t1 <= window_end]
    inside = [(t1 - t0) * 1e3 for t0, t1 in done if t0 >= window_start]
    if not inside:
        raise RuntimeError(f"no request started and ended within {MAX_WINDOW_S} s")
    window_s = window_end - window_start
    return Load(len(done) * CALLER_TOKENS / window_s, p50(inside), len(done), window_s)


def rel_error(call: Callable[[torch.Tensor], torch.Tensor], reference: MoELayer) -> float:
    """Worst max |call(x) - MoELayer(x)| / max |MoELayer(x)| over a few token counts."""
    worst = 0.0
    for num_tokens in (1, 8, 64):
        x = torch.randn(num_tokens, reference.spec.hidden_size, generator=torch.Generator().manual_seed(num_tokens))
        out, ref = call(x), reference(x)
        if out.shape != ref.shape:
            return float("inf")
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
    return worst


def _tokens(num_tokens: int, hidden_size: int) -> torch.Tensor:
    return torch.randn(num_tokens, hidden_size, generator=torch.Generator().manual_seed(num_tokens))


# ---- results ----

class Results:
    """Cells filled in as measurements finish; printed once at the end."""

    def __init__(self):
        self.lat: dict[tuple[str, str, int], list[float]] = {}   # (column, model, T) -> ms
        self.paired_local: dict[tuple[str, str, int], list[float]] = {}  # the in-process calls alternated with them
        self.load: dict[str, Load] = {}
        self.error: dict[str, float] = {}                      # column -> worst rel error
        self.transport: dict[str, tuple[float, float]] = {}    # kind -> (MB/s, p50 RTT ms)
        self.local_rate = 0.0
        self.floors: dict[str, dict[str, float]] = {}           # kind -> size -> p50 round trip ms
        self.fallbacks: dict[str, int] = {}                      # column -> slices sent over grpc after warm-up
        self.breakdown: dict[str, dict[str, float]] = {}         # column -> stage -> us per tiny Forward
        self.cpu_floors: cpu.CpuFloors | None = None
        self.cpu_rows: list[cpu.CpuRow] = []
        self.cpu_skeletons: dict[str, cpu.CpuRow] = {}            # mesh row label -> the skeleton's same path
        self.v3: dict[str, float] = {}                            # "router" / "direct" / "floor" -> p50 ms per layer
        self.v3_destinations, self.v3_bytes = 0.0, 0
        self.failures: list[str] = []

    def add_error(self, column: str, value: float) -> None:
        self.error[column] = max(self.error.get(column, 0.0), value)
        progress(f"{COLUMNS[column]}: max rel error vs MoELayer {value:.1e}")

    def ratio(self, column: str, model: str, num_tokens: int) -> float | None:
        """p50 of `column` / p50 of the in-process calls alternated with it."""
        key = (column, model, num_tokens)
        if key not in self.lat:
            return None
        return p50(self.lat[key]) / p50(self.paired_local[key])


def measure_load(r: Results, column: str, model: Model, call: Callable[[torch.Tensor], torch.Tensor],
                 effort: Effort) -> None:
    """Throughput and p50 latency of NUM_CALLERS concurrent callers of CALLER_TOKENS tokens."""
    load = r.load[column] = closed_loop(call, model.hidden_size, effort)
    progress(f"{COLUMNS[column]} {NUM_CALLERS} x {CALLER_TOKENS} tokens: {load.tokens_per_s:,.0f} tokens/s, "
             f"p50 {load.p50_ms:.1f} ms ({load.num_requests} requests in {load.window_s:.1f} s)")


def measure_latency(r: Results, column: str, model: Model, num_tokens: int,
                    call: Callable[[torch.Tensor], torch.Tensor], reps: int, effort: Effort) -> None:
    """Latency series of `call` at num_tokens, alternated with the in-process MoELayer."""
    x = _tokens(num_tokens, model.hidden_size)
    times, local = paired_latencies_ms(call, model.reference, x, reps, effort.max_series_s)
    key = (column, model.name, num_tokens)
    r.lat[key], r.paired_local[key] = times, local
    r.lat.setdefault((LOCAL, model.name, num_tokens), local)
    progress(f"{COLUMNS[column]} {model.name} T={num_tokens}: p50/p90 {_ms(times)} ms "
             f"(in-process alternated with it: {_ms(local)} ms)")


# ---- the table ----

def _ms(values: list[float] | None) -> str:
    return "" if not values else f"{p50(values):.2f} / {p90(values):.2f}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


Row = tuple[str, dict[str, str], str, str]  # (label, {column: text}, goal, met); no cells and no goal: a heading


def _latency_rows(r: Results) -> list[Row]:
    rows = [("(a) Forward latency, big: p50 / p90 ms", {}, "", "")]
    paths = (MESH, MESH_COLL, DIRECT, DIRECT_COLL)
    for t in TOKENS:
        rows.append((f"  T={t}", {c: _ms(r.lat.get((c, "big", t))) for c in (*paths, LOCAL)}, "", ""))
    for t in TOKENS:
        ratios = {c: r.ratio(c, "big", t) for c in paths}
        goal, met = ("direct collective <= 1.15", _met(ratios[DIRECT_COLL] <= 1.15 if ratios[DIRECT_COLL] else None)) \
            if t == 512 else ("", "")
        rows.append((f"  mesh / in-process p50, T={t}", {c: _ratio(v) for c, v in ratios.items()}, goal, met))
    tiny = {c: r.lat.get((c, "tiny", OVERHEAD_TOKENS)) for c in (*paths, ACTORS, SERVE, SERVE_TUNED, LOCAL)}
    rows.append((f"  fixed overhead, tiny T={OVERHEAD_TOKENS}: p50 / p90 ms", {c: _ms(v) for c, v in tiny.items() if v},
                 "", ""))
    tiny_ratios = {c: r.ratio(c, "tiny", OVERHEAD_TOKENS) for c in tiny if c != LOCAL}
    limits = {MESH: 4.0, MESH_COLL: 4.0, DIRECT: 2.5, DIRECT_COLL: 1.5}
    measured = {c: v for c, v in tiny_ratios.items() if c in limits and v}
    rows.append(("  ... / in-process p50, tiny", {c: _ratio(v) for c, v in tiny_ratios.items()},
                 "router <= 4, direct <= 2.5, direct coll. <= 1.5",
                 _met(all(v <= limits[c] for c, v in measured.items())) if measured else "n/a"))
    grpc_floor = r.floors.get("grpc", {}).get("64 B")
    if grpc_floor:
        multiples = {c: p50(tiny[c]) / grpc_floor for c in (MESH, MESH_COLL) if tiny[c]}
        rows.append(("  tiny p50 / grpc echo floor (64 B)", {c: f"{v:.1f}x" for c, v in multiples.items()},
                     "grpc <= 3x, collective <= 2x",
                     _met(multiples.get(MESH, 99) <= 3 and multiples.get(MESH_COLL, 99) <= 2) if multiples else "n/a"))
    return rows


def _load_rows(r: Results) -> list[Row]:
    load = r.load
    rows = [(f"(b) {NUM_CALLERS} callers x {CALLER_TOKENS} tokens, big", {}, "", "")]
    rate = {c: f"{v.tokens_per_s:,.0f}" for c, v in load.items()}
    if r.local_rate:
        rate[LOCAL] = f"{r.local_rate:,.0f} (T={BATCHED_TOKENS})"
    mesh = load.get(MESH)
    rows.append(("  tokens/s", rate, ">= 3,500", _met(mesh.tokens_per_s >= 3500 if mesh else None)))
    latency = {c: f"{v.p50_ms:.1f}" for c, v in load.items()}
    if (LOCAL, "big", BATCHED_TOKENS) in r.lat:
        latency[LOCAL] = f"{p50(r.lat[(LOCAL, 'big', BATCHED_TOKENS)]):.1f} (1 call)"
    rows.append(("  p50 ms per request", latency, "<= 100 ms", _met(mesh.p50_ms <= 100 if mesh else None)))
    versus_local = mesh.tokens_per_s / r.local_rate if mesh and r.local_rate else None
    rows.append((f"  mesh / in-process T={BATCHED_TOKENS} tokens/s",
                 {MESH: f"{versus_local:.2f}" if versus_local else ""}, ">= 0.80",
                 _met(versus_local >= 0.8 if versus_local else None)))
    tuned = load.get(SERVE_TUNED)
    versus_serve = mesh.tokens_per_s / tuned.tokens_per_s if mesh and tuned else None
    rows.append(("  mesh / Serve tuned tokens/s", {MESH: f"{versus_serve:.2f}" if versus_serve else ""}, ">= 2.0",
                 _met(versus_serve >= 2.0 if versus_serve else None)))
    return rows


def _other_rows(r: Results) -> list[Row]:
    rows = [("(c) floors: two plain processes on loopback, p50 round trip ms (GB/s)", {}, "", "")]
    for kind, label in (("grpc", "grpc.aio echo"), ("gloo", "gloo send/recv")):
        for size, ms in r.floors.get(kind, {}).items():
            rate = f" ({floors.gb_per_s(size, ms):.2f})" if size == "8 MB" else ""
            rows.append((f"  {label}, {size}", {MESH: f"{ms:.3f}{rate}"}, "", ""))
    rows.append(("  slices sent over grpc after warm-up (collective)", {c: str(n) for c, n in r.fallbacks.items()},
                 "0", _met(all(n == 0 for n in r.fallbacks.values()) if r.fallbacks else None)))
    rows.append(("(c) 8 MB round trip through the boundary (plan, dispatch, group echo, combine)", {}, "", ""))
    kinds = {"grpc": ("grpc", 0.9), "ray": (None, None), "collective": ("gloo", 0.75),
             "channel alone": ("gloo", None)}  # kind -> (its floor, the goal as a share of it)
    for kind, (floor, goal) in kinds.items():
        value = r.transport.get(kind)
        floor_ms = r.floors.get(floor, {}).get("8 MB")
        share = floor_ms / value[1] if value and floor_ms else None
        cell = f"{value[0]:,.0f} ({value[1]:.1f})" + (f", {share:.2f}x" if share else "") if value else ""
        label = "the collective's channel alone, two plain processes" if kind == "channel alone" else kind
        rows.append((f"  {label}: MB/s (p50 ms)" + (f", x the {floor} floor" if floor else ""), {MESH: cell},
                     f">= {goal}x" if goal else "", _met(share >= goal if share and goal else None)))
    errors = {c: f"{v:.1e}" + ("" if v <= TOLERANCE else " WRONG") for c, v in r.error.items()}
    rows.append(("correctness: max rel error vs MoELayer", errors, f"<= {TOLERANCE:g}",
                 _met(all(v <= TOLERANCE for v in r.error.values()) if r.error else None)))
    return rows


def print_table(r: Results, header: str) -> None:
    rows = [*_latency_rows(r), *_load_rows(r), *_other_rows(r)]
    label_w = max(len(label) for label, *_ in rows)
    widths = {c: max(len(COLUMNS[c]), *(len(cells.get(c, "")) for _, cells, *_ in rows)) for c in COLUMNS}
    goal_w = max(len("goal"), *(len(goal) for *_, goal, _ in rows))
    print(header)
    print(" | ".join([f"{'measurement':<{label_w}}", *(f"{COLUMNS[c]:>{widths[c]}}" for c in COLUMNS),
                      f"{'goal':<{goal_w}}", "met"]))
    print("-+-".join(["-" * label_w, *("-" * widths[c] for c in COLUMNS), "-" * goal_w, "---"]))
    for label, cells, goal, met in rows:
        if not cells and not goal:
            print(label)
            continue
        print(" | ".join([f"{label:<{label_w}}", *(f"{cells.get(c, ''):>{widths[c]}}" for c in COLUMNS),
                          f"{goal:<{goal_w}}", met]))
    for note in NOTES:
        print(note)
    wrong = [COLUMNS[c] for c, v in r.error.items() if not v <= TOLERANCE]
    if wrong:
        print(f"WRONG OUTPUTS (differ from MoELayer by more than {TOLERANCE:g}): {', '.join(wrong)}; "
              f"their figures do not count")
    sys.stdout.flush()


# ---- setup ----

def build_models(root: Path) -> dict[str, Model]:
    models = {}
    for name, overrides in MODELS.items():
        path = root / name
        save_checkpoint(build_model("mixtral", seed=0, **overrides), path)
        models[name] = Model(name, str(path), MoELayer.from_pretrained(path, layer=LAYER), overrides["hidden_size"])
    return models


def node_order() -> tuple[list[str], str]:
    """Alive node ids, head first (the order the mesh's controller places groups in), and the head's."""
    nodes = sorted((n for n in ray.nodes() if n["Alive"]),
                   key=lambda n: (not n.get("IsHeadNode", False), n["NodeID"]))
    return [n["NodeID"] for n in nodes], ray.get_runtime_context().get_node_id()


def group_layout(spec) -> tuple[list[dict[int, list[int]]], list[str], str]:
    """The mesh's split of experts over NUM_NODES groups and their nodes: (assignment, nodes, head)."""
    nodes, head = node_order()
    assignment = initial_assignment(list(spec.moe_layers), spec.num_experts, NUM_NODES)
    return assignment, spread_groups(NUM_NODES, nodes), head


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- in-process ----

def bench_in_process(models: dict[str, Model], effort: Effort, r: Results) -> None:
    """The batched reference of (b): the 32 x 8 tokens as one in-process call. (The latencies of (a)
    are measured alternated with each implementation's.)"""
    big = models["big"]
    times = latencies_ms(big.reference, _tokens(BATCHED_TOKENS, big.hidden_size),
                         effort.latency_reps[BATCHED_TOKENS], effort.max_series_s)
    r.lat[(LOCAL, "big", BATCHED_TOKENS)] = times
    r.local_rate = BATCHED_TOKENS / (p50(times) / 1e3)
    progress(f"in-process T={BATCHED_TOKENS}: p50/p90 {_ms(times)} ms, {r.local_rate:,.0f} tokens/s")


# ---- the mesh ----

ECHO_LAYER = -1  # a batch for this layer comes back from an echoing group as sent


class EchoingGroupServer(ExpertGroupServer):
    """A group's server that hands ECHO_LAYER's rows back, for the bandwidth through the boundary
    (plan, dispatch, combine) with the group's compute taken out; every other layer computes."""

    def compute_sync(self, layer, rows, *args):
        return rows if layer == ECHO_LAYER else super().compute_sync(layer, rows, *args)


class EchoingGroupActor(ExpertGroupActor):
    server_class = EchoingGroupServer


@contextlib.contextmanager
def running_mesh(name: str, model: Model, echo: bool = False, **router):
    """A mesh of `model`; `echo`: its groups also echo ECHO_LAYER (bench_boundary)."""
    config = MeshConfig(name=name, router={"port": 0, **router})
    progress(f"starting mesh {name} ({model.name}, router {router or 'defaults'})")
    mesh = start_mesh(config, model.path, progress, ExpertGroupFactory(EchoingGroupActor if echo else None))
    try:
        yield mesh
    finally:
        progress(f"stopping mesh {name}")
        mesh.stop()


def echo_through_boundary(mesh, kind: str, transport) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [T, H] -> plan (every token to an expert of group TRANSPORT_GROUP, on another node) ->
    transport.dispatch (the group echoes the rows: ECHO_LAYER) -> combine: the router's own path,
    driven from this process, with the group's compute taken out."""
    group = f"{mesh.name}/group-{TRANSPORT_GROUP}"
    info = ray.get(ray.get_actor(group, namespace=NAMESPACE).info.remote())
    layer, experts = next(iter(info["experts"].items()))
    copies = [[] for _ in range(MODELS["big"]["num_local_experts"])]
    for expert, version in zip(experts, info["versions"][layer]):
        copies[expert] = [Copy(group, info["endpoint"], version)]
    keep_freed_memory()  # as the router process does
    loop = asyncio.new_event_loop()

    def call(x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        order = torch.arange(num_tokens)  # k = 1: copy t is token t, all to the group's first expert
        counts = [num_tokens if e == experts[0] else 0 for e in range(len(copies))]
        plan = plan_batch(order, counts, copies)
        rows = x.index_select(0, plan.order)
        y = torch.empty_like(rows)
        outcome = loop.run_until_complete(transport.dispatch(ECHO_LAYER, 0, rows, None, plan.destinations, y))
        if outcome.errors:
            raise RuntimeError(f"{kind} echo through the boundary failed: {outcome.errors}")
        return combine(y, plan.order, torch.ones(num_tokens, 1), num_tokens)

    call.loop = loop
    return call


def _echo_peer(port: int) -> None:
    from experts.channel import ChannelWorker

    keep_freed_memory()
    hidden = MODELS["big"]["hidden_size"]
    worker = ChannelWorker("alone/0", "127.0.0.1", port, lambda layer, rows, *_: rows,
                           MODELS["big"]["num_local_experts"], hidden, torch.float32, TRANSPORT_ROWS)
    worker.connect()
    worker._serve()


def bench_channel_alone(effort: Effort, r: Results) -> None:
    """The mesh's own channel ends (router_service/collective.Channel, experts/channel.ChannelWorker
    echoing) between two plain processes, no Ray: what the collective path costs without the
    emulated cluster sharing the cores. 8 MB of rows, as bench_boundary."""
    import datetime
    import multiprocessing

    import torch.distributed as dist

    from protos.collective import process_group
    from router_service.collective import Channel
    from router_service.routing import Destination

    keep_freed_memory()
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    peer = multiprocessing.get_context("spawn").Process(target=_echo_peer, args=(store.port,), daemon=True)
    peer.start()
    channel = Channel("alone", process_group(dist.PrefixStore("alone/0/", store), 0, torch.device("cpu"), 60),
                      store, MODELS["big"]["num_local_experts"], 60.0)
    x = torch.randn(TRANSPORT_ROWS, MODELS["big"]["hidden_size"])
    out = torch.empty_like(x)
    dest = Destination("alone", "", 0, TRANSPORT_ROWS, (0,), (TRANSPORT_ROWS,), ("0" * 12,))

    def call(_):
        channel.call(ECHO_LAYER, 0, x, None, dest, out)
        return out

    try:
        if not torch.equal(call(None), x):
            raise RuntimeError("the channel's echo did not return the rows")
        times = latencies_ms(call, x, effort.transport_reps, effort.max_series_s)
        r.transport["channel alone"] = (2 * x.numel() * 4 / (p50(times) / 1e3) / 1e6, p50(times))
        progress(f"channel alone: p50 {p50(times):.1f} ms")
    finally:
        channel.close()
        peer.terminate()


def bench_boundary(mesh, kind: str, effort: Effort, r: Results) -> None:
    """Round trips of 8 MB of rows ([2048, 1024] fp32) through the transport boundary to a group
    on another node, over `kind` ("grpc", "ray" or "collective")."""
    hidden = MODELS["big"]["hidden_size"]
    transport = make_transport(RouterConfig(transport=kind), NAMESPACE, f"{mesh.name}/bench-{kind}",
                               MODELS["big"]["num_local_experts"], TRANSPORT_ROWS, torch.float32,
                               ray.get(mesh.controller.data_secret.remote()))
    call = echo_through_boundary(mesh, kind, transport)
    x = torch.randn(TRANSPORT_ROWS, hidden)
    try:
        if kind == "collective":
            group = f"{mesh.name}/group-{TRANSPORT_GROUP}"
            call.loop.run_until_complete(transport.open([group]))
            if group not in transport.channels:
                raise RuntimeError(f"no collective channel to {group}")
        if not torch.equal(call(x), x):
            raise RuntimeError(f"{kind}: the echo through the boundary did not return the rows")
        times = latencies_ms(call, x, effort.transport_reps, effort.max_series_s)
        if kind == "collective" and transport.segments.get("grpc"):
            raise RuntimeError(f"collective bandwidth: {transport.segments['grpc']} slices went over grpc")
        r.transport[kind] = (2 * x.numel() * 4 / (p50(times) / 1e3) / 1e6, p50(times))
        progress(f"boundary {kind}: {r.transport[kind][0]:,.0f} MB/s, p50 {p50(times):.1f} ms")
    finally:
        call.loop.run_until_complete(transport.close())
        call.loop.close()


def check_mesh_layout(mesh, model: Model) -> None:
    """The peers copy the mesh's split of experts over groups and nodes: warn if the mesh differs."""
    assignment, nodes, _ = group_layout(model.reference.spec)
    infos = [ray.get(ray.get_actor(f"{mesh.name}/group-{k}", namespace=NAMESPACE).info.remote())
             for k in range(len(nodes))]
    actual = [({int(layer): list(experts) for layer, experts in info["experts"].items()}, info["node_id"])
              for info in infos]
    if actual != list(zip(assignment, nodes)):
        progress(f"WARNING: the mesh's groups hold {actual}; the peers use {list(zip(assignment, nodes))}")


def bench_mesh(models: dict[str, Model], effort: Effort, r: Results) -> None:
    big, tiny = models["big"], models["tiny"]
    with running_mesh("bench-big", big, echo=True) as mesh, MeshClient(mesh.address, timeout_s=120) as client:
        check_mesh_layout(mesh, big)
        forward = lambda x: client.forward(LAYER, x)  # noqa: E731
        r.add_error(MESH, rel_error(forward, big.reference))
        for t in TOKENS:
            measure_latency(r, MESH, big, t, forward, effort.latency_reps[t], effort)
        measure_load(r, MESH, big, forward, effort)
        for kind in ("grpc", "ray"):
            bench_boundary(mesh, kind, effort, r)
    with running_mesh("bench-nobatch", big, batching={"enabled": False}) as mesh, \
            MeshClient(mesh.address, timeout_s=120) as client:
        forward = lambda x: client.forward(LAYER, x)  # noqa: E731
        r.add_error(MESH_NB, rel_error(forward, big.reference))
        measure_load(r, MESH_NB, big, forward, effort)
    with running_mesh("bench-tiny", tiny) as mesh, MeshClient(mesh.address, timeout_s=120) as client:
        forward = lambda x: client.forward(LAYER, x)  # noqa: E731
        r.add_error(MESH, rel_error(forward, tiny.reference))
        measure_latency(r, MESH, tiny, OVERHEAD_TOKENS, forward, effort.overhead_reps, effort)
        r.breakdown[MESH] = breakdown(mesh, client, tiny)


def _stage_counters(mesh) -> tuple[dict, dict]:
    """(the router's stage seconds, the groups' Compute stage seconds summed), since start."""
    import msgpack

    router = msgpack.unpackb(ray.get(mesh.router.load_report.remote()))["stage_s"]
    groups: dict[str, float] = {}
    for k in range(NUM_NODES):
        info = ray.get(ray.get_actor(f"{mesh.name}/group-{k}", namespace=NAMESPACE).info.remote())
        for stage, seconds in info.get("stage_s", {}).items():
            groups[stage] = groups.get(stage, 0.0) + seconds
    return router, groups


def breakdown(mesh, client: MeshClient, model: Model, calls: int = 300) -> dict[str, float]:
    """Microseconds per tiny Forward (T=OVERHEAD_TOKENS) in each stage, from the router's and the
    groups' own counters over `calls` Forwards, and the client's encode and decode timed here."""
    from router_service.client import _forward_request, _forward_result

    x = _tokens(OVERHEAD_TOKENS, model.hidden_size)
    r0, g0 = _stage_counters(mesh)
    start = time.perf_counter()
    for _ in range(calls):
        client.forward(LAYER, x)
    total_s = (time.perf_counter() - start) / calls
    r1, g1 = _stage_counters(mesh)
    per = {k: (r1.get(k, 0.0) - r0.get(k, 0.0)) for k in r1}
    forwards = per.pop("forwards", 0) or 1
    group_calls = (g1.get("calls", 0) - g0.get("calls", 0)) / forwards  # destinations per Forward
    encode_start = time.perf_counter()
    for _ in range(calls):
        request = _forward_request(LAYER, x)
    client_encode = (time.perf_counter() - encode_start) / calls
    reply = pb.ForwardResponse(hidden=request.hidden)
    decode_start = time.perf_counter()
    for _ in range(calls):
        _forward_result(reply, x, "bench")
    client_decode = (time.perf_counter() - decode_start) / calls
    us = {"client encode": client_encode * 1e6, "router decode": per.get("decode", 0) / forwards * 1e6}
    batch_s = sum(per.get(k, 0) for k in ("gate", "plan", "dispatch", "combine"))
    us["batcher"] = (per.get("router", 0) - batch_s) / forwards * 1e6
    for stage in ("gate", "plan"):
        us[stage] = per.get(stage, 0) / forwards * 1e6
    group = {k: (g1.get(k, 0.0) - g0.get(k, 0.0)) / forwards * 1e6 for k in ("decode", "compute", "encode")}
    us["send + wire + group, all destinations"] = per.get("dispatch", 0) / forwards * 1e6
    us[f"  of which group decode / compute / encode (sum over {group_calls:.1f} destinations)"] = sum(group.values())
    us["combine (+ shared)"] = per.get("combine", 0) / forwards * 1e6
    us["router encode"] = per.get("encode", 0) / forwards * 1e6
    us["client decode"] = client_decode * 1e6
    accounted = sum(v for k, v in us.items() if not k.startswith("  "))
    us["client <-> router wire and grpc (the rest)"] = total_s * 1e6 - accounted
    us["total (mean round trip)"] = total_s * 1e6
    us["  group decode"], us["  group compute"], us["  group encode"] = group["decode"], group["compute"], group["encode"]
    return us


def print_breakdown(r: Results) -> None:
    if not r.breakdown:
        return
    columns = list(r.breakdown)
    stages = list(next(iter(r.breakdown.values())))
    width = max(len(s) for s in stages)
    print(f"one tiny Forward (T={OVERHEAD_TOKENS}, H=64), microseconds per Forward (mean of 300): " +
          " | ".join(COLUMNS[c] for c in columns))
    for stage in stages:
        print(f"  {stage:<{width}} " + " | ".join(f"{r.breakdown[c].get(stage, 0):>10.0f}" for c in columns))


def _segments(mesh) -> dict[str, int]:
    import msgpack

    return msgpack.unpackb(ray.get(mesh.router.load_report.remote()))["segments"]


def _warm_collective(mesh, client, hidden_size: int, timeout_s: float = 60.0) -> int:
    """Forwards until one goes out over collective only (channels open in the background);
    returns the grpc slice count at that point."""
    x = _tokens(64, hidden_size)
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        before = _segments(mesh)
        client.forward(LAYER, x)
        after = _segments(mesh)
        if after.get("grpc", 0) == before.get("grpc", 0) and after.get("collective", 0) > before.get("collective", 0):
            return after.get("grpc", 0)
        time.sleep(0.2)
    raise RuntimeError(f"collective channels of {mesh.name} not up within {timeout_s} s: {_segments(mesh)}")


def bench_collective(models: dict[str, Model], effort: Effort, r: Results) -> None:
    """The mesh with router.transport: collective (gloo between the router and its groups)."""
    big, tiny = models["big"], models["tiny"]
    fallbacks = 0
    for model, name in ((big, "bench-coll-big"), (tiny, "bench-coll-tiny")):
        with running_mesh(name, model, echo=model is big, transport="collective") as mesh, \
                MeshClient(mesh.address, timeout_s=120) as client:
            warm = _warm_collective(mesh, client, model.hidden_size)
            forward = lambda x: client.forward(LAYER, x)  # noqa: E731
            r.add_error(MESH_COLL, rel_error(forward, model.reference))
            if model is big:
                for t in TOKENS:
                    measure_latency(r, MESH_COLL, big, t, forward, effort.latency_reps[t], effort)
                measure_load(r, MESH_COLL, big, forward, effort)
                bench_boundary(mesh, "collective", effort, r)
            else:
                measure_latency(r, MESH_COLL, tiny, OVERHEAD_TOKENS, forward, effort.overhead_reps, effort)
                r.breakdown[MESH_COLL] = breakdown(mesh, client, tiny)
            fallbacks += _segments(mesh).get("grpc", 0) - warm
    r.fallbacks[MESH_COLL] = fallbacks


def bench_direct(models: dict[str, Model], effort: Effort, r: Results) -> None:
    """A DirectClient in this process (the router core here, one hop to the groups) over grpc and
    over collective, on the same meshes' groups."""
    for model, name in ((models["big"], "bench-direct-big"), (models["tiny"], "bench-direct-tiny")):
        with running_mesh(name, model) as mesh:
            for column, transport in ((DIRECT, "grpc"), (DIRECT_COLL, "collective")):
                with DirectClient(mesh.name, transport=transport, timeout_s=120) as client:
                    forward = lambda x: client.forward(LAYER, x)  # noqa: E731
                    warm = _tokens(OVERHEAD_TOKENS, model.hidden_size)
                    _warm_direct(client._core.router, lambda: client.forward(LAYER, warm))
                    r.add_error(column, rel_error(forward, model.reference))
                    if model is models["big"]:
                        for t in TOKENS:
                            measure_latency(r, column, model, t, forward, effort.latency_reps[t], effort)
                    else:
                        measure_latency(r, column, model, OVERHEAD_TOKENS, forward, effort.overhead_reps, effort)


# ---- CPU per Forward ----

def _actor_pid(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


def path_pids(mesh) -> dict[str, list[int]]:
    """The processes on a Forward's path through the router: {role: pids}."""
    groups = [ray.get_actor(f"{mesh.name}/group-{k}", namespace=NAMESPACE) for k in range(NUM_NODES)]
    return {"client": [os.getpid()], "router": [_actor_pid(mesh.router)], "groups": [_actor_pid(g) for g in groups]}


def _group_calls(mesh) -> int:
    """Messages the router has sent to expert groups since it started (its batch statistics)."""
    import msgpack

    return msgpack.unpackb(ray.get(mesh.router.load_report.remote()))["batches"].get("group_calls", 0)


def bench_cpu(models: dict[str, Model], effort: Effort, r: Results) -> None:
    """(d) CPU per tiny Forward over each path, beside its floor (bench/cpu.py); this process (the
    client) at one torch thread, as the actors, the floors and the skeleton."""
    with cpu.torch_threads(1):
        _bench_cpu(models["tiny"], effort, r)


def _bench_cpu(tiny: Model, effort: Effort, r: Results) -> None:
    x = _tokens(OVERHEAD_TOKENS, tiny.hidden_size)
    progress("measuring the CPU floors (grpc.aio echo, gloo send/recv, in-process MoELayer)")
    r.cpu_floors = cpu.measure_cpu_floors(tiny.reference, x, effort.cpu_floor_calls)
    progress(f"CPU floors: {r.cpu_floors}")
    wires = {"grpc": r.cpu_floors.grpc_us, "collective": r.cpu_floors.gloo_us}
    for transport, wire_us in wires.items():
        with running_mesh(f"bench-cpu-{transport}", tiny, transport=transport) as mesh, \
                MeshClient(mesh.address, timeout_s=120) as client:
            if transport == "collective":
                _warm_collective(mesh, client, tiny.hidden_size)
            forward = lambda: client.forward(LAYER, x)  # noqa: E731
            for _ in range(effort.cpu_calls):
                forward()
            pids = path_pids(mesh)
            rows = [cpu.cpu_row(f"router, {transport}", pids, forward, effort.cpu_calls, lambda: _group_calls(mesh), 1,
                                wire_us, r.cpu_floors)]
            with DirectClient(mesh.name, transport=transport, timeout_s=120) as direct:
                router = direct._core.router
                _warm_direct(router, lambda: direct.forward(LAYER, x))
                direct_pids = {role: p for role, p in pids.items() if role != "router"}
                rows.append(cpu.cpu_row(f"direct, {transport}", direct_pids, lambda: direct.forward(LAYER, x),
                                        effort.cpu_calls, lambda: router.batch_stats["group_calls"], 0, wire_us,
                                        r.cpu_floors))
            for row in rows:
                r.cpu_rows.append(row)
                progress(f"CPU {row.label}: {row.total_us:.0f} us per Forward {row.cpu_us}, floor {row.floor_us:.0f}")
    progress("measuring the skeleton: the same paths as plain processes with no mesh protocol (bench/skeleton.py)")
    r.cpu_skeletons = skeleton.skeleton_rows(tiny.path, x, effort.cpu_calls, r.cpu_floors)
    for row in r.cpu_skeletons.values():
        progress(f"CPU {row.label}: {row.total_us:.0f} us per Forward {row.cpu_us}, floor {row.floor_us:.0f}")


def _warm_direct(router, forward: Callable[[], object], timeout_s: float = 60.0) -> None:
    """Forwards until one goes out with no slice over grpc where the transport is collective
    (its channels open in the background), then 100 more."""
    deadline = time.perf_counter() + timeout_s
    while router.config.transport == "collective" and time.perf_counter() < deadline:
        before = router.transport.segments.get("grpc", 0)
        forward()
        if router.transport.segments.get("grpc", 0) == before:
            break
        time.sleep(0.2)
    for _ in range(100):
        forward()


def print_cpu(r: Results) -> None:
    if r.cpu_floors and r.cpu_rows:
        cpu.print_rows(r.cpu_rows + list(r.cpu_skeletons.values()), r.cpu_floors,
                       f"(d) CPU per tiny Forward (T={OVERHEAD_TOKENS}, H=64), microseconds, "
                       f"summed over the processes on the path (median of {cpu.WINDOWS} windows)", r.cpu_skeletons)


# ---- DeepSeek-V3's shape on simulated devices ----

V3 = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=61, first_k_dense_replace=3,
          n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1)
V3_GROUPS, V3_NODES, V3_TOKENS = 32, 4, 64


def bench_v3(cluster, root: Path, effort: Effort, r: Results) -> None:
    """(e) One layer of DeepSeek-V3's shape (58 MoE layers x 256 experts, top-8, H=64, bf16 gates and
    shared experts) on V3_GROUPS simulated groups (no compute: latency_ms 0) over V3_NODES nodes,
    T=V3_TOKENS, through the router and a direct client (grpc), beside its floor: this process
    making as many concurrent grpc.aio round trips of the same bytes to as many plain echo servers."""
    path = root / "v3"
    save_checkpoint(build_model("deepseek_v3", seed=0, **V3), path)
    while len([n for n in ray.nodes() if n["Alive"]]) < V3_NODES:
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    config = MeshConfig(name="bench-v3", router={"port": 0}, router_dtype="bfloat16",
                        groups={"num_groups": V3_GROUPS})
    progress(f"starting mesh bench-v3 ({V3_GROUPS} simulated groups on {V3_NODES} nodes)")
    mesh = start_mesh(config, path, progress, SimulatedGroupFactory(latency_ms=0.0))
    reps = max(50, effort.overhead_reps // 4)
    try:
        layers = list(MeshClient(mesh.address).info().moe_layers)
        x = torch.randn(V3_TOKENS, V3["hidden_size"], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
        with MeshClient(mesh.address, timeout_s=120) as client:
            r.v3["router"] = _per_layer_ms(lambda layer: client.forward(layer, x), layers, reps)
        with DirectClient(mesh.name, timeout_s=120) as client:
            r.v3["direct"] = _per_layer_ms(lambda layer: client.forward(layer, x), layers, reps)
            stats = client._core.router.batch_stats
            r.v3_destinations = stats["group_calls"] / stats["batches"]
    finally:
        mesh.stop()
    num_bytes = V3_TOKENS * V3["num_experts_per_tok"] * V3["hidden_size"] * 2 // max(1, round(r.v3_destinations))
    r.v3["floor"] = floors.concurrent_echo_ms(round(r.v3_destinations), num_bytes, reps)
    r.v3_bytes = num_bytes
    progress(f"V3 shape: {r.v3}, {r.v3_destinations:.1f} destinations per batch")


def _per_layer_ms(forward: Callable[[int], object], layers: list[int], reps: int) -> float:
    """p50 ms of one Forward, the MoE layers taken in turn (a decode step's order)."""
    for layer in layers[:8]:
        forward(layer)
    times = []
    for i in range(reps):
        start = time.perf_counter()
        forward(layers[i % len(layers)])
        times.append((time.perf_counter() - start) * 1e3)
    return p50(times)


def print_v3(r: Results) -> None:
    if not r.v3.get("floor"):
        return
    floor = r.v3["floor"]
    print(f"(e) DeepSeek-V3 shape: {len(range(V3['first_k_dense_replace'], V3['num_hidden_layers']))} MoE layers x "
          f"{V3['n_routed_experts']} experts, top-{V3['num_experts_per_tok']}, H={V3['hidden_size']}, bf16; "
          f"{V3_GROUPS} simulated groups (latency_ms 0) on {V3_NODES} nodes; T={V3_TOKENS}, p50 ms per layer")
    print(f"  floor: {r.v3_destinations:.1f} concurrent grpc.aio echoes of {r.v3_bytes} B to as many plain servers "
          f"(the destinations per batch): {floor:.2f} ms")
    for path in ("router", "direct"):
        ratio = r.v3[path] / floor
        print(f"  {path:<6} {r.v3[path]:7.2f} ms = {ratio:5.2f}x the floor (goal <= 2x: {_met(ratio <= 2)})")


# ---- plain Ray actors ----

@contextlib.contextmanager
def plain_actors(model: Model):
    assignment, nodes, _ = group_layout(model.reference.spec)
    progress(f"starting plain actors ({model.name})")
    handles = peers.start_plain_actors(model.path, assignment, nodes)
    frontend = peers.LocalFrontend(model.path, LAYER, [a[LAYER] for a in assignment])
    try:
        yield peers.PlainActorsMoE(frontend, handles)
    finally:
        for handle in handles:
            ray.kill(handle)


def bench_actors(models: dict[str, Model], effort: Effort, r: Results) -> None:
    big, tiny = models["big"], models["tiny"]
    with plain_actors(tiny) as moe:
        r.add_error(ACTORS, rel_error(moe.forward, tiny.reference))
        measure_latency(r, ACTORS, tiny, OVERHEAD_TOKENS, moe.forward, effort.overhead_reps, effort)
    with plain_actors(big) as moe:
        r.add_error(ACTORS, rel_error(moe.forward, big.reference))
        measure_load(r, ACTORS, big, moe.forward, effort)


# ---- plain Ray Serve ----

def _wait_serving(client: peers.ServeClient, hidden_size: int, timeout_s: float = 60.0) -> None:
    """The proxy learns about a new app asynchronously: retry UNAVAILABLE/NOT_FOUND for a while."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.forward(torch.zeros(1, hidden_size))
            return
        except grpc.RpcError as exc:
            if time.monotonic() > deadline:
                raise
            progress(f"waiting for Serve's proxy: {exc.code().name}")
            time.sleep(0.5)


@contextlib.contextmanager
def serve_app(app_name: str, model: Model, wait_s: float, grpc_port: int):
    from ray import serve

    assignment, nodes, head = group_layout(model.reference.spec)
    progress(f"deploying Serve app {app_name} ({model.name}, batch_wait_timeout_s={wait_s})")
    peers.deploy_serve_app(app_name, model.path, LAYER, assignment, nodes, head, wait_s)
    placed = [serve.get_deployment_handle(f"group-{k}", app_name).node_id.remote().result()
              for k in range(len(nodes))]
    if placed != nodes:
        raise RuntimeError(f"Serve group replicas landed on {placed}, asked for {nodes}")
    client = peers.ServeClient(f"127.0.0.1:{grpc_port}", app_name, LAYER)
    try:
        _wait_serving(client, model.hidden_size)
        yield client
    finally:
        client.close()
        serve.delete(app_name)


def bench_serve(models: dict[str, Model], effort: Effort, r: Results) -> None:
    from ray import serve

    big, tiny = models["big"], models["tiny"]
    grpc_port = free_port()
    peers.start_serve(grpc_port, free_port())
    try:
        for column in (SERVE, SERVE_TUNED) if effort.serve_tuned else (SERVE,):
            wait_s = SERVE_WAIT_S[column]
            with serve_app(f"{column}-tiny", tiny, wait_s, grpc_port) as client:
                r.add_error(column, rel_error(client.forward, tiny.reference))
                measure_latency(r, column, tiny, OVERHEAD_TOKENS, client.forward, effort.overhead_reps, effort)
            with serve_app(f"{column}-big", big, wait_s, grpc_port) as client:
                r.add_error(column, rel_error(client.forward, big.reference))
                measure_load(r, column, big, client.forward, effort)
    finally:
        serve.shutdown()


# ---- main ----

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, shorter windows, no tuned Serve run")
    parser.add_argument("--only", type=lambda v: v.split(","), default=None,
                        help="comma-separated phases to run (mesh, collective, direct, cpu, actors, serve, v3; "
                             "in-process always)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process (callers, in-process)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    effort = QUICK if args.quick else FULL
    ray.cloudpickle.register_pickle_by_value(peers)
    results = Results()
    # stdout carries the table only: whatever Ray prints meanwhile (raylet notices) goes to stderr
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory(prefix="bench_mesh-") as tmp:
        progress("measuring the floors (grpc.aio echo, gloo send/recv between two plain processes)")
        results.floors = floors.measure_floors()
        progress(f"floors: {results.floors}")
        if args.only is None or "collective" in args.only:
            bench_channel_alone(effort, results)
        progress("building checkpoints")
        models = build_models(Path(tmp))
        bench_in_process(models, effort, results)
        progress(f"starting a {NUM_NODES}-node local Ray cluster")
        cluster = start_local_cluster(num_nodes=NUM_NODES)
        try:
            ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
            phases = {"mesh": bench_mesh, "collective": bench_collective, "direct": bench_direct, "cpu": bench_cpu,
                      "actors": bench_actors, "serve": bench_serve,
                      "v3": lambda _models, e, r: bench_v3(cluster, Path(tmp), e, r)}
            for name, phase in phases.items():
                if args.only is None or name in args.only:
                    try:
                        phase(models, effort, results)
                    except Exception as exc:  # noqa: BLE001 - the other phases still run; the table says so
                        traceback.print_exc()
                        results.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                        progress(f"phase {name} FAILED: {exc}")
        finally:
            ray.shutdown()
            cluster.shutdown()
    header = (f"expert-mesh vs in-process / plain Ray actors / plain Ray Serve; {NUM_NODES} emulated nodes on one "
              f"machine ({os.cpu_count()} cores), fp32, Mixtral layer E=8 k=2; big H=1024 I=2816, tiny H=64 I=128; "
              f"{'--quick' if args.quick else 'full'} run")
    print_table(results, header)
    print_breakdown(results)
    print_cpu(results)
    print_v3(results)
    for failure in results.failures:
        print(f"FAILED {failure}")
    sys.exit(1 if results.failures else 0)


if __name__ == "__main__":
    main()
