"""Pure policies of the data plane: dispatch planning, table encoding, batch taking; and the
batcher and router with fakes of their transport (no Ray, no network)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from experts import ExpertGroup, MoELayer, load_spec
from router_service.batcher import LayerBatcher, first_of_idle, take_batch
from router_service.config import BatchingConfig, RouterConfig
from router_service.router import Router, RouterWeights
from router_service.routing import Copy, RoutingTable, expert_segments, plan_dispatch
from router_service.transport import Outcome, Transport
from protos.errors import ExpertTimeoutError, ExpertUnavailableError, QueueFullError

A, B, C = (Copy(g, f"{g}:1", "v1") for g in ("a", "b", "c"))

PLAN_CASES = [
    # counts, copies per expert, excluded, expected segments per group, expected unroutable
    ([2, 0, 3], [[A], [B], [B]], (), {"a": [(0, 0, 2)], "b": [(2, 2, 3)]}, []),
    ([5], [[A, B]], (), {"a": [(0, 0, 3)], "b": [(0, 3, 2)]}, []),
    ([5], [[A, B]], ("a",), {"b": [(0, 0, 5)]}, []),
    ([1, 4], [[A], [B, C]], ("a",), {"b": [(1, 1, 2)], "c": [(1, 3, 2)]}, [(0, 0, 1)]),
]


@pytest.mark.parametrize("counts,copies,excluded,expected,unroutable", PLAN_CASES)
def test_plan_dispatch(counts, copies, excluded, expected, unroutable):
    plan = plan_dispatch(expert_segments(counts), copies, 0, frozenset(excluded))
    assert plan.segments == expected
    assert plan.unroutable == unroutable
    assert set(plan.endpoints) == set(expected)


def test_routing_table_round_trips_through_msgpack():
    table = RoutingTable(7, {3: [[A, B], [], [C]]})
    decoded = RoutingTable.decode(table.encode())
    assert decoded == table
    assert decoded.missing_experts() == [(3, 1)]
    assert decoded.groups() == {"a": "a:1", "b": "b:1", "c": "c:1"}


@pytest.mark.parametrize("queued,limit,expected", [
    ([("a", 5), ("a", 5), ("a", 5)], 10, [0, 1]),
    ([("a", 20), ("a", 1)], 10, [0]),
    ([("a", 3)], 0, [0]),
    ([], 8, []),
    ([("flood", 4)] * 6 + [("b", 4)], 8, [0, 6]),            # b is not held behind the flood
    ([("a", 2), ("a", 2), ("b", 2), ("c", 2), ("a", 2)], 100, [0, 2, 3, 1, 4]),
])
def test_take_batch_lets_callers_take_turns(queued, limit, expected):
    assert take_batch(queued, limit) == expected


@pytest.mark.parametrize("callers,busy,expected", [
    (["a", "a", "b", "c", "b"], set(), [0, 2, 3]),
    (["flood", "flood", "b"], {"flood"}, [2]),
    (["flood"], {"flood"}, []),
])
def test_first_of_idle_takes_one_entry_per_caller_with_nothing_in_flight(callers, busy, expected):
    assert first_of_idle(callers, busy) == expected


class FakeRouter:
    """The batcher's runner: `run_batch(x, parts, token_ids)` answers each batch; pins are recorded."""

    def __init__(self, run_batch):
        self._run_batch, self.pins = run_batch, []

    async def run_batch(self, layer, x, parts, token_ids, table=None):
        self.pins.append(table)
        return await self._run_batch(x, parts, token_ids)

    def observe_batch(self, num_tokens, num_requests):
        pass


def test_a_caller_is_not_held_behind_a_flooders_batches_in_flight():
    """The flooder's batches fill the main lane and finish only once the other caller has its
    answer: the express lane must serve that caller meanwhile (else this times out)."""
    light_done = None

    async def run_batch(x, parts, token_ids):
        if x[0, 0] < 0:   # the light caller's rows
            return [x[p] for p in parts], 1
        await light_done.wait()
        return [x[p] for p in parts], 1

    async def main():
        nonlocal light_done
        light_done = asyncio.Event()
        batcher = LayerBatcher(FakeRouter(run_batch), 0, BatchingConfig(max_batch_tokens=4, max_inflight_batches=2), 1000)
        flood = [asyncio.ensure_future(batcher.submit(torch.ones(4, 2), "flood")) for _ in range(8)]
        await asyncio.sleep(0.01)   # the flood's first batches are in flight, the rest queued
        out, _ = await asyncio.wait_for(batcher.submit(-torch.ones(1, 2), "light"), 2.0)
        light_done.set()
        answers = await asyncio.gather(*flood)
        await batcher.close()
        return out, answers

    out, answers = asyncio.run(main())
    assert torch.equal(out, -torch.ones(1, 2))
    assert len(answers) == 8 and all(torch.equal(a, torch.ones(4, 2)) for a, _ in answers)


def test_batcher_merges_splits_and_answers_each_caller():
    batches = []

    async def run_batch(x, parts, token_ids):
        batches.append(x.shape[0])
        await asyncio.sleep(0.01)
        return [x[p] * 2 for p in parts], len(batches)

    async def main():
        batcher = LayerBatcher(FakeRouter(run_batch), 0, BatchingConfig(max_batch_tokens=8, max_inflight_batches=1), 1000)
        inputs = [torch.full((n, 2), float(i)) for i, n in enumerate([3, 20, 1, 5, 2])]
        outs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.close()
        return inputs, outs

    inputs, outs = asyncio.run(main())
    for x, (out, tag) in zip(inputs, outs):
        assert torch.equal(out, x * 2) and 1 <= tag <= len(batches)
    assert max(batches) <= 8 and sum(batches) == 31
    assert len(batches) < 8  # requests were merged (one at a time would be 3 + 1 + 1 + 1 + 1 + chunks)


def test_token_ids_travel_with_their_rows_through_merges_and_chunks():
    """Each row of a batch meets its own token id: the fake layer answers row + id."""
    async def run_batch(x, parts, token_ids):
        assert token_ids.shape == (x.shape[0],)
        return [(x + token_ids[:, None])[p] for p in parts], 1

    async def main():
        batcher = LayerBatcher(FakeRouter(run_batch), 0, BatchingConfig(max_batch_tokens=8, max_inflight_batches=1), 1000)
        inputs = [(torch.full((n, 2), 100.0 * i), torch.arange(n) + 10 * i) for i, n in enumerate([3, 20, 1, 5])]
        outs = await asyncio.gather(*(batcher.submit(x, f"caller{i}", ids) for i, (x, ids) in enumerate(inputs)))
        await batcher.close()
        return inputs, outs

    inputs, outs = asyncio.run(main())
    for (x, ids), (out, _) in zip(inputs, outs):
        assert torch.equal(out, x + ids[:, None])


def test_batcher_refuses_beyond_queue_limit():
    async def main():
        async def run_batch(x, parts, token_ids):
            await asyncio.sleep(0.05)
            return [x[p] for p in parts], 1

        batcher = LayerBatcher(FakeRouter(run_batch), 0, BatchingConfig(max_inflight_batches=1), max_queue_tokens=10)
        # one slot per lane: two batches in flight (queued tokens leave the queue), the third waits
        running = [asyncio.ensure_future(batcher.submit(torch.zeros(8, 2))) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert batcher.queued_tokens == 8
        with pytest.raises(QueueFullError, match="max_queue_tokens=10"):
            await batcher.submit(torch.zeros(4, 2))
        await asyncio.gather(*running)
        await batcher.close()

    asyncio.run(main())


class FakeGroupTransport(Transport):
    """Computes on in-process ExpertGroups; groups named in `dead` raise ExpertUnavailableError,
    groups in `frozen` answer nothing until the call's deadline (then raise, as grpc does)."""

    def __init__(self, groups: dict[str, ExpertGroup], dead: set[str]):
        self.groups, self.dead, self.frozen, self.calls = groups, dead, set(), []
        self.doomed: set[str] = set()  # answer their first call, then are dead
        self.lost: set[str] = set()  # dispatch reports neither their answer nor an error (a transport's bug)

    async def dispatch(self, layer, epoch, rows, scale, destinations, out, deadlines=None):
        errors, seconds = await super().dispatch(layer, epoch, rows, scale, destinations, out, deadlines)
        return Outcome(errors, {g: s for g, s in seconds.items() if g not in self.lost})

    async def send(self, layer, epoch, rows, scale, dest, out, timeout_s=None):
        self.calls.append(dest.group)
        if dest.group in self.lost:
            return  # its slice of out left as it was
        if dest.group in self.dead or (dest.group in self.doomed and self.calls.count(dest.group) > 1):
            raise ExpertUnavailableError(f"expert group {dest.group} is dead")
        if dest.group in self.frozen:
            await asyncio.sleep(timeout_s or 30.0)
            raise ExpertTimeoutError(f"expert group {dest.group}: DEADLINE_EXCEEDED")
        part = None if scale is None else scale[dest.start:dest.stop]
        out[dest.start:dest.stop] = self.groups[dest.group].forward(
            layer, rows[dest.start:dest.stop], list(dest.experts), list(dest.counts), part, list(dest.versions))


def _router(path, assignment: dict[str, list[int]], layer: int, dead: set[str]):
    groups = {name: ExpertGroup.from_checkpoint(path, {layer: experts}) for name, experts in assignment.items()}
    spec = load_spec(path)
    copies = [[Copy(n, n, groups[n].version(layer, e)) for n, experts in assignment.items() if e in experts]
              for e in range(spec.num_experts)]
    transport = FakeGroupTransport(groups, dead)
    router = Router(RouterWeights.from_checkpoint(path), RouterConfig(), transport)
    router.set_table(RoutingTable(1, {layer: copies}))
    return router, transport


def test_failed_copy_is_retried_on_another_copy(zoo):
    path = zoo.checkpoint("mixtral")
    everything = list(range(load_spec(path).num_experts))
    router, transport = _router(path, {"g0": everything, "g1": everything}, 0, dead={"g0"})
    x = torch.randn(12, 48, generator=torch.Generator().manual_seed(0))
    out, _ = asyncio.run(router.forward(0, x))
    ref = MoELayer.from_pretrained(path, layer=0)(x)
    assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert "g0" in transport.calls and "g1" in transport.calls


def test_a_slice_the_transport_lost_is_retried_not_answered_with_garbage(zoo):
    path = zoo.checkpoint("mixtral")
    everything = list(range(load_spec(path).num_experts))
    router, transport = _router(path, {"g0": everything, "g1": everything}, 0, dead=set())
    transport.lost.add("g0")
    x = torch.randn(12, 48, generator=torch.Generator().manual_seed(0))
    out, _ = asyncio.run(router.forward(0, x))
    ref = MoELayer.from_pretrained(path, layer=0)(x)
    assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert transport.calls == ["g0", "g1", "g1"]  # g0 and g1 each half the batch, then g1 g0's half


def test_a_retry_that_meets_the_next_dead_group_is_retried_again(zoo):
    """Three copies of every expert: g0 is dead, g1 dies right after its first answer (a node's
    groups die one after another). g0's tokens are retried on g1 and g2; g1's share of that retry
    fails and goes to g2: the caller gets the right answer, not g1's error."""
    path = zoo.checkpoint("mixtral")
    everything = list(range(load_spec(path).num_experts))
    router, transport = _router(path, {"g0": everything, "g1": everything, "g2": everything}, 0, dead={"g0"})
    transport.doomed.add("g1")
    x = torch.randn(12, 48, generator=torch.Generator().manual_seed(0))
    out, _ = asyncio.run(router.forward(0, x))
    ref = MoELayer.from_pretrained(path, layer=0)(x)
    assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert transport.calls.count("g1") == 2 and transport.calls[-1] == "g2"  # three sends: g2 took g1's retry


def test_a_frozen_group_costs_one_deadline_then_is_ejected_and_answers_stay_right(zoo):
    """Two copies of every expert; g0 freezes (no answer, no error). A batch that goes to it is
    hedged at its deadline (3 x the p99 of its calls, at least 50 ms) and served by g1; batches right
    after that miss avoid g0 for one deadline; each later batch that meets it is hedged again, and
    after 3 misses in a row g0 is ejected and batches go to g1 alone."""
    path = zoo.checkpoint("mixtral")
    everything = list(range(load_spec(path).num_experts))
    router, transport = _router(path, {"g0": everything, "g1": everything}, 0, dead=set())
    x = torch.randn(12, 48, generator=torch.Generator().manual_seed(0))
    ref = MoELayer.from_pretrained(path, layer=0)(x)

    async def forward() -> float:
        start = time.perf_counter()
        out, _ = await router.forward(0, x)
        assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-5
        return time.perf_counter() - start

    async def main():
        for _ in range(25):  # the groups' times: what their deadlines come from
            await router.forward(0, x)
        transport.frozen.add("g0")
        slowest = await forward()
        assert router.batch_stats["hedges"] == 1
        mark = len(transport.calls)
        slowest = max(slowest, await forward())  # right after the miss: g0 avoided, no second deadline
        assert "g0" not in transport.calls[mark:] and router.batch_stats["hedges"] == 1
        for _ in range(2):
            await asyncio.sleep(0.55)  # past the avoidance (one deadline, at most 500 ms): g0 is met again
            slowest = max(slowest, await forward())
        mark = len(transport.calls)
        for _ in range(3):
            slowest = max(slowest, await forward())
        return slowest, transport.calls[mark:]

    slowest, last_calls = asyncio.run(main())
    assert slowest < 1.0  # one deadline (<= 500 ms) and the retry, never the 30 s timeout
    assert router.batch_stats["hedges"] == 3 and router.hedging.ejections == 1
    assert router.hedging.ejected() == {"g0"}
    assert last_calls == ["g1"] * 3  # ejected: the last batches did not try g0


def test_only_callers_needing_a_dead_group_fail(zoo):
    path = zoo.checkpoint("mixtral")
    router, _ = _router(path, {"g0": [0, 1, 2], "g1": [3, 4, 5]}, 0, dead={"g1"})
    spec = load_spec(path)
    gate = router.gates[0]
    candidates = torch.randn(64, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    ids = gate(candidates)[1]
    uses_g1 = (ids >= 3).any(dim=1)
    good, bad = candidates[~uses_g1][:2], candidates[uses_g1][:2]
    assert len(good) == 2 and len(bad) == 2

    async def main():
        return await asyncio.gather(*(router.forward(0, t[None]) for t in [*good, *bad]), return_exceptions=True)

    results = asyncio.run(main())
    for token, result in zip(good, results[:2]):
        ref = MoELayer.from_pretrained(path, layer=0)(token[None])
        assert not isinstance(result, BaseException)
        assert ((result[0] - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert all(isinstance(r, ExpertUnavailableError) for r in results[2:])


def test_each_failed_caller_gets_the_error_of_the_group_that_failed_it(zoo):
    """Two dead groups, one batch: a caller whose tokens needed only g1 hears of g1, not of g0."""
    path = zoo.checkpoint("mixtral")
    router, _ = _router(path, {"g0": [0, 1, 2], "g1": [3, 4, 5]}, 0, dead={"g0", "g1"})
    spec = load_spec(path)
    candidates = torch.randn(256, spec.hidden_size, generator=torch.Generator().manual_seed(3))
    ids = router.gates[0](candidates)[1]
    only_g0, only_g1 = candidates[(ids < 3).all(dim=1)][:1], candidates[(ids >= 3).all(dim=1)][:1]
    assert len(only_g0) == 1 and len(only_g1) == 1

    async def main():
        return await asyncio.gather(router.forward(0, only_g1, "a"), router.forward(0, only_g0, "b"),
                                    return_exceptions=True)

    to_g1, to_g0 = asyncio.run(main())
    assert "g1 is dead" in str(to_g1) and "g0 is dead" in str(to_g0), (to_g1, to_g0)


def test_a_chunked_request_is_served_by_one_table_even_when_the_table_changes():
    """A request of 3 chunks pinned to the table of its arrival; a table pushed meanwhile serves
    only later requests."""
    async def run_batch(x, parts, token_ids):
        await asyncio.sleep(0.01)
        return [x[p] for p in parts], 1

    async def main():
        runner = FakeRouter(run_batch)
        batcher = LayerBatcher(runner, 0, BatchingConfig(max_batch_tokens=4, max_inflight_batches=1), 1000)
        chunked = asyncio.ensure_future(batcher.submit(torch.ones(12, 2), "a", pin="epoch-1"))
        await asyncio.sleep(0.005)
        later = asyncio.ensure_future(batcher.submit(torch.zeros(2, 2), "b"))
        await asyncio.gather(chunked, later)
        await batcher.close()
        return runner.pins

    pins = asyncio.run(main())
    assert pins.count("epoch-1") == 3 and pins.count(None) == 1  # never a batch mixing the two


def test_plan_batch_gives_every_destination_one_slice_sorted_by_destination_then_expert():
    from kernels import align_tokens
    from router_service.routing import plan_batch

    ids = torch.tensor([[0, 2], [1, 2], [2, 0], [3, 1], [0, 3]])  # T=5, k=2; expert 3 has no copy
    order, counts, _ = align_tokens(ids, 4)
    copies = [[Copy("a", "a:1", "va0")], [Copy("b", "b:1", "vb1")], [Copy("a", "a:1", "va2"), Copy("b", "b:1", "vb2")], []]
    plan = plan_batch(order, counts.tolist(), copies)
    flat = ids.reshape(-1)
    assert sorted(plan.order.tolist() + plan.unroutable.tolist()) == list(range(10))  # every copy once
    assert sorted(flat[plan.unroutable].tolist()) == [3, 3]
    assert [d.group for d in plan.destinations] == ["a", "b"]
    starts = 0
    for d in plan.destinations:
        assert d.start == starts and d.stop - d.start == sum(d.counts)  # contiguous, back to back
        experts = flat[plan.order[d.start:d.stop]].tolist()
        assert experts == sorted(experts) and tuple(sorted(set(experts))) == d.experts  # then by expert
        assert d.versions == tuple(next(c.version for c in copies[e] if c.group == d.group) for e in d.experts)
        starts = d.stop
    assert sum(d.counts[d.experts.index(2)] for d in plan.destinations) == 3  # expert 2 split over a and b


def test_token_tally_accumulates_and_hands_over_once():
    from router_service.load import TokenTally

    tally = TokenTally([0, 3], num_experts=4)
    tally.add(3, torch.tensor([1, 0, 2, 1]), torch.tensor([[0, 2], [2, 3]]))
    tally.add(3, torch.tensor([0, 1, 1, 0]), torch.tensor([[1, 2]]))
    taken = tally.take()
    assert list(taken) == [3] and taken[3][0] == [1, 1, 3, 1] and taken[3][1].tolist() == [[0, 2], [2, 3], [1, 2]]
    assert tally.take() == {}  # reset: nothing is counted twice


def test_an_expert_whose_copies_were_all_hedged_goes_to_the_one_not_ejected_that_missed_fewest():
    copies = [[Copy("g0", "a", "v"), Copy("g1", "b", "v")], [Copy("g1", "b", "v"), Copy("g2", "c", "v")]]
    plan = plan_dispatch([(0, 0, 4), (1, 4, 2)], copies, excluded=frozenset({"g0", "g1"}),
                         slow={"g0": (False, 1), "g1": (True, 0)})  # g1 ejected: g0, though it missed once
    assert plan.segments == {"g0": [(0, 0, 4)], "g2": [(1, 4, 2)]} and plan.unroutable == []
    dead = plan_dispatch([(0, 0, 4)], copies, excluded=frozenset({"g0", "g1"}), slow={})
    assert dead.unroutable == [(0, 0, 4)]  # failed for real: no copy left
