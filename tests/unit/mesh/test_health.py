"""The health policy: a group is dead on Ray's word or after N missed observations in a row, and a
round that times out on more groups than one node holds kills none of them."""

from __future__ import annotations

from mesh.health import default_max_timeout_deaths, judge


def test_one_missed_observation_makes_a_suspect_not_a_death():
    verdict = judge({"g1": 1, "g2": 2}, set(), failure_threshold=3, max_timeout_deaths=2)
    assert verdict.dead == [] and verdict.suspect == ["g1", "g2"] and verdict.held_back == []


def test_the_threshold_or_rays_word_makes_a_death():
    verdict = judge({"g1": 3, "g2": 1, "g3": 1}, {"g3"}, failure_threshold=3, max_timeout_deaths=2)
    assert verdict.dead == ["g3", "g1"] and verdict.suspect == ["g2"]


def test_a_round_past_the_cap_declares_none_dead_on_timeouts_but_still_on_rays_word():
    missed = {f"g{k}": 3 for k in range(64)}
    verdict = judge(missed, {"g5"}, failure_threshold=3, max_timeout_deaths=9)
    assert verdict.dead == ["g5"]
    assert len(verdict.held_back) == 63 and len(verdict.suspect) == 63


def test_the_default_cap_is_the_most_crowded_node_plus_one():
    groups = {f"g{k}": f"n{k % 8}" for k in range(64)}
    assert default_max_timeout_deaths(groups) == 9
    assert default_max_timeout_deaths({"g0": "n0", "g1": "n0", "g2": "n1"}) == 3
    assert default_max_timeout_deaths({}) == 1
