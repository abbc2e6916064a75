"""The Serve app without a cluster: `mesh serve-config` output that `serve deploy` accepts, app args
as `serve run k=v` passes them, and the ingress's error mapping on fake router stubs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import yaml

from cluster.cli import main as mesh_cli
from cluster.serve_app import SERVICER_FUNCTIONS, MeshIngress, build_app, mesh_config, serve_config
from mesh.config import MeshConfig
from protos import expert_mesh_pb2 as pb
from protos.errors import ConfigError, IngressError


def test_serve_config_validates_and_carries_the_mesh_config():
    from ray.serve.schema import ServeDeploySchema

    config = MeshConfig(name="m1", model="/ckpt", groups={"replicas": 2}, router={"port": 50060})
    schema = ServeDeploySchema.model_validate(serve_config(config, app_name="a", grpc_port=9100))
    (app,) = schema.applications
    assert (app.name, app.import_path, schema.grpc_options.port) == ("a", "cluster.serve_app:build_app", 9100)
    assert schema.grpc_options.grpc_servicer_functions == list(SERVICER_FUNCTIONS)
    assert mesh_config(app.args) == config


def test_serve_config_leaves_the_admin_token_out():
    args = serve_config(MeshConfig(admin_token="s3cret"))["applications"][0]["args"]
    assert "s3cret" not in yaml.safe_dump(args) and mesh_config(args).admin_token is None


def test_cli_writes_a_config_that_serve_deploy_accepts(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump({"router": {"batching": {"max_wait_ms": 2.0}},
                                                         "groups": {"num_groups": 3}}))
    out = tmp_path / "serve.yaml"
    assert mesh_cli(["serve-config", "--model", "ckpt", "--config", str(tmp_path / "mesh.yaml"), "--name", "m2",
                     "--proxy-location", "HeadOnly", "-o", str(out)]) == 0
    schema = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    config = mesh_config(schema.applications[0].args)
    assert schema.proxy_location == "HeadOnly"
    assert (config.name, config.groups.num_groups, config.router.batching.max_wait_ms) == ("m2", 3, 2.0)
    assert config.model.endswith("/ckpt") and config.model.startswith("/")  # absolute: the cluster has no cwd of ours


def test_servicer_functions_import():
    from ray.serve.config import gRPCOptions

    functions = gRPCOptions(grpc_servicer_functions=list(SERVICER_FUNCTIONS)).grpc_servicer_func_callable
    assert [f.__name__ for f in functions] == ["add_ExpertMeshServicer_to_server"]


@pytest.mark.parametrize("args,expected", [
    ({}, {"name": "mesh", "model": None, "router.port": 50051}),
    ({"model": "/m", "name": "x", "router.port": "0"}, {"name": "x", "model": "/m", "router.port": 0}),
    ({"config": {"name": "y", "router": {"port": 7}}, "router.port": "8"},
     {"name": "y", "model": None, "router.port": 8}),
])
def test_mesh_config_from_app_args(args, expected):
    config = mesh_config(args)
    assert {"name": config.name, "model": config.model, "router.port": config.router.port} == expected


@pytest.mark.parametrize("args,message", [
    ({"router.port": "x"}, "router.port"),
    ({"groups.bogus": "1"}, "groups.bogus"),
    ({"config": 3}, "args.config"),
])
def test_mesh_config_names_the_bad_field(args, message):
    with pytest.raises(ConfigError, match=message):
        mesh_config(args)


def test_build_app_binds_one_ingress():
    from ray.serve import Application

    assert isinstance(build_app({"model": "/m", "router.port": "0"}), Application)


# ---- the ingress's forwarding, on fake router stubs (no Ray, no network) ----

class FakeRouterStub:
    """ExpertMeshStub of one router: answers with `reply` or fails with `code`."""

    def __init__(self, code: grpc.StatusCode | None = None, reply=None):
        self.code, self.reply, self.calls = code, reply, 0

    async def Forward(self, request, timeout=None):  # noqa: N802
        self.calls += 1
        if self.code is not None:
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details=f"{self.code.name} here")
        return self.reply


class FakeServeGrpcContext:
    def __init__(self):
        self.code, self.details = None, None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def ingress(*stubs) -> MeshIngress:
    body = MeshIngress.__new__(MeshIngress)  # the constructor deploys a mesh; only forwarding under test
    body._stubs, body._turn, body.timeout_s = list(stubs), 0, 1.0
    return body


def test_ingress_fails_over_on_unavailable_and_round_robins():
    reply = pb.ForwardResponse(epoch=3)
    down, up = FakeRouterStub(grpc.StatusCode.UNAVAILABLE), FakeRouterStub(reply=reply)
    body = ingress(down, up)
    assert asyncio.run(body.Forward(pb.ForwardRequest(layer=1), FakeServeGrpcContext())) == reply
    assert asyncio.run(body.Forward(pb.ForwardRequest(layer=1), FakeServeGrpcContext())) == reply
    assert (down.calls, up.calls) == (1, 2)  # the second call started at the live router


def test_ingress_passes_the_routers_status_code_to_serve():
    body = ingress(FakeRouterStub(grpc.StatusCode.INVALID_ARGUMENT), FakeRouterStub(reply=pb.ForwardResponse()))
    context = FakeServeGrpcContext()
    reply = asyncio.run(body.Forward(pb.ForwardRequest(layer=1), context))
    assert reply == pb.ForwardResponse()  # not retried elsewhere: the input is bad on every router
    assert (context.code, context.details) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT here")
    with pytest.raises(IngressError, match="INVALID_ARGUMENT"):  # a Python DeploymentHandle caller
        asyncio.run(ingress(FakeRouterStub(grpc.StatusCode.INVALID_ARGUMENT)).Forward(pb.ForwardRequest(), None))
