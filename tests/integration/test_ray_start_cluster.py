"""`mesh up --address` on a cluster that `ray start` made: a head and two labelled workers on this
machine; `groups.node_labels` puts the expert groups on the workers only.

Every node is a `ray start --block` in a session of its own, with its own loopback address (head
127.0.0.2, workers 127.0.0.3 and .4), the ports Ray would otherwise fix (GCS 6379, client 10001,
dashboard agent 52365) picked free below the ephemeral range, workers on ephemeral ports, and a temp
dir of its own under one root (nodes that share one and start together race for the same socket
names). The test
stops them by their process groups, never with `ray stop` (which stops every Ray on the machine),
and checks that no process naming that root is left.

Why not 127.0.0.1 for every node: a worker's `ray start` refuses to join a cluster unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (this machine runs Ray with 0), and with 1 Ray replaces a
127.0.0.1 or localhost `--address` / `--node-ip-address` with the machine's external address.
Other loopback addresses it keeps as given.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from experts import MoELayer, load_spec
from router_service import MeshClient
from tests.integration.mesh_helpers import FP32_TOL, MeshUp, free_port, mesh_cli, rel_err

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[2]
HEAD_IP, WORKER_IPS = "127.0.0.2", ("127.0.0.3", "127.0.0.4")
ROLE = "expert-mesh.io/role"
STOP_TIMEOUT_S = 20  # from SIGTERM to SIGKILL, for all the nodes together
STOP_GRACE_S = 10  # for Ray's workers to follow their raylet

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs Linux: all of 127.0.0.0/8 on loopback, /proc")


def fixed_port(ip: str) -> int:
    """A port free on `ip` now and below the kernel's ephemeral range: the ports a node is told to
    use. Ray's own processes bind port 0 (an ephemeral port) as they start; one of them once took a
    port picked free a moment before for the client server, and the head failed to bind it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(20000, min(low, 32768)), 200):
        with socket.socket() as sock:
            try:
                sock.bind((ip, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low} on {ip}")


class RayStartCluster:
    """A head and workers, each `ray start --block` in its own process group, on loopback addresses."""

    def __init__(self, root: Path):
        self.root = root
        self.address = f"{HEAD_IP}:{fixed_port(HEAD_IP)}"
        self.nodes: list[subprocess.Popen] = []
        self.env = self._env()

    def _env(self) -> dict[str, str]:
        """The nodes' environment. Ray's dashboard on a `ray start` head asks the cloud metadata
        address (169.254.169.254) which cloud it runs on, unless ~/ray_bootstrap_config.yaml names
        the provider, and posts a "usage stats disabled" note to usage-stats.ray.io: a HOME of the
        test's own and a report URL on a closed loopback port keep both on this machine."""
        home = self.root / "home"
        home.mkdir()
        (home / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump({"provider": {"type": "local"}}))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
                   RAY_USAGE_STATS_ENABLED="0", RAY_USAGE_STATS_REPORT_URL=f"http://127.0.0.1:{free_port()}/",
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # SIGTERM: stop now, not drain for 30 s
        return env

    def _start(self, ip: str, labels: dict[str, str], args: list[str], join: bool) -> None:
        temp_dir = self.root / f"n{len(self.nodes)}"
        command = [RAY, "start", "--block", "--node-ip-address", ip, "--num-cpus", "1",
                   "--object-store-memory", str(100 * 2**20), "--temp-dir", str(temp_dir),
                   "--labels", ",".join(f"{k}={v}" for k, v in labels.items()),
                   "--dashboard-agent-listen-port", str(fixed_port(ip)),
                   "--min-worker-port", "0", "--max-worker-port", "0", *args]  # 0: workers on random ports
        env = {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if join else "0"}
        temp_dir.mkdir()
        with open(temp_dir / "ray-start.log", "w") as log:
            self.nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def start(self, worker_labels: dict[str, str], head_labels: dict[str, str]) -> None:
        port = self.address.rsplit(":", 1)[1]
        self._start(HEAD_IP, head_labels, ["--head", "--port", port, "--include-dashboard=false",
                                           "--dashboard-port", str(fixed_port(HEAD_IP)),
                                           "--ray-client-server-port", str(fixed_port(HEAD_IP))], join=False)
        self.wait_for_nodes(1)
        for ip in WORKER_IPS:
            self._start(ip, worker_labels, ["--address", self.address], join=True)
        self.wait_for_nodes(1 + len(WORKER_IPS))

    def alive_nodes(self) -> list[dict]:
        """The GCS's live nodes: {"node_id", "ip", "labels", "is_head"}; [] while it does not answer."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        try:
            infos = GcsClient(address=self.address).get_all_node_info(timeout=5).values()
        except Exception:  # noqa: BLE001 - not up yet
            return []
        return [{"node_id": n.node_id.hex(), "ip": n.node_manager_address, "labels": dict(n.labels),
                 "is_head": n.is_head_node} for n in infos if n.state == GcsNodeInfo.ALIVE]

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.time() + timeout_s
        while len(self.alive_nodes()) < count:
            exited = [k for k, node in enumerate(self.nodes) if node.poll() is not None]
            assert not exited and time.time() < deadline, self.logs()
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("n*/ray-start.log")))

    def processes(self) -> list[int]:
        """Pids of the processes this cluster started, found by the HOME they inherit: Ray's workers
        live in process groups of their own, under names (`ray::IDLE`) that hide their command line."""
        marker, pids = f"HOME={self.root / 'home'}\0".encode(), []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "environ").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
        return pids

    def stop(self) -> list[int]:
        """SIGTERM each node's process group (workers first) and SIGKILL the group after
        STOP_TIMEOUT_S; then SIGKILL whatever of the cluster still runs after a grace period (Ray's
        workers are in groups of their own and exit once their raylet is gone). Returns those pids."""
        for node in reversed(self.nodes):
            _signal_group(node.pid, signal.SIGTERM)
        deadline = time.time() + STOP_TIMEOUT_S
        for node in self.nodes:
            try:
                node.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(node.pid, signal.SIGKILL)  # the group's stragglers, if any
            node.wait()
        deadline = time.time() + STOP_GRACE_S
        while self.processes() and time.time() < deadline:
            time.sleep(0.2)
        left = self.processes()
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return left


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def ray_start_cluster():
    root = Path(tempfile.mkdtemp(prefix="ray-start-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = RayStartCluster(root)
    try:
        cluster.start(worker_labels={ROLE: "experts"}, head_labels={ROLE: "routers"})
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the `ray start` cluster still running after it stopped: {left}"


def test_mesh_up_address_joins_a_ray_start_cluster_and_pins_groups_by_labels(ray_start_cluster, zoo, tmp_path):
    """`mesh up --address` on the `ray start` cluster: one group per labelled worker, none on the
    head (labelled otherwise), each serving on its worker's address; a Forward equals MoELayer;
    `mesh down` stops it and `mesh down --address` then finds no mesh on that cluster."""
    cluster = ray_start_cluster
    workers = {n["node_id"]: n["ip"] for n in cluster.alive_nodes() if not n["is_head"]}
    assert sorted(workers.values()) == sorted(WORKER_IPS)
    path = zoo.checkpoint("mixtral")
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump({"groups": {"node_labels": {ROLE: "experts"}}}))
    env = {**cluster.env, "EXPERT_MESH_STATE_DIR": str(tmp_path / "state")}
    name, port = f"raystart-{os.getpid()}", fixed_port("127.0.0.1")
    with MeshUp(env, "--address", cluster.address, "--model", str(path), "--config", str(config),
                "--port", str(port), "--name", name) as up:
        assert up.address == f"127.0.0.1:{port}"
        status = mesh_cli(env, "status", "--json", "--name", name)
        assert status.returncode == 0, status.stderr
        groups = json.loads(status.stdout)["groups"]
        assert sorted(g["node"] for g in groups) == sorted(workers) and all(g["alive"] for g in groups)
        assert {g["endpoint"].rsplit(":", 1)[0] for g in groups} == set(WORKER_IPS)

        spec = load_spec(path)
        x = torch.randn(2, 7, spec.hidden_size, generator=torch.Generator().manual_seed(11))
        with MeshClient(up.address) as client:
            for layer in spec.moe_layers:
                assert rel_err(client.forward(layer, x), MoELayer.from_pretrained(path, layer=layer)(x)) <= FP32_TOL

        down = mesh_cli(env, "down", "--name", name)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout_s=60) == 0, up.output()
    gone = mesh_cli(env, "down", "--name", name, "--address", cluster.address)
    assert gone.returncode == 1 and f"no mesh {name!r} on the cluster at {cluster.address}" in gone.stderr
