"""What `mesh status` shows: the controller's view of its mesh as one msgpack-able dict. Pure: the
controller hands over the reconciler's state and what it measured.
"""

from __future__ import annotations

from mesh.load import Load, by_name
from mesh.placement import shared_nodes

__all__ = ["held_lists", "status_report"]


def held_lists(named: dict[tuple[int, int], str]) -> dict:
    """{"experts": {"layer": [experts ascending]}, "versions": {"layer": [their versions]}} of one
    group's named copies ((layer, expert) -> version), the snapshot's form."""
    experts: dict[str, list[int]] = {}
    versions: dict[str, list[str]] = {}
    for (layer, expert), version in sorted(named.items()):
        experts.setdefault(str(layer), []).append(expert)
        versions.setdefault(str(layer), []).append(version)
    return {"experts": experts, "versions": versions}


def status_report(rec, header: dict, load: Load, direct_clients: list[dict]) -> dict:
    """`header` (mesh, model, model_type, uptime_s) + the reconciler `rec`'s groups (name, node,
    endpoint, device and weight bytes held, experts per layer, versions, alive, suspect), routers,
    copies per expert in the table, tokens per expert since start and tokens/s over the load window,
    direct clients, the change in progress and what has not converged yet."""
    tokens, rates, _ = load
    state, seen, named = rec.state, rec.seen, rec.named()
    groups = [{"name": n, "node": node, "endpoint": seen[n].endpoint if n in seen else "", "alive": n in seen,
               "suspect": n in rec.verdict.suspect, "device": seen[n].device if n in seen else "",
               "nbytes": seen[n].nbytes if n in seen else 0, **held_lists(named.get(n, {}))}
              for n, node in state.groups.items()]
    copies = {f"{l}/{e}": len(c) for l, experts in rec.table.layers.items() for e, c in enumerate(experts)}
    return {
        **header, "epoch": rec.epoch, "revision": state.revision, "autoscale": state.autoscale, "groups": groups,
        "routers": list(rec.routers), "copies": copies, "direct_clients": direct_clients,
        "last_push": rec.last_push,
        "sources": {f"{l}/{e}": rs[0].source for (l, e), rs in state.copies.items() if rs[0].source},
        "tokens_per_expert": by_name(tokens), "tokens_per_s": by_name(rates), **rec.pending(),
        "copies_sharing_a_node": [f"{l}/{e}" for l, e in shared_nodes(
            {key: [r.group for r in rs] for key, rs in state.copies.items()}, state.groups)],
    }
