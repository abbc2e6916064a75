"""The direct client: the router core in the model server's own process, one hop per MoE layer.

    [model server: DirectClient -> Router (batch, gate, plan, combine)] --grpc | collective--> [expert groups]
                        ^ routing table by long polling the controller; each poll renews a lease

A process on the mesh's Ray cluster routes its own tokens (MegaScale-Infer's M2N, gRPC's proxyless
mesh): no router hop, so no second encode and decode per token. It gets the gates and shared
experts once (from the checkpoint when its node can read it, else from the controller over Ray),
the routing table by long polling (as Ray Serve's handles do), and sends each destination's slice
straight to the expert groups. The controller keeps a lease per client: a change's drain waits
until every live client serves nothing on an older epoch, or its lease ends. Concurrent calls of
the process are batched together; calls of other processes are not (that is what the router's
port is for).

`DirectClient` is blocking and thread-safe; `AsyncDirectClient` is its awaitable twin. Both run the
router core in an event loop of their own, on a thread of their own. Every failure raises
`MeshClientError` with the gRPC status code a router would give.

Shape legend: B = batch, S = sequence, T = tokens (B * S), H = hidden.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import Any

import grpc
import torch

from protos.errors import InvalidRequestError, MeshClientError
from protos.serving import TLSConfig, status_of
from protos.wire import DTYPES
from router_service import state
from router_service.actor import ControllerAdmin
from router_service.client import MeshInfo, check_call
from router_service.config import NAMESPACE, RouterConfig
from router_service.router import Router, RouterWeights
from router_service.routing import RoutingTable
from router_service.server import check_rows, check_shape, check_token_ids, info_of
from router_service.transport import make_transport

__all__ = ["AsyncDirectClient", "DirectClient"]

logger = logging.getLogger(__name__)

FLUSH_S = 0.5          # token counts go to the load window and metrics this often
DRAIN_POLL_S = 0.02    # while a request runs on an older epoch, the client reports this often


def _error(exc: BaseException) -> MeshClientError:
    """A failure of the router core as the MeshClientError a router's caller would get."""
    if isinstance(exc, MeshClientError):
        return exc
    if isinstance(exc, asyncio.TimeoutError):
        return MeshClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call did not complete within timeout_s")
    code = status_of(exc) or grpc.StatusCode.INTERNAL
    error = MeshClientError(code, str(exc))
    error.__cause__ = exc
    return error


def _join_ray(mesh: str, address: str | None) -> None:
    """This process on the mesh's Ray cluster: the connection it has, `address`, or the one of the
    `mesh up` of `mesh` running on this machine."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        running = state.read(mesh)
        if running is None or not state.is_alive(running["pid"]):
            raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION, (
                f"a DirectClient runs in a process on the mesh's Ray cluster, and this one is not connected "
                f"to Ray (no ray.init), no address was given and no `mesh up` of mesh {mesh!r} runs here: "
                f"pass address= (as ray.init takes it), or call the mesh over gRPC with MeshClient('host:port')"))
        address = running["ray_address"]
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MeshClientError(grpc.StatusCode.UNAVAILABLE, f"cannot join the Ray cluster at {address}: {exc}; "
                              f"off the cluster, use MeshClient('host:port')") from exc


class _Core:
    """What runs in the client's event loop: the Router, its transport, the poll and flush tasks."""

    def __init__(self, mesh: str, transport: str | None, timeout_s: float, device: str | torch.device | None):
        self.mesh, self.transport_name, self.timeout_s = mesh, transport, timeout_s
        self.device = device
        self.follows = device is None  # until the first Forward, whose device the router core moves to
        self.name = f"{mesh}/direct-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.router: Router | None = None
        self.lease_s = 10.0
        self._tasks: list[asyncio.Task] = []

    def _controller(self):
        import ray

        try:
            return ray.get_actor(f"{self.mesh}/controller", namespace=NAMESPACE)
        except ValueError as exc:
            raise MeshClientError(grpc.StatusCode.UNAVAILABLE, f"no mesh named {self.mesh!r} runs on this "
                                  "Ray cluster (no controller actor)") from exc

    async def _attach(self) -> dict:
        import ray

        hello = await self._controller().attach_direct.remote(self.name, ray.get_runtime_context().get_node_id())
        self.lease_s = hello["lease_s"]
        return hello

    async def start(self) -> None:
        hello = await self._attach()
        config = RouterConfig(**hello["router"])
        if self.transport_name is not None:
            config = config.model_copy(update={"transport": self.transport_name})
        dtype = DTYPES[hello["dtype"]]
        if Path(hello["model"]).is_dir():
            weights = await asyncio.to_thread(RouterWeights.from_checkpoint, hello["model"], dtype)
        else:  # another machine's path: the controller reads it
            weights = await self._controller().router_weights.remote()
        spec = weights.spec
        tls = TLSConfig(**hello["tls"]) if hello["tls"] else None
        device = torch.device("cpu" if self.device is None else self.device)
        transport = make_transport(config, NAMESPACE, self.name, spec.num_experts,  # its loop is ours: inline waits
                                   config.batching.max_batch_tokens * spec.top_k, dtype, hello["secret"], tls,
                                   inline=True, device=device)
        self.router = Router(weights, config, transport, dtype, _metrics(self.mesh), device)
        self.router.on_group_failure = ControllerAdmin(f"{self.mesh}/controller", NAMESPACE).group_failed
        self.router.set_table(RoutingTable.decode(hello["table"]))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll_forever()), loop.create_task(self.router.flush_forever(FLUSH_S))]
        logger.info("direct client %s: %s over %s at epoch %d", self.name, spec.model_type, config.transport,
                    self.router.epoch)

    async def _poll_forever(self) -> None:
        """Long-poll the controller for tables; each poll renews the lease and carries the epochs
        still in flight and the load report. While a request runs on an older epoch (a change is
        draining), the client reports every DRAIN_POLL_S instead of waiting."""
        router = self.router
        while True:
            oldest = router.oldest_inflight
            behind = 0 < oldest < router.epoch
            try:
                held, blob = await self._controller().poll_direct.remote(
                    self.name, router.epoch, oldest, router.load_report(), 0.0 if behind else self.lease_s / 3)
                if not held:  # the lease ended (a long pause, a controller restart): take a new one
                    blob = (await self._attach())["table"]
                if blob:
                    router.set_table(RoutingTable.decode(blob))
            except Exception as exc:  # noqa: BLE001 - the controller restarts or is busy: serve on, retry
                logger.warning("direct client %s: poll failed (retrying): %r", self.name, exc)
                await asyncio.sleep(min(1.0, self.lease_s / 10))
            if behind:
                await asyncio.sleep(DRAIN_POLL_S)

    def check(self, layer: Any, hidden: Any, token_ids: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a client and then a router check of a Forward, on tensors: returns (hidden as [T, H],
        token ids [T] int64 or None). Raises MeshClientError / InvalidRequestError naming the field."""
        check_call(layer, hidden, token_ids)
        spec, shape = self.router.spec, list(hidden.shape)
        check_shape(layer, shape, spec.moe_layers, spec.hidden_size)
        x = hidden.reshape(-1, spec.hidden_size)
        check_rows(x, shape, self.router.config.max_request_tokens)
        vocab_size = self.router.vocab_sizes.get(layer)
        if vocab_size is None:
            return x, None
        if token_ids is None:
            raise InvalidRequestError(f"token_ids are needed for layer {layer}: it picks experts by token id")
        return x, check_token_ids(token_ids.reshape(-1).to(torch.int64), vocab_size)

    async def forward(self, layer: Any, hidden: Any, token_ids: Any, caller: str) -> tuple[torch.Tensor, int]:
        try:
            x, ids = self.check(layer, hidden, token_ids)
            if self.follows:  # the router core follows its first caller's device, once
                self.follows = False
                if x.device != self.router.device:
                    self.router.to(x.device)
            async with asyncio.timeout(self.timeout_s):  # a timer, not a task per call (wait_for's)
                out, epoch = await self.router.forward(layer, x, caller, ids)  # on x's device
        except Exception as exc:
            raise _error(exc) from exc
        return out.reshape(hidden.shape), epoch

    async def info(self) -> MeshInfo:
        return MeshInfo.from_proto(info_of(self.router))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        try:
            await asyncio.wait_for(self._controller().detach_direct.remote(self.name), 5.0)
        except Exception as exc:  # noqa: BLE001 - the lease then ends on its own
            logger.info("direct client %s: lease not released (%r); it expires in %.0f s", self.name, exc, self.lease_s)
        if self.router is not None:
            await self.router.close()


def _metrics(mesh: str):
    """The router metrics of this process, or None where Ray's metrics cannot be recorded."""
    from router_service.metrics import RouterMetrics

    try:
        return RouterMetrics(mesh)
    except Exception as exc:  # noqa: BLE001 - serving does not depend on metrics
        logger.warning("direct client: no metrics (%r)", exc)
        return None


class _DirectBase:
    """The event loop thread the router core runs in, shared by the blocking and async clients."""

    def __init__(self, mesh: str = "mesh", address: str | None = None, transport: str | None = None,
                 timeout_s: float = 30.0, device: str | torch.device | None = None):
        """`mesh`: the mesh's name; `address`: the Ray cluster as `ray.init` takes it (None: this
        process's Ray connection, else the running `mesh up`'s); `transport`: "grpc" or
        "collective" (None: the mesh's router.transport); `timeout_s`: the deadline of one call;
        `device`: where the client gates, plans and combines (None: the device of the first hidden
        states it is given, so that a model server's stay on its GPU)."""
        if transport not in (None, "grpc", "collective"):
            raise MeshClientError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"transport must be 'grpc', 'collective' or None, got {transport!r}")
        _join_ray(mesh, address)
        self._core = _Core(mesh, transport, timeout_s, device)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"direct-{mesh}", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._submit(self._core.start()).result()
        except BaseException as exc:
            self._stop_loop()
            raise _error(exc) from exc

    @property
    def name(self) -> str:
        """This client's name at the controller (`mesh status` lists it)."""
        return self._core.name

    def _submit(self, coro) -> concurrent.futures.Future:
        if self._closed:
            coro.close()
            raise MeshClientError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _forward(self, layer, hidden, token_ids) -> concurrent.futures.Future:
        return self._submit(self._core.forward(layer, hidden, token_ids, str(threading.get_ident())))

    def _close(self) -> concurrent.futures.Future | None:
        if self._closed:
            return None
        future = self._submit(self._core.close())
        self._closed = True
        return future

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __deepcopy__(self, memo: dict) -> "_DirectBase":
        return self  # a deep-copied model shares the client

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mesh={self._core.mesh!r}, name={self.name!r})"


class DirectClient(_DirectBase):
    """Blocking direct client: `forward`, `forward_with_epoch`, `info`, `close`, as `MeshClient`."""

    def forward(self, layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The MoE layer `layer` applied to hidden [T, H] or [B, S, H]; same shape, dtype and device.
        token_ids ([T] or [B, S]) are needed by layers that pick experts by token id."""
        return self.forward_with_epoch(layer, hidden, token_ids)[0]

    def forward_with_epoch(self, layer: int, hidden: torch.Tensor,
                           token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """`forward`, and the epoch of the routing table that served the request."""
        return self._forward(layer, hidden, token_ids).result()

    def info(self) -> MeshInfo:
        return self._submit(self._core.info()).result()

    def close(self) -> None:
        """Release the lease and the channels; later calls raise FAILED_PRECONDITION."""
        future = self._close()
        if future is not None:
            future.result()
            self._stop_loop()

    def __enter__(self) -> "DirectClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class AsyncDirectClient(_DirectBase):
    """`DirectClient` for asyncio callers: `await forward(...)`, `await forward_with_epoch(...)`,
    `await info()`, `await close()`. Construction joins Ray and starts the core (blocking, once)."""

    async def forward(self, layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        return (await self.forward_with_epoch(layer, hidden, token_ids))[0]

    async def forward_with_epoch(self, layer: int, hidden: torch.Tensor,
                                 token_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        return await asyncio.wrap_future(self._forward(layer, hidden, token_ids))

    async def info(self) -> MeshInfo:
        return await asyncio.wrap_future(self._submit(self._core.info()))

    async def close(self) -> None:
        future = self._close()
        if future is not None:
            await asyncio.wrap_future(future)
            await asyncio.to_thread(self._stop_loop)

    async def __aenter__(self) -> "AsyncDirectClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
