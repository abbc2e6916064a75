"""The controller: a thin Ray actor over the reconciler (mesh/reconciler.py), the one owner of the
expert-group actors and of the routing table.

deploy():   assignment policy -> group actors pinned to nodes -> desired state persisted -> epoch 1.
changes:    scale / autoscale / rebalance / swap are planned (mesh/changes.py) against the desired
            state under the reconciler's lock, recorded as an intent, then carried out step by step.
loop:       every `health_period_s` one reconcile round (observe, drop dead groups, resync routers,
            restore, tidy); an exception in a round is logged and the next round runs.
restart:    Ray restarts this actor; it adopts the persisted state, rolls the change in progress back
            or forward, and publishes a new epoch.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path

import msgpack

from experts import load_spec
from protos.collector import settle_gc
from protos.errors import AdminError, MeshError, PlacementError
from mesh.admin import AdminAuth, accepted, refused
from mesh.autoscale import autoscaled
from mesh.changes import plan_copies, plan_deploy, plan_swap
from mesh.config import MeshConfig
from mesh.handles import NAMESPACE, GroupFactory, RayLauncher, alive_nodes, default_num_groups, gpus_per_group
from mesh.leases import Leases
from mesh.load import Load, aggregate_load
from mesh.placement import check_memory, initial_assignment, placement_report, scaled, spread_groups
from mesh.probes import ProbeFleet
from mesh.reconciler import Reconciler
from mesh.state import MeshState
from mesh.status import status_report
from mesh.store import GcsKVStore, StateStore
from mesh.verify import hand_back_large_frees

__all__ = ["MeshController", "NAMESPACE"]

logger = logging.getLogger(__name__)


def _str_keys(assignment: dict) -> dict:
    """msgpack keeps int keys, but JSON and the CLI want str: {group: {"layer": experts}}."""
    return {g: {str(layer): e for layer, e in held.items()} for g, held in assignment.items()}


def _failed(future: asyncio.Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def _log_to_stderr() -> None:
    """The mesh's loggers at INFO on this actor's stderr (the dashboard's actor logs): every change's
    steps with their times, restores, drains. Ray leaves the root logger at WARNING."""
    mesh_logger = logging.getLogger("mesh")
    if not mesh_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        mesh_logger.addHandler(handler)
        mesh_logger.setLevel(logging.INFO)
        mesh_logger.propagate = False


def _call_ready_soon() -> None:
    import ray

    ray.get_runtime_context().current_actor.ready.remote()


class MeshController:
    """Ray actor body; created by the CLI (or the Serve app) as `<mesh>/controller`, detached."""

    def __init__(self, config: dict, model_path: str, group_factory: GroupFactory | None = None):
        self.config = MeshConfig(**config)
        self.model_path = model_path
        self.spec = load_spec(model_path)
        self.store = StateStore(GcsKVStore(NAMESPACE), self.config.name)
        self.rec = Reconciler(self.store, RayLauncher(self.config, model_path, self.spec, group_factory),
                              list(self.spec.moe_layers), self.spec.num_experts, drain_s=self.config.drain_s,
                              call_timeout_s=self.config.group_timeout_s, push_timeout_s=self.config.push_timeout_s,
                              failure_threshold=self.config.failure_threshold,
                              max_timeout_deaths=self.config.max_timeout_deaths,
                              start_timeout_s=self.config.group_start_timeout_s,
                              restart_settle_s=self.config.health_period_s)
        self.started_at = time.time()
        self.probes = ProbeFleet(self.config.name, self.rec.launcher.factory.probe_class)
        self.auth = AdminAuth(self.config.admin_token, self.config.read_token)
        self._tasks: list[asyncio.Task] = []
        self._recovering: asyncio.Future | None = None
        self._wake = asyncio.Event()  # set: the reconcile loop runs its next round now
        self.leases = Leases(self.config.direct_lease_s)  # direct clients (router_service/direct.py)
        self._published = asyncio.Event()  # set (and replaced) at every new table: answers the polls
        self.rec.on_publish = self._on_publish
        self.rec.drain_wait = self._drain_direct_clients
        _log_to_stderr()
        hand_back_large_frees()  # a swap's verification reads experts one at a time: their memory goes back
        settle_gc()  # torch and Ray's objects out of every scan: full collections stalled change steps
        _call_ready_soon()  # after a restart by Ray, adopt the mesh without waiting for a caller

    # -- deployment and recovery ---------------------------------------------------------------------

    async def ready(self) -> int:
        """After Ray restarted this actor, adopt the previous incarnation's mesh (from the persisted
        state); called by every public method and by `mesh up`'s watchdog. Returns the epoch. A
        recovery that failed (the GCS busy, a group call timed out) is tried again by the next call."""
        if self._recovering is None or _failed(self._recovering):
            self._recovering = asyncio.ensure_future(self._recover())
        await self._recovering
        return self.rec.epoch

    async def _recover(self) -> bool:
        state = self.store.load()
        if state is None:
            return False
        start = time.perf_counter()
        self.rec.launcher.secret = state.secret
        self.rec.adopt(state)
        if not state.groups:  # never deployed: a deploy that failed, or stopped before its publish (rolled back)
            await self.rec.resume()
            return False
        await self.rec.observe()
        await self.rec.resume()
        await self.rec.publish()  # a new epoch: never one a previous incarnation used
        self._start_loops()
        logger.info("controller adopted %d groups (%d live), %d routers at epoch %d in %.2f s",
                    len(state.groups), len(self.rec.seen), len(self.rec.routers), self.rec.epoch,
                    time.perf_counter() - start)
        return True

    async def deploy(self) -> bytes:
        """Create every expert group (or adopt them after a controller restart), wait until all
        serve, persist the desired state, publish epoch 1 (one change); returns the table. Two deploys
        at once create the groups once."""
        if not await self.ready():
            await self._create_groups()
        self._start_loops()
        return self.rec.table.encode()

    async def _create_groups(self) -> None:
        nodes = alive_nodes(self.config.groups.node_labels)
        if not nodes:
            labels = [n.get("Labels") or {} for n in alive_nodes()]
            raise PlacementError(f"no live node carries groups.node_labels {self.config.groups.node_labels}; "
                                 f"the nodes' labels are {labels}")
        num_groups = self.config.groups.num_groups or default_num_groups(self.config.groups.device, nodes)
        assignment = initial_assignment(list(self.spec.moe_layers), self.spec.num_experts, num_groups,
                                        self.config.groups.replicas, num_nodes=len(nodes))
        placement = spread_groups(num_groups, [n["NodeID"] for n in nodes])
        names = [f"{self.config.name}/group-{k}" for k in range(num_groups)]
        await self._check_memory(names, assignment, placement, nodes)
        groups = {n: (node, held) for n, held, node in zip(names, assignment, placement)}

        async def plan(state: MeshState):  # under the change lock: a concurrent deploy's groups stand
            if state.groups:
                return None
            secret = self.rec.launcher.secret = secrets.token_urlsafe(32)  # the data plane's, persisted at publish
            return plan_deploy(groups, {"autoscale": self.config.autoscale.enabled, "secret": secret},
                               f"deploy-{state.revision + 1}")

        await self.rec.submit(plan)

    async def _check_memory(self, names: list[str], assignment: list[dict], placement: list[str],
                            nodes: list[dict]) -> None:
        """The groups' weights against their GPU's memory (groups on GPUs: each GPU measured, fp8 where
        it stays fp8) or their node's host memory (mesh.placement.check_memory)."""
        launcher, groups = self.rec.launcher, self.config.groups
        copies = [sum(len(v) for v in experts.values()) for experts in assignment]
        on_gpus = bool(gpus_per_group(groups.device, nodes))
        if on_gpus:
            gpus = await launcher.measure_gpus(sorted(set(placement)))
            need = [launcher.expert_bytes(gpus[node]) * n for node, n in zip(placement, copies)]
            capacity = {node: gpu.memory_bytes for node, gpu in gpus.items()}
        else:
            need = [launcher.expert_bytes() * n for n in copies]
            capacity = {n["NodeID"]: n["Resources"].get("memory", 0) for n in nodes}
        check_memory(names, need, placement, capacity, on_gpus, groups.memory_fraction)

    def _start_loops(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reconcile_loop()), loop.create_task(self._autoscale_loop())]

    def group_failed(self, group: str) -> None:
        """A router's call to `group` failed: run the next reconcile round now."""
        logger.info("router reports group %s failing", group)
        self._wake.set()

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.health_period_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.rec.round()
            except Exception:  # noqa: BLE001 - logged with its cause; the next round runs
                logger.exception("reconcile round failed; retrying next round")

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.autoscale.period_s)
            if self.rec.state.autoscale:
                try:
                    await self.autoscale_step()
                except Exception:  # noqa: BLE001 - logged; the next period tries again
                    logger.exception("autoscale step failed")

    # -- routers ---------------------------------------------------------------------------------

    def internal_tls(self) -> dict | None:
        """How routers reach the groups' ports and probes each other: a TLSConfig as a dict
        (internal_tls), or None."""
        return self.config.internal_tls.model_dump() if self.config.internal_tls else None

    async def data_secret(self) -> str:
        """The mesh's secret, for its routers' calls to the groups (a Ray call: only what may call
        this actor learns it; with Ray's token authentication on, nothing outside the cluster)."""
        await self.ready()
        if not self.rec.state.secret:
            raise MeshError("the mesh is not deployed yet: no data-plane secret")
        return self.rec.state.secret

    async def add_router(self, name: str) -> bool:
        """Register the router actor `name` (already started); push the current table. Returns
        whether it serves."""
        await self.ready()
        handle = self.rec.launcher.find_router(name)
        if handle is None:
            raise MeshError(f"no router actor named {name}")
        address = await handle.start()  # idempotent: the address it already has
        return await self.rec.add_router(name, handle, int(address.rsplit(":", 1)[1]))

    # -- direct clients (routers in model servers' processes, fed by long polling) -----------------

    async def attach_direct(self, client: str, node: str) -> dict:
        """A direct client `client` on Ray node `node` starts: a lease, and what it routes with
        (checkpoint path, router config and dtype, the data-plane secret and TLS, the table)."""
        await self.ready()
        self.leases.attach(client, node, time.monotonic())
        return {"model": self.model_path, "router": self.config.router.model_dump(), "dtype": self.config.router_dtype,
                "lease_s": self.config.direct_lease_s, "secret": await self.data_secret(), "tls": self.internal_tls(),
                "table": self.rec.table.encode()}

    async def router_weights(self):
        """The gates and shared experts (RouterWeights), for a direct client whose node cannot read the checkpoint."""
        from protos.wire import DTYPES
        from router_service.router import RouterWeights

        return await asyncio.to_thread(RouterWeights.from_checkpoint, self.model_path, DTYPES[self.config.router_dtype])

    async def poll_direct(self, client: str, epoch: int, oldest_inflight: int, report: bytes,
                          wait_s: float) -> tuple[bool, bytes | None]:
        """Long poll: renews `client`'s lease with what it reports, then answers as soon as a table
        newer than `epoch` is in force, or after `wait_s`. Returns (lease held: False asks the client
        to attach anew, the new table or None)."""
        if not self.leases.renew(client, time.monotonic(), epoch, oldest_inflight, report):
            return False, None
        if self.rec.epoch <= epoch:
            try:
                await asyncio.wait_for(self._published.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return True, self.rec.table.encode() if self.rec.epoch > epoch else None

    def detach_direct(self, client: str) -> None:
        """A direct client closed: its lease ends now."""
        self.leases.detach(client)

    def _on_publish(self, table) -> None:
        self._published.set()
        self._published = asyncio.Event()

    async def _drain_direct_clients(self, epoch: int) -> None:
        """Until every live direct client serves nothing on an epoch older than `epoch` (a silent one
        counts until its lease ends)."""
        start = time.monotonic()
        while not self.leases.drained(epoch, time.monotonic()):
            await asyncio.sleep(0.02)
        if time.monotonic() - start > 1.0:
            logger.info("direct clients drained to epoch %d in %.1f s", epoch, time.monotonic() - start)

    # -- admin -------------------------------------------------------------------------------------

    async def read(self, verb: str, token: str | bytes | None) -> dict:
        """Status ("status") or Placement ("placement") for a router's caller: {ok, report} or
        {ok: False, denied, message}."""
        try:
            self.auth.check_read(token)
        except AdminError as exc:
            return {"ok": False, "denied": True, "message": f"{verb} refused: {exc}"}
        return {"ok": True, "report": await (self.snapshot() if verb == "status" else self.placement())}

    async def _admin(self, verb: str, token: str, change) -> dict:
        """Run one mutating admin call: token checked, `change()` run; its errors become a refusal.
        `change` returns (message, change id or "")."""
        await self.ready()
        try:
            self.auth.check_admin(token)
            message, change_id = await change()
        except (AdminError, MeshError, ValueError) as exc:
            return refused(verb, exc, self.rec.epoch)
        return accepted(message, self.rec.epoch, change_id)

    async def _submit_copies(self, kind: str, make_plan) -> str:
        """Plan (under the lock, against the state in force) and carry out a change of copies;
        returns its change id ("" when nothing needed to change)."""
        async def plan(state: MeshState):
            return plan_copies(state, await make_plan(), kind, f"{kind}-{state.revision + 1}")

        intent = await self.rec.submit(plan)
        return "" if intent is None else intent.change_id

    async def scale(self, token: str, layer: int, expert: int, replicas: int) -> dict:
        """Set the copies of one expert of one layer. New copies load and warm up before the table
        moves traffic to them; removed copies leave the table first and are released after a drain."""
        async def change():
            self.spec.check_layer(layer)
            if not 0 <= expert < self.spec.num_experts:
                raise ValueError(f"expert must be in [0, {self.spec.num_experts}), got {expert}")
            if not 1 <= replicas <= len(self.rec.seen):
                raise ValueError(f"replicas must be in [1, {len(self.rec.seen)}] (live groups), got {replicas}")
            rates = (await self.load()).rates

            async def make_plan():
                return scaled(self.rec.live_holdings(), rates, layer, expert, replicas,
                              len(self.rec.state.copies.get((layer, expert), ())), self.rec.state.groups)

            change_id = await self._submit_copies("scale", make_plan)
            return f"layer {layer} expert {expert}: {replicas} copies", change_id

        return await self._admin("scale", token, change)

    async def swap(self, token: str, layer: int, experts: list[int], source: str) -> dict:
        """Hot swap: new weights of `experts` of `layer` from checkpoint `source` staged beside the
        old on every live holder, verified (architecture, shapes, sha256 of the source bytes, a probe
        batch equal to the in-process experts built from `source`), then one table epoch flips all
        named experts at once; the old weights drain and are released. Failing before the flip, the
        staged weights are dropped and traffic never saw them."""
        from protos.wire import DTYPES

        from mesh.verify import SwapVerifier

        async def change():
            self.spec.check_layer(layer)
            resolved = self._swap_source(source)
            wanted = sorted(set(int(e) for e in experts))
            if not wanted or not all(0 <= e < self.spec.num_experts for e in wanted):
                raise ValueError(f"experts must be a non-empty subset of [0, {self.spec.num_experts}), got {wanted}")
            verifier = await asyncio.to_thread(SwapVerifier, self.spec, resolved, layer, wanted,
                                               DTYPES[self.rec.launcher.dtype()], self.config.swap_probe_experts)

            async def plan(state: MeshState):
                return plan_swap(state, layer, verifier.versions(), resolved, set(self.rec.seen),
                                 f"swap-{state.revision + 1}")

            intent = await self.rec.submit(plan, verifier)
            if intent is None:
                return f"layer {layer} experts {wanted} already serve weights from {resolved}", ""
            return f"layer {layer} experts {wanted} now serve weights from {resolved}", intent.change_id

        return await self._admin("swap", token, change)

    def _swap_source(self, source: str) -> str:
        """`source` resolved (links, ..) on the controller's node; ValueError unless it lies under
        one of `swap_roots` (default: the model's parent folder)."""
        roots = [Path(r).resolve() for r in self.config.swap_roots] or [Path(self.model_path).resolve().parent]
        if not isinstance(source, str) or not source.strip():
            raise ValueError("the swap source is empty: give a checkpoint folder")
        resolved = Path(source).resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            raise ValueError(f"swap source {source} is outside swap_roots {[str(r) for r in roots]}")
        return str(resolved)

    async def set_autoscale(self, token: str, enabled: bool) -> dict:
        async def change():
            return f"autoscale {'on' if enabled else 'off'}", await self.rec.set_autoscale(enabled)

        return await self._admin("autoscale", token, change)

    async def autoscale_step(self) -> dict[str, int]:
        """One round of autoscaling. `plan_autoscale` says which layers need other copy counts (an
        expert's load per copy left its hysteresis band; bounds: 1 to max_copies) and how many copies
        each such layer wants in all; `replicate_layer` (rebalance_experts) re-plans those layers:
        copies per expert by load, equal slots per group, copies in force kept where that costs
        little. New copies serve before old ones leave. Returns the counts that changed ("layer/expert")."""
        settings = self.config.autoscale
        rates = (await self.load()).rates
        before = self.rec.copy_counts()

        async def make_plan():
            counts = {key: len(replicas) for key, replicas in self.rec.state.copies.items()}
            return autoscaled(self.rec.live_holdings(), counts, rates, settings.target_tokens_per_s,
                              settings.max_copies, settings.hysteresis, self.spec.num_experts, self.rec.state.groups)

        await self._submit_copies("autoscale", make_plan)
        changes = {f"{l}/{e}": n for (l, e), n in self.rec.copy_counts().items() if n != before.get((l, e))}
        if changes:
            logger.info("autoscale: %s", changes)
        return changes

    # -- placement by measured latency ---------------------------------------------------------------

    async def measure_links(self) -> dict:
        """The link matrix the latency probes measure (mesh/probes.py; at most every LINKS_EVERY_S)."""
        return await self.probes.links(self.rec.state.secret, self.internal_tls())

    async def _placement_plan(self) -> dict:
        links = await self.measure_links()
        router_nodes = await self.rec.router_nodes()
        router_nodes += [lease.node for lease in self.leases.live(time.monotonic()).values()]  # direct clients
        current = self.rec.live_holdings()
        return placement_report(links, router_nodes, current, {n: self.rec.state.groups[n] for n in current},
                                await self.load(pairs=True), self.config.placement_balance, self.spec.top_k)

    async def placement(self) -> bytes:
        """msgpack report for `mesh placement`: the measured links, each group's latency from the
        routers, the current and proposed placement with their expected mean latency per token copy."""
        await self.ready()
        async with self.rec.lock:  # serialised with the changes: probes start, links are measured
            plan = await self._placement_plan()
        plan["current"]["assignment"] = _str_keys(plan["current"]["assignment"])
        plan["proposed"]["assignment"] = _str_keys(plan["proposed"]["assignment"])
        return msgpack.packb(plan)

    async def rebalance(self, token: str, dry_run: bool = False) -> dict:
        """Measure, plan and (unless dry_run) apply the proposed placement live: new copies load and
        serve before the old ones leave."""
        async def change():
            plan = await self._placement_plan()
            summary = (f"{len(plan['adds'])} copies move; expected latency per token copy "
                       f"{plan['current']['mean_latency_ms']:.2f} -> {plan['proposed']['mean_latency_ms']:.2f} ms")
            if dry_run or not plan["adds"]:
                return ("dry run: " if dry_run else "") + summary, ""

            async def make_plan():
                return plan["proposed"]["assignment"]

            change_id = await self._submit_copies("rebalance", make_plan)
            logger.info("rebalance: %s", summary)
            return summary, change_id

        return await self._admin("rebalance", token, change)

    # -- status ----------------------------------------------------------------------------------

    async def load(self, pairs: bool = False) -> Load:
        """Tokens since start, tokens/s over the routers' window and, with `pairs`, co-activated
        pairs/s (up to 60k of them at V3's shape: only placement reads them), all routers."""
        direct = [lease.report for lease in self.leases.live(time.monotonic()).values() if lease.report]
        return aggregate_load(await self.rec.router_reports(pairs) + direct, self.spec.top_k_of)

    async def snapshot(self) -> bytes:
        """msgpack of `mesh status` (mesh/status.py)."""
        await self.ready()
        header = {"mesh": self.config.name, "model": self.model_path, "model_type": self.spec.model_type,
                  "uptime_s": time.time() - self.started_at}
        return msgpack.packb(status_report(self.rec, header, await self.load(), self.leases.describe(time.monotonic())))

    async def shutdown(self) -> None:
        """Stop the routers and kill every group and probe of this mesh."""
        for task in self._tasks:
            task.cancel()
        await self.rec.close()  # restarts in flight end here, before the state is deleted
        self.store.delete()
        await self.rec.stop_all()
        self.probes.kill()

