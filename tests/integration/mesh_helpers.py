"""What the mesh integration tests share: tolerance, the router's counters, gate predictions,
concurrent callers, continuous load (`Load`), the `mesh` CLI in a child process (`MeshUp`)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import ray
import torch

from experts import CheckpointReader, Gate, load_spec
from router_service import MeshClient
from protos.errors import MeshClientError

FP32_TOL = 1e-5  # max abs error <= FP32_TOL * max|ref|
# the elastic tests' small Mixtral: one MoE layer of 6 experts
SMALL = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=1, num_local_experts=6, num_experts_per_tok=2)


def small_checkpoints(root: Path, **seeds: int) -> dict[str, Path]:
    """One small Mixtral checkpoint per name, under `root`, from the seed it is given."""
    from experts.builtin import build_model, save_checkpoint

    for name, seed in seeds.items():
        save_checkpoint(build_model("mixtral", seed=seed, **SMALL), root / name)
    return {name: root / name for name in seeds}


def swapped_reference(old: Path, new: Path, experts: list[int], x: torch.Tensor) -> torch.Tensor:
    """Layer 0 of checkpoint `old` with `experts` taken from `new`, applied to x [T, H]."""
    from experts import MoELayer
    from experts.group import LayerExperts

    layer = MoELayer.from_pretrained(old, layer=0)
    weights = CheckpointReader(new).experts(0, experts)
    held = layer.experts.layers[0]
    w_gate_up, w_down = held.w_gate_up.clone(), held.w_down.clone()
    w_gate_up[experts], w_down[experts] = weights.w_gate_up, weights.w_down
    layer.experts.layers[0] = LayerExperts(held.experts, w_gate_up, w_down, held.checksums)
    return layer(x)


def wait_for(predicate, timeout_s: float = 60.0, period_s: float = 0.5):
    """`predicate()`'s first true value, polled every period_s; AssertionError after timeout_s."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def load_report(mesh) -> dict:
    """The router's own counters: tokens per (layer, expert) and batch statistics since start."""
    report = msgpack.unpackb(ray.get(mesh.router.load_report.remote()), strict_map_key=False)
    report["tokens"] = {(layer, expert): n for layer, expert, n in report["tokens"]}
    return report


def stats_delta(before: dict, after: dict) -> dict:
    return {key: after["batches"].get(key, 0) - before["batches"].get(key, 0) for key in ("batches", "entries", "tokens")}


def tokens_delta(before: dict, after: dict) -> dict[str, int]:
    """Per "layer/expert": token copies routed between two `mesh.status()` snapshots (zeros dropped)."""
    old, new = before["tokens_per_expert"], after["tokens_per_expert"]
    delta = {key: new.get(key, 0) - old.get(key, 0) for key in set(old) | set(new)}
    return {key: n for key, n in delta.items() if n}


def load_gate(path: Path, layer: int) -> Gate:
    reader = CheckpointReader(path)
    try:
        return Gate(reader.spec, reader.gate(layer))
    finally:
        reader.close()


def gate_counts(path: Path, layer: int, x: torch.Tensor) -> dict[str, int]:
    """Per "layer/expert": the token copies that the gate of `layer` sends for x [..., H]."""
    spec = load_spec(path)
    _, ids = load_gate(path, layer)(x.reshape(-1, spec.hidden_size))
    counts = torch.bincount(ids.reshape(-1), minlength=spec.num_experts).tolist()
    return {f"{layer}/{expert}": n for expert, n in enumerate(counts) if n}


def call_concurrently(address: str, requests: list[tuple], return_errors: bool = False) -> list:
    """Every request, (layer, x) or (layer, x, token_ids), from its own thread and MeshClient,
    released together. Returns the outputs (with `return_errors`, a MeshClientError in place of a
    failed request's output)."""
    barrier = threading.Barrier(len(requests))

    def call(request):
        layer, x, *token_ids = request
        with MeshClient(address, timeout_s=60) as client:
            client.info()  # connected before the barrier, so that the Forwards arrive together
            barrier.wait()
            try:
                return client.forward(layer, x, *token_ids)
            except MeshClientError as exc:
                if return_errors:
                    return exc
                raise

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(call, requests))


class Load:
    """Callers sending the same batch in a loop; each answer is classified against references."""

    def __init__(self, addresses, x: torch.Tensor, refs: dict[str, torch.Tensor], num_callers: int = 3,
                 client=None):
        """Each caller its own MeshClient of `addresses`, or all of them the one `client` given (a
        DirectClient: its process's calls are batched together; the caller closes it)."""
        self.x, self.refs, self.client = x, refs, client
        self.counts = dict.fromkeys([*refs, "wrong", "failed"], 0)
        self.last: list[str] = []
        self.answers: list[tuple[str, int]] = []  # (kind, epoch that served it), in order
        self.errors: list[str] = []
        self.calls: list[tuple[float, float]] = []  # (perf_counter at its start, seconds) of every call
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(addresses,)) for _ in range(num_callers)]

    def _run(self, addresses) -> None:
        with contextlib.nullcontext(self.client) if self.client else MeshClient(addresses, timeout_s=30) as client:
            while not self._stop.is_set():
                epoch, start = 0, time.perf_counter()
                try:
                    out, epoch = client.forward_with_epoch(0, self.x)
                    kind = next((k for k, ref in self.refs.items() if rel_err(out, ref) <= FP32_TOL), "wrong")
                    if kind == "wrong":
                        with self._lock:
                            self.errors.append(f"{time.strftime('%H:%M:%S')} wrong at epoch {epoch}: "
                                               f"{_misses(out, self.refs)}")
                except Exception as exc:  # noqa: BLE001 - counted as failed, reason kept for the assert
                    kind = "failed"
                    with self._lock:
                        self.errors.append(f"{time.strftime('%H:%M:%S')} {exc}"[:300])
                with self._lock:
                    self.calls.append((start, time.perf_counter() - start))
                    self.counts[kind] += 1
                    self.last.append(kind)
                    self.answers.append((kind, epoch))

    def slowest_s(self, since: float = 0.0) -> float:
        """The longest call, answered or failed, of those still running at `since` (perf_counter) or
        started after it."""
        return max((s for start, s in self.calls if start + s >= since), default=0.0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join()

    def lost(self) -> str:
        """What went wrong, for assertion messages: counts and the first few failure reasons."""
        return f"{self.counts}; first failures: {self.errors[:5]}"


def _misses(out: torch.Tensor, refs: dict[str, torch.Tensor]) -> str:
    """How a wrong answer [T, H] misses each reference: its relative error, and its rows off by
    more than FP32_TOL."""
    def rows(ref):
        off = (out.float() - ref.float()).abs().amax(dim=1) > FP32_TOL * ref.float().abs().max()
        return off.nonzero().flatten().tolist()
    return "; ".join(f"{k} rel {rel_err(out, ref):.2e}, rows {rows(ref)}" for k, ref in refs.items())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the caller binds it soon after)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def mesh_cli(env: dict, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`mesh ARGS` run to the end in a child process; its output captured."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s)


class MeshUp:
    """`mesh up ARGS` in a child process: entered once it prints its ready line (`address` is the
    router's address it printed); terminated on exit if it still runs."""

    READY = "expert-mesh ready at "

    def __init__(self, env: dict, *args: str, timeout_s: float = 240):
        self.command = [sys.executable, "-m", "cluster.cli", "up", *args]
        self.env, self.timeout_s = env, timeout_s
        self.lines: list[str] = []
        self.address = ""
        self._ready = threading.Event()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith(self.READY):
                self.address = line.split()[-1]
                self._ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)

    def __enter__(self) -> "MeshUp":
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        deadline = time.time() + self.timeout_s
        try:
            while not self._ready.wait(0.5):
                assert self.process.poll() is None and time.time() < deadline, self.output()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=90)
        self._reader.join(timeout=5)
