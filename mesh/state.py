"""The mesh's desired state, typed and pure (no Ray): what the controller persists before a change
takes effect, and what a restarted controller resumes from.

MeshState:  groups (name -> node), copies ((layer, expert) -> replicas, each with the weight source
            and version it must serve), autoscale on/off, routers (name -> port), the epoch of the last
            published routing table, a revision of its own, the change in progress (Intent) and the
            ids of the last changes done.
Intent:     one change as the planner made it (mesh/changes.py): its steps, the next one to run,
            what to load / stage / release, the copies in force once it publishes and the settings it sets.
            Every change of the desired state is one: deploy, scale, swap, restart, router
            registration and the autoscale toggle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
from protos.errors import StateError
from protos.collector import paused_gc

__all__ = ["COMMIT_STEPS", "Intent", "MeshState", "Replica", "SCHEMA", "held_by"]

SCHEMA = 1  # version of the persisted snapshot's layout
APPLIED_KEPT = 64  # change ids remembered, so that a repeated call is recognised
COMMIT_STEPS = ("publish", "record")  # the step of an Intent from which it rolls forward

Key = tuple[int, int]  # (layer, expert)


@dataclasses.dataclass(frozen=True, slots=True)
class Replica:
    """One copy of an expert that the desired state names: on `group`, weights from `source`
    (None: the model's own checkpoint), of weight `version` (sha256 prefix of the source bytes)."""

    group: str
    source: str | None
    version: str


@dataclasses.dataclass(frozen=True)
class Intent:
    """A change recorded before it takes effect, then carried out step by step.

    steps: the planner's step names in order, one of them "publish"; next_step: index of the step to
    run next (len(steps): done). loads: (group, layer, experts, source) to load ("load"), stage
    ("stage") or start with ("start"); releases: (group, layer, experts) to release after the drain.
    target: the copies of the (layer, expert)s this change touches, as they are once it publishes;
    nodes: groups that (re)start on another node; settings: other fields of the desired state it sets
    (autoscale, routers; a deploy's secret). A crash before "publish" ("record") rolls back; at or
    after it, rolls forward."""

    change_id: str
    kind: str
    steps: tuple[str, ...]
    next_step: int = 0
    loads: tuple[tuple[str, int, tuple[int, ...], str | None], ...] = ()
    releases: tuple[tuple[str, int, tuple[int, ...]], ...] = ()
    target: dict[Key, tuple[Replica, ...]] = dataclasses.field(default_factory=dict)
    nodes: dict[str, str] = dataclasses.field(default_factory=dict)
    summary: str = ""
    flipped: bool = False  # the publish step has put `target` in force (and persisted it)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # MeshState fields it sets

    @property
    def published(self) -> bool:
        """Whether the step that puts it in force ("publish", or "record" for a change that takes no
        other step) has started: from then on the change rolls forward."""
        commit = next(i for i, step in enumerate(self.steps) if step in COMMIT_STEPS)
        return self.flipped or self.next_step > commit

    @property
    def step(self) -> str | None:
        return self.steps[self.next_step] if self.next_step < len(self.steps) else None

    def advanced(self) -> "Intent":
        return dataclasses.replace(self, next_step=self.next_step + 1)


@dataclasses.dataclass(frozen=True)
class MeshState:
    revision: int = 0
    epoch: int = 0
    groups: dict[str, str] = dataclasses.field(default_factory=dict)           # group -> node id
    copies: dict[Key, tuple[Replica, ...]] = dataclasses.field(default_factory=dict)
    autoscale: bool = False
    routers: dict[str, int] = dataclasses.field(default_factory=dict)          # router -> port
    intent: Intent | None = None
    applied: tuple[str, ...] = ()
    secret: str = dataclasses.field(default="", repr=False)  # the data plane's (protos/serving.py); never shown

    def replace(self, **changes) -> "MeshState":
        """A new revision with `changes`."""
        return dataclasses.replace(self, revision=self.revision + 1, **changes)

    def with_intent(self, intent: Intent | None) -> "MeshState":
        return self.replace(intent=intent)

    def done(self, intent: Intent) -> "MeshState":
        """The intent is carried out: cleared and its id remembered."""
        return self.replace(intent=None, applied=(*self.applied, intent.change_id)[-APPLIED_KEPT:])

    def source(self, layer: int, expert: int) -> str | None:
        """The weight source every copy of (layer, expert) serves (None: the model's own)."""
        replicas = self.copies.get((layer, expert), ())
        return replicas[0].source if replicas else None

    def version(self, layer: int, expert: int) -> str:
        return self.copies[(layer, expert)][0].version

    # -- the persisted form (msgpack; tuple keys as "layer/expert") ---------------------------------

    def encode(self) -> bytes:
        return msgpack.packb({"schema": SCHEMA, "revision": self.revision, "epoch": self.epoch,
                              "groups": self.groups, "copies": _copies_out(self.copies),
                              "autoscale": self.autoscale, "routers": self.routers,
                              "intent": _intent_out(self.intent), "applied": list(self.applied),
                              "secret": self.secret})

    @classmethod
    def decode(cls, blob: bytes) -> "MeshState":
        with paused_gc():  # 30k replicas at V3's shape
            return cls._decode(blob)

    @classmethod
    def _decode(cls, blob: bytes) -> "MeshState":
        try:
            data = msgpack.unpackb(blob, strict_map_key=False)
            if data.get("schema") != SCHEMA:
                raise StateError(f"persisted mesh state has schema {data.get('schema')!r}, this code reads {SCHEMA}")
            return cls(revision=data["revision"], epoch=data["epoch"], groups=dict(data["groups"]),
                       copies=_copies_in(data["copies"]), autoscale=bool(data["autoscale"]),
                       routers=dict(data["routers"]), intent=_intent_in(data["intent"]),
                       applied=tuple(data["applied"]), secret=str(data.get("secret", "")))
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            if isinstance(exc, StateError):
                raise
            raise StateError(f"persisted mesh state does not decode: {exc!r}") from exc


def held_by(copies: dict[Key, tuple[Replica, ...]]) -> dict[str, dict[int, list[int]]]:
    """{group: {layer: experts ascending}} of the copies named."""
    held: dict[str, dict[int, list[int]]] = {}
    for (layer, expert), replicas in sorted(copies.items()):
        for r in replicas:
            held.setdefault(r.group, {}).setdefault(layer, []).append(expert)
    return held


def _copies_out(copies: dict[Key, tuple[Replica, ...]]) -> dict[str, list]:
    return {f"{l}/{e}": [(r.group, r.source, r.version) for r in rs] for (l, e), rs in copies.items()}


def _copies_in(data: dict[str, list]) -> dict[Key, tuple[Replica, ...]]:
    out = {}
    for key, replicas in data.items():
        layer, expert = (int(v) for v in key.split("/"))
        out[(layer, expert)] = tuple(Replica(*r) for r in replicas)
    return out


def _intent_out(intent: Intent | None) -> dict | None:
    if intent is None:
        return None
    return {"change_id": intent.change_id, "kind": intent.kind, "steps": list(intent.steps),
            "next_step": intent.next_step, "loads": [list(x) for x in intent.loads],
            "releases": [list(x) for x in intent.releases], "target": _copies_out(intent.target),
            "nodes": intent.nodes, "summary": intent.summary, "flipped": intent.flipped,
            "settings": intent.settings}


def _intent_in(data: dict | None) -> Intent | None:
    if data is None:
        return None
    return Intent(change_id=data["change_id"], kind=data["kind"], steps=tuple(data["steps"]),
                  next_step=data["next_step"],
                  loads=tuple((g, l, tuple(e), s) for g, l, e, s in data["loads"]),
                  releases=tuple((g, l, tuple(e)) for g, l, e in data["releases"]),
                  target=_copies_in(data["target"]), nodes=dict(data["nodes"]), summary=data["summary"],
                  flipped=bool(data["flipped"]), settings=dict(data.get("settings") or {}))
