"""The reconciler: carries out changes step by step and converges the running mesh to the desired state.

    submit(intent) -> [persist intent] -> step ... -> [publish: epoch + 1 persisted, then pushed]
                   -> step ... -> [done]                        (one change at a time: `lock`)
    round()        -> observe groups and routers -> drop dead groups from the table (never waits for
                      a change) -> re-push to routers behind -> (no change running) restart dead or
                      diverged groups, release / commit / unstage what nothing names
                      (dead: Ray's word, or `failure_threshold` observations missed in a row:
                      mesh/health.py; a group that missed fewer is suspect and still routed)

It drives groups and routers through small async handles (GroupHandle, RouterHandle, Launcher):
Ray actors in the controller (mesh/handles.py), fakes in unit tests. No Ray here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable, NamedTuple, Protocol

from protos.errors import GroupGoneError, StepError, StepUnavailableError, UnavailableError
from mesh.changes import (GroupView, Tidy, adopted, named_versions, plan_restart, plan_settings,
                          published_state, rows_match, table_layers, tidy)
from mesh.health import Verdict, default_max_timeout_deaths, judge
from mesh.placement import restore_node
from mesh.state import Intent, MeshState, Replica, held_by
from mesh.store import StateStore
from router_service.routing import RoutingTable

__all__ = ["GroupHandle", "Launcher", "Reconciler", "RouterHandle"]

logger = logging.getLogger(__name__)


def step_error(message: str, cause: BaseException) -> StepError:
    """StepError for `cause`, StepUnavailableError when it is a peer that did not answer."""
    unavailable = isinstance(cause, (UnavailableError, asyncio.TimeoutError, ConnectionError))
    return (StepUnavailableError if unavailable else StepError)(message)


class GroupHandle(Protocol):
    async def info(self) -> dict: ...
    async def load(self, layer: int, experts: list[int], source: str | None) -> list[str]: ...
    async def release(self, layer: int, experts: list[int]) -> None: ...
    async def stage(self, layer: int, experts: list[int], source: str, probed: list[int], probe) -> dict: ...
    async def commit(self, layer: int) -> None: ...
    async def unstage(self, layer: int) -> None: ...
    def kill(self) -> None: ...


class RouterHandle(Protocol):
    async def epoch(self) -> int: ...
    async def open_channels(self, groups: list[str], fresh: bool) -> None: ...
    async def set_table(self, blob: bytes) -> bool: ...
    async def start(self, port: int | None = None) -> str: ...
    async def load_report(self, pairs: bool) -> bytes: ...
    async def node_id(self) -> str: ...
    async def stop(self) -> None: ...
    def kill(self) -> None: ...


class Launcher(Protocol):
    def alive_nodes(self) -> list[str]: ...
    def find_group(self, name: str) -> GroupHandle | None: ...
    def find_router(self, name: str) -> RouterHandle | None: ...
    async def start_group(self, name: str, node: str, loads: list[tuple[int, list[int], str | None]]) -> GroupHandle: ...




def view_of(info: dict) -> GroupView:
    """GroupView from a group's `info()` ({"endpoint", "experts", "versions", "staged", "device", "nbytes"})."""
    held = {(int(l), e): v for l, es in info["experts"].items() for e, v in zip(es, info["versions"][l])}
    staged = {(int(l), int(e)): v for l, vs in info.get("staged", {}).items() for e, v in vs.items()}
    return GroupView(info["endpoint"], held, staged, info.get("device", ""), info.get("nbytes", 0))


class Compared(NamedTuple):
    """What `Reconciler.table_is_current` compared, and its answer."""

    copies: dict
    table: RoutingTable
    views: dict[str, GroupView]
    current: bool


class Reconciler:
    def __init__(self, store: StateStore, launcher: Launcher, moe_layers: list[int], num_experts: int,
                 drain_s: float = 1.0, call_timeout_s: float = 5.0, push_timeout_s: float = 2.0,
                 sleep=asyncio.sleep, failure_threshold: int = 3, max_timeout_deaths: int | None = None,
                 max_concurrent_calls: int = 32, start_timeout_s: float = 300.0, restart_settle_s: float = 1.0):
        self.store, self.launcher = store, launcher
        self.moe_layers, self.num_experts = list(moe_layers), num_experts
        self.drain_s, self.call_timeout_s, self.push_timeout_s = drain_s, call_timeout_s, push_timeout_s
        self.failure_threshold, self.max_timeout_deaths = failure_threshold, max_timeout_deaths
        self.start_timeout_s = start_timeout_s  # a group start (pending actor, slow load) holds the lock no longer
        self.restart_settle_s = restart_settle_s  # a restore waits this long for the rest of a node's losses
        self._observing = asyncio.Semaphore(max_concurrent_calls)  # observation calls in flight at once
        self.missed: dict[str, int] = {}                # group -> observations missed in a row
        self.verdict = Verdict([], [], [])              # the last observation's
        self.sleep = sleep
        self.state = MeshState()
        self.groups: dict[str, GroupHandle] = {}
        self.routers: dict[str, RouterHandle] = {}
        self.seen: dict[str, GroupView] = {}            # groups seen alive in the last observation
        self._seen_seq = 0                               # bumped by every update of `seen`
        self._compared: Compared | None = None  # what table_is_current last compared, and its answer
        self._named: tuple = (None, {})          # (copies, named_versions(copies)): see named()
        self.router_epochs: dict[str, int] = {}
        self.last_push: dict = {}  # the last table push: epoch, bytes, routers, seconds
        self.table = RoutingTable(0, {})
        self.lock = asyncio.Lock()                      # one change at a time
        self.on_publish: Callable[[RoutingTable], None] | None = None   # told of every new table first
        self.drain_wait: Callable[[int], Awaitable[None]] | None = None  # drain: until callers left older epochs
        self._queued: set[str] = set()                  # groups whose restart is queued
        self._restarts: set[asyncio.Task] = set()        # restarts in flight (close cancels them)
        self.closed = False                              # set by close: nothing is persisted after it

    # -- state ---------------------------------------------------------------------------------------

    def save(self, state: MeshState) -> None:
        """Persist, then adopt: nothing takes effect that is not persisted first."""
        if self.closed:
            raise StepError("the mesh is shutting down: nothing more is persisted")
        self.store.save(state)
        self.state = state

    def adopt(self, state: MeshState) -> None:
        """Take over the groups and routers a persisted state names (a controller restart)."""
        self.state = state
        self.groups = {n: h for n in state.groups if (h := self.launcher.find_group(n)) is not None}
        self.routers = {n: h for n in state.routers if (h := self.launcher.find_router(n)) is not None}

    # -- publishing ------------------------------------------------------------------------------------

    async def publish(self, state: MeshState | None = None) -> None:
        """A new routing table from the desired state (`state`, default the one in force) and what
        groups were seen holding: epoch + 1, persisted before the push; pushed to every router,
        each within push_timeout_s."""
        state = state or self.state
        layers = table_layers(state, self.seen, self.moe_layers, self.num_experts)
        self.save(state.replace(epoch=state.epoch + 1))
        self.table = RoutingTable(self.state.epoch, layers)
        if self.on_publish is not None:
            self.on_publish(self.table)
        await self.push(list(self.routers))

    async def push(self, names: list[str]) -> None:
        start = time.perf_counter()
        blob, epoch = self.table.encode(), self.table.epoch
        results = await asyncio.gather(*(asyncio.wait_for(self.routers[n].set_table(blob), self.push_timeout_s)
                                         for n in names), return_exceptions=True)
        self.last_push = {"epoch": epoch, "bytes": len(blob), "routers": len(names),
                          "seconds": round(time.perf_counter() - start, 4)}
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                logger.warning("router %s did not take epoch %d (retried next round): %r", name, epoch, result)
            else:
                self.router_epochs[name] = max(epoch, self.router_epochs.get(name, 0))

    def table_is_current(self) -> bool:
        """Whether the table in force is what the desired copies and the views make. Compared whole
        only when the copies or the table are other objects than last time (a new state revision
        keeps its copies object unless they change), or the last answer was no; else only the rows
        of the groups whose view is another object (an observation keeps a view object while it is
        equal). At 58 layers x 256 experts a whole comparison takes 0.15 s of CPU."""
        last, views = self._compared, dict(self.seen)
        if last and last.current and last.copies is self.state.copies and last.table is self.table:
            named = self.named()
            changed = {g for g in views.keys() | last.views.keys() if views.get(g) is not last.views.get(g)}
            current = all(rows_match(self.table.layers, g, named.get(g, {}), views.get(g)) for g in changed)
        else:
            current = self.table.layers == table_layers(self.state, self.seen, self.moe_layers, self.num_experts)
        self._compared = Compared(self.state.copies, self.table, views, current)
        return current

    def named(self) -> dict[str, dict[tuple[int, int], str]]:
        """{group: {(layer, expert): version}} of the desired copies (`named_versions`), computed
        once per copies object."""
        if self._named[0] is not self.state.copies:
            self._named = (self.state.copies, named_versions(self.state.copies))
        return self._named[1]

    # -- changes -------------------------------------------------------------------------------------

    async def submit(self, plan: Callable[[MeshState], Awaitable[Intent | None]], verifier=None) -> Intent | None:
        """One change at a time: `plan(state)` makes the intent against the state in force (None:
        nothing to change); it is recorded, carried out and marked done. Raises StepError (rolled
        back, nothing changed) if a step before the publish fails."""
        async with self.lock:
            intent = await plan(self.state)
            if intent is None:
                return None
            self.save(self.state.with_intent(intent))
            return await self._carry_out(intent, verifier)

    async def add_router(self, name: str, handle: RouterHandle, port: int) -> bool:
        """Register router `name` (serving on `port`) as a change, then push it the table in force
        outside the lock, within start_timeout_s (its warm-up opens a channel to every group; a
        router ignores a table older than its own, and the reconcile loop pushes to one behind);
        returns whether it serves."""
        self.routers[name] = handle
        await self.submit(self._settings("router", routers=lambda state: {**state.routers, name: port}))
        return await asyncio.wait_for(handle.set_table(self.table.encode()), self.start_timeout_s)

    async def set_autoscale(self, enabled: bool) -> str:
        """Autoscale on or off, as a change; returns its id ("" when it already was)."""
        intent = await self.submit(self._settings("autoscale", autoscale=lambda state: enabled))
        return "" if intent is None else intent.change_id

    @staticmethod
    def _settings(kind: str, **settings: Callable[[MeshState], object]):
        """The planner of a settings change: each field's value made from the state in force."""
        async def plan(state: MeshState) -> Intent | None:
            return plan_settings(state, kind, f"{kind}-{state.revision + 1}",
                                 **{field: value(state) for field, value in settings.items()})
        return plan

    async def resume(self) -> None:
        """After a restart: the change in progress rolls back (not yet published) or forward."""
        async with self.lock:
            intent = self.state.intent
            if intent is None:
                return
            if intent.published:
                logger.info("resuming change %s (%s) at step %s", intent.change_id, intent.kind, intent.step)
                await self._carry_out(intent, None)
            else:
                logger.info("rolling back change %s (%s), stopped before %s", intent.change_id, intent.kind,
                            intent.step)
                await self._roll_back(intent)
                self.save(self.state.with_intent(None))

    async def _carry_out(self, intent: Intent, verifier) -> Intent:
        while intent.step is not None:
            start = time.perf_counter()
            try:
                await self._run_step(intent, verifier)
                logger.info("change %s (%s): %s took %.2f s", intent.change_id, intent.kind, intent.step,
                            time.perf_counter() - start)
            except Exception as exc:
                if self.state.intent.published:  # the publish step may have flipped it
                    logger.warning("change %s: step %s failed (the reconcile loop finishes it): %r",
                                   intent.change_id, intent.step, exc)
                else:
                    await self._roll_back(intent)
                    self.save(self.state.with_intent(None))
                    raise step_error(f"{intent.kind} {intent.change_id} failed at {intent.step}, nothing "
                                     f"changed: {exc}", exc) from exc
            intent = self.state.intent.advanced()  # the publish step flips the intent it persists
            self.save(self.state.with_intent(intent) if intent.step else self.state.done(intent))
        return intent

    async def _run_step(self, intent: Intent, verifier) -> None:
        step = intent.step
        if step == "publish":  # target in force and epoch + 1, persisted together, then pushed
            await self.publish(published_state(self.state, intent))
        elif step == "drain":
            await self.sleep(self.drain_s)
            if self.drain_wait is not None:
                await self.drain_wait(self.table.epoch)
        elif step == "load":
            await self._load(intent)
        elif step == "stage":
            await self._stage(intent, verifier)
        elif step == "start":
            await self._start(intent)
        elif step == "adopt":  # a deploy's copies: what its groups hold
            self.save(self.state.with_intent(dataclasses.replace(intent, target=adopted(intent.nodes, self.seen))))
        elif step == "record":
            self.save(published_state(self.state, intent))
        elif step == "connect":  # routers have channels to the groups before a table routes to them
            restarted = intent.kind == "restart"
            await self._connect(list(intent.nodes) if restarted else sorted({g for g, *_ in intent.loads}), restarted)
        elif step == "release":
            await self._each([(g, self.groups[g].release(l, list(e))) for g, l, e in intent.releases])
        elif step == "commit":
            await self._each([(g, self.groups[g].commit(l)) for g, l, _, _ in intent.loads])
        else:
            raise ValueError(f"unknown step {step!r}")

    async def _load(self, intent: Intent) -> None:
        """New copies load on their groups; each must come back at the version the plan names."""
        results = await asyncio.gather(*(self._call(self.groups[g].load(l, list(e), s)) for g, l, e, s in intent.loads),
                                       return_exceptions=True)
        for (group, layer, experts, _), versions in zip(intent.loads, results):
            if isinstance(versions, BaseException):
                raise step_error(f"could not load layer {layer} experts {list(experts)} on {group}: {versions!r}",
                                 versions) from versions
            self._check_versions(intent, group, layer, experts, versions)
            self._saw(group, held={(layer, e): v for e, v in zip(experts, versions)})

    async def _stage(self, intent: Intent, verifier) -> None:
        """Live holders stage the new weights beside the old and run the verifier's probe through them."""
        calls = [self._call(self.groups[g].stage(l, list(e), s, *(verifier.probe(list(e)) if verifier else ([], None))),
                            timeout_s=None) for g, l, e, s in intent.loads]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for (group, layer, experts, _), result in zip(intent.loads, results):
            if isinstance(result, BaseException):
                raise step_error(f"group {group} could not stage the new weights: {result!r}", result) from result
            self._check_versions(intent, group, layer, experts, result["versions"])
            if verifier is not None:
                verifier.check(group, list(experts), result)
            self._saw(group, staged={(layer, e): v for e, v in zip(experts, result["versions"])})

    async def _start(self, intent: Intent) -> None:
        """(Re)start the groups on their nodes, together, with their named copies; each must hold
        exactly those versions. Each start bounded by start_timeout_s."""
        names = sorted(intent.nodes)
        loads = {g: [(l, list(e), s) for owner, l, e, s in intent.loads if owner == g] for g in names}
        handles = await asyncio.gather(*(self._call(self.launcher.start_group(g, intent.nodes[g], loads[g]),
                                                    timeout_s=self.start_timeout_s) for g in names),
                                       return_exceptions=True)
        infos = await asyncio.gather(*(self._call(h.info()) for h in handles if not isinstance(h, BaseException)),
                                     return_exceptions=True)
        infos, failures = iter(infos), []
        for group, handle in zip(names, handles):
            info = handle if isinstance(handle, BaseException) else next(infos)
            if isinstance(info, BaseException):
                failures.append((group, info))
                continue
            view = view_of(info)
            wanted = {(l, e): r.version for (l, e), rs in self.state.copies.items() for r in rs if r.group == group}
            wrong = sorted(k for k, v in wanted.items() if view.held.get(k) != v)
            if wrong:
                failures.append((group, ValueError(f"does not hold the named versions of (layer, expert) {wrong}")))
                continue
            self.groups[group] = handle
            self._saw(group, view=view)
        if failures:
            group, error = failures[0]
            raise step_error(f"restarting {group} failed: {error!r}", error) from error

    def _saw(self, group: str, view: GroupView | None = None, held: dict | None = None,
             staged: dict | None = None) -> None:
        """A step's own news of what `group` holds; an observation begun before it is dropped."""
        self._seen_seq += 1
        if view is not None:
            self.seen[group] = view
        elif group in self.seen:
            old = self.seen[group]  # a new view, never changed in place (table_is_current compares objects)
            self.seen[group] = dataclasses.replace(old, held={**old.held, **(held or {})},
                                                   staged={**old.staged, **(staged or {})})

    async def _connect(self, groups: list[str], fresh: bool) -> None:
        """Every router has a channel to each of `groups` (`fresh`: opened anew; a no-op but for the
        collective transport); a router that cannot is logged and sends over grpc meanwhile."""
        names = list(self.routers)
        results = await asyncio.gather(*(self._call(self.routers[n].open_channels(groups, fresh)) for n in names),
                                       return_exceptions=True)
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                logger.warning("router %s did not open channels to %s: %r", name, groups, result)

    def _check_versions(self, intent: Intent, group: str, layer: int, experts, versions: list[str]) -> None:
        for expert, version in zip(experts, versions):
            named = next((r.version for r in intent.target.get((layer, expert), ()) if r.group == group),
                         self._named_version(group, layer, expert))
            if version != named:
                raise StepError(f"{group} loaded layer {layer} expert {expert} at version {version}, the plan "
                                f"names {named} (the checkpoint changed?)")

    def _named_version(self, group: str, layer: int, expert: int) -> str | None:
        return next((r.version for r in self.state.copies.get((layer, expert), ()) if r.group == group), None)

    async def _roll_back(self, intent: Intent) -> None:
        """Undo what the steps before the publish may have done: loaded copies, staged weights. A
        group a restart started stays (it holds the named copies): routers' channels to it are
        opened anew, since their old ones reach the dead incarnation."""
        if intent.kind == "deploy":  # nothing serves yet: the groups it started go
            for group in intent.nodes:
                handle = self.groups.pop(group, None) or self.launcher.find_group(group)
                self.seen.pop(group, None)
                if handle is not None:
                    handle.kill()
            return
        if intent.kind == "restart" and intent.next_step > 0:
            await self._connect([g for g in intent.nodes if g in self.groups], True)
        if "load" in intent.steps[:intent.next_step + 1]:
            await self._each([(g, self.groups[g].release(l, list(e))) for g, l, e, _ in intent.loads
                              if g in self.groups])
        if "stage" in intent.steps[:intent.next_step + 1]:
            await self._each([(g, self.groups[g].unstage(l)) for g, l, _, _ in intent.loads if g in self.groups])

    async def _each(self, calls: list[tuple[str, object]]) -> None:
        """Run group calls together; failures are logged (a dead group is the reconcile loop's)."""
        results = await asyncio.gather(*(self._call(c) for _, c in calls), return_exceptions=True)
        for (group, _), result in zip(calls, results):
            if isinstance(result, BaseException):
                logger.warning("group %s: %r", group, result)

    async def _call(self, awaitable, timeout_s: float | None = -1.0):
        return await asyncio.wait_for(awaitable, self.call_timeout_s if timeout_s == -1.0 else timeout_s)

    # -- the reconcile loop ------------------------------------------------------------------------------

    async def observe(self) -> None:
        """Which groups live and what they hold (mesh/health.py decides which are dead); which epoch
        each router has. Each group's call bounded by call_timeout_s, at most max_concurrent_calls
        at once."""
        names, seq = list(self.state.groups), self._seen_seq
        infos = await asyncio.gather(*(self._observe(n) for n in names), return_exceptions=True)
        seen, missed, gone = {}, {}, set()
        for name, info in zip(names, infos):
            if isinstance(info, GroupGoneError):
                gone.add(name)
            elif isinstance(info, BaseException):
                missed[name] = self.missed.get(name, 0) + 1
                logger.warning("expert group %s missed an observation (%d in a row): %r", name, missed[name], info)
            else:
                view = view_of(info)
                seen[name] = self.seen[name] if self.seen.get(name) == view else view  # the same object while equal
        verdict = judge(missed, gone, self.failure_threshold, self._max_timeout_deaths())
        for name in verdict.dead:
            if name in self.seen:
                logger.warning("expert group %s is dead: %s", name, "Ray reports it dead" if name in gone
                               else f"{missed[name]} observations missed in a row")
        if verdict.held_back:
            logger.warning("%d groups missed %d observations in a row: more than a round declares dead on "
                           "timeouts alone (%d); routed as last seen until Ray's word or an answer",
                           len(verdict.held_back), self.failure_threshold, self._max_timeout_deaths())
        seen.update({n: self.seen[n] for n in verdict.suspect if n in self.seen})  # still routed as last seen
        if seq == self._seen_seq:  # else a step changed a group meanwhile: this view may be older
            self.seen, self._seen_seq = seen, seq + 1
            self.missed, self.verdict = missed, verdict
        routers = list(self.routers)
        epochs = await asyncio.gather(*(asyncio.wait_for(self.routers[n].epoch(), self.push_timeout_s)
                                        for n in routers), return_exceptions=True)
        self.router_epochs = {n: e for n, e in zip(routers, epochs) if not isinstance(e, BaseException)}

    async def _observe(self, name: str) -> dict:
        if name not in self.groups:
            raise GroupGoneError(f"no actor named {name}")
        async with self._observing:
            return await self._call(self.groups[name].info())

    def _max_timeout_deaths(self) -> int:
        return self.max_timeout_deaths or default_max_timeout_deaths(self.state.groups)

    async def round(self) -> list[asyncio.Task]:
        """One level-triggered round. Returns the restart tasks it queued (each a change of its own)."""
        await self.observe()
        if not self.table_is_current():
            await self.publish()
        await self._resync_routers()
        if self.lock.locked():
            return []
        async with self.lock:  # no change may start while copies nothing names are released
            fix = tidy(self.state, self.seen)
            await self._tidy(fix)
        todo = [n for n in dict.fromkeys([*self.dead_groups(), *fix.restart]) if n not in self._queued]
        return [self._queue_restart(todo)] if todo else []

    def dead_groups(self) -> list[str]:
        """Groups of the desired state that are not routed and not merely suspect: to restore."""
        return [n for n in self.state.groups if n not in self.seen and n not in self.verdict.suspect]

    async def _resync_routers(self) -> None:
        behind = [n for n in self.routers if self.router_epochs.get(n, -1) < self.table.epoch]
        restarted = [n for n in behind if self.router_epochs.get(n) == -1]
        if restarted:  # Ray restarted its process: bind it again on its port
            results = await asyncio.gather(*(asyncio.wait_for(self.routers[n].start(self.state.routers[n]), 30)
                                             for n in restarted), return_exceptions=True)
            for name, result in zip(restarted, results):
                logger.warning("router %s restarted by Ray: serving again at %r", name, result)
        if behind:
            await self.push(behind)

    async def _tidy(self, fix: Tidy) -> None:
        calls = [(g, self.groups[g].release(l, list(e))) for g, l, e in fix.release]
        calls += [(g, self.groups[g].commit(l)) for g, l in fix.commit]
        calls += [(g, self.groups[g].unstage(l)) for g, l in fix.unstage]
        if calls:
            logger.info("tidying: release %s, commit %s, unstage %s", fix.release, fix.commit, fix.unstage)
            await self._each(calls)

    def _queue_restart(self, groups: list[str]) -> asyncio.Task:
        self._queued.update(groups)
        task = asyncio.get_running_loop().create_task(self._restart(groups))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)
        return task

    async def close(self) -> None:
        """The mesh is shutting down: restarts in flight are cancelled and nothing is persisted
        after this (a restart finishing later would write the deleted state back)."""
        self.closed = True
        for task in list(self._restarts):
            task.cancel()
        await asyncio.gather(*self._restarts, return_exceptions=True)

    async def stop_all(self) -> None:
        """After close: every router stopped, then every router and group killed."""
        await asyncio.gather(*(r.stop() for r in self.routers.values()), return_exceptions=True)
        for handle in [*self.routers.values(), *self.groups.values()]:
            handle.kill()

    # -- what the controller reads ----------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch of the table in force."""
        return self.table.epoch

    def live_holdings(self) -> dict[str, dict[int, list[int]]]:
        """{group: {layer: experts}} of the desired copies on groups seen alive."""
        held = held_by(self.state.copies)
        return {g: held.get(g, {}) for g in self.state.groups if g in self.seen}

    def copy_counts(self) -> dict[tuple[int, int], int]:
        """Copies per (layer, expert) in the routing table (experts with none left out)."""
        return {(l, e): len(c) for l, experts in self.table.layers.items() for e, c in enumerate(experts) if c}

    async def router_reports(self, pairs: bool) -> list[bytes]:
        """Every router's load report that came back (mesh/load.py aggregates them)."""
        reports = await asyncio.gather(*(r.load_report(pairs) for r in self.routers.values()), return_exceptions=True)
        return [r for r in reports if isinstance(r, bytes)]

    async def router_nodes(self) -> list[str]:
        """The nodes the routers that answered run on."""
        nodes = await asyncio.gather(*(r.node_id() for r in self.routers.values()), return_exceptions=True)
        return [n for n in nodes if isinstance(n, str)]

    async def _restart(self, groups: list[str]) -> None:
        """Restore `groups`, and every group found dead meanwhile, as one change: a lost node's
        groups die over a few rounds' observations, and come back together, not one after another."""
        try:
            await self.sleep(self.restart_settle_s)
            async with self.lock:
                groups = list(dict.fromkeys([*groups, *self.dead_groups()]))
                self._queued.update(groups)
                restart = tidy(self.state, self.seen).restart
                todo = [g for g in groups if g in self.state.groups and (g not in self.seen or g in restart)]
                if not todo:
                    return  # came back, holding what they should
                diverged = [g for g in todo if g in self.seen]
                if diverged:  # alive but diverged: traffic leaves them before they restart
                    for group in diverged:
                        del self.seen[group]
                    self._seen_seq += 1
                    await self.publish()
                    await self.sleep(self.drain_s)
                nodes = self._restart_nodes(todo)
                intent = plan_restart(self.state, nodes, f"restart-{self.state.revision + 1}")
                self.save(self.state.with_intent(intent))
                start = time.perf_counter()
                await self._carry_out(intent, None)
                logger.warning("expert groups restored in %.2f s: %s", time.perf_counter() - start, intent.summary)
        except Exception as exc:  # noqa: BLE001 - the next round queues them again
            logger.warning("could not restore groups %s yet: %r", groups, exc)
        finally:
            self._queued.difference_update(groups)

    def _restart_nodes(self, groups: list[str]) -> dict[str, str]:
        """Each group's node: its own while that node lives (a killed actor), else the node holding
        the fewest other copies of its experts (the groups placed before it counted)."""
        nodes = self.launcher.alive_nodes()
        held = held_by(self.state.copies)
        live = [(self.state.groups[g], held.get(g, {})) for g in self.seen if g not in groups]
        chosen = {}
        for group in groups:
            own = self.state.groups[group]
            order = [own, *(n for n in nodes if n != own)] if own in nodes else nodes
            chosen[group] = restore_node(held.get(group, {}), order, live)
            live.append((chosen[group], held.get(group, {})))
        return chosen

    def pending(self) -> dict:
        """What has not converged yet, for `mesh status`."""
        intent = self.state.intent
        return {"change": None if intent is None else {"id": intent.change_id, "kind": intent.kind,
                                                       "step": intent.step, "summary": intent.summary},
                "dead_groups": sorted(self.dead_groups()),
                "suspect_groups": list(self.verdict.suspect),
                "routers_behind": sorted(n for n in self.routers if self.router_epochs.get(n, -1) < self.table.epoch)}

