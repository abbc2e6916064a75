"""How servers take calls: the memory budget of requests in flight."""

from __future__ import annotations

import asyncio

import pytest

from protos.errors import ResourceExhaustedError
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


def test_health_and_reflection_take_their_bodies_within_the_budget():
    """grpc's health and reflection services registered through BudgetedServer on a real grpc.aio
    server on 127.0.0.1: while admitted requests fill the budget, Check, Watch and a reflection
    stream are refused RESOURCE_EXHAUSTED before their bodies are read; once it frees, they answer;
    a body that does not decode is INVALID_ARGUMENT, and the server goes on."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer
    from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

    from protos.serving import BUDGETED_SERVER_OPTIONS, BudgetedServer

    async def main():
        budget = ByteBudget(limit=1 << 20, largest=1 << 20)  # one request of the largest size at a time
        server = grpc.aio.server(options=BUDGETED_SERVER_OPTIONS)
        health = HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        budgeted = BudgetedServer(server, budget)
        health_pb2_grpc.add_HealthServicer_to_server(health, budgeted)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(("grpc.health.v1.Health", reflection.SERVICE_NAME)), budgeted)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

            async def calls() -> list:
                check = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                watch = anext(aiter(stub.Watch(health_pb2.HealthCheckRequest(), timeout=5)))
                listing = anext(aiter(reflect.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)))
                return await asyncio.gather(check, watch, listing, return_exceptions=True)

            release = asyncio.Event()

            async def hold(raw: bytes):
                await release.wait()
            held = asyncio.create_task(budget.run(body(1 << 20), hold))
            await asyncio.sleep(0.05)
            refused = await calls()
            assert [e.code() for e in refused] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3, refused
            release.set()
            await held
            check, watch, listing = await calls()
            assert check.status == watch.status == health_pb2.HealthCheckResponse.SERVING
            assert {s.name for s in listing.list_services_response.service} == {"grpc.health.v1.Health",
                                                                                reflection.SERVICE_NAME}
            raw_check = channel.unary_unary("/grpc.health.v1.Health/Check")
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await raw_check(b"\xff\xff\xff", timeout=5)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.value
            assert (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert budget.in_use == 0
        await server.stop(0)
    asyncio.run(main())
