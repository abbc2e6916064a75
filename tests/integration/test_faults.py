"""The fault matrix: controller, router and group faults under continuous load from 3 callers on
a real cluster (the session's 3 nodes and a 4th, far one: 30 ms emulated link), every answer checked
against the old and the new weights of layer 0.

A kill "mid-change" fires at a named step through the reconciler's crash hook (the controller
process exits right before that step, Ray restarts it); the test reads the persisted intent to
confirm where it stopped. For each fault: no failed request (every expert has a second copy), no
answer equal to neither reference or served by an epoch whose weights it does not match, and the
desired copies restored. Times to converge are printed (run with -s; tests/run_fault_matrix.sh).
"""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
import ray
import torch

from experts import MoELayer
from cluster.links import EmulatedLinks
from experts.links import LINK_DELAY_LABEL
from mesh.handles import NAMESPACE
from mesh.state import MeshState
from mesh.store import GcsKVStore, StateStore
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from tests.integration.mesh_helpers import SMALL, Load, load_gate, rel_err, small_checkpoints, swapped_reference

TOKEN = "faults-token"
ALL = list(range(SMALL["num_local_experts"]))
CASE_S = 45  # each case converges well within this


class World:
    def __init__(self, cluster, mesh, old, new, far_node):
        self.cluster, self.mesh, self.old, self.new, self.far_node = cluster, mesh, old, new, far_node
        self.x = torch.randn(16, SMALL["hidden_size"], generator=torch.Generator().manual_seed(21))
        self.refs = {"old": MoELayer.from_pretrained(old, layer=0)(self.x),
                     "new": swapped_reference(old, new, ALL, self.x)}
        assert rel_err(self.refs["old"], self.refs["new"]) > 1e-2
        self.admin = pb_grpc.MeshAdminStub(grpc.insecure_channel(mesh.addresses[1]))
        self.serving = "old"  # which weights layer 0 serves now


@pytest.fixture(scope="module")
def world(ray_cluster, meshes, tmp_path_factory):
    old, new = small_checkpoints(tmp_path_factory.mktemp("faults"), old=0, new=5).values()
    far = ray_cluster.add_node(num_cpus=2, labels={LINK_DELAY_LABEL: "30"})
    ray_cluster.wait_for_nodes()
    mesh = meshes.get(old, key="faults", group_factory=EmulatedLinks(), admin_token=TOKEN, num_routers=2,
                      drain_s=0.5, placement_balance=1.0,
                      groups={"replicas": 2, "num_groups": 4}, router={"load_window_s": 5})
    yield World(ray_cluster, mesh, old, new, far.node_id)
    meshes.stop("faults")


# -- helpers -----------------------------------------------------------------------------------------

def _arm(controller, kind: str, step: str) -> None:
    """Runs inside the controller: exit the process right before `step` of the next `kind` change,
    keeping a copy of the snapshot persisted at that moment (the restarted controller resumes at
    once and moves on)."""
    run_step = controller.rec._run_step

    async def crash_before_the_step(intent, verifier):
        if intent.kind == kind and intent.step == step:
            kv = controller.store.kv
            kv.put(controller.store.key + "/at-crash", kv.get(controller.store.key))
            os._exit(1)
        await run_step(intent, verifier)
    controller.rec._run_step = crash_before_the_step


def crash_at(w: World, kind: str, step: str) -> None:
    ray.get(w.mesh.controller.__ray_call__.remote(_arm, kind, step))


def persisted(w: World) -> MeshState:
    return StateStore(GcsKVStore(NAMESPACE), w.mesh.name).load()


def persisted_at_crash(w: World) -> MeshState:
    store = StateStore(GcsKVStore(NAMESPACE), w.mesh.name)
    return MeshState.decode(store.kv.get(store.key + "/at-crash"))


def crash_during(w: World, kind: str, step: str, published: bool, call) -> MeshState:
    """`call()` (an admin RPC) with the controller set to exit right before `step` of a `kind`
    change: the call fails; returns the snapshot persisted at the crash, checked to name that step."""
    crash_at(w, kind, step)
    with pytest.raises(grpc.RpcError):
        call()
    state = persisted_at_crash(w)
    assert (state.intent.kind, state.intent.step, state.intent.published) == (kind, step, published)
    return state


def status(w: World) -> dict | None:
    try:
        return w.mesh.status()
    except ray.exceptions.RayError:  # the controller is restarting
        return None


def converged(w: World, copies: int = 2) -> bool:
    """No change in progress, every group alive, every router at the epoch in force, and every
    expert of layer 0 routed to `copies` copies."""
    s = status(w)
    return (s is not None and s["change"] is None and not s["dead_groups"] and not s["routers_behind"]
            and all(g["alive"] for g in s["groups"]) and all(n == copies for n in s["copies"].values()))


def wait(predicate, timeout_s: float = CASE_S, period_s: float = 0.1) -> float:
    """Seconds until `predicate()` held."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if predicate():
            return time.perf_counter() - start
        time.sleep(period_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def actual_matches_desired(w: World) -> None:
    """What each group actor holds (its own info) is what the desired state names, nothing staged."""
    s = w.mesh.status()
    for g in s["groups"]:
        info = ray.get(ray.get_actor(g["name"], namespace=NAMESPACE).info.remote())
        held = {int(l): e for l, e in info["experts"].items() if e}
        assert held == {int(l): e for l, e in g["experts"].items() if e}, g["name"]
        assert {int(l): v for l, v in info["versions"].items() if v} == {int(l): v for l, v in g["versions"].items() if v}
        assert not any(info["staged"].values()), (g["name"], info["staged"])


def check_answers(load: Load, w: World, flip_epoch: int | None = None, before: str = "old", after: str = "new"):
    """No failure, nothing equal to neither reference; with `flip_epoch`, answers served before it
    match `before` and from it on `after`."""
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0, load.lost()
    assert len(load.answers) > 10, load.lost()
    if flip_epoch is not None:
        misfits = [(k, e) for k, e in load.answers if k != (after if e >= flip_epoch else before)]
        assert not misfits, (flip_epoch, misfits[:5])


def report(case: str, seconds: float) -> None:
    print(f"\nfault {case}: converged in {seconds:.2f} s")


def kill_group(w: World, index: int):
    """Kill group `index`; returns a predicate: a new incarnation of it serves and all converged."""
    name = f"{w.mesh.name}/group-{index}"
    before = next(g["endpoint"] for g in w.mesh.status()["groups"] if g["name"] == name)
    ray.kill(ray.get_actor(name, namespace=NAMESPACE))

    def restored() -> bool:
        s = status(w)
        endpoint = next((g["endpoint"] for g in s["groups"] if g["name"] == name), before) if s else before
        return endpoint not in (before, "") and converged(w)
    return restored


# -- the matrix ----------------------------------------------------------------------------------------

def test_a_controller_killed_mid_scale_rolls_back(world):
    w = world
    wait(lambda: converged(w))
    with Load(w.mesh.addresses, w.x, w.refs) as load:
        crash_during(w, "scale", "publish", False,
                     lambda: w.admin.Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=1, replicas=3)))
        seconds = wait(lambda: converged(w))
    report("(a) controller killed mid-scale", seconds)
    check_answers(load, w)
    assert load.counts["old"] > 0
    actual_matches_desired(w)  # the copy loaded for the scale was released


def test_b_controller_killed_mid_swap_after_staging_rolls_back(world):
    w = world
    with Load(w.mesh.addresses, w.x, w.refs) as load:
        crash_during(w, "swap", "publish", False,
                     lambda: w.admin.Swap(pb.SwapRequest(token=TOKEN, layer=0, experts=ALL, source_dir=str(w.new))))
        seconds = wait(lambda: converged(w))
        time.sleep(0.5)
    report("(b) controller killed mid-swap after staging", seconds)
    check_answers(load, w)
    assert load.counts["new"] == 0  # traffic never saw the staged weights
    assert w.mesh.status()["sources"] == {}
    actual_matches_desired(w)  # staged weights dropped


def test_c_controller_killed_mid_swap_after_the_flip_rolls_forward(world):
    w = world
    with Load(w.mesh.addresses, w.x, w.refs) as load:
        flip = crash_during(w, "swap", "drain", True, lambda: w.admin.Swap(pb.SwapRequest(
            token=TOKEN, layer=0, experts=ALL, source_dir=str(w.new)))).epoch
        seconds = wait(lambda: converged(w))
        time.sleep(0.5)
    w.serving = "new"
    report("(c) controller killed mid-swap after the flip", seconds)
    check_answers(load, w, flip_epoch=flip)
    assert set(w.mesh.status()["sources"].values()) == {str(w.new)}
    actual_matches_desired(w)  # committed: the new weights are the current ones, nothing staged


def test_d_controller_killed_mid_rebalance_rolls_forward(world):
    w = world
    far = {e for g in w.mesh.status()["groups"] if g["node"] == w.far_node for e in g["experts"]["0"]}
    candidates = torch.randn(20000, SMALL["hidden_size"], generator=torch.Generator().manual_seed(2))
    picks = load_gate(w.old, 0)(candidates)[1]
    hot = candidates[torch.isin(picks, torch.tensor(sorted(far))).all(dim=1)][:16]  # tokens for far experts
    refs = {"new": swapped_reference(w.old, w.new, ALL, hot)}
    with Load(w.mesh.addresses, hot, refs) as load:
        time.sleep(3)  # the routers' load window fills
        crash_during(w, "rebalance", "release", True, lambda: w.admin.Rebalance(pb.RebalanceRequest(token=TOKEN)))
        seconds = wait(lambda: converged(w))
    report("(d) controller killed mid-rebalance", seconds)
    assert load.counts["failed"] == 0 and load.counts["wrong"] == 0 and load.counts["new"] > 10, load.lost()
    moved = {e for g in w.mesh.status()["groups"] if g["node"] == w.far_node for e in g["experts"]["0"]}
    assert moved != far  # hot copies left the far node
    actual_matches_desired(w)  # the copies left behind were released by the resumed change


def test_e_group_killed_during_a_swap_restores_with_the_swapped_weights(world):
    w = world
    replies = []
    with Load(w.mesh.addresses, w.x, w.refs) as load:
        swap = threading.Thread(target=lambda: replies.append(w.admin.Swap(pb.SwapRequest(
            token=TOKEN, layer=0, experts=ALL, source_dir=str(w.old)))))
        swap.start()
        wait(lambda: (status(w) or {}).get("change") and status(w)["change"]["step"] == "drain", period_s=0.05)
        flip = persisted(w).epoch  # the epoch the swap published
        start = time.perf_counter()
        restored = kill_group(w, 2)
        swap.join()
        wait(restored)
        seconds = time.perf_counter() - start
        time.sleep(0.5)
    w.serving = "old"
    report("(e) group killed during a swap", seconds)
    assert replies[0].ok
    check_answers(load, w, flip_epoch=flip, before="new", after="old")
    assert set(w.mesh.status()["sources"].values()) == {str(w.old)}
    actual_matches_desired(w)


def test_f_swap_then_controller_restart_then_group_kill_serves_the_new_weights(world):
    w = world
    with Load(w.mesh.addresses, w.x, w.refs) as load:
        reply = w.admin.Swap(pb.SwapRequest(token=TOKEN, layer=0, experts=ALL, source_dir=str(w.new)))
        wait(lambda: converged(w))
        epoch = reply.epoch
        start = time.perf_counter()
        ray.kill(w.mesh.controller, no_restart=False)
        adopted = wait(lambda: (status(w) or {"epoch": 0})["epoch"] > epoch)
        report("(f) controller restart adopted", adopted)
        start = time.perf_counter()
        wait(kill_group(w, 1))
        seconds = time.perf_counter() - start
        time.sleep(1)
    w.serving = "new"
    report("(f) group restored after the controller restart", seconds)
    check_answers(load, w, flip_epoch=reply.epoch, before="old", after="new")
    assert load.answers[-1][0] == "new"
    actual_matches_desired(w)  # the restored group holds the swapped versions


def _drop_next_push(controller, router: str) -> None:
    handle = controller.rec.routers[router]
    original = handle.set_table

    async def dropped(blob):
        handle.set_table = original
        controller.dropped_at = time.time()
        raise ConnectionError("table push dropped (test)")
    handle.set_table = dropped


def _dropped_at(controller) -> float | None:
    return getattr(controller, "dropped_at", None)


def test_g_a_router_that_missed_a_push_resyncs(world):
    w = world
    router = f"{w.mesh.name}/router-1"
    with Load(w.mesh.addresses, w.x, w.refs) as load:
        ray.get(w.mesh.controller.__ray_call__.remote(_drop_next_push, router))
        reply = w.admin.Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=0, replicas=3))
        dropped_at = ray.get(w.mesh.controller.__ray_call__.remote(_dropped_at))
        assert dropped_at is not None  # it missed the push of the scale's table
        wait(lambda: ray.get(w.mesh.routers[1].epoch.remote()) >= reply.epoch, period_s=0.02)
        seconds = time.time() - dropped_at  # an upper bound: it may have resynced before we looked
        assert w.admin.Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=0, replicas=2)).ok
        wait(lambda: converged(w))
    report("(g) stale router resynced", seconds)
    check_answers(load, w)


def test_h_a_killed_router_fails_over_and_comes_back_on_its_port(world):
    w = world
    with Load(w.mesh.addresses, w.x, w.refs) as load:
        time.sleep(0.5)
        start = time.perf_counter()
        ray.kill(w.mesh.routers[0], no_restart=False)  # the process dies; Ray restarts the actor
        wait(lambda: _router_epoch(w.mesh.routers[0]) in (None, -1), period_s=0.02)  # gone, or back unbound
        wait(lambda: _router_epoch(w.mesh.routers[0]) == w.mesh.status()["epoch"], period_s=0.2)
        seconds = time.perf_counter() - start
        address = _retry(lambda: ray.get(w.mesh.routers[0].start.remote(), timeout=5))
        time.sleep(0.5)
    report("(h) killed router back on its port", seconds)
    assert address == w.mesh.addresses[0]
    check_answers(load, w)
    from router_service import MeshClient
    with MeshClient(w.mesh.addresses[0]) as client:  # it serves again on its own port
        assert rel_err(client.forward(0, w.x), w.refs[w.serving]) <= 1e-5


def _retry(call, attempts: int = 10):
    """`call()`, retried while Ray reports the actor restarting (a stale connection after the kill)."""
    for _ in range(attempts - 1):
        try:
            return call()
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.2)
    return call()


def _router_epoch(router) -> int | None:
    try:
        return ray.get(router.epoch.remote(), timeout=5)
    except (ray.exceptions.RayError, TimeoutError):  # restarting
        return None


def _fail_next_observe(controller) -> None:
    original = controller.rec.observe

    async def failing():
        controller.rec.observe = original
        raise RuntimeError("injected fault in a health round (test)")
    controller.rec.observe = failing


def test_i_an_exception_in_a_health_round_does_not_end_health_checks(world):
    w = world
    with Load(w.mesh.addresses, w.x, w.refs) as load:
        ray.get(w.mesh.controller.__ray_call__.remote(_fail_next_observe))
        time.sleep(1.5)  # the failing round has run
        start = time.perf_counter()
        wait(kill_group(w, 0))
        seconds = time.perf_counter() - start
    report("(i) group restored after a failed health round", seconds)
    check_answers(load, w)
    actual_matches_desired(w)


def test_j_a_removed_node_holding_one_of_two_copies(world):
    w = world
    victims = [g["name"] for g in w.mesh.status()["groups"] if g["node"] == w.far_node]
    assert victims
    with Load(w.mesh.addresses, w.x, w.refs) as load:
        start = time.perf_counter()
        w.cluster.remove_node(next(n for n in w.cluster.worker_nodes if n.node_id == w.far_node),
                              allow_graceful=False)
        wait(lambda: converged(w) and all(g["node"] != w.far_node for g in w.mesh.status()["groups"]))
        seconds = time.perf_counter() - start
    report("(j) groups of a removed node restored elsewhere", seconds)
    check_answers(load, w)
    for expert in ALL:  # the two copies of every expert on two nodes again
        nodes = [g["node"] for g in w.mesh.status()["groups"] if expert in g["experts"]["0"]]
        assert len(set(nodes)) == 2, (expert, nodes)
    actual_matches_desired(w)


def _slow_observations(controller, misses: int) -> None:
    """Runs inside the controller: every group's next `misses` observations outlast group_timeout_s,
    all at once (one slow round after another, as an overloaded controller or a stalled network sees
    them); the groups themselves keep serving."""
    import asyncio

    class Slow:
        def __init__(self, handle):
            self.handle, self.left = handle, misses

        def __getattr__(self, name):
            return getattr(self.handle, name)

        async def info(self):
            if self.left > 0:
                self.left -= 1
                await asyncio.sleep(controller.config.group_timeout_s + 1)
            return await self.handle.info()
    controller.rec.groups = {name: Slow(handle) for name, handle in controller.rec.groups.items()}


def test_k_slow_observation_rounds_on_every_group_kill_nothing(world):
    """Two rounds in a row in which no group answers in time: every group SUSPECT, none declared dead
    (failure_threshold 3), none restarted, no caller failed; then all answer and none is suspect."""
    w = world
    before = {g["name"]: g["endpoint"] for g in w.mesh.status()["groups"]}
    suspects_seen: set[str] = set()

    def all_suspect() -> bool:
        suspects_seen.update(status(w)["suspect_groups"])
        return suspects_seen == set(before)

    with Load(w.mesh.addresses, w.x, w.refs) as load:
        ray.get(w.mesh.controller.__ray_call__.remote(_slow_observations, 2))
        wait(all_suspect)
        start = time.perf_counter()
        wait(lambda: converged(w) and not status(w)["suspect_groups"])
        seconds = time.perf_counter() - start
    report("(k) slow observation rounds: every group suspect, then answering", seconds)
    check_answers(load, w)
    assert {g["name"]: g["endpoint"] for g in w.mesh.status()["groups"]} == before  # nobody restarted
    ray.get(w.mesh.controller.__ray_call__.remote(
        lambda c: setattr(c.rec, "groups", {n: getattr(h, "handle", h) for n, h in c.rec.groups.items()})))


PACKED = dict(SMALL, hidden_size=768, intermediate_size=2048, num_local_experts=4)  # groups pack and thread


def test_l_a_swap_under_load_at_a_size_groups_pack_and_thread(ray_cluster, meshes, tmp_path_factory):
    """The hot swap at H=768, I=2048 (18.9 MB an expert, fp32: groups pack their weights and compute
    in threads), every expert on 2 groups, 3 callers throughout: no failure, no answer equal to
    neither reference, every answer before the flip's epoch the old weights' and from it the new's."""
    from experts.builtin import build_model, save_checkpoint

    root = tmp_path_factory.mktemp("packed")
    old, new = (save_checkpoint(build_model("mixtral", seed=seed, **PACKED), root / name)
                for name, seed in (("old", 0), ("new", 5)))
    experts = list(range(PACKED["num_local_experts"]))
    x = torch.randn(16, PACKED["hidden_size"], generator=torch.Generator().manual_seed(3))
    refs = {"old": MoELayer.from_pretrained(old, layer=0)(x), "new": swapped_reference(old, new, experts, x)}
    mesh = meshes.get(old, key="packed", admin_token=TOKEN, drain_s=0.5, groups={"replicas": 2, "num_groups": 2})
    admin = pb_grpc.MeshAdminStub(grpc.insecure_channel(mesh.address))
    try:
        with Load(mesh.addresses, x, refs) as load:
            time.sleep(1.0)
            start = time.perf_counter()
            reply = admin.Swap(pb.SwapRequest(layer=0, experts=experts, source_dir=str(new)), timeout=120,
                               metadata=[("authorization", f"Bearer {TOKEN}")])
            seconds = time.perf_counter() - start
            time.sleep(1.0)
        report(f"(l) swap of {len(experts)} experts of 18.9 MB under load, returned", seconds)
        assert reply.ok, reply.message
        assert load.counts["failed"] == 0 and load.counts["wrong"] == 0, load.lost()
        misfits = [(k, e) for k, e in load.answers if k != ("new" if e >= reply.epoch else "old")]
        assert not misfits and load.counts["old"] > 0 and load.counts["new"] > 0, (reply.epoch, misfits[:5])
    finally:
        meshes.stop("packed")


def _pending_starts(controller, times: int, timeout_s: float) -> None:
    """Runs inside the controller: the next `times` group starts wait on an actor that no node can
    place (it asks for a resource none has), as a start does on a cluster with no free GPU, and time
    out after `timeout_s`; the starts after them run with the mesh's own start timeout (a real start
    takes 4-6 s on 2 busy cores). times=0 puts everything back."""
    import ray

    launcher, left = controller.rec.launcher, [times]
    start_group = getattr(launcher.start_group, "original", launcher.start_group)
    configured_s = getattr(launcher.start_group, "configured_s", controller.rec.start_timeout_s)

    async def start(name, node, loads):
        if left[0] > 0:
            left[0] -= 1
            blocker = ray.remote(num_cpus=0, resources={"no-such-device": 1})(_Unplaceable).remote()
            try:
                await blocker.ping.remote()  # pending until the reconciler's start timeout cancels it
            finally:
                ray.kill(blocker)
                if not left[0]:
                    controller.rec.start_timeout_s = configured_s
        return await start_group(name, node, loads)
    start.original, start.configured_s = start_group, configured_s
    launcher.start_group = start
    controller.rec.start_timeout_s = timeout_s if times else configured_s


class _Unplaceable:
    def ping(self) -> None:
        pass


def test_m_a_pending_group_start_blocks_no_later_change(world):
    """A killed group's restart waits on an actor no node can place: it gives up after the start
    timeout (4 s here), a scale asked for meanwhile goes through, and the next round restores the
    group. No caller fails: every expert has a second copy."""
    w = world
    timeout_s = 4.0
    ray.get(w.mesh.controller.__ray_call__.remote(_pending_starts, 1, timeout_s))
    try:
        with Load(w.mesh.addresses, w.x, w.refs) as load:
            restored = kill_group(w, 0)
            wait(lambda: ((s := status(w)) or {}).get("change") and s["change"]["kind"] == "restart")
            start = time.perf_counter()
            reply = w.admin.Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=1, replicas=3), timeout=60)
            scale_s = time.perf_counter() - start
            assert reply.ok, reply.message
            assert scale_s < timeout_s + 15, scale_s
            assert w.admin.Scale(pb.ScaleRequest(token=TOKEN, layer=0, expert=1, replicas=2), timeout=60).ok
            seconds = wait(restored)
        report(f"(m) a pending group start: a scale waited {scale_s:.1f} s (start timeout {timeout_s:.0f} s); "
               f"restored after", seconds)
        check_answers(load, w)
        actual_matches_desired(w)
    finally:
        ray.get(w.mesh.controller.__ray_call__.remote(_pending_starts, 0, 0.0))
