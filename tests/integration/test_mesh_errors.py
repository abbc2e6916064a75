"""The mesh's errors on a real 3-node Ray cluster: every bad input gets INVALID_ARGUMENT naming the
field, a full queue RESOURCE_EXHAUSTED, a deadline DEADLINE_EXCEEDED, a dead expert group
UNAVAILABLE for the callers whose tokens it held; after each, the next good request succeeds.

Bad requests go as raw protos through the generated stub, since the client refuses to send some.
"""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
import ray
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.local import start_mesh
from experts import MoELayer, load_spec
from mesh.config import MeshConfig
from mesh.controller import NAMESPACE
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from router_service import AsyncMeshClient, MeshClient
from tests.integration.mesh_helpers import FP32_TOL, call_concurrently, load_gate, load_report, rel_err
from protos.errors import MeshClientError

MAX_TOKENS = 64  # max_request_tokens == max_queue_tokens of the `limits` mesh
LIMITS = {"router": {"max_request_tokens": MAX_TOKENS, "max_queue_tokens": MAX_TOKENS}}
H = 48  # hidden size of the zoo's deepseek_v3 (checked below)
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1, "": 4}


def raw(layer: int, shape: list[int], dtype: str = "float32", data: bytes | None = None,
        fill: float | None = None) -> pb.ForwardRequest:
    """A ForwardRequest as any gRPC client could send it; data defaults to the right byte count
    (random float32 values, or `fill`)."""
    if data is None:
        numel = math.prod(shape)
        if dtype == "float32" and numel:
            values = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
            if fill is not None:
                values[numel // 2] = fill
            data = values.numpy().tobytes()
        else:
            data = bytes(numel * ITEMSIZE[dtype])
    return pb.ForwardRequest(layer=layer, hidden=pb.Tensor(data=data, dtype=dtype, shape=shape))


# (case, request, words the details must contain: the field and what was expected)
BAD_INPUTS = [
    ("unknown layer", raw(7, [4, H]), ["layer 7", "MoE layers are [1, 2]"]),
    ("negative layer", raw(-1, [4, H]), ["layer -1", "MoE layers are [1, 2]"]),
    ("dense layer", raw(0, [4, H]), ["layer 0", "MoE layers are [1, 2]"]),
    ("wrong hidden size", raw(1, [4, H - 1]), ["hidden.shape[-1]", f"hidden size {H}", f"got {H - 1}"]),
    ("rank 1", raw(1, [H]), ["hidden.shape", f"[T, {H}] or [B, S, {H}]", f"got [{H}]"]),
    ("rank 4", raw(1, [1, 2, 2, H]), ["hidden.shape", f"[T, {H}] or [B, S, {H}]", f"got [1, 2, 2, {H}]"]),
    ("no hidden", pb.ForwardRequest(layer=1), ["hidden.shape", "got []"]),
    ("int8", raw(1, [4, H], "int8"), ["hidden.dtype", "float32, bfloat16, float16", "'int8'"]),
    ("float64", raw(1, [4, H], "float64"), ["hidden.dtype", "float32, bfloat16, float16", "'float64'"]),
    ("dtype unset", raw(1, [4, H], ""), ["hidden.dtype", "float32, bfloat16, float16", "''"]),
    ("empty [0, H]", raw(1, [0, H]), ["hidden", "no token", f"[0, {H}]"]),
    ("empty [B, 0, H]", raw(2, [3, 0, H]), ["hidden", "no token", f"[3, 0, {H}]"]),
    ("too many tokens", raw(1, [MAX_TOKENS + 1, H]), [f"{MAX_TOKENS + 1} tokens", f"max_request_tokens={MAX_TOKENS}"]),
    ("too many tokens [B, S, H]", raw(2, [5, 13, H]), ["65 tokens", f"max_request_tokens={MAX_TOKENS}"]),
    ("data one byte short", raw(1, [4, H], data=bytes(4 * H * 4 - 1)),
     ["hidden.data", f"{4 * H * 4 - 1} bytes", f"expected {4 * H * 4}"]),
    ("data one float long", raw(1, [4, H], data=bytes(4 * H * 4 + 4)),
     ["hidden.data", f"{4 * H * 4 + 4} bytes", f"expected {4 * H * 4}"]),
    ("shape claims 2**30 tokens", raw(1, [2**30, H], data=bytes(4 * H * 4)), ["hidden.data", "expected"]),
    ("shape claims 2**40 tokens", raw(1, [2**40, H], data=bytes(4 * H * 4)), ["hidden.shape", "[0, 2147483647]"]),
    ("empty, 2**61 tokens a row", raw(2, [0, 2**61, H], data=b""), ["hidden.shape", "[0, 2147483647]"]),
    ("negative shape", raw(1, [-4, H], data=b""), ["hidden.shape", "[0, 2147483647]", f"[-4, {H}]"]),
    ("NaN", raw(1, [4, H], fill=float("nan")), ["hidden", "NaN or Inf"]),
    ("Inf", raw(2, [2, 3, H], fill=float("-inf")), ["hidden", "NaN or Inf"]),
]


@pytest.fixture(scope="module")
def limits(meshes, zoo):
    """deepseek_v3 (layer 0 dense, MoE layers 1 and 2) with max_request_tokens = max_queue_tokens = 64."""
    path = zoo.checkpoint("deepseek_v3")
    spec = load_spec(path)
    assert spec.hidden_size == H and spec.moe_layers == (1, 2) and spec.num_layers == 3
    mesh = meshes.get(path, key="deepseek-limits", router={k: v for k, v in LIMITS["router"].items()})
    return path, mesh, {layer: MoELayer.from_pretrained(path, layer=layer) for layer in spec.moe_layers}


def assert_serves(address: str, layers: dict, num_tokens: int = MAX_TOKENS, seed: int = 0) -> None:
    """A good request of `num_tokens` (default: as many as the whole queue holds, so a leaked queue
    count would refuse it) gets the right answer on every MoE layer."""
    x = torch.randn(num_tokens, H, generator=torch.Generator().manual_seed(seed))
    with MeshClient(address) as client:
        for layer, local in layers.items():
            assert rel_err(client.forward(layer, x), local(x)) <= FP32_TOL, layer


@pytest.mark.parametrize("case,request_,words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_invalid_argument_naming_the_field(limits, case, request_, words):
    path, mesh, layers = limits
    tokens_before = load_report(mesh)["tokens"]
    with grpc.insecure_channel(mesh.address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.ExpertMeshStub(channel).Forward(request_, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, error.value.details())
    assert all(word in error.value.details() for word in words), (case, error.value.details())
    assert load_report(mesh)["tokens"] == tokens_before  # refused before the gate: nothing routed
    assert_serves(mesh.address, layers, seed=len(case))


CLIENT_SENDS = [  # bad inputs that MeshClient sends as they are: the server's answer reaches the caller
    ("unknown layer", 5, torch.randn(3, H), ["layer 5", "[1, 2]"]),
    ("dense layer", 0, torch.randn(3, H), ["layer 0", "[1, 2]"]),
    ("wrong hidden size", 1, torch.randn(3, H + 1), ["hidden.shape[-1]", f"got {H + 1}"]),
    ("too many tokens", 2, torch.randn(2, 40, H), ["80 tokens", f"max_request_tokens={MAX_TOKENS}"]),
    ("NaN", 1, torch.full((3, H), float("nan")), ["NaN or Inf"]),
    ("Inf bf16", 2, torch.full((3, H), float("inf"), dtype=torch.bfloat16), ["NaN or Inf"]),
    ("empty", 1, torch.empty(0, H), ["no token"]),
]


@pytest.mark.parametrize("case,layer,x,words", CLIENT_SENDS, ids=[c[0] for c in CLIENT_SENDS])
def test_client_gets_invalid_argument_from_the_mesh(limits, case, layer, x, words):
    path, mesh, layers = limits
    with MeshClient(mesh.address) as client:
        with pytest.raises(MeshClientError) as error:
            client.forward(layer, x)
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT, (case, error.value)
    assert error.value.address == mesh.address  # the server said so, not the client
    assert all(word in error.value.details for word in words), (case, error.value.details)
    assert_serves(mesh.address, layers, num_tokens=5)


def test_hash_layer_needs_its_token_ids_and_the_other_layers_serve_old_clients(meshes, zoo):
    """DeepSeek-V4 (layer 0 picks experts by token id, layers 1 and 2 by the gate): a request to
    layer 0 without token ids (as an old client sends it), or with bad ones, gets
    INVALID_ARGUMENT naming token_ids; with them it equals the in-process layer; layers 1 and 2
    answer requests without token ids as before."""
    path = zoo.checkpoint("deepseek_v4")
    spec = load_spec(path)
    assert spec.hash_layers == (0,) and spec.moe_layers == (0, 1, 2)
    mesh = meshes.get(path, key="deepseek_v4")
    x = torch.randn(2, 3, spec.hidden_size, generator=torch.Generator().manual_seed(6))
    ids = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(7))
    hidden = raw(0, [2, 3, spec.hidden_size]).hidden
    bad_raw = [(pb.Tensor(data=bytes(32), dtype="int64", shape=[2, 2]),
                "token_ids.shape must be hidden's leading dims [2, 3], got [2, 2]"),
               (pb.Tensor(data=bytes(24), dtype="float32", shape=[2, 3]), "token_ids.dtype must be one of int64")]
    with grpc.insecure_channel(mesh.address) as channel:
        for token_ids, words in bad_raw:
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.ExpertMeshStub(channel).Forward(pb.ForwardRequest(layer=0, hidden=hidden, token_ids=token_ids),
                                                        timeout=30)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.value.details(), words
    with MeshClient(mesh.address) as client:
        for token_ids, words in [(None, "token_ids are needed for layer 0"),
                                 (ids + 128, "token_ids must be in [0, 128)")]:
            with pytest.raises(MeshClientError) as error:
                client.forward(0, x, token_ids)
            assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in error.value.details, words
            assert error.value.address == mesh.address  # the server said so, not the client
        assert rel_err(client.forward(0, x, ids), MoELayer.from_pretrained(path, layer=0)(x, ids)) <= FP32_TOL
        for layer in (1, 2):
            assert rel_err(client.forward(layer, x), MoELayer.from_pretrained(path, layer=layer)(x)) <= FP32_TOL


def test_full_queue_gives_resource_exhausted_not_a_hang(limits):
    """64 requests of 48..64 tokens at once against a 64-token queue: each either gets its own
    right answer or RESOURCE_EXHAUSTED naming max_queue_tokens, within a bounded time; then a
    request as large as the whole queue succeeds (no queued token leaked)."""
    path, mesh, layers = limits
    layer = 1
    generator = torch.Generator().manual_seed(9)
    xs = [torch.randn(48 + i % 17, H, generator=generator) for i in range(64)]

    async def flood() -> list:
        clients = [AsyncMeshClient(mesh.address, timeout_s=60) for _ in range(8)]
        try:
            await asyncio.gather(*(c.info() for c in clients))
            calls = (clients[i % len(clients)].forward(layer, x) for i, x in enumerate(xs))
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 90)
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    for _attempt in range(3):  # the flood must overrun the queue at least once
        start = time.perf_counter()
        results = asyncio.run(flood())
        elapsed_s = time.perf_counter() - start
        full = [r for r in results if isinstance(r, MeshClientError)]
        if full:
            break
    answered = [(x, r) for x, r in zip(xs, results) if isinstance(r, torch.Tensor)]
    assert len(answered) + len(full) == len(xs), [r for r in results if not isinstance(r, (torch.Tensor, MeshClientError))]
    assert full and answered, (len(full), len(answered))
    assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"max_queue_tokens={MAX_TOKENS}" in e.details
               for e in full), {(e.code, e.details) for e in full}
    for x, out in answered:
        assert rel_err(out, layers[layer](x)) <= FP32_TOL
    assert elapsed_s < 60
    assert_serves(mesh.address, layers)


def test_deadline_gives_deadline_exceeded_and_the_server_keeps_serving(limits):
    """Deadlines from 0.1 ms to 2 s (so that calls expire before sending, while queued, in flight,
    or not at all): each caller gets its right answer or DEADLINE_EXCEEDED, no later than its
    deadline allows; then a request as large as the whole queue succeeds (expired work left no
    queued token behind) and health says SERVING."""
    path, mesh, layers = limits
    x = torch.randn(MAX_TOKENS, H, generator=torch.Generator().manual_seed(10))
    refs = {layer: local(x) for layer, local in layers.items()}
    timeouts_s = [1e-4 * 1.5**i for i in range(25)]  # 0.1 ms .. 1.7 s
    outcomes = []
    for i, timeout_s in enumerate(timeouts_s):
        layer = 1 + i % 2
        with MeshClient(mesh.address, timeout_s=timeout_s) as client:
            start = time.perf_counter()
            try:
                out = client.forward(layer, x)
            except MeshClientError as exc:
                outcomes.append((exc.code, time.perf_counter() - start))
            else:
                assert rel_err(out, refs[layer]) <= FP32_TOL, timeout_s
                outcomes.append((grpc.StatusCode.OK, time.perf_counter() - start))
    codes = [code for code, _ in outcomes]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
    assert codes[:3] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3 and codes[-1] == grpc.StatusCode.OK, codes
    for (code, elapsed_s), timeout_s in zip(outcomes, timeouts_s):
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            assert elapsed_s < timeout_s + 0.5, (timeout_s, elapsed_s)
    assert_serves(mesh.address, layers)
    with grpc.insecure_channel(mesh.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- a dead expert group: UNAVAILABLE for the callers whose tokens it held, and only them ----

def _probe_requests(path, spec, dead_experts: dict[int, set[int]], per_kind: int = 6):
    """Single- and few-token requests per MoE layer, half of them needing a dead expert.
    Returns [(layer, x, is_affected)]."""
    generator = torch.Generator().manual_seed(21)
    requests = []
    for layer in spec.moe_layers:
        x = torch.randn(400, spec.hidden_size, generator=generator)
        _, ids = load_gate(path, layer)(x)  # [400, k]
        is_affected = torch.isin(ids, torch.tensor(sorted(dead_experts[layer]))).any(dim=1)
        hit, miss = x[is_affected], x[~is_affected]
        assert len(hit) >= 3 * per_kind and len(miss) >= 3 * per_kind
        for i in range(per_kind):
            requests.append((layer, hit[i:i + 1], True))
            requests.append((layer, miss[i:i + 1], False))
            requests.append((layer, miss[per_kind + 2 * i:per_kind + 2 * i + 2], False))  # 2 tokens, both fine
            mixed = torch.cat([miss[3 * per_kind + i:3 * per_kind + i + 1], hit[per_kind + i:per_kind + i + 1]])
            requests.append((layer, mixed, True))  # one token of it needs the dead group
    return requests


def _check_outcomes(requests, results, layers, strict: bool) -> int:
    """Unaffected callers get their right answer; affected ones UNAVAILABLE (`strict`) or, while
    the controller may be restoring the group, UNAVAILABLE or their right answer. Never a wrong
    answer, never another code. Returns how many got UNAVAILABLE."""
    num_unavailable = 0
    for i, ((layer, x, is_affected), result) in enumerate(zip(requests, results)):
        if isinstance(result, MeshClientError):
            assert is_affected, (i, layer, result)
            assert result.code == grpc.StatusCode.UNAVAILABLE, (i, result)
            assert "group-1" in result.details or "no live copy" in result.details, result.details
            num_unavailable += 1
        else:
            assert not (strict and is_affected), (i, layer, "an affected caller got an answer")
            assert rel_err(result, layers[layer](x)) <= FP32_TOL, (i, layer)
    return num_unavailable


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _wait_until_gone(endpoint: str, timeout_s: float = 30) -> None:
    """Until nothing answers ExpertWorker.Ping at the killed group's endpoint."""
    deadline = time.time() + timeout_s
    with grpc.insecure_channel(endpoint) as channel:
        stub = pb_grpc.ExpertWorkerStub(channel)
        while time.time() < deadline:
            try:
                stub.Ping(pb.PingRequest(), timeout=1)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:  # that one: still there, refusing outsiders
                    return
            time.sleep(0.05)
    raise AssertionError(f"the killed group at {endpoint} still answers")


def test_dead_expert_group_fails_only_its_callers(ray_cluster, zoo):
    path = zoo.checkpoint("mixtral")
    spec = load_spec(path)
    layers = {layer: MoELayer.from_pretrained(path, layer=layer) for layer in spec.moe_layers}
    mesh = start_mesh(MeshConfig(name="spine-failure", router={"port": 0}, health_period_s=2.0), path)
    try:
        group = next(g for g in mesh.status()["groups"] if g["name"] == f"{mesh.name}/group-1")
        dead = {layer: set(group["experts"][str(layer)]) for layer in spec.moe_layers}
        requests = _probe_requests(path, spec, dead)
        calls = [(layer, x) for layer, x, _ in requests]
        epoch = mesh.status()["epoch"]
        assert _check_outcomes(requests, call_concurrently(mesh.address, calls, return_errors=True), layers,
                               strict=False) == 0  # all live: every caller answered

        ray.kill(ray.get_actor(group["name"], namespace=NAMESPACE))
        _wait_until_gone(group["endpoint"])
        num_affected = sum(is_affected for _, _, is_affected in requests)
        # Phase A: at once, while the router's table most likely still lists the dead group.
        results = call_concurrently(mesh.address, calls, return_errors=True)
        with MeshClient(mesh.address) as client:
            assert client.info().moe_layers == spec.moe_layers  # GetInfo still works
        # Losing the group costs one epoch; a controller that restores the group publishes another
        # one for it (after marking it alive). While the controller is at most one epoch further,
        # no router has served a table with a restored group.
        is_strict = mesh.status()["epoch"] <= epoch + 1
        num_unavailable = _check_outcomes(requests, results, layers, strict=is_strict)
        assert num_unavailable == num_affected or not is_strict

        # Phase B: the controller noticed (it pings every health_period_s): NOT_SERVING, copies gone.
        deadline = time.time() + 2.0 + 15
        while _health(mesh.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.time() < deadline, "health never went NOT_SERVING"
            time.sleep(0.02)
        results = call_concurrently(mesh.address, calls, return_errors=True)
        with MeshClient(mesh.address) as client:
            versions = client.info().weight_versions
        snapshot = mesh.status()
        is_alive = {g["name"]: g["alive"] for g in snapshot["groups"]}
        is_strict = snapshot["epoch"] == epoch + 1 and not is_alive[group["name"]]
        num_unavailable = _check_outcomes(requests, results, layers, strict=is_strict)
        if is_strict:
            assert num_unavailable == num_affected
            assert is_alive == {f"{mesh.name}/group-{k}": k != 1 for k in range(3)}
            assert len(versions) == len(spec.moe_layers) * spec.num_experts - sum(len(e) for e in dead.values())
            assert not any(f"{layer}/{e}" in versions for layer, experts in dead.items() for e in experts)
    finally:
        mesh.stop()
