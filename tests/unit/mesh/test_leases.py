"""Direct clients' leases: a drain waits for live clients to leave older epochs, never for dead ones."""

from mesh.leases import Leases


def test_a_drain_ends_when_every_live_client_left_the_older_epochs():
    leases = Leases(lease_s=10.0)
    leases.attach("a", "node-1", now=0.0)
    leases.attach("b", "node-2", now=0.0)
    assert leases.renew("a", 1.0, epoch=4, oldest_inflight=0, report=b"r")
    assert leases.renew("b", 1.0, epoch=4, oldest_inflight=3, report=b"")
    assert not leases.drained(4, now=1.0)  # b still serves a request on epoch 3
    assert leases.renew("b", 1.5, epoch=4, oldest_inflight=4, report=b"")
    assert leases.drained(4, now=1.5)
    assert not leases.drained(5, now=1.5)  # neither has epoch 5 yet


def test_a_silent_client_holds_a_drain_until_its_lease_ends_then_is_forgotten():
    leases = Leases(lease_s=3.0)
    leases.attach("dead", "n", now=0.0)
    leases.renew("dead", 1.0, epoch=1, oldest_inflight=1, report=b"")
    assert not leases.drained(2, now=3.9)
    assert leases.drained(2, now=4.1)
    assert leases.describe(4.1) == [] and not leases.renew("dead", 4.2, 2, 0, b"")  # it must attach anew


def test_detach_ends_a_lease_at_once_and_reports_are_kept_between_polls():
    leases = Leases(lease_s=10.0)
    leases.attach("a", "n", now=0.0)
    leases.renew("a", 1.0, epoch=1, oldest_inflight=0, report=b"load")
    leases.renew("a", 2.0, epoch=1, oldest_inflight=0, report=b"")
    assert leases.live(2.0)["a"].report == b"load"
    assert leases.describe(2.0) == [{"name": "a", "node": "n", "epoch": 1, "oldest_inflight": 0, "lease_left_s": 10.0}]
    leases.detach("a")
    assert leases.drained(99, now=2.0) and leases.live(2.0) == {}
