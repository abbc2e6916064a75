"""The reconciler driven with fake groups, routers and KV store (no Ray), and a fake clock.

Crash points are enumerated from the planner's own step lists: the controller dies before each step
of each kind of change (and in the middle of a publish, after the epoch is persisted and before any
router took it); a new reconciler built from the persisted snapshot alone must converge, and no
table a router ever took may name a copy its group did not hold (served or staged) at that version.
"""

from __future__ import annotations

import asyncio

import pytest

from protos.errors import GroupGoneError, StateError, StepError, StepUnavailableError
from mesh.changes import STEPS, plan_copies, plan_deploy, plan_swap, tidy
from mesh.reconciler import Reconciler
from mesh.state import Intent, MeshState, Replica, held_by
from mesh.store import StateStore
from router_service.routing import RoutingTable

LAYERS, NUM_EXPERTS = [0, 1], 4
NODES = ["n0", "n1", "n2"]


def version(source, layer, expert) -> str:
    return f"{source or 'model'}:{layer}:{expert}"


class FakeCrash(BaseException):
    """The controller process ending (not an Exception: nothing in the reconciler catches it)."""


class FakeKVStore:
    def __init__(self):
        self.data: dict[str, bytes] = {}
        self.crash_on_epoch: int | None = None  # the process ends right after persisting this epoch
        self.refuse_epoch: int | None = None    # a write of this epoch fails (GCS unreachable)

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        if MeshState.decode(value).epoch == self.refuse_epoch:
            raise ConnectionError("GCS unreachable")
        self.data[key] = value
        if MeshState.decode(value).epoch == self.crash_on_epoch:
            raise FakeCrash()

    def delete(self, key):
        self.data.pop(key, None)


class FakeGroupActor:
    """An expert group's memory: what it serves and stages, (layer, expert) -> version."""

    def __init__(self, name: str, loads):
        self.name, self.alive = name, True
        self.slow = False  # info() times out (a frozen process, a slow round), but Ray reports it alive
        self.held = {(l, e): version(s, l, e) for l, es, s in loads for e in es}
        self.staged: dict[tuple[int, int], str] = {}
        self.block: asyncio.Event | None = None  # set: load waits on it

    def die(self):
        """The actor is gone: Ray reports it dead, and what it held is lost."""
        self.alive, self.held = False, {}

    def kill(self):
        self.die()

    def _check(self):
        if not self.alive:
            raise GroupGoneError(f"{self.name} is dead")

    async def info(self):
        self._check()
        if self.slow:
            raise asyncio.TimeoutError()
        experts, versions, staged = {}, {}, {}
        for (l, e), v in sorted(self.held.items()):
            experts.setdefault(l, []).append(e)
            versions.setdefault(l, []).append(v)
        for (l, e), v in self.staged.items():
            staged.setdefault(l, {})[e] = v
        return {"endpoint": f"{self.name}:1", "experts": experts, "versions": versions, "staged": staged}

    async def load(self, layer, experts, source):
        self._check()
        if self.block is not None:
            await self.block.wait()
        self.held.update({(layer, e): version(source, layer, e) for e in experts})
        return [version(source, layer, e) for e in experts]

    async def release(self, layer, experts):
        self._check()
        for e in experts:
            self.held.pop((layer, e), None)

    async def stage(self, layer, experts, source, probed, probe):
        self._check()
        self.staged = {k: v for k, v in self.staged.items() if k[0] != layer}
        self.staged.update({(layer, e): version(source, layer, e) for e in experts})
        return {"versions": [version(source, layer, e) for e in experts], "checksums": [], "probe": None}

    async def commit(self, layer):
        self._check()
        self.held.update({k: v for k, v in self.staged.items() if k[0] == layer})
        self.staged = {k: v for k, v in self.staged.items() if k[0] != layer}

    async def unstage(self, layer):
        self._check()
        self.staged = {k: v for k, v in self.staged.items() if k[0] != layer}


class FakeRouterActor:
    """Checks every table it takes against what the groups hold at that moment."""

    def __init__(self, world: "FakeLauncher"):
        self.world, self.tables, self.epoch_ = world, [], 0
        self.hang = False
        self.crash_on_epoch: int | None = None
        self.opened: list[tuple[list[str], bool]] = []  # open_channels calls
        self.channels: dict[str, int] | None = None  # group -> id of the group actor its channel reaches

    async def epoch(self):
        return self.epoch_

    async def set_table(self, blob):
        table = RoutingTable.decode(blob)
        if table.epoch == self.crash_on_epoch:
            raise FakeCrash()
        if self.hang:
            await asyncio.Event().wait()
        for layer, experts in table.layers.items():
            for expert, copies in enumerate(experts):
                for c in copies:
                    g = self.world.actors[c.group]
                    if c.version not in (g.held.get((layer, expert)), g.staged.get((layer, expert))):
                        self.world.violations.append(f"epoch {table.epoch} names {c}, not held by {c.group}")
        self._check_channels(table)
        self.tables.append(table)
        self.epoch_ = max(self.epoch_, table.epoch)
        return True

    async def start(self, port):
        return f"127.0.0.1:{port}"

    async def open_channels(self, groups, fresh):
        self.opened.append((list(groups), fresh))
        for g in groups:
            if fresh or g not in self.channels:
                self.channels[g] = id(self.world.actors[g])

    def _check_channels(self, table):
        """Every group a table routes to has a channel to its current actor (the first table: the deploy's)."""
        if self.channels is None:
            self.channels = {g: id(self.world.actors[g]) for g in table.groups()}
        for g in table.groups():
            if self.channels.get(g) != id(self.world.actors[g]):
                self.world.violations.append(f"epoch {table.epoch} routes to {g} with no channel to it")


class FakeLauncher:
    def __init__(self):
        self.actors: dict[str, FakeGroupActor] = {}
        self.router_actors: dict[str, FakeRouterActor] = {}
        self.starts: list[str] = []
        self.violations: list[str] = []  # tables that named a copy its group did not hold

    def alive_nodes(self):
        return list(NODES)

    def find_group(self, name):
        return self.actors.get(name)

    def find_router(self, name):
        return self.router_actors.get(name)

    async def start_group(self, name, node, loads):
        self.starts.append(name)
        self.actors[name] = FakeGroupActor(name, loads)
        return self.actors[name]


async def no_sleep(seconds):
    await asyncio.sleep(0)


def deployed(kv: FakeKVStore, world: FakeLauncher) -> Reconciler:
    """3 groups, each expert of each layer on one group (expert e on group e % 3), 2 routers, epoch 1."""
    copies = {(l, e): (Replica(f"g{e % 3}", None, version(None, l, e)),) for l in LAYERS for e in range(NUM_EXPERTS)}
    for g, held in held_by(copies).items():
        world.actors[g] = FakeGroupActor(g, [(l, es, None) for l, es in held.items()])
    world.router_actors = {"r0": FakeRouterActor(world), "r1": FakeRouterActor(world)}
    state = MeshState(revision=1, groups={f"g{k}": NODES[k] for k in range(3)}, copies=copies,
                      routers={"r0": 1, "r1": 2})
    rec = reconciler(kv, world)
    rec.save(state)
    rec.adopt(state)
    return rec


async def started() -> tuple[FakeKVStore, FakeLauncher, Reconciler]:
    """`deployed`, observed and published (epoch 1)."""
    kv, world = FakeKVStore(), FakeLauncher()
    rec = deployed(kv, world)
    await rec.observe()
    await rec.publish()
    return kv, world, rec


def reconciler(kv, world) -> Reconciler:
    return Reconciler(StateStore(kv, "m"), world, LAYERS, NUM_EXPERTS, push_timeout_s=0.05, sleep=no_sleep)


async def converge(rec: Reconciler, rounds: int = 3) -> None:
    for _ in range(rounds):
        for task in await rec.round():
            await task


def assert_converged(rec: Reconciler, world: FakeLauncher) -> None:
    assert world.violations == []
    state = rec.state
    assert state.intent is None
    for g, actor in world.actors.items():
        wanted = {(l, e): r.version for (l, e), rs in state.copies.items() for r in rs if r.group == g}
        assert actor.held == wanted and not actor.staged, (g, actor.held, actor.staged)
    for name, router in world.router_actors.items():
        assert router.epoch_ == rec.table.epoch, name
    assert all(copies for experts in rec.table.layers.values() for copies in experts)


def scale_up(state: MeshState) -> Intent:
    """Expert 1 of layer 0 gains a copy on g0; expert 2 of layer 1 moves from g2 to g1."""
    plan = {g: {l: list(e) for l, e in held.items()} for g, held in held_by(state.copies).items()}
    plan["g0"][0].append(1)
    plan["g2"][1].remove(2)
    plan["g1"][1].append(2)
    return plan_copies(state, plan, "scale", f"scale-{state.revision + 1}")


def swap(state: MeshState) -> Intent:
    versions = {e: version("new", 0, e) for e in (1, 2)}
    return plan_swap(state, 0, versions, "new", set(state.groups), f"swap-{state.revision + 1}")


def restart(state: MeshState) -> Intent:
    from mesh.changes import plan_restart

    return plan_restart(state, {"g1": "n2"}, f"restart-{state.revision + 1}")


PLANS = {"scale": scale_up, "swap": swap, "restart": restart}
CRASH_POINTS = [(kind, i) for kind, plan in PLANS.items()
                for i in range(len(STEPS["restart" if kind == "restart" else "swap" if kind == "swap" else "copies"]))]


def make_plan(kind):
    async def plan(state):
        return PLANS[kind](state)
    return plan


@pytest.mark.parametrize("kind,crash_before", CRASH_POINTS + [(k, "mid-publish") for k in PLANS])
def test_a_crash_at_any_step_resumes_or_rolls_back_and_converges(kind, crash_before):
    async def main():
        kv, world, rec = await started()
        before = rec.state
        steps = PLANS[kind](before).steps
        if crash_before == "mid-publish":  # epoch persisted, no router has the table yet
            kv.crash_on_epoch = before.epoch + 1
            crash_step = steps.index("publish")
        else:
            crash_step = crash_before

            run_step = rec._run_step

            async def crash_before_the_step(intent, verifier):  # the process ends right before that step
                if intent.next_step == crash_before:
                    raise FakeCrash()
                await run_step(intent, verifier)
            rec._run_step = crash_before_the_step
        with pytest.raises(FakeCrash):
            await rec.submit(make_plan(kind))
        kv.crash_on_epoch = None
        persisted = StateStore(kv, "m").load()
        assert persisted.intent is not None and persisted.intent.next_step == crash_step
        assert persisted.intent.published == (crash_before == "mid-publish" or crash_step > steps.index("publish"))
        # a new controller: the snapshot alone, the same (living) actors
        fresh = reconciler(kv, world)
        fresh.adopt(persisted)
        await fresh.observe()
        await fresh.resume()
        await fresh.publish()
        await converge(fresh)
        assert_converged(fresh, world)
        published = persisted.intent.published
        wanted = PLANS[kind](before)
        expected = {**before.copies, **(wanted.target if published else {})}
        assert fresh.state.copies == expected
        assert fresh.state.epoch > persisted.epoch  # never reused
        epochs = [t.epoch for r in world.router_actors.values() for t in r.tables]
        assert fresh.table.epoch == max(epochs)

    asyncio.run(main())


def test_swap_serves_new_weights_and_a_repeated_swap_changes_nothing():
    async def main():
        kv, world, rec = await started()
        done = await rec.submit(make_plan("swap"))
        assert done.change_id.startswith("swap-") and rec.state.applied[-1] == done.change_id
        table = world.router_actors["r0"].tables[-1]
        assert [c.version for c in table.layers[0][1]] == [version("new", 0, 1)]
        epoch = rec.table.epoch
        assert await rec.submit(make_plan("swap")) is None  # already applied: no intent, no epoch
        assert rec.table.epoch == epoch

    asyncio.run(main())


def test_a_failed_load_rolls_back_and_names_the_group():
    async def main():
        kv, world, rec = await started()
        before = rec.state.copies
        world.actors["g1"].alive = False  # loads on g1 fail
        with pytest.raises(StepUnavailableError, match="g1"):  # a group gone: worth a retry (UNAVAILABLE)
            await rec.submit(make_plan("scale"))
        assert rec.state.copies == before and rec.state.intent is None
        assert (0, 1) not in world.actors["g0"].held  # the copy loaded on g0 was released

    asyncio.run(main())


def test_a_load_the_group_refuses_is_a_step_error_not_an_unavailable_one():
    async def main():
        kv, world, rec = await started()

        async def refuse(layer, experts, source):
            raise ValueError("checkpoint is not the same architecture as the served model")

        world.actors["g1"].load = refuse
        with pytest.raises(StepError, match="same architecture") as info:
            await rec.submit(make_plan("scale"))
        assert not isinstance(info.value, StepUnavailableError)

    asyncio.run(main())


def test_a_dead_group_leaves_the_table_while_a_change_runs_and_restarts_after_it():
    async def main():
        kv, world, rec = await started()
        world.actors["g0"].block = asyncio.Event()  # the scale's load on g0 hangs
        change = asyncio.ensure_future(rec.submit(make_plan("scale")))
        await asyncio.sleep(0)
        world.actors["g2"].die()
        queued = await rec.round()  # publishes without g2 at once, queues nothing while locked
        assert queued == [] and "g2" not in rec.table.groups()
        assert world.router_actors["r0"].epoch_ == rec.table.epoch
        world.actors["g0"].block.set()
        await change
        await converge(rec)
        assert world.starts == ["g2"] and "g2" in rec.table.groups()
        assert all((["g2"], True) in r.opened for r in world.router_actors.values())  # before it was routed to
        assert_converged(rec, world)

    asyncio.run(main())


def test_a_group_that_gains_its_first_copies_has_channels_before_a_table_routes_to_it():
    async def main():
        kv, world = FakeKVStore(), FakeLauncher()
        rec = deployed(kv, world)
        world.actors["g3"] = FakeGroupActor("g3", [])  # deployed empty: no table names it
        rec.adopt(rec.state.replace(groups={**rec.state.groups, "g3": "n0"}))
        await rec.observe()
        await rec.publish()
        assert "g3" not in rec.table.groups()

        async def onto_g3(state):
            plan = {g: {l: list(e) for l, e in held.items()} for g, held in held_by(state.copies).items()}
            plan["g0"][0].remove(3)
            plan["g3"] = {0: [3]}
            return plan_copies(state, plan, "rebalance", "rebalance-1")

        await rec.submit(onto_g3)
        assert "g3" in rec.table.groups()
        assert all((["g3"], False) in r.opened for r in world.router_actors.values())
        assert_converged(rec, world)  # no table routed to g3 before its channel (FakeRouterActor checks)

    asyncio.run(main())


def test_a_hung_router_never_blocks_the_others_and_resyncs():
    async def main():
        kv, world = FakeKVStore(), FakeLauncher()
        rec = deployed(kv, world)
        await rec.observe()
        world.router_actors["r1"].hang = True
        await rec.publish()
        assert world.router_actors["r0"].epoch_ == rec.table.epoch and world.router_actors["r1"].epoch_ == 0
        assert rec.pending()["routers_behind"] == ["r1"]
        world.router_actors["r1"].hang = False
        await rec.round()
        assert world.router_actors["r1"].epoch_ == rec.table.epoch

    asyncio.run(main())


def test_tidy_releases_unnamed_copies_commits_named_staging_drops_the_rest():
    state = MeshState(groups={"g0": "n0"}, copies={(0, 0): (Replica("g0", "new", "v-new"),),
                                                   (0, 1): (Replica("g0", None, "v1"),)})
    from mesh.changes import GroupView

    seen = {"g0": GroupView("g0:1", {(0, 0): "v-old", (0, 1): "v1", (0, 3): "v3"}, {(0, 0): "v-new"})}
    fix = tidy(state, seen)
    assert fix.release == (("g0", 0, (3,)),) and fix.commit == (("g0", 0),) and not fix.unstage
    assert not fix.restart
    seen = {"g0": GroupView("g0:1", {(0, 0): "v-old", (0, 1): "v1"}, {(0, 0): "v-other"})}
    fix = tidy(state, seen)
    assert fix.unstage == (("g0", 0),) and fix.restart == ("g0",)


def test_checking_the_rows_of_changed_groups_agrees_with_rebuilding_the_table():
    """table_is_current's shortcut: given a table built from some views, the rows of the groups whose
    view changed match exactly when the whole table rebuilt from the new views is equal."""
    import random

    from mesh.changes import GroupView, named_versions, rows_match, table_layers

    rng = random.Random(0)
    groups = [f"g{i}" for i in range(5)]
    state = MeshState(groups={g: "n0" for g in groups},
                      copies={(l, e): tuple(Replica(g, None, f"v{rng.randint(0, 1)}") for g in rng.sample(groups, 2))
                              for l in LAYERS for e in range(NUM_EXPERTS)})
    named = named_versions(state.copies)

    def random_view(group):
        if rng.random() < 0.1:
            return None  # not seen
        versions = {k: rng.choice(["v0", "v1"]) for k in named.get(group, {}) if rng.random() < 0.9}
        staged = {k: rng.choice(["v0", "v1"]) for k in named.get(group, {}) if rng.random() < 0.2}
        return GroupView(rng.choice([f"{group}:1", f"{group}:2"]), versions, staged)

    outcomes = set()
    for _ in range(300):
        before = {g: v for g in groups if (v := random_view(g)) is not None}
        table = table_layers(state, before, LAYERS, NUM_EXPERTS)
        after = dict(before)
        for g in rng.sample(groups, rng.randint(1, 2)):
            view = random_view(g) if rng.random() < 0.7 else before.get(g)
            after.pop(g, None) if view is None else after.update({g: view})
        changed = {g for g in groups if after.get(g) is not before.get(g)}
        shortcut = all(rows_match(table, g, named.get(g, {}), after.get(g)) for g in changed)
        assert shortcut == (table == table_layers(state, after, LAYERS, NUM_EXPERTS))
        outcomes.add(shortcut)
    assert outcomes == {True, False}  # both answers were exercised


def test_state_round_trips_and_garbage_is_a_clear_error():
    intent = scale_up(MeshState(groups={"g0": "n0", "g1": "n1", "g2": "n2"},
                                copies={(l, e): (Replica(f"g{e % 3}", None, "v"),) for l in LAYERS
                                        for e in range(NUM_EXPERTS)}))
    state = MeshState(revision=3, epoch=7, groups={"g0": "n0"}, copies=intent.target, routers={"r0": 5},
                      intent=intent.advanced(), applied=("scale-2",))
    assert MeshState.decode(state.encode()) == state
    with pytest.raises(StateError, match="does not decode"):
        MeshState.decode(b"\x93garbage")
    with pytest.raises(ValueError, match="not newer"):
        store = StateStore(FakeKVStore(), "m")
        store.save(state)
        store.save(state)


def test_a_holder_that_missed_the_staging_is_not_routed_until_restarted_with_the_new_weights():
    async def main():
        kv, world, rec = await started()

        async def plan(state):  # g1 (expert 1's only holder) was not seen alive when the swap was planned
            return plan_swap(state, 0, {1: version("new", 0, 1)}, "new", {"g0", "g2"}, "swap-x")

        await rec.submit(plan)
        assert rec.table.layers[0][1] == []  # named at the new version, which g1 does not hold
        assert world.actors["g1"].held[(0, 1)] == version(None, 0, 1)
        await converge(rec)  # tidy: g1 diverged -> restarted from the desired state
        assert world.starts == ["g1"] and world.actors["g1"].held[(0, 1)] == version("new", 0, 1)
        assert_converged(rec, world)

    asyncio.run(main())


def test_an_observation_older_than_a_step_does_not_hide_what_the_step_loaded():
    async def main():
        kv, world, rec = await started()
        slow = world.actors["g1"]
        gate, taken = asyncio.Event(), asyncio.Event()
        original = slow.info

        async def slow_info():
            snapshot = await original()  # taken before the swap stages
            taken.set()
            await gate.wait()
            return snapshot
        slow.info = slow_info
        observing = asyncio.ensure_future(rec.observe())
        await taken.wait()
        await rec.submit(make_plan("swap"))  # stages on g1 and g2, publishes the new versions
        gate.set()
        await observing
        slow.info = original
        assert rec.seen["g1"].serves(0, 1, version("new", 0, 1))
        assert rec.table_is_current() and [c.group for c in rec.table.layers[0][1]] == ["g1"]
        await converge(rec)
        assert_converged(rec, world)

    asyncio.run(main())


def test_a_publish_that_cannot_be_persisted_rolls_back_and_publishes_nothing():
    async def main():
        kv, world, rec = await started()
        before, epoch = rec.state.copies, rec.table.epoch
        kv.refuse_epoch = epoch + 1
        with pytest.raises(StepError, match="GCS unreachable"):
            await rec.submit(make_plan("scale"))
        assert rec.state.copies == before and rec.state.intent is None and rec.table.epoch == epoch
        assert StateStore(kv, "m").load().copies == before
        assert all(r.tables[-1].epoch == epoch for r in world.router_actors.values())
        kv.refuse_epoch = None
        await converge(rec)
        assert_converged(rec, world)  # the copies loaded for the change were released

    asyncio.run(main())


def test_a_group_missing_observations_stays_routed_until_the_threshold_then_is_restored():
    async def main():
        kv, world, rec = await started()
        world.actors["g1"].slow = True
        for missed in (1, 2):
            assert await rec.round() == []
            assert "g1" in rec.table.groups() and rec.pending()["suspect_groups"] == ["g1"], missed
            assert rec.pending()["dead_groups"] == [] and world.starts == []
        restarts = await rec.round()  # the third miss in a row: dead, dropped, restored
        assert "g1" not in rec.table.groups() and len(restarts) == 1
        await asyncio.gather(*restarts)
        await converge(rec)
        assert world.starts == ["g1"] and "g1" in rec.table.groups()
        assert rec.pending()["suspect_groups"] == []
        assert_converged(rec, world)

    asyncio.run(main())


def test_an_answer_between_misses_starts_the_count_again():
    async def main():
        kv, world, rec = await started()
        for slow in (True, True, False, True, True, False):
            world.actors["g2"].slow = slow
            await converge(rec, rounds=1)
        assert world.starts == [] and "g2" in rec.table.groups()

    asyncio.run(main())


def test_a_round_that_times_out_on_every_group_kills_none_and_rays_word_still_counts():
    async def main():
        kv, world, rec = await started()
        epoch = rec.table.epoch
        for actor in world.actors.values():
            actor.slow = True
        for _ in range(5):
            assert await rec.round() == []  # 3 groups over the default cap of 2 (one per node, + 1): held back
        assert rec.table.epoch == epoch and world.starts == []
        assert rec.verdict.held_back == ["g0", "g1", "g2"]
        rec.max_timeout_deaths = 1
        world.actors["g0"].die()  # Ray's word: dead at once, whatever the cap
        await converge(rec, rounds=1)
        assert world.starts == ["g0"]
        for actor in world.actors.values():
            actor.slow = False
        await converge(rec)
        assert_converged(rec, world)

    asyncio.run(main())


def test_a_group_start_that_never_ends_fails_within_its_timeout_and_frees_the_lock():
    async def main():
        kv, world, rec = await started()
        rec.start_timeout_s = 0.05
        started_group = world.start_group

        async def pending(name, node, loads):  # an actor Ray cannot place: it never serves
            await asyncio.Event().wait()

        world.start_group = pending
        world.actors["g1"].die()
        await asyncio.wait_for(converge(rec, rounds=1), 5)  # the restart fails within its timeout
        assert not rec.lock.locked() and rec.state.intent is None
        assert "g1" in rec.pending()["dead_groups"]
        world.start_group = started_group  # the node is back: the next round restores it
        await converge(rec)
        assert world.starts == ["g1"]
        assert_converged(rec, world)

    asyncio.run(main())


def test_a_lost_nodes_groups_restore_as_one_change_started_together():
    async def main():
        kv, world, rec = await started()
        in_flight, most = set(), []
        start_group = world.start_group

        async def slow_start(name, node, loads):
            in_flight.add(name)
            most.append(len(in_flight))
            await asyncio.sleep(0.01)
            in_flight.discard(name)
            return await start_group(name, node, loads)

        world.start_group = slow_start
        for name in ("g0", "g2"):
            world.actors[name].die()
        tasks = await rec.round()
        assert len(tasks) == 1  # one change for both
        await asyncio.gather(*tasks)
        assert sorted(world.starts) == ["g0", "g2"] and max(most) == 2  # started together
        await converge(rec)
        assert_converged(rec, world)

    asyncio.run(main())


def _deploy(groups, settings):
    async def plan(state):
        return None if state.groups else plan_deploy(groups, settings, f"deploy-{state.revision + 1}")
    return plan


def test_deploy_starts_the_groups_together_persists_what_they_report_and_publishes_epoch_1():
    async def main():
        kv, world = FakeKVStore(), FakeLauncher()
        rec = reconciler(kv, world)
        groups = {f"g{k}": (NODES[k], {l: [e for e in range(NUM_EXPERTS) if e % 3 == k] for l in LAYERS})
                  for k in range(3)}
        intent = await rec.submit(_deploy(groups, {"autoscale": True, "secret": "s"}))
        assert intent.kind == "deploy" and rec.state.applied == (intent.change_id,) and rec.state.intent is None
        assert sorted(world.starts) == ["g0", "g1", "g2"]
        assert rec.table.epoch == 1 and rec.state.autoscale and rec.state.secret == "s"
        assert StateStore(kv, "m").load() == rec.state
        assert {k: [r.group for r in rs] for k, rs in rec.state.copies.items()} == {
            (l, e): [f"g{e % 3}"] for l in LAYERS for e in range(NUM_EXPERTS)}
        assert rec.table_is_current() and rec.table.missing_experts() == []
        assert await rec.submit(_deploy(groups, {})) is None and world.starts.count("g0") == 1  # deployed once

    asyncio.run(main())


def test_a_deploy_whose_group_never_starts_gives_up_at_the_start_timeout_and_kills_what_it_started():
    async def main():
        kv, world = FakeKVStore(), FakeLauncher()
        rec = reconciler(kv, world)
        rec.start_timeout_s = 0.05
        start_group = world.start_group

        async def pending(name, node, loads):  # g1's actor is never placed (no free GPU)
            if name == "g1":
                await asyncio.sleep(3600)
            return await start_group(name, node, loads)

        world.start_group = pending
        groups = {f"g{k}": (NODES[k], {0: [k]}) for k in range(3)}
        with pytest.raises(StepError, match="deploy-1 failed at start"):
            await rec.submit(_deploy(groups, {"secret": "s"}))
        state = StateStore(kv, "m").load()
        assert state.groups == {} and state.copies == {} and state.intent is None and state.epoch == 0
        assert not world.actors["g0"].alive and not world.actors["g2"].alive and not rec.lock.locked()

    asyncio.run(main())


def test_a_controller_that_stops_mid_deploy_rolls_it_back_when_it_comes_back():
    async def main():
        kv, world = FakeKVStore(), FakeLauncher()
        rec = reconciler(kv, world)
        groups = {f"g{k}": (NODES[k], {0: [k]}) for k in range(3)}
        run_step = rec._run_step

        async def crash_at_publish(intent, verifier):  # the controller ends there: groups started, nothing published
            if intent.step == "publish":
                raise FakeCrash()
            await run_step(intent, verifier)

        rec._run_step = crash_at_publish
        with pytest.raises(FakeCrash):
            await rec.submit(_deploy(groups, {"secret": "s"}))
        assert StateStore(kv, "m").load().intent.step == "publish"
        again = reconciler(kv, world)
        again.adopt(StateStore(kv, "m").load())
        await again.resume()
        assert again.state.intent is None and again.state.groups == {}
        assert not any(actor.alive for actor in world.actors.values())

    asyncio.run(main())


def test_router_registration_and_the_autoscale_toggle_are_changes_recorded_under_the_lock():
    async def main():
        kv, world, rec = await started()
        world.router_actors["r2"] = FakeRouterActor(world)
        async with rec.lock:  # a change in progress: neither lands between its steps
            registering = asyncio.ensure_future(rec.add_router("r2", world.router_actors["r2"], 3))
            toggling = asyncio.ensure_future(rec.set_autoscale(True))
            await asyncio.sleep(0.01)
            assert not registering.done() and not toggling.done() and rec.state.routers == {"r0": 1, "r1": 2}
        assert await registering and await toggling
        state = StateStore(kv, "m").load()
        assert state.routers == {"r0": 1, "r1": 2, "r2": 3} and state.autoscale and state.intent is None
        assert [c.split("-")[0] for c in state.applied] == ["router", "autoscale"]
        assert world.router_actors["r2"].epoch_ == rec.table.epoch
        assert await rec.set_autoscale(True) == ""  # already on: no change

    asyncio.run(main())


def test_groups_found_dead_while_a_restore_settles_join_it():
    """A node's groups die over a few rounds: the ones seen dead during the restore's settle wait
    come back in the same change (one start step for all), not in a second one after it."""
    async def main():
        kv, world, rec = await started()
        settles = []

        async def settle(seconds):  # the next round runs during the first restore's wait
            settles.append(seconds)
            if len(settles) == 1:
                world.actors["g2"].die()
                await rec.observe()

        rec.sleep, rec.restart_settle_s = settle, 1.0
        world.actors["g0"].die()
        first = await rec.round()
        await asyncio.gather(*first)
        assert sorted(world.starts) == ["g0", "g2"] and settles[0] == 1.0
        restarts = [i for i in rec.state.applied if i.startswith("restart-")]
        assert len(restarts) == 1, restarts
        await converge(rec)
        assert sorted(world.starts) == ["g0", "g2"]  # nothing restarted twice
        assert_converged(rec, world)

    asyncio.run(main())


def test_close_cancels_a_restart_in_flight_and_nothing_is_written_after_it():
    async def main():
        kv, world, rec = await started()
        gate = asyncio.Event()
        start_group = world.start_group

        async def slow_start(name, node, loads):
            await gate.wait()
            return await start_group(name, node, loads)

        world.start_group = slow_start
        world.actors["g1"].alive = False
        tasks = await rec.round()
        await asyncio.sleep(0.01)  # the restart waits in its start
        await rec.close()
        kv.data.clear()  # the controller deletes the state
        gate.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert kv.data == {} and all(t.done() for t in tasks)

    asyncio.run(main())
