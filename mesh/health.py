"""When an expert group counts as dead: evidence, not one slow answer. Pure policy.

A group is dead when Ray reports its actor dead (GroupGoneError), or after `failure_threshold`
consecutive observations it missed (Kubernetes' failureThreshold, Ray Serve's
health_check_failure_threshold). One that missed fewer is suspect: shown so in `mesh status`,
still routed. A round never declares more than `max_timeout_deaths` groups dead on missed
observations alone: when more cross the threshold together, the controller's own round is the
likelier culprit (a stalled process, a busy GCS), so it logs and waits for evidence instead.
"""

from __future__ import annotations

import collections
import dataclasses

__all__ = ["Verdict", "default_max_timeout_deaths", "judge"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    dead: list[str]       # drop from routing, restore
    suspect: list[str]    # missed an observation (or are held back): still routed as last seen
    held_back: list[str]  # past the threshold, but more of them than a round may declare dead on timeouts


def judge(missed: dict[str, int], gone: set[str], failure_threshold: int, max_timeout_deaths: int) -> Verdict:
    """missed: group -> consecutive observations it missed (this one included); gone: groups Ray
    reports dead. Groups in neither are healthy."""
    over = sorted(g for g, n in missed.items() if n >= failure_threshold and g not in gone)
    held_back = over if len(over) > max_timeout_deaths else []
    dead = sorted(gone) + ([] if held_back else over)
    suspect = sorted(g for g in missed if g not in dead)
    return Verdict(dead, suspect, held_back)


def default_max_timeout_deaths(groups: dict[str, str]) -> int:
    """The groups of the most crowded node, plus one: a node lost without Ray noticing can go,
    a round that timed out on most of the mesh cannot. groups: name -> node."""
    per_node = collections.Counter(groups.values())
    return max(per_node.values(), default=0) + 1
