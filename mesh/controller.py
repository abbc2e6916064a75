"""The controller: the one owner of the expert-group actors and of the routing table.

deploy():  assignment policy -> group actors pinned to nodes -> endpoints -> table (epoch 1)
           -> pushed to every router.
health:    groups pinged every `health_period_s`; a dead group's copies leave the table
           (epoch + 1), routers get the new table; the group restarts away from its experts' copies.
changes:   scale / autoscale / rebalance add copies (loaded, then published), then remove copies
           (unpublished, drained, released); swap stages, verifies and flips. One change at a time.
placement: a probe actor per node measures links -> group latency -> plan_placement -> moves.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from typing import NamedTuple

import msgpack

from experts import load_spec
from experts.actor import ExpertGroupActor
from experts.errors import MeshError, one_line
from experts.simulated import CostModel, SimulatedGroupActor
from mesh.autoscale import plan_autoscale
from mesh.config import MeshConfig
from mesh.placement import (group_latency, initial_assignment, pairs_kept, pick_groups, placement_cost,
                            placement_moves, plan_placement, replicate_layer, restore_node, spread_groups)
from mesh.probes import LatencyProbe, link_matrix
from router_service.routing import Copy, RoutingTable

__all__ = ["AdminError", "MeshController", "NAMESPACE", "PlacementError"]

logger = logging.getLogger(__name__)

NAMESPACE = "expert-mesh"
_BYTES = {"float32": 4, "bfloat16": 2}


class Load(NamedTuple):
    """What the routers counted, summed over them, per (layer, expert) or (layer, a, b) with a < b."""
    tokens: dict[tuple[int, int], int]           # token copies since start
    rates: dict[tuple[int, int], float]          # token copies/s over the load window
    pairs: dict[tuple[int, int, int], float]     # tokens/s that picked both a and b (share x tokens/s)


def _add(totals: dict, key: tuple, value: float) -> None:
    totals[key] = totals.get(key, 0) + value


class AdminError(MeshError):
    """A mutating admin call without the right token."""


class PlacementError(MeshError):
    """Expert groups cannot be placed as asked (no node, not enough memory)."""


def _probe_rows(probe, experts: list[int], subset: list[int], rows_per_expert: int):
    """Rows of `probe` ([len(experts) * n, H], n rows per expert in order) for the experts in `subset`."""
    import torch

    index = [experts.index(e) * rows_per_expert + r for e in subset for r in range(rows_per_expert)]
    return probe[torch.tensor(index)]


def _alive_nodes() -> list[dict]:
    import ray

    return sorted((n for n in ray.nodes() if n["Alive"]), key=lambda n: (not n.get("IsHeadNode", False), n["NodeID"]))


def _by_name(per_expert: dict[tuple[int, int], float]) -> dict[str, float]:
    """(layer, expert) keys as "layer/expert", the snapshot's (msgpack and JSON) form."""
    return {f"{layer}/{expert}": value for (layer, expert), value in per_expert.items()}


def _str_keys(assignment: dict) -> dict:
    """msgpack keeps int keys, but JSON and the CLI want str: {group: {"layer": experts}}."""
    return {g: {str(layer): e for layer, e in held.items()} for g, held in assignment.items()}


def _pinning(node_id: str) -> dict:
    """Actor options that pin to `node_id`: a label selector on Ray's node-id label."""
    return {"label_selector": {"ray.io/node-id": node_id}}


class MeshController:
    """Ray actor body; created by the CLI (or the Serve app) as `<mesh>/controller`, detached."""

    def __init__(self, config: dict, model_path: str):
        self.config = MeshConfig(**config)
        self.model_path = model_path
        self.spec = load_spec(model_path)
        self.groups: dict[str, dict] = {}          # name -> info (node, endpoint, experts, versions, alive)
        self.handles: dict[str, object] = {}
        self.routers: dict[str, object] = {}
        self.table = RoutingTable(0, {})
        self.started_at = time.time()
        self._health_task: asyncio.Task | None = None
        self._recovering: asyncio.Future | None = None
        self.autoscale_on = self.config.autoscale.enabled
        self.sources: dict[tuple[int, int], str] = {}  # experts swapped in from another checkpoint
        self._autoscale_task: asyncio.Task | None = None
        self._changing = asyncio.Lock()  # one change of copies (scale, autoscale, swap, rebalance) at a time
        self.probes: dict[str, object] = {}  # node id -> LatencyProbe handle

    # -- deployment ------------------------------------------------------------------------------

    async def ready(self) -> int:
        """After Ray restarted this actor, adopt the previous incarnation's groups and routers (from
        the saved state); called by every public method and by `mesh up`'s watchdog. Returns the epoch."""
        if self.table.epoch == 0 and self._recovering is None:
            self._recovering = asyncio.ensure_future(self._recover())
        if self._recovering is not None:
            await self._recovering
        return self.table.epoch

    async def deploy(self) -> bytes:
        """Create every expert group (or adopt them after a controller restart), wait until all
        serve, build the table; returns it."""
        if await self.ready():
            return self.table.encode()
        nodes = _alive_nodes()
        num_groups = self.config.groups.num_groups or len(nodes)
        assignment = initial_assignment(list(self.spec.moe_layers), self.spec.num_experts, num_groups,
                                        self.config.groups.replicas)
        placement = spread_groups(num_groups, [n["NodeID"] for n in nodes])
        self._check_memory(assignment, placement, nodes)
        names = [f"{self.config.name}/group-{k}" for k in range(num_groups)]
        await asyncio.gather(*(self._start_group(n, e, node) for n, e, node in zip(names, assignment, placement)))
        self.table = self._build_table(epoch=1)
        self._save_state()
        self._start_loops()
        return self.table.encode()

    async def _start_group(self, name: str, experts: dict[int, list[int]], node_id: str) -> None:
        """Create group actor `name` on `node_id` holding `experts`; returns once it serves."""
        import ray

        groups = self.config.groups
        has_gpus = any(n["Resources"].get("GPU", 0) > 0 for n in _alive_nodes())
        options = dict(name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=groups.num_cpus,
                       max_concurrency=64, **_pinning(node_id))
        if groups.simulated is not None:  # a cost model asleep: no weights, no GPU
            cost = CostModel(self.spec.hidden_size, self.spec.intermediate_size, groups.simulated.tflops,
                             groups.simulated.latency_ms)
            handle = ray.remote(SimulatedGroupActor).options(**options).remote(name, experts, cost)
        else:
            handle = ray.remote(ExpertGroupActor).options(num_gpus=1 if has_gpus else 0, **options).remote(
                name, self.model_path, experts, groups.dtype, groups.torch_threads)
        for (layer, expert), source in self.sources.items():  # swapped-in weights, not the model's
            if expert in experts.get(layer, []):
                await handle.release_experts.remote(layer, [expert])
                await handle.load_experts.remote(layer, [expert], source)
        endpoint = await handle.start.remote()
        info = await handle.info.remote()
        self.handles[name] = handle
        self.groups[name] = {"node": node_id, "experts": {int(l): e for l, e in info["experts"].items()},
                             "versions": {int(l): v for l, v in info["versions"].items()},
                             "endpoint": endpoint, "alive": True}

    # -- persistence (survives a controller restart: Ray's GCS key-value store) --------------------

    def _state_key(self) -> bytes:
        return f"expert-mesh/{self.config.name}/state".encode()

    def _save_state(self) -> None:
        from ray.experimental import internal_kv

        state = {"epoch": self.table.epoch, "routers": list(self.routers),
                 "groups": {n: {"node": g["node"], "alive": g["alive"],
                                "experts": {str(l): e for l, e in g["experts"].items()}}
                            for n, g in self.groups.items()}}
        internal_kv._internal_kv_put(self._state_key(), msgpack.packb(state), overwrite=True)

    def forget_state(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self._state_key())

    async def _recover(self) -> bool:
        """Adopt the groups and routers of a previous controller incarnation, if any."""
        import ray
        from ray.experimental import internal_kv

        blob = internal_kv._internal_kv_get(self._state_key())
        if blob is None:
            return False
        state = msgpack.unpackb(blob, strict_map_key=False)
        for name, saved in state["groups"].items():
            self.groups[name] = {"node": saved["node"], "alive": False,
                                 "experts": {int(l): e for l, e in saved["experts"].items()}, "versions": {}}
            try:
                self.handles[name] = ray.get_actor(name, namespace=NAMESPACE)
                info = await asyncio.wait_for(self.handles[name].info.remote(), 10)
                self.groups[name].update(alive=True, endpoint=info["endpoint"],
                                         versions={int(l): v for l, v in info["versions"].items()})
            except Exception as exc:  # noqa: BLE001 - a group that died meanwhile is restored below
                logger.warning("group %s not recovered: %s", name, exc)
        for name in state["routers"]:
            try:
                self.routers[name] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                logger.warning("router %s is gone", name)
        self.table = self._build_table(state["epoch"] + 1)
        await self._push_table()
        self._save_state()
        self._start_loops()
        logger.info("controller recovered %d groups, %d routers at epoch %d", len(self.groups),
                    len(self.routers), self.table.epoch)
        return True

    def _check_memory(self, assignment: list[dict], placement: list[str], nodes: list[dict]) -> None:
        spec, groups = self.spec, self.config.groups
        if groups.simulated is not None:
            return  # simulated devices hold no weights
        per_expert = 3 * spec.hidden_size * spec.intermediate_size * _BYTES[groups.dtype] * 2  # + packed copy
        memory = {n["NodeID"]: n["Resources"].get("memory", 0) for n in nodes}
        need: dict[str, int] = {}
        for experts, node in zip(assignment, placement):
            need[node] = need.get(node, 0) + per_expert * sum(len(v) for v in experts.values())
        for node, nbytes in need.items():
            allowed = memory[node] * groups.memory_fraction
            if nbytes > allowed:
                raise PlacementError(
                    f"expert groups on node {node[:12]} need {nbytes / 2**30:.2f} GiB of weights, more than "
                    f"memory_fraction={groups.memory_fraction} of its {memory[node] / 2**30:.2f} GiB Ray memory; "
                    f"add nodes or groups, or lower groups.replicas")

    def _build_table(self, epoch: int) -> RoutingTable:
        layers: dict[int, list[list[Copy]]] = {l: [[] for _ in range(self.spec.num_experts)] for l in self.spec.moe_layers}
        for name, group in self.groups.items():
            if not group["alive"]:
                continue
            for layer, experts in group["experts"].items():
                for expert, version in zip(experts, group["versions"][layer]):
                    layers[layer][expert].append(Copy(name, group["endpoint"], version))
        return RoutingTable(epoch, layers)

    # -- routers ---------------------------------------------------------------------------------

    async def add_router(self, name: str) -> bool:
        """Register the router actor `name`; push the current table. Returns whether it serves."""
        import ray

        await self.ready()
        handle = ray.get_actor(name, namespace=NAMESPACE)
        self.routers[name] = handle
        self._save_state()
        return await handle.set_table.remote(self.table.encode())

    async def _push_table(self) -> None:
        blob = self.table.encode()
        results = await asyncio.gather(*(r.set_table.remote(blob) for r in self.routers.values()),
                                       return_exceptions=True)
        for name, result in zip(list(self.routers), results):
            if isinstance(result, Exception):
                logger.warning("router %s did not take epoch %d: %s", name, self.table.epoch, result)

    # -- health ----------------------------------------------------------------------------------

    def _start_loops(self) -> None:
        loop = asyncio.get_running_loop()
        self._health_task = loop.create_task(self._health_loop())
        self._autoscale_task = loop.create_task(self._autoscale_loop())

    async def _autoscale_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.autoscale.period_s)
            if self.autoscale_on:
                try:
                    await self.autoscale_step()
                except Exception:  # noqa: BLE001 - logged; the next period tries again
                    logger.exception("autoscale step failed")

    async def autoscale_step(self) -> dict[str, int]:
        """One round of autoscaling. `plan_autoscale` says which layers need other copy counts (an
        expert's load per copy left its hysteresis band; bounds: 1 to max_copies) and how many copies
        each such layer wants in all; `replicate_layer` (rebalance_experts) re-plans those layers:
        copies per expert by load, equal slots per group, copies in force kept where that costs
        little. New copies serve before old ones leave. Returns the counts that changed ("layer/expert")."""
        settings = self.config.autoscale
        rates = (await self.load()).rates
        async with self._changing:
            current = {n: {layer: list(e) for layer, e in g["experts"].items()}
                       for n, g in self.groups.items() if g["alive"]}
            before = self._copy_counts()
            most = min(settings.max_copies or len(current), len(current))
            wanted = {**before, **plan_autoscale(rates, before, settings.target_tokens_per_s, most, settings.hysteresis)}
            plan = current
            for layer in sorted({l for (l, e), n in wanted.items() if n != before[(l, e)]}):
                total = sum(n for (l, _), n in wanted.items() if l == layer)
                plan = replicate_layer(plan, layer, rates, total, self.spec.num_experts, most)
            adds, removes = placement_moves(current, plan)
            if adds:
                await self._add_copies(adds)
            if removes:
                await self._remove_copies(removes)
        after = self._copy_counts()
        changes = {f"{l}/{e}": n for (l, e), n in after.items() if n != before.get((l, e))}
        if changes:
            logger.info("autoscale: %s", changes)
        return changes

    def _copy_counts(self) -> dict[tuple[int, int], int]:
        """Copies per (layer, expert) in the routing table (experts with none left out)."""
        return {(l, e): len(c) for l, experts in self.table.layers.items() for e, c in enumerate(experts) if c}

    async def set_autoscale(self, token: str, enabled: bool) -> dict:
        await self.ready()
        try:
            self._check_token(token)
        except AdminError as exc:
            return {"ok": False, "message": str(exc), "epoch": self.table.epoch, "denied": True}
        self.autoscale_on = enabled
        return {"ok": True, "message": f"autoscale {'on' if enabled else 'off'}", "epoch": self.table.epoch}

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_period_s)
            await self.check_health()

    async def check_health(self) -> None:
        """Ping the groups; drop dead ones from the table at once, then restart them (same experts)
        on a live node, so the desired count of every expert comes back."""
        names = [n for n, g in self.groups.items() if g["alive"]]
        results = await asyncio.gather(*(asyncio.wait_for(self.handles[n].ping.remote(), 5.0) for n in names),
                                       return_exceptions=True)
        dead = [n for n, r in zip(names, results) if isinstance(r, BaseException)]
        dead += [n for n, g in self.groups.items() if not g["alive"] and n not in dead]
        if not dead:
            return
        for name in dead:
            if self.groups[name]["alive"]:
                logger.warning("expert group %s is dead: removing its copies", name)
            self.groups[name]["alive"] = False
        await self._publish()
        await self._restore(dead)

    async def _restore(self, dead: list[str]) -> None:
        nodes = [n["NodeID"] for n in _alive_nodes()]
        for name in dead:
            group = self.groups[name]
            live = [(g["node"], g["experts"]) for g in self.groups.values() if g["alive"]]
            # its own node first when that node lives (a killed actor), else the best other node
            order = [group["node"], *(n for n in nodes if n != group["node"])] if group["node"] in nodes else nodes
            node = restore_node(group["experts"], order, live)
            try:
                await asyncio.wait_for(self._start_group(name, group["experts"], node), 120)
                logger.info("expert group %s restored on node %s", name, node[:12])
            except Exception as exc:  # noqa: BLE001 - tried again on the next health round
                logger.warning("could not restore group %s yet: %s", name, exc)
                self.groups[name]["alive"] = False
        await self._publish()

    async def _publish(self) -> None:
        """New table (epoch + 1) to every router; state saved."""
        self.table = self._build_table(self.table.epoch + 1)
        await self._push_table()
        self._save_state()

    # -- admin -------------------------------------------------------------------------------------

    def _check_token(self, token: str) -> None:
        expected = os.environ.get("EXPERT_MESH_ADMIN_TOKEN") or self.config.admin_token
        if not expected:
            raise AdminError("no admin token is configured (admin_token or EXPERT_MESH_ADMIN_TOKEN): "
                             "mutating calls are refused")
        if not hmac.compare_digest(token or "", expected):
            raise AdminError("admin token missing or wrong")

    async def scale(self, token: str, layer: int, expert: int, replicas: int) -> dict:
        """Set the copies of one expert of one layer. New copies load and warm up before the table
        moves traffic to them; removed copies leave the table first and are released after a drain."""
        await self.ready()
        try:
            self._check_token(token)
            self.spec.check_layer(layer)
            live = [n for n, g in self.groups.items() if g["alive"]]
            if not 0 <= expert < self.spec.num_experts:
                raise ValueError(f"expert must be in [0, {self.spec.num_experts}), got {expert}")
            if not 1 <= replicas <= len(live):
                raise ValueError(f"replicas must be in [1, {len(live)}] (live groups), got {replicas}")
            async with self._changing:
                await self._set_copies({(layer, expert): replicas}, (await self.load()).rates)
            return {"ok": True, "message": f"layer {layer} expert {expert}: {replicas} copies", "epoch": self.table.epoch}
        except (AdminError, MeshError, ValueError) as exc:
            return {"ok": False, "message": str(exc), "epoch": self.table.epoch,
                    "denied": isinstance(exc, AdminError)}

    async def swap(self, token: str, layer: int, experts: list[int], source: str) -> dict:
        """Hot swap: new weights of `experts` of `layer` from checkpoint `source` load beside the old
        on every group holding a copy, are verified (architecture, shapes, sha256 of the source bytes,
        a probe batch equal to the in-process experts built from `source`), then one table epoch flips
        all named experts at once; the old weights drain and are released. On any failure the staged
        weights are dropped and traffic never saw them."""
        await self.ready()
        try:
            self._check_token(token)
            self.spec.check_layer(layer)
            experts = sorted(set(int(e) for e in experts))
            if not experts or not all(0 <= e < self.spec.num_experts for e in experts):
                raise ValueError(f"experts must be a non-empty subset of [0, {self.spec.num_experts}), got {experts}")
            async with self._changing:
                await self._swap(layer, experts, source)
        except (AdminError, MeshError, ValueError) as exc:
            return {"ok": False, "message": f"swap refused, nothing changed: {exc}", "epoch": self.table.epoch,
                    "denied": isinstance(exc, AdminError)}
        return {"ok": True, "message": f"layer {layer} experts {experts} now serve weights from {source}",
                "epoch": self.table.epoch}

    async def _swap(self, layer: int, experts: list[int], source: str) -> None:
        holders = {n: [e for e in experts if e in g["experts"].get(layer, [])]
                   for n, g in self.groups.items() if g["alive"]}
        holders = {n: e for n, e in holders.items() if e}
        await self._stage_and_verify(layer, experts, source, holders)  # raises: nothing changed
        await self._publish()  # Step 4: one epoch flips every named expert
        await asyncio.sleep(self.config.drain_s)  # Step 5: batches planned on the old table finish
        await asyncio.gather(*(self.handles[n].commit_staged.remote(layer) for n in holders), return_exceptions=True)
        for expert in experts:
            self.sources[(layer, expert)] = source
        self._save_state()

    async def _stage_and_verify(self, layer: int, experts: list[int], source: str, holders: dict) -> None:
        """Steps 1-3 of a swap; on success the new versions are in self.groups (not yet published)."""
        import torch

        from experts import CheckpointReader, ExpertGroup
        from protos.wire import DTYPES

        # Step 1: the source as this controller reads it: same architecture, shapes, checksums.
        reader = CheckpointReader(source)
        if reader.spec != self.spec:
            raise ValueError(f"checkpoint {source} is a {reader.spec.model_type} of another shape, not this "
                             f"{self.spec.model_type} (config hash {reader.spec.config_hash()[:12]} != "
                             f"{self.spec.config_hash()[:12]})")
        dtype = DTYPES[self.config.groups.dtype]
        expected = ExpertGroup.from_checkpoint(source, {layer: experts}, dtype, reader=reader)
        rows_per_expert = 4
        probe = torch.randn(len(experts) * rows_per_expert, self.spec.hidden_size,
                            generator=torch.Generator().manual_seed(layer)).to(dtype)
        # Step 2: every holder stages the new weights beside the old and runs the probe through them.
        names = list(holders)
        results = await asyncio.gather(*(self.handles[n].stage_experts.remote(
            layer, holders[n], source, _probe_rows(probe, experts, holders[n], rows_per_expert)) for n in names),
            return_exceptions=True)
        try:
            # Step 3: verify each against the in-process experts built from the source.
            for name, result in zip(names, results):
                if isinstance(result, BaseException):
                    raise ValueError(f"group {name} could not load the new weights: {result}")
                self._verify(name, layer, holders[name], result, expected, _probe_rows(probe, experts, holders[name],
                                                                                       rows_per_expert))
        except BaseException:
            await asyncio.gather(*(self.handles[n].unstage.remote(layer) for n in names), return_exceptions=True)
            raise
        for name, result in zip(names, results):
            held, versions = self.groups[name]["experts"][layer], self.groups[name]["versions"][layer]
            for expert, version in zip(holders[name], result["versions"]):
                versions[held.index(expert)] = version

    @staticmethod
    def _verify(name: str, layer: int, experts: list[int], result: dict, expected, probe) -> None:
        import torch

        held = expected.layers[layer]
        want = [held.checksums[held.slot[e]] for e in experts]
        if result["checksums"] != want:
            raise ValueError(f"group {name}: sha256 of the source bytes differs from this controller's read "
                             f"(the files changed while loading?)")
        ref = expected.forward(layer, probe, experts, [probe.shape[0] // len(experts)] * len(experts))
        out = result["probe"]
        if not torch.isfinite(out).all():
            raise ValueError(f"group {name}: probe output of the new weights has NaN or Inf")
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
        if err > 1e-5:
            raise ValueError(f"group {name}: probe output differs from the in-process experts (rel err {err:.1e})")

    async def _set_copies(self, counts: dict[tuple[int, int], int], load: dict[tuple[int, int], float]) -> None:
        """Bring every (layer, expert) in `counts` to that many live copies: gains go to the
        least-loaded groups, losses come from the most-loaded (`load`: tokens/s per (layer, expert)).
        All new copies load and are published together, then all leaving copies drain together."""
        plan = {n: {layer: list(e) for layer, e in g["experts"].items()} for n, g in self.groups.items() if g["alive"]}
        adds, removes = [], []
        for (layer, expert), count in counts.items():
            held = sum(expert in experts.get(layer, []) for experts in plan.values())
            for group in pick_groups(plan, load, layer, expert, count - held):
                if count > held:
                    plan[group].setdefault(layer, []).append(expert)
                    adds.append((layer, expert, group))
                else:
                    plan[group][layer].remove(expert)
                    removes.append((layer, expert, group))
        if adds:
            await self._add_copies(adds)
        if removes:
            await self._remove_copies(removes)

    async def _add_copies(self, adds: list[tuple[int, int, str]]) -> None:
        """Load every (layer, expert, group) copy (one call per group, layer and weights source), then
        one new table: traffic moves only to loaded copies. If a load fails, the loaded copies are
        released and MeshError says what failed; the table is unchanged."""
        calls: dict[tuple[str, int, str | None], list[int]] = {}
        for layer, expert, name in adds:
            calls.setdefault((name, layer, self.sources.get((layer, expert))), []).append(expert)
        results = await asyncio.gather(*(self.handles[name].load_experts.remote(layer, experts, source)
                                         for (name, layer, source), experts in calls.items()), return_exceptions=True)
        failed = [(key, r) for key, r in zip(calls, results) if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(self.handles[name].release_experts.remote(layer, calls[(name, layer, source)])
                                   for (name, layer, source), r in zip(calls, results)
                                   if not isinstance(r, BaseException)), return_exceptions=True)
            (name, layer, _), error = failed[0]
            raise MeshError(f"could not load layer {layer} experts {calls[failed[0][0]]} on {name}: "
                            f"{one_line(error)}; no copy was added")
        for ((name, layer, _), experts), versions in zip(calls.items(), results):
            for expert, version in zip(experts, versions):
                self._record_copy(name, layer, expert, version)
        await self._publish()

    def _record_copy(self, name: str, layer: int, expert: int, version: str) -> None:
        held = self.groups[name]["experts"].setdefault(layer, [])
        vers = self.groups[name]["versions"].setdefault(layer, [])
        held.append(expert)
        vers.append(version)
        order = sorted(range(len(held)), key=held.__getitem__)
        self.groups[name]["experts"][layer] = [held[i] for i in order]
        self.groups[name]["versions"][layer] = [vers[i] for i in order]

    async def _remove_copies(self, removes: list[tuple[int, int, str]]) -> None:
        """Take the copies out of the table, let planned batches finish, then release them."""
        for layer, expert, name in removes:
            held, vers = self.groups[name]["experts"][layer], self.groups[name]["versions"][layer]
            i = held.index(expert)
            del held[i], vers[i]
        await self._publish()  # traffic leaves the copies first
        await asyncio.sleep(self.config.drain_s)  # batches already planned on the old table finish
        await asyncio.gather(*(self.handles[n].release_experts.remote(layer, [e]) for layer, e, n in removes),
                             return_exceptions=True)

    # -- placement by measured latency ---------------------------------------------------------------

    async def _ensure_probes(self) -> tuple[list[str], list[str]]:
        """One LatencyProbe per live node (started on first use, dropped with their node); returns
        (node ids, their probes' endpoints), in one order."""
        import ray

        nodes = [n["NodeID"] for n in _alive_nodes()]
        self.probes = {n: p for n, p in self.probes.items() if n in nodes}
        for node in nodes:
            if node not in self.probes:
                self.probes[node] = ray.remote(LatencyProbe).options(
                    name=f"{self.config.name}/probe-{node[:12]}", namespace=NAMESPACE, lifetime="detached",
                    num_cpus=0, get_if_exists=True, **_pinning(node)).remote()
        started = await asyncio.gather(*(self.probes[n].start.remote() for n in nodes))
        return nodes, [endpoint for _, endpoint in started]

    async def measure_links(self) -> dict:
        """Every probe in turn times echoes to every probe: {"nodes", "rtt_ms" [from][to], "mbps" [from][to]}."""
        nodes, endpoints = await self._ensure_probes()
        rows = [await self.probes[n].measure.remote(endpoints) for n in nodes]  # one at a time: no cross-talk
        return link_matrix(nodes, rows)

    async def _placement_plan(self) -> dict:
        links = await self.measure_links()
        router_nodes = [n for n in await asyncio.gather(*(r.node_id.remote() for r in self.routers.values()),
                                                        return_exceptions=True) if isinstance(n, str)]
        live = {n: g for n, g in self.groups.items() if g["alive"]}
        latency = group_latency({n: g["node"] for n, g in live.items()}, router_nodes, links)
        tokens, rates, pairs = await self.load()
        source = "tokens/s over the load window" if rates else "tokens since start"
        load = rates or tokens
        top_k = self.spec.top_k
        current = {n: dict(g["experts"]) for n, g in live.items()}
        proposed = plan_placement(current, latency, load, self.config.placement_balance, pairs=pairs, top_k=top_k)
        total = sum(load.values()) or 1.0
        adds, removes = placement_moves(current, proposed)

        def summary(plan: dict) -> dict:
            cost = placement_cost(plan, latency, load, pairs, top_k)
            return {"assignment": plan, "cost": cost, "mean_latency_ms": cost / total,
                    "pairs_kept": pairs_kept(plan, pairs)}

        return {"links": links, "router_nodes": router_nodes, "load_source": source,
                "groups": {n: {"node": g["node"], "latency_ms": latency[n]} for n, g in live.items()},
                "pairs": len(pairs), "current": summary(current), "proposed": summary(proposed),
                "adds": adds, "removes": removes}

    async def placement(self) -> bytes:
        """msgpack report for `mesh placement`: the measured links, each group's latency from the
        routers, the current and proposed placement with their expected mean latency per token copy."""
        await self.ready()
        plan = await self._placement_plan()
        plan["current"]["assignment"] = _str_keys(plan["current"]["assignment"])
        plan["proposed"]["assignment"] = _str_keys(plan["proposed"]["assignment"])
        return msgpack.packb(plan)

    async def rebalance(self, token: str, dry_run: bool = False) -> dict:
        """Measure, plan and (unless dry_run) apply the proposed placement live: new copies load and
        serve before the old ones leave."""
        await self.ready()
        try:
            self._check_token(token)
            async with self._changing:
                plan = await self._placement_plan()
                summary = (f"{len(plan['adds'])} copies move; expected latency per token copy "
                           f"{plan['current']['mean_latency_ms']:.2f} -> {plan['proposed']['mean_latency_ms']:.2f} ms")
                if not dry_run and plan["adds"]:
                    await self._add_copies(plan["adds"])
                    await self._remove_copies(plan["removes"])
                    logger.info("rebalance: %s", summary)
        except (AdminError, MeshError) as exc:
            return {"ok": False, "message": f"rebalance refused: {exc}", "epoch": self.table.epoch,
                    "denied": isinstance(exc, AdminError)}
        return {"ok": True, "message": ("dry run: " if dry_run else "") + summary, "epoch": self.table.epoch}

    # -- status ----------------------------------------------------------------------------------

    async def load(self) -> Load:
        """Tokens since start, tokens/s over the routers' window and co-activated pairs/s, all routers.
        A router's pairs/s: the share of its tokens that picked both, times its tokens/s of the layer."""
        reports = await asyncio.gather(*(r.load_report.remote() for r in self.routers.values()),
                                       return_exceptions=True)
        load = Load({}, {}, {})
        for data in (msgpack.unpackb(r) for r in reports if isinstance(r, bytes)):
            tokens_per_s: dict[int, float] = {}  # this router's tokens (not copies) per layer
            for layer, expert, count in data["tokens"]:
                _add(load.tokens, (layer, expert), count)
            for layer, expert, rate in data["rates"]:
                _add(load.rates, (layer, expert), rate)
                tokens_per_s[layer] = tokens_per_s.get(layer, 0.0) + rate / self.spec.top_k
            for layer, a, b, share in data["pairs"]:
                _add(load.pairs, (layer, a, b), share * tokens_per_s.get(layer, 0.0))
        return load

    async def snapshot(self) -> bytes:
        """msgpack state: groups (name, node, endpoint, experts per layer, versions, alive), routers,
        copies per expert, tokens per expert since start and tokens/s over the load window."""
        await self.ready()
        tokens, rates, _ = await self.load()
        copies: dict[str, int] = {}
        for layer, experts in self.table.layers.items():
            for expert, held in enumerate(experts):
                copies[f"{layer}/{expert}"] = len(held)
        groups = [{"name": n, "node": g["node"], "endpoint": g.get("endpoint", ""), "alive": g["alive"],
                   "experts": {str(l): e for l, e in g["experts"].items()},
                   "versions": {str(l): v for l, v in g.get("versions", {}).items()}} for n, g in self.groups.items()]
        return msgpack.packb({
            "mesh": self.config.name, "model": self.model_path, "model_type": self.spec.model_type,
            "epoch": self.table.epoch, "uptime_s": time.time() - self.started_at, "autoscale": self.autoscale_on,
            "groups": groups, "routers": list(self.routers), "copies": copies,
            "tokens_per_expert": _by_name(tokens), "tokens_per_s": _by_name(rates),
        })

    async def shutdown(self) -> None:
        """Stop the routers and kill every group and probe of this mesh."""
        import ray

        for task in (self._health_task, self._autoscale_task):
            if task is not None:
                task.cancel()
        self.forget_state()
        await asyncio.gather(*(r.stop.remote() for r in self.routers.values()), return_exceptions=True)
        probes = []  # by name: an earlier incarnation of this controller may have started them
        for node in (n["NodeID"] for n in _alive_nodes()):
            try:
                probes.append(ray.get_actor(f"{self.config.name}/probe-{node[:12]}", namespace=NAMESPACE))
            except ValueError:
                pass
        for handle in [*self.routers.values(), *self.handles.values(), *probes]:
            try:
                ray.kill(handle)
            except Exception:  # noqa: BLE001 - already gone
                pass
