"""Leases of direct clients: what the controller knows of the routers that run in model servers'
processes (router_service/direct.py). Pure: the caller passes the clock.

    attach  -> a lease of `lease_s`, renewed by every poll (poll: the client's table epoch, the
               oldest epoch it still serves a request on, its load report)
    drain   -> a change's drain ends once every live lease reports the new epoch and nothing in
               flight on an older one; a client that stops polling stops counting when its lease ends
    detach  -> the lease is released at once (DirectClient.close)
"""

from __future__ import annotations

import dataclasses

__all__ = ["Lease", "Leases"]


@dataclasses.dataclass
class Lease:
    expires_at: float
    node: str = ""            # the Ray node the client runs on (placement measures from there)
    epoch: int = 0            # the table epoch it serves new requests on
    oldest_inflight: int = 0  # the oldest epoch it still serves a request on; 0: none in flight
    report: bytes = b""       # its last load report (msgpack, as a router's load_report)

    def is_drained(self, epoch: int) -> bool:
        """Serves nothing on an epoch older than `epoch`, and takes new requests on `epoch` or later."""
        return self.epoch >= epoch and (self.oldest_inflight == 0 or self.oldest_inflight >= epoch)


class Leases:
    def __init__(self, lease_s: float):
        self.lease_s = lease_s
        self._leases: dict[str, Lease] = {}

    def attach(self, client: str, node: str, now: float) -> None:
        self._leases[client] = Lease(now + self.lease_s, node)

    def renew(self, client: str, now: float, epoch: int, oldest_inflight: int, report: bytes) -> bool:
        """A poll from `client`; False when it holds no lease (expired or never attached: attach anew)."""
        lease = self.live(now).get(client)
        if lease is None:
            return False
        lease.expires_at, lease.epoch, lease.oldest_inflight = now + self.lease_s, epoch, oldest_inflight
        lease.report = report or lease.report
        return True

    def detach(self, client: str) -> None:
        self._leases.pop(client, None)

    def live(self, now: float) -> dict[str, Lease]:
        """The leases not expired at `now` (expired ones are forgotten)."""
        self._leases = {c: lease for c, lease in self._leases.items() if lease.expires_at > now}
        return self._leases

    def drained(self, epoch: int, now: float) -> bool:
        """Whether every live client is done with the epochs before `epoch`."""
        return all(lease.is_drained(epoch) for lease in self.live(now).values())

    def describe(self, now: float) -> list[dict]:
        """For `mesh status`: every live client's name, node, epoch, oldest epoch in flight, lease left."""
        return [{"name": c, "node": lease.node, "epoch": lease.epoch, "oldest_inflight": lease.oldest_inflight,
                 "lease_left_s": round(lease.expires_at - now, 1)} for c, lease in sorted(self.live(now).items())]
