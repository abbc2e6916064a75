"""The router as a Ray actor: a Router and its gRPC server on the node it runs on.

The controller pushes routing tables with `set_table`; `load_report` gives tokens per expert
(msgpack) for the controller's status and, later, its replication policy.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from protos.collector import settle_gc
from protos.errors import MeshError, UnavailableError, one_line
from experts.actor import compute_device
from experts.memory import keep_freed_memory
from protos.serving import TLSConfig
from protos.wire import DTYPES
from router_service.config import RouterConfig
from router_service.routing import RoutingTable
from router_service.router import Router, RouterWeights
from router_service.server import RouterServer
from router_service.transport import make_transport

__all__ = ["ControllerAdmin", "RouterActor"]

logger = logging.getLogger(__name__)

FLUSH_S = 0.5  # the router's token tally goes to its load window and metrics this often


class ControllerAdmin:
    """MeshAdmin backend: the controller actor, found by name on every call (it may restart)."""

    def __init__(self, name: str, namespace: str):
        self.name, self.namespace = name, namespace
        self._told: dict[str, float] = {}  # group -> when the controller was last told it failed

    def _handle(self):
        import ray

        return ray.get_actor(self.name, namespace=self.namespace)

    async def _remote(self, method: str, *args):
        """One controller call. The controller gone (no actor by its name, Ray reports it dead or
        unreachable, a Ray timeout) -> UnavailableError; an error it raised on purpose (a MeshError)
        -> that error; anything else as it came."""
        import ray

        try:
            handle = self._handle()
        except ValueError as exc:  # ray.get_actor: no actor by that name
            raise UnavailableError(f"controller {self.name} is not running: {exc}") from exc
        try:
            return await getattr(handle, method).remote(*args)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, MeshError):
                raise exc.cause from exc
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            raise UnavailableError(f"controller {self.name} did not answer: {one_line(exc)}") from exc

    async def read(self, verb: str, token: str | None) -> dict:
        return await self._remote("read", verb, token)

    async def scale(self, token: str, layer: int, expert: int, replicas: int) -> dict:
        return await self._remote("scale", token, layer, expert, replicas)

    async def set_autoscale(self, token: str, enabled: bool) -> dict:
        return await self._remote("set_autoscale", token, enabled)

    async def swap(self, token: str, layer: int, experts: list[int], source: str) -> dict:
        return await self._remote("swap", token, layer, experts, source)

    async def rebalance(self, token: str, dry_run: bool) -> dict:
        return await self._remote("rebalance", token, dry_run)

    def group_failed(self, group: str) -> None:
        """Tell the controller at once (no reply awaited), at most once a second per group: it
        observes the groups now instead of at its next round."""
        now = time.monotonic()
        if now - self._told.get(group, -1e9) >= 1.0:
            self._told[group] = now
            try:
                self._handle().group_failed.remote(group)
            except Exception as exc:  # noqa: BLE001 - the controller's own round finds it anyway
                logger.debug("could not tell the controller about %s: %r", group, exc)


class RouterActor:
    """Ray actor body (the controller or the CLI wraps it with ray.remote, name and placement)."""

    def __init__(self, mesh: str, model_path: str, config: dict, namespace: str, dtype: str = "float32",
                 controller: str | None = None, torch_threads: int = 0):
        keep_freed_memory()
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.mesh = mesh
        self.model_path = model_path
        self.config = RouterConfig(**config)
        self.namespace = namespace
        self.dtype = DTYPES[dtype]
        self.controller = controller
        self.server: RouterServer | None = None
        self._starting: asyncio.Future | None = None

    async def start(self, port: int | None = None) -> str:
        """Bind the gRPC port (`port`, when given, instead of the configured one: the controller
        re-binds a router that Ray restarted on the port it had); returns "host:port". Idempotent:
        later calls (a Serve replica adopting this router) get the same address; a start that
        failed (the controller restarting, the port taken) is tried again by the next call."""
        if self._starting is None or (self._starting.done() and (self._starting.cancelled()
                                                                 or self._starting.exception() is not None)):
            if port is not None:
                self.config = self.config.model_copy(update={"port": port})
            self._starting = asyncio.ensure_future(self._start())
        return await self._starting

    async def _start(self) -> str:
        from router_service.metrics import RouterMetrics

        metrics = RouterMetrics(self.mesh)
        import ray

        from experts import load_spec

        spec = load_spec(self.model_path)
        name = ray.get_runtime_context().get_actor_name() or "router"
        device = compute_device(self.config.device, f"router {name}", len(ray.get_gpu_ids()))
        secret, tls = "", None
        if self.controller:
            controller = ray.get_actor(self.controller, namespace=self.namespace)
            secret, tls = await controller.data_secret.remote(), await controller.internal_tls.remote()
        transport = make_transport(self.config, self.namespace, name, spec.num_experts,
                                   self.config.batching.max_batch_tokens * spec.top_k, self.dtype, secret,
                                   TLSConfig(**tls) if tls else None, device=device)
        router = Router(RouterWeights.from_checkpoint(self.model_path, self.dtype), self.config, transport, self.dtype,
                        metrics, device)
        admin = ControllerAdmin(self.controller, self.namespace) if self.controller else None
        if admin is not None:
            router.on_group_failure = admin.group_failed
        self.server = RouterServer(router, admin, metrics)
        port = await self.server.start()
        self._flusher = asyncio.get_running_loop().create_task(router.flush_forever(FLUSH_S))
        settle_gc()
        return f"{self.config.host}:{port}"

    async def set_table(self, blob: bytes) -> bool:
        """Install a routing table; warm every layer up if not yet serving. Returns is_serving."""
        self.server.router.set_table(RoutingTable.decode(blob))
        if not self.server.is_serving():
            await self.server.warm_up()
        await self.server.refresh_health()
        return self.server.is_serving()

    async def open_channels(self, groups: list[str], fresh: bool) -> None:
        """The transport's channels to `groups` (`fresh`: anew, the groups were restarted): the
        reconciler's step before the first table that routes to them."""
        await self.server.router.transport.open(groups, fresh)

    def epoch(self) -> int:
        """Epoch of the routing table in force; -1 before `start` (a router Ray just restarted)."""
        return -1 if self.server is None else self.server.router.epoch

    def is_serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    def node_id(self) -> str:
        """The Ray node this router runs on (placement measures latency from here)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def load_report(self, pairs: bool = True) -> bytes:
        """The router's load report (Router.load_report)."""
        return self.server.router.load_report(pairs)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            await asyncio.sleep(0)
