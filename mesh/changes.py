"""Pure planning of the mesh's changes, and of what the routing table may name.

A change is an Intent (mesh/state.py) with one of these step lists:

    copies   (scale, autoscale, rebalance):  load -> connect -> publish -> drain -> release
    swap:                                    stage -> publish -> drain -> commit
    restart  (a dead or diverged group):     start -> connect -> publish
    deploy   (the first groups):              start -> adopt -> publish
    settings (autoscale on/off, a router):    record

"adopt": a deploy's copies are what its groups report holding (the model's own weights, at the
versions they read). "record": the settings are put in force and persisted, nothing else.
"connect": every router has a channel to each group that gains copies (the collective transport;
a restarted group's channels are opened anew) before the first table that routes to it.

A crash before "publish" rolls back (loaded copies released, staged weights dropped); at or after
it, the change rolls forward. The table names only copies the desired state names *and* the group
was seen to hold at that version (served or staged): no table names weights that are not loaded.
No Ray, no clock.
"""

from __future__ import annotations

import dataclasses

from mesh.state import Intent, MeshState, Replica, held_by
from protos.collector import paused_gc
from router_service.routing import Copy

__all__ = ["GroupView", "STEPS", "Tidy", "adopted", "named_versions", "plan_copies", "plan_deploy", "plan_restart",
           "plan_settings", "plan_swap", "published_state", "rows_match", "table_layers", "tidy"]

STEPS = {"copies": ("load", "connect", "publish", "drain", "release"),
         "swap": ("stage", "publish", "drain", "commit"),
         "restart": ("start", "connect", "publish"),
         "deploy": ("start", "adopt", "publish"),
         "settings": ("record",)}

Assignment = dict[str, dict[int, list[int]]]  # {group: {layer: experts}}


@dataclasses.dataclass(frozen=True)
class GroupView:
    """What one group was seen to hold (its `info()`): (layer, expert) -> version, served and staged."""

    endpoint: str
    held: dict[tuple[int, int], str]
    staged: dict[tuple[int, int], str] = dataclasses.field(default_factory=dict)
    device: str = ""   # where its experts compute ("cpu", "cuda:0")
    nbytes: int = 0    # expert weight bytes it holds

    def serves(self, layer: int, expert: int, version: str) -> bool:
        return version in (self.held.get((layer, expert)), self.staged.get((layer, expert)))


def plan_copies(state: MeshState, plan: Assignment, kind: str, change_id: str) -> Intent | None:
    """The change that brings the copies of `state` to `plan` (only groups in `plan` change).
    New copies serve the expert's source and version in force. None: nothing to change."""
    current = held_by(state.copies)
    adds: dict[tuple[str, int, str | None], list[int]] = {}
    releases: dict[tuple[str, int], list[int]] = {}
    target: dict[tuple[int, int], list[Replica]] = {}
    for group, layers in plan.items():
        for layer in sorted(set(layers) | set(current.get(group, {}))):
            now, then = set(current.get(group, {}).get(layer, [])), set(layers.get(layer, []))
            for expert in sorted(then - now):
                source = state.source(layer, expert)
                adds.setdefault((group, layer, source), []).append(expert)
                target.setdefault((layer, expert), list(state.copies[(layer, expert)])).append(
                    Replica(group, source, state.version(layer, expert)))
            for expert in sorted(now - then):
                releases.setdefault((group, layer), []).append(expert)
                replicas = target.setdefault((layer, expert), list(state.copies[(layer, expert)]))
                replicas[:] = [r for r in replicas if r.group != group]
    if not target:
        return None
    empty = sorted(key for key, replicas in target.items() if not replicas)
    if empty:
        raise ValueError(f"the plan leaves (layer, expert) {empty} without a copy")
    return Intent(change_id, kind, STEPS["copies"],
                  loads=tuple((g, l, tuple(e), s) for (g, l, s), e in sorted(adds.items(), key=_by_group)),
                  releases=tuple((g, l, tuple(e)) for (g, l), e in sorted(releases.items())),
                  target={key: tuple(sorted(r, key=lambda r: r.group)) for key, r in target.items()},
                  summary=f"{sum(len(e) for e in adds.values())} copies added, "
                          f"{sum(len(e) for e in releases.values())} removed")


def plan_swap(state: MeshState, layer: int, versions: dict[int, str], source: str, live: set[str],
              change_id: str) -> Intent | None:
    """Hot swap of `layer`'s experts to `source` (`versions`: expert -> its version there). Live
    holders stage the new weights; every copy, live or not, serves them once published (a dead
    holder restarts with them). None when every expert already serves that version."""
    experts = sorted(e for e, v in versions.items() if any(r.version != v or r.source != source
                                                          for r in state.copies[(layer, e)]))
    if not experts:
        return None
    target = {(layer, e): tuple(Replica(r.group, source, versions[e]) for r in state.copies[(layer, e)])
              for e in experts}
    holders: dict[str, list[int]] = {}
    for e in experts:
        for r in state.copies[(layer, e)]:
            if r.group in live:
                holders.setdefault(r.group, []).append(e)
    return Intent(change_id, "swap", STEPS["swap"],
                  loads=tuple((g, layer, tuple(e), source) for g, e in sorted(holders.items())),
                  target=target, summary=f"layer {layer} experts {experts} -> {source}")


def plan_restart(state: MeshState, nodes: dict[str, str], change_id: str) -> Intent:
    """(Re)start each group of `nodes` (group -> node) with the copies the desired state names for
    it, each from its source: a lost node's groups come back as one change."""
    held, all_loads = held_by(state.copies), []
    for group in sorted(nodes):
        loads: dict[tuple[int, str | None], list[int]] = {}
        for layer, experts in held.get(group, {}).items():
            for expert in experts:
                loads.setdefault((layer, state.source(layer, expert)), []).append(expert)
        all_loads += [(group, l, tuple(e), s) for (l, s), e in sorted(loads.items(), key=_by_layer)]
    where = ", ".join(f"{g} on node {n[:12]}" for g, n in sorted(nodes.items()))
    return Intent(change_id, "restart", STEPS["restart"], loads=tuple(all_loads), nodes=dict(nodes),
                  summary=f"restart {where}")


def plan_deploy(groups: dict[str, tuple[str, dict[int, list[int]]]], settings: dict, change_id: str) -> Intent:
    """Start every group (name -> (node, {layer: experts}), the model's own weights) and publish
    epoch 1 with the copies they report; `settings`: the desired state's other fields (autoscale, secret)."""
    loads = tuple((g, l, tuple(e), None) for g, (_, held) in groups.items() for l, e in sorted(held.items()))
    return Intent(change_id, "deploy", STEPS["deploy"], loads=loads, nodes={g: node for g, (node, _) in groups.items()},
                  settings=dict(settings), summary=f"deploy {len(groups)} groups")


def adopted(nodes: dict[str, str], seen: dict[str, GroupView]) -> dict[tuple[int, int], tuple[Replica, ...]]:
    """The copies the groups of `nodes` were seen holding, in `nodes`' order (a deploy's target)."""
    copies: dict[tuple[int, int], list[Replica]] = {}
    for group in nodes:
        for (layer, expert), version in sorted(seen[group].held.items()):
            copies.setdefault((layer, expert), []).append(Replica(group, None, version))
    return {key: tuple(replicas) for key, replicas in copies.items()}


def plan_settings(state: MeshState, kind: str, change_id: str, **settings) -> Intent | None:
    """A change of the desired state's other fields (autoscale=, routers=) that takes no step but
    its recording. None when they already hold those values."""
    changed = {k: v for k, v in settings.items() if getattr(state, k) != v}
    if not changed:
        return None
    return Intent(change_id, kind, STEPS["settings"], settings=changed, summary=f"{kind}: {sorted(changed)} set")


def published_state(state: MeshState, intent: Intent) -> MeshState:
    """`state` once `intent` publishes: its target copies in force, moved groups on their nodes, its settings set."""
    return state.replace(copies={**state.copies, **intent.target}, groups={**state.groups, **intent.nodes},
                         intent=dataclasses.replace(intent, flipped=True), **intent.settings)


def table_layers(state: MeshState, seen: dict[str, GroupView], moe_layers: list[int],
                 num_experts: int) -> dict[int, list[list[Copy]]]:
    """layer -> expert -> copies for the routing table: the desired copies whose group was seen
    serving (or staging) exactly that version."""
    with paused_gc():
        layers: dict[int, list[list[Copy]]] = {l: [[] for _ in range(num_experts)] for l in moe_layers}
        for (layer, expert), replicas in state.copies.items():  # 30k copies at V3's shape: kept to one pass
            for r in replicas:
                view = seen.get(r.group)
                if view is not None and view.serves(layer, expert, r.version):
                    layers[layer][expert].append(Copy(r.group, view.endpoint, r.version))
    return layers


@dataclasses.dataclass(frozen=True)
class Tidy:
    """What brings live groups back in line with the desired state when no change runs."""

    release: tuple[tuple[str, int, tuple[int, ...]], ...] = ()  # copies nothing names
    commit: tuple[tuple[str, int], ...] = ()                     # staged weights the state names
    unstage: tuple[tuple[str, int], ...] = ()                    # staged weights nothing names
    restart: tuple[str, ...] = ()                                # live groups missing a named copy

    def __bool__(self) -> bool:
        return bool(self.release or self.commit or self.unstage or self.restart)


def named_versions(copies: dict[tuple[int, int], tuple[Replica, ...]]) -> dict[str, dict[tuple[int, int], str]]:
    """{group: {(layer, expert): version}} of the copies named."""
    named: dict[str, dict[tuple[int, int], str]] = {}
    for key, replicas in copies.items():
        for r in replicas:
            named.setdefault(r.group, {})[key] = r.version
    return named


def rows_match(layers: dict[int, list[list[Copy]]], group: str, named: dict[tuple[int, int], str],
               view: GroupView | None) -> bool:
    """Whether a table's rows of `group` are what `table_layers` makes of the copies `named` for it
    (its `named_versions`) and its `view`: the check of one group whose view changed."""
    for (layer, expert), version in named.items():
        want = [Copy(group, view.endpoint, version)] if view is not None and view.serves(layer, expert, version) else []
        if [c for c in layers[layer][expert] if c.group == group] != want:
            return False
    return True


def tidy(state: MeshState, seen: dict[str, GroupView]) -> Tidy:
    """Compare what live groups hold with what the desired state names (call with no change in progress)."""
    wanted = named_versions(state.copies)
    release, commit, unstage, restart = {}, set(), set(), []
    for group, view in sorted(seen.items()):
        named = wanted.get(group, {})
        for layer in sorted({l for l, _ in view.staged}):
            staged = {e: v for (l, e), v in view.staged.items() if l == layer}
            ok = all(named.get((layer, e)) == v for e, v in staged.items())
            (commit if ok else unstage).add((group, layer))
        for (layer, expert), version in sorted(view.held.items()):
            if (layer, expert) not in named:
                release.setdefault((group, layer), []).append(expert)
        committed = {**view.held, **{(l, e): v for (l, e), v in view.staged.items() if (group, l) in commit}}
        if any(committed.get(key) != v for key, v in named.items()):
            restart.append(group)
    return Tidy(tuple((g, l, tuple(e)) for (g, l), e in sorted(release.items())), tuple(sorted(commit)),
                tuple(sorted(unstage)), tuple(restart))


def _by_group(item):
    (group, layer, source), _ = item
    return group, layer, source or ""


def _by_layer(item):
    (layer, source), _ = item
    return layer, source or ""
