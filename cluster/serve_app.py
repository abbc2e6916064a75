"""expert-mesh as a Ray Serve application: Serve's gRPC proxy serves `ExpertMesh` (Forward, GetInfo)
to simple clients; the router's own port stays the fast path.

    [gRPC client] --metadata application=<app>--> [Serve gRPC proxy] --> [MeshIngress replica]
        --grpc.aio ExpertMesh.Forward (same node)--> [router actor] --> [expert-group actors]

A MeshIngress replica, on start, adopts the mesh `<name>` (controller `<name>/controller` and its
routers in namespace expert-mesh) or deploys it as `mesh up` does (`find_or_start_mesh`: detached
controller, groups, routers pinned to the replica's node, router port from the config). The mesh
outlives the replica: a restarted replica adopts it again, and deleting the app leaves it running
(`mesh down --name NAME --address ADDR` stops it).

    serve run cluster.serve_app:build_app model=/path/to/checkpoint router.port=50051
    mesh serve-config --model DIR -o serve.yaml && serve deploy serve.yaml
"""

from __future__ import annotations

import asyncio
import copy
import logging
from pathlib import Path

from protos.errors import ConfigError, IngressError
from mesh.config import MeshConfig, load_config

__all__ = ["IMPORT_PATH", "SERVICER_FUNCTIONS", "MeshIngress", "build_app", "grpc_options", "mesh_config",
           "serve_config"]

logger = logging.getLogger(__name__)

IMPORT_PATH = "cluster.serve_app:build_app"
SERVICER_FUNCTIONS = ("protos.expert_mesh_pb2_grpc.add_ExpertMeshServicer_to_server",)
DEFAULT_APP_NAME = "expert-mesh"
DEFAULT_GRPC_PORT = 9000          # Serve's defaults
DEFAULT_HTTP_PORT = 8000
MAX_ONGOING_REQUESTS = 256        # per replica: concurrent Forwards must reach the router's batcher together
HEALTH_TIMEOUT_S = 5.0


def mesh_config(args: dict) -> MeshConfig:
    """MeshConfig from the app's args: `config` (a YAML path or a mapping) and overrides of its fields,
    top-level (`model=DIR`, `name=m`) or one level down (`router.port=0`), as `serve run ... k=v`
    passes them (strings; pydantic converts). Raises ConfigError naming the field."""
    args = dict(args)
    base = args.pop("config", None)
    if base is None or isinstance(base, (str, Path)):
        return load_config(base, **args)
    if not isinstance(base, dict):
        raise ConfigError(f"args.config must be a YAML path or a mapping, got {type(base).__name__}")
    return load_config(None, **{**copy.deepcopy(base), **args})


class MeshIngress:
    """Serve deployment body: `Forward` and `GetInfo` named like the RPCs, for Serve's gRPC proxy,
    each forwarded to a router's own port (round robin; the next router on UNAVAILABLE)."""

    async def __init__(self, config: dict):
        from cluster.local import find_or_start_mesh
        from experts import load_spec
        from experts.builtin import builtin_model_dir
        from protos import expert_mesh_pb2_grpc as pb_grpc
        from protos.serving import channel

        self.config = MeshConfig(**config)
        model = self.config.model or str(await asyncio.to_thread(builtin_model_dir))
        self.mesh, self.created = await asyncio.to_thread(find_or_start_mesh, self.config, model)
        logger.info("%s mesh %r; routers at %s", "deployed" if self.created else "adopted", self.mesh.name,
                    ", ".join(self.mesh.addresses))
        limit = self.config.router.max_message_bytes(load_spec(model).hidden_size)
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        # With router.tls the routers take TLS only: this replica checks them against its `ca` and
        # presents its cert and key (mutual TLS), as a caller inside the mesh's PKI.
        self._channels = [channel(a, self.config.router.tls, options) for a in self.mesh.addresses]
        self._stubs = [pb_grpc.ExpertMeshStub(c) for c in self._channels]
        self._turn = 0
        # batching wait, then the slowest expert call and its one retry on another copy
        self.timeout_s = 2 * self.config.router.expert_timeout_s + 5.0

    async def Forward(self, request, grpc_context=None):  # noqa: N802 - the RPC's name
        """ForwardRequest -> ForwardResponse from a router; the router's status code on failure."""
        from protos import expert_mesh_pb2 as pb

        return await self._call("Forward", request, pb.ForwardResponse, grpc_context)

    async def GetInfo(self, request, grpc_context=None):  # noqa: N802 - the RPC's name
        from protos import expert_mesh_pb2 as pb

        return await self._call("GetInfo", request, pb.InfoResponse, grpc_context)

    async def check_health(self) -> None:
        """Serve's periodic check: every router answers. Raising restarts this replica, whose
        constructor adopts the mesh again and restarts a router that died."""
        from protos import expert_mesh_pb2 as pb

        await asyncio.gather(*(stub.GetInfo(pb.GetInfoRequest(), timeout=HEALTH_TIMEOUT_S) for stub in self._stubs))

    async def _call(self, method: str, request, reply_type, grpc_context):
        import grpc

        start, self._turn = self._turn, self._turn + 1
        for attempt in range(len(self._stubs)):
            stub = self._stubs[(start + attempt) % len(self._stubs)]
            try:
                return await getattr(stub, method)(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                error = exc
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    break
        if grpc_context is None:
            raise IngressError(f"{method}: {error.code().name}: {error.details()}")
        # The router's code and message reach the client unchanged; Serve keeps a code set here.
        grpc_context.set_code(error.code())
        grpc_context.set_details(error.details() or "")
        return reply_type()


def build_app(args: dict):
    """Serve app builder: `serve run cluster.serve_app:build_app model=DIR router.port=0`, or
    `import_path: cluster.serve_app:build_app` with `args` in a `serve deploy` config (see
    `mesh_config` for the args). One MeshIngress replica, no CPU reserved (it only forwards bytes)."""
    from ray import serve

    config = mesh_config(args)
    deployment = serve.deployment(MeshIngress).options(
        name="MeshIngress", num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": 0},
    )
    return deployment.bind(config.model_dump())


def grpc_options(port: int = DEFAULT_GRPC_PORT):
    """Serve's gRPC proxy options with ExpertMesh registered: `serve.start(grpc_options=...)`."""
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=list(SERVICER_FUNCTIONS))


def serve_config(config: MeshConfig, app_name: str = DEFAULT_APP_NAME, grpc_port: int = DEFAULT_GRPC_PORT,
                 http_port: int = DEFAULT_HTTP_PORT, host: str = "0.0.0.0",
                 proxy_location: str = "EveryNode") -> dict:
    """A `serve deploy` / `serve run` config (ServeDeploySchema) for the mesh of `config`: its
    fields that differ from the defaults travel inline as the app's args, so that the cluster needs
    no copy of the YAML file. `admin_token` is left out (Serve shows app args to anyone who can
    read its config): set EXPERT_MESH_ADMIN_TOKEN in the environment of the cluster's nodes."""
    mesh = {"name": config.name, **config.model_dump(mode="json", exclude_defaults=True, exclude={"admin_token"})}
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": host, "port": http_port},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": list(SERVICER_FUNCTIONS)},
        "applications": [{"name": app_name, "route_prefix": f"/{app_name}", "import_path": IMPORT_PATH,
                          "args": {"config": mesh}}],
    }
