"""How servers take calls: the memory budget of requests in flight."""

from __future__ import annotations

import asyncio

import pytest

from experts.errors import ResourceExhaustedError
from protos.serving import ByteBudget


def body(size: int, gate: asyncio.Event | None = None):
    async def read() -> bytes:
        if gate is not None:
            await gate.wait()
        return b"x" * size
    return read


def test_a_call_reserves_the_largest_charge_while_read_then_holds_its_own():
    async def main():
        budget = ByteBudget(limit=100, largest=20, footprint=2.0)   # a read reserves 40
        seen = []

        async def use(raw: bytes):
            seen.append((len(raw), budget.held, budget.reading))
            return len(raw)

        assert await budget.run(body(5), use) == 5
        assert seen == [(5, 10, 0)] and budget.in_use == 0
    asyncio.run(main())


def test_a_call_is_refused_when_admitted_requests_leave_no_room_and_waits_behind_reads():
    async def main():
        budget = ByteBudget(limit=100, largest=20, footprint=2.0)
        release = asyncio.Event()

        async def hold_until_released(raw: bytes):
            await release.wait()

        first = asyncio.create_task(budget.run(body(20), hold_until_released))   # holds 40
        second = asyncio.create_task(budget.run(body(20), hold_until_released))  # holds 40
        await asyncio.sleep(0.01)
        assert budget.held == 80
        with pytest.raises(ResourceExhaustedError, match="80 bytes of requests in flight; the next one needs 40 more"):
            await budget.run(body(1), hold_until_released)
        release.set()
        await asyncio.gather(first, second)
        # Reads in progress make a call wait, not fail: two slow reads fill the room for reads.
        gate = asyncio.Event()
        reads = [asyncio.create_task(budget.run(body(1, gate), hold_until_released)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert budget.reading == 80 and not any(r.done() for r in reads)
        gate.set()
        await asyncio.gather(*reads)
        assert budget.in_use == 0
    asyncio.run(main())


def test_a_budget_that_cannot_take_the_largest_request_is_refused_at_start():
    with pytest.raises(ValueError, match="cannot take the largest request: 20 bytes x footprint 8.0 = 160"):
        ByteBudget(limit=100, largest=20, footprint=8.0)
