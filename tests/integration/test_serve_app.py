"""The mesh as a Ray Serve application, on the shared 3-node cluster.

`mesh serve-config` writes a config that ServeDeploySchema accepts; the real `serve run` CLI deploys
it onto the cluster; a plain gRPC client on Serve's gRPC proxy port (metadata application=<app>)
gets `ExpertMesh.Forward` answers equal to the in-process MoELayer, the tokens went through the
mesh's router, `GetInfo` describes the model, bad input keeps the router's INVALID_ARGUMENT; a
replica that restarts adopts the running mesh instead of deploying another.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import msgpack
import pytest
import ray
import torch
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.cli import main as mesh_cli
from cluster.local import MeshHandle, find_or_start_mesh
from cluster.serve_app import mesh_config
from experts import CheckpointReader, Gate, MoELayer, load_spec
from mesh.controller import NAMESPACE
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos.wire import from_proto, to_proto
from protos.errors import MeshConflictError

FP32_TOL = 1e-5          # max abs error <= FP32_TOL * max|ref|
MESH = "serve-t"
APP = "mesh-app"
SERVE_RUN_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_running(app: str, timeout_s: float) -> None:
    from ray import serve

    deadline, status = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            status = serve.status().applications.get(app)
        except Exception:  # noqa: BLE001 - Serve's controller still starting
            status = None
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            pytest.fail(f"app {app} failed to deploy: {status.message}")
        time.sleep(0.5)
    pytest.fail(f"app {app} not RUNNING after {timeout_s} s: {status}")


def _router_tokens(name: str) -> dict[tuple[int, int], int]:
    router = ray.get_actor(f"{name}/router-0", namespace=NAMESPACE)
    report = msgpack.unpackb(ray.get(router.load_report.remote()), strict_map_key=False)
    return {(layer, expert): n for layer, expert, n in report["tokens"]}


def _gate_copies(path: Path, layer: int, x: torch.Tensor) -> int:
    """Token copies the gate of `layer` routes for x [T, H] (top_k per token, every expert routed)."""
    spec, reader = load_spec(path), CheckpointReader(path)
    try:
        _, ids = Gate(spec, reader.gate(layer))(x)
    finally:
        reader.close()
    return ids.numel()


def _forward(stub, app: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    request = pb.ForwardRequest(layer=layer)
    to_proto(x, request.hidden)
    reply = stub.Forward(request, metadata=(("application", app),), timeout=60)
    return from_proto(reply.hidden, "ForwardResponse.hidden")


@pytest.fixture(scope="module")
def serve_app(ray_cluster, zoo, tmp_path_factory):
    """`mesh serve-config` -> file -> `serve run FILE --non-blocking --address <cluster>`; yields
    (checkpoint, gRPC proxy address, config file); Serve and the mesh it deployed stopped after."""
    from ray import serve

    path = zoo.checkpoint("mixtral")
    grpc_port, http_port = _free_port(), _free_port()
    config_file = tmp_path_factory.mktemp("serve") / "serve.yaml"
    assert mesh_cli(["serve-config", "--model", str(path), "--name", MESH, "--port", "0", "--app-name", APP,
                     "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--host", "127.0.0.1",
                     "--proxy-location", "HeadOnly", "-o", str(config_file)]) == 0
    serve_cli = Path(sys.executable).with_name("serve")
    try:
        run = subprocess.run([str(serve_cli), "run", str(config_file), "--non-blocking", "--address",
                              ray_cluster.address], capture_output=True, text=True, timeout=SERVE_RUN_TIMEOUT_S)
        assert run.returncode == 0, run.stdout + run.stderr
        _wait_running(APP, SERVE_RUN_TIMEOUT_S)
        yield path, f"127.0.0.1:{grpc_port}", config_file
    finally:
        serve.shutdown()
        try:  # the mesh is detached (it outlives replicas): stop what the app deployed
            MeshHandle(MESH, [], ray.get_actor(f"{MESH}/controller", namespace=NAMESPACE), []).stop()
        except ValueError:
            pass


def test_written_serve_config_validates(serve_app):
    path, _, config_file = serve_app
    schema = ServeDeploySchema.model_validate(yaml.safe_load(config_file.read_text()))
    (app,) = schema.applications
    assert app.name == APP and app.import_path == "cluster.serve_app:build_app"
    assert schema.grpc_options.grpc_servicer_functions == [
        "protos.expert_mesh_pb2_grpc.add_ExpertMeshServicer_to_server"]
    config = mesh_config(app.args)
    assert (config.name, config.model, config.router.port) == (MESH, str(path), 0)


def test_forward_through_serves_grpc_proxy_equals_moe_layer(serve_app):
    path, proxy, _ = serve_app
    spec = load_spec(path)
    generator = torch.Generator().manual_seed(5)
    before = _router_tokens(MESH)
    sent: dict[int, int] = {}
    with grpc.insecure_channel(proxy) as channel:
        stub = pb_grpc.ExpertMeshStub(channel)
        for layer in spec.moe_layers:
            ref_layer = MoELayer.from_pretrained(path, layer=layer)
            for shape in ((13, spec.hidden_size), (2, 5, spec.hidden_size)):
                x = torch.randn(*shape, generator=generator)
                out = _forward(stub, APP, layer, x)
                ref = ref_layer(x)
                assert out.shape == x.shape and out.dtype == torch.float32
                assert (out - ref).abs().max().item() <= FP32_TOL * ref.abs().max().item(), (layer, shape)
                sent[layer] = sent.get(layer, 0) + _gate_copies(path, layer, x.reshape(-1, spec.hidden_size))
    after = _router_tokens(MESH)
    for layer in spec.moe_layers:  # the tokens went through the mesh's router, not a local layer
        routed = sum(after.get((layer, e), 0) - before.get((layer, e), 0) for e in range(spec.num_experts))
        assert routed == sent[layer], layer


def test_get_info_and_errors_through_serves_grpc_proxy(serve_app):
    path, proxy, _ = serve_app
    spec = load_spec(path)
    with grpc.insecure_channel(proxy) as channel:
        stub = pb_grpc.ExpertMeshStub(channel)
        info = stub.GetInfo(pb.GetInfoRequest(), metadata=(("application", APP),), timeout=30)
        assert (info.model_type, info.config_hash) == (spec.model_type, spec.config_hash())
        assert list(info.moe_layers) == list(spec.moe_layers) and info.hidden_size == spec.hidden_size
        assert len(info.weight_versions) == len(spec.moe_layers) * spec.num_experts and info.epoch >= 1
        with pytest.raises(grpc.RpcError) as bad:
            _forward(stub, APP, spec.moe_layers[0], torch.randn(3, spec.hidden_size + 1))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"hidden size {spec.hidden_size}" in bad.value.details()
        x = torch.randn(4, spec.hidden_size)  # and the app still serves
        assert _forward(stub, APP, spec.moe_layers[0], x).shape == x.shape


def test_a_restarted_replica_adopts_the_running_mesh(serve_app, tmp_path):
    """What a MeshIngress replica's constructor runs: with the app's mesh up, `find_or_start_mesh`
    adopts its controller and router (same actors, same address, nothing created); a mesh of that
    name serving another checkpoint is refused."""
    path, _, config_file = serve_app
    config = mesh_config(ServeDeploySchema.model_validate(yaml.safe_load(config_file.read_text())).applications[0].args)
    controller = ray.get_actor(f"{MESH}/controller", namespace=NAMESPACE)
    router = ray.get_actor(f"{MESH}/router-0", namespace=NAMESPACE)
    address = ray.get(router.start.remote())
    mesh, created = find_or_start_mesh(config, path)
    assert not created and mesh.addresses == [address]
    assert (mesh.controller._actor_id, mesh.router._actor_id) == (controller._actor_id, router._actor_id)
    status = msgpack.unpackb(ray.get(controller.snapshot.remote()), strict_map_key=False)
    assert status["routers"] == [f"{MESH}/router-0"]
    with pytest.raises(MeshConflictError, match="already runs"):
        find_or_start_mesh(config, tmp_path / "another-checkpoint")
