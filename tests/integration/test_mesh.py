"""The mesh spine on a real 3-node Ray cluster: routers, batching, expert groups, client, CLI.

- every MoE layer through `MeshClient.forward` equals the transformers block ([T, H] and [B, S, H]);
- 32 concurrent callers with different token counts get their own answers, batched and chunked;
- greedy generation through `patch_model` gives the unpatched model's tokens, six families;
- reflection and grpc.health.v1 on the router's port, as any gRPC tool sees them;
- `mesh.status()`: groups, nodes, experts, versions, liveness, routers, tokens per expert;
- the `mesh` CLI end to end: up, status --json, down, down again.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import time
from pathlib import Path

import grpc
import pytest
import ray
import torch
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.local import start_mesh
from experts import ExpertGroup, MoELayer, load_spec
from mesh.config import MeshConfig
from router_service import AsyncMeshClient, DirectClient, MeshClient, RemoteMoE, patch_model
from tests.checkpoints import (FAMILIES, NUM_NEW_TOKENS, PROMPT, block_output, generate_greedy, moe_block,
                               token_ids_for)
from tests.integration.mesh_helpers import (FP32_TOL, MeshUp, call_concurrently, free_port, gate_counts, load_report,
                                             mesh_cli, rel_err, stats_delta, tokens_delta)
from protos.errors import MeshClientError

NUM_CALLERS = 32
# max_wait_ms holds a batch open for 5 ms: 32 callers released together merge reliably (with 0, an
# idle router sends each request at once, and whether they merge depends on timing)
BATCH16 = {"router": {"batching": {"max_batch_tokens": 16, "max_wait_ms": 50.0}}}  # chunks of callers merge


def caller_requests(spec, seed: int) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """NUM_CALLERS requests (layer, x, token ids or None) of 1..40 tokens (all different), over the
    MoE layers in turn; token ids for the layers that pick experts by them."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(NUM_CALLERS):
        layer, num_tokens = spec.moe_layers[i % len(spec.moe_layers)], 1 + (7 * i) % 40
        requests.append((layer, torch.randn(num_tokens, spec.hidden_size, generator=generator),
                         token_ids_for(spec, layer, (num_tokens,), seed=seed + i)))
    return requests


def check_own_answers(path: Path, requests, outputs) -> None:
    layers = {layer: MoELayer.from_pretrained(path, layer=layer) for layer, _, _ in requests}
    assert len(outputs) == len(requests)
    for i, ((layer, x, ids), out) in enumerate(zip(requests, outputs)):
        assert out.shape == x.shape and out.dtype == x.dtype, i
        assert rel_err(out, layers[layer](x, ids)) <= FP32_TOL, (i, layer, x.shape[0])


# ---- one mesh per block, started for this module's tests of that family and stopped after ----

# Families whose MoE block is another served family's (the spec differs in config names, MoE layers
# or checkpoint names only): MoELayer and patch_model check each against transformers
# (test_layer_matches_transformers.py, test_client.py); the mesh path is the other family's.
SAME_BLOCK_AS = {"minimax": "mixtral", "granitemoe": "mixtral", "granitemoeshared": "mixtral",
                 "granitemoehybrid": "mixtral", "granitemoe_swa": "mixtral", "flex_olmo": "olmoe",
                 "jamba": "olmoe", "mellum": "qwen3_moe", "qwen3_vl_moe": "qwen3_moe",
                 "qwen3_omni_moe": "qwen3_moe", "cohere2_moe": "qwen2_moe",
                 "glm4_moe_lite": "glm4_moe", "solar_open": "glm4_moe", "glm4v_moe": "glm4_moe",
                 "glm_moe_dsa": "deepseek_v32", "axk2": "deepseek_v32", "dots1": "deepseek_v3",
                 "exaone_moe": "deepseek_v3", "hy_v3": "deepseek_v3", "mimo_v2_flash": "deepseek_v3",
                 "kimi_linear": "deepseek_v3", "bailing_hybrid": "deepseek_v3", "afmoe": "deepseek_v3",
                 "flint": "deepseek_v3", "laguna": "deepseek_v3", "beam": "deepseek_v3",
                 "hy_v4": "deepseek_v3", "ernie4_5_moe": "deepseek_v2",
                 "ernie4_5_vl_moe": "deepseek_v2",
                 "mistral4": "mistral_large4", "lfm2_moe": "minimax_m2"}
MESH_FAMILIES = [family for family in FAMILIES if family not in SAME_BLOCK_AS]


@pytest.fixture(scope="module", params=MESH_FAMILIES)
def family_mesh(request, ray_cluster, zoo):
    family = request.param
    path = zoo.checkpoint(family)
    mesh = start_mesh(MeshConfig(name=f"spine-{family}", router={"port": 0}), path)
    yield family, path, mesh
    mesh.stop()


def test_every_moe_layer_equals_the_transformers_block(family_mesh, zoo):
    family, path, mesh = family_mesh
    spec, model = load_spec(path), zoo.model(family)
    x = torch.randn(3, 7, spec.hidden_size, generator=torch.Generator().manual_seed(0))  # [B, S, H]
    with MeshClient(mesh.address) as client:
        info = client.info()
        for layer in spec.moe_layers:
            ids = token_ids_for(spec, layer, (3, 7))  # [B, S] for a hash-routed layer, else None
            ref = block_output(moe_block(model, layer, spec.block_attr), x, ids)
            out_bsh = client.forward(layer, x, ids)
            out_th = client.forward(layer, x.reshape(-1, spec.hidden_size), None if ids is None else ids.reshape(-1))
            one = client.forward(layer, x[0, :1], None if ids is None else ids[0, :1])
            assert out_bsh.shape == x.shape and out_bsh.dtype == torch.float32
            assert out_th.shape == (21, spec.hidden_size)
            assert rel_err(out_bsh, ref) <= FP32_TOL, (family, layer)
            assert rel_err(out_th, ref.reshape(-1, spec.hidden_size)) <= FP32_TOL, (family, layer)
            assert rel_err(one, ref[0, :1]) <= FP32_TOL, (family, layer)
    assert (info.model_type, info.config_hash) == (spec.model_type, spec.config_hash())
    assert info.moe_layers == spec.moe_layers and info.hidden_size == spec.hidden_size
    assert len(info.weight_versions) == len(spec.moe_layers) * spec.num_experts
    assert info.epoch >= 1 and "float32" in info.dtypes


class CountingClient(MeshClient):
    """A MeshClient that counts the tokens it sends per layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_sent: dict[int, int] = {}

    def forward(self, layer, hidden, token_ids=None):
        self.tokens_sent[layer] = self.tokens_sent.get(layer, 0) + hidden.numel() // hidden.shape[-1]
        return super().forward(layer, hidden, token_ids)


def test_patched_model_generates_the_unpatched_tokens(family_mesh, zoo):
    """20 greedy tokens equal; prompt logits within fp32 tolerance; and the mesh really served
    them: the router routed top_k copies (that layer's) of every token that the patched model sent."""
    family, path, mesh = family_mesh
    spec, reference = load_spec(path), zoo.model(family)
    patched = copy.deepcopy(reference)
    before = mesh.status()
    with CountingClient(mesh.address) as client:
        assert patch_model(patched, client) == len(spec.moe_layers)
        tokens = generate_greedy(patched)
        with torch.no_grad():
            logits = patched(torch.tensor(PROMPT)).logits
    after = mesh.status()
    with torch.no_grad():
        ref_logits = reference(torch.tensor(PROMPT)).logits
    assert all(isinstance(moe_block(patched, i, spec.block_attr), RemoteMoE) for i in spec.moe_layers)
    assert len(tokens) == NUM_NEW_TOKENS and tokens == generate_greedy(reference), family
    assert rel_err(logits, ref_logits) <= FP32_TOL, family
    # prefill (9) + 19 single-token decode steps + the logits pass (9), per MoE layer
    assert client.tokens_sent == {layer: 2 * len(PROMPT[0]) + NUM_NEW_TOKENS - 1 for layer in spec.moe_layers}
    routed = tokens_delta(before, after)
    for layer in spec.moe_layers:
        in_layer = sum(n for key, n in routed.items() if key.startswith(f"{layer}/"))
        copies = spec.top_k_of(layer) * client.tokens_sent[layer]
        if spec.num_identity_experts:  # copies picked for identity experts never reach a group
            assert 0 < in_layer < copies, (family, layer)
        else:
            assert in_layer == copies, (family, layer)


# ---- the direct client (router core in this process) on the same meshes ----

DIRECT_FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "deepseek_v4")  # v4: token ids


@pytest.mark.parametrize("transport", ["grpc", "collective"])
def test_direct_client_equals_transformers_and_generates_the_unpatched_tokens(family_mesh, zoo, transport):
    """Every MoE layer through a DirectClient equals the transformers block; 20 greedy tokens through
    patch_model(model, DirectClient) equal the unpatched model's; the slices went over `transport`
    (collective: after its channels opened, none over grpc) straight to the groups."""
    family, path, mesh = family_mesh
    if family not in DIRECT_FAMILIES:
        pytest.skip("the direct client is checked on the issue's families (and deepseek_v4's token ids)")
    spec, model = load_spec(path), zoo.model(family)
    x = torch.randn(3, 7, spec.hidden_size, generator=torch.Generator().manual_seed(0))  # [B, S, H]
    with DirectClient(mesh.name, transport=transport) as client:
        segments = client._core.router.transport.segments
        if transport == "collective":
            _wait_for_channels(client, x, spec)
            segments.clear()
        for layer in spec.moe_layers:
            ids = token_ids_for(spec, layer, (3, 7))
            ref = block_output(moe_block(model, layer, spec.block_attr), x, ids)
            out, epoch = client.forward_with_epoch(layer, x, ids)
            assert out.shape == x.shape and out.dtype == torch.float32 and epoch >= 1
            assert rel_err(out, ref) <= FP32_TOL, (family, transport, layer)
        patched = copy.deepcopy(model)
        assert patch_model(patched, client) == len(spec.moe_layers)
        assert generate_greedy(patched) == generate_greedy(model), (family, transport)
        assert set(segments) == {transport} and segments[transport] > 0, dict(segments)
        assert client.name in [c["name"] for c in mesh.status()["direct_clients"]]
    assert client.name not in [c["name"] for c in mesh.status()["direct_clients"]]  # close() ended the lease


def _wait_for_channels(client, x, spec, timeout_s: float = 30.0) -> None:
    """Calls until the collective channels to every group are open (until then slices go over grpc)."""
    transport, deadline = client._core.router.transport, time.time() + timeout_s
    groups = set(client._core.router.table.groups())
    while set(transport.channels) != groups:
        assert time.time() < deadline, f"channels {sorted(transport.channels)} of {sorted(groups)}"
        layer = spec.moe_layers[-1]
        client.forward(layer, x, token_ids_for(spec, layer, tuple(x.shape[:-1])))
        time.sleep(0.05)


def test_bad_input_to_a_direct_client_names_the_field_and_sends_nothing(family_mesh):
    family, path, mesh = family_mesh
    if family not in ("deepseek_v3", "deepseek_v4"):
        pytest.skip("checked where a dense layer (deepseek_v3) or a hash-routed one (deepseek_v4) exists")
    spec = load_spec(path)
    H, layer = spec.hidden_size, spec.moe_layers[-1]
    nan = torch.randn(4, H)
    nan[1, 2] = float("nan")
    cases = [((layer, torch.randn(4, H + 1)), "hidden size"), ((layer, torch.randn(4, H).to(torch.int32)), "dtype"),
             ((layer, torch.randn(H)), "hidden must be"), ((layer, torch.randn(1, 2, 3, H)), "hidden must be"),
             ((layer, nan), "NaN"), ((99, torch.randn(4, H)), "not an MoE layer"),
             ((layer, torch.randn(0, H)), "no token")]
    if family == "deepseek_v3":
        cases.append(((0, torch.randn(4, H)), "not an MoE layer"))  # layer 0 is dense
    else:
        hashed = min(spec.hash_layers)
        cases += [((hashed, torch.randn(4, H)), "token_ids"),
                  ((hashed, torch.randn(4, H), torch.zeros(3, dtype=torch.int64)), "token_ids must have hidden's"),
                  ((hashed, torch.randn(4, H), torch.zeros(4)), "token_ids must be an integer")]
    with DirectClient(mesh.name) as client:
        router = client._core.router
        before = (dict(router.batch_stats), dict(router.transport.segments))
        for args, field in cases:
            with pytest.raises(MeshClientError) as info:
                client.forward(*args)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details, (field, info.value)
        assert (dict(router.batch_stats), dict(router.transport.segments)) == before  # nothing was sent
        x = torch.randn(4, H)
        ids = token_ids_for(spec, layer, (4,))
        assert rel_err(client.forward(layer, x, ids), MoELayer.from_pretrained(path, layer=layer)(x, ids)) <= FP32_TOL


def test_concurrent_callers_get_their_own_answers(family_mesh):
    """32 callers released together, 1..40 tokens each, default batching: all answered, each its
    own; the router's counters saw every request in one batch. (Whether they merge depends on
    timing here: an idle router sends a batch at once; merging is asserted in the chunked test.)"""
    family, path, mesh = family_mesh
    requests = caller_requests(load_spec(path), seed=11)
    before = load_report(mesh)
    outputs = call_concurrently(mesh.address, requests)
    delta = stats_delta(before, load_report(mesh))
    check_own_answers(path, requests, outputs)
    assert delta["entries"] == NUM_CALLERS  # every request in exactly one batch (no chunking at 2048)
    assert delta["tokens"] == sum(x.shape[0] for _, x, _ in requests)
    assert 1 <= delta["batches"] <= NUM_CALLERS, (family, delta)


# ---- one mixtral mesh with max_batch_tokens=16: chunking, status, reflection ----

@pytest.fixture(scope="module")
def batch16(meshes, zoo):
    path = zoo.checkpoint("mixtral")
    return path, meshes.get(path, key="mixtral-batch16", **copy.deepcopy(BATCH16))


def test_chunked_batches_still_give_every_caller_its_answer(batch16):
    """With max_batch_tokens=16, requests of up to 40 tokens travel as chunks of <= 16 tokens;
    32 AsyncMeshClients (asyncio.gather) all get their own answers."""
    path, mesh = batch16
    requests = caller_requests(load_spec(path), seed=12)

    async def run():
        clients = [AsyncMeshClient(mesh.address, timeout_s=60) for _ in requests]
        try:
            await asyncio.gather(*(c.info() for c in clients))
            return await asyncio.gather(*(c.forward(layer, x, ids) for c, (layer, x, ids) in zip(clients, requests)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    before = load_report(mesh)
    outputs = asyncio.run(run())
    after = load_report(mesh)
    check_own_answers(path, requests, outputs)
    delta = stats_delta(before, after)
    assert delta["entries"] == sum(math.ceil(x.shape[0] / 16) for _, x, _ in requests)  # chunks, each batched once
    assert delta["tokens"] == sum(x.shape[0] for _, x, _ in requests)
    assert delta["batches"] < delta["entries"], delta  # chunks of different requests were merged
    assert after["batches"]["max_tokens"] <= 16


def test_status_reports_groups_versions_and_tokens_per_expert(batch16):
    path, mesh = batch16
    spec = load_spec(path)
    generator = torch.Generator().manual_seed(3)
    inputs = {layer: [torch.randn(37, spec.hidden_size, generator=generator),
                      torch.randn(2, 5, spec.hidden_size, generator=generator)] for layer in spec.moe_layers}
    before = mesh.status()
    with MeshClient(mesh.address) as client:
        for layer, xs in inputs.items():
            for x in xs:
                client.forward(layer, x)
        info = client.info()
    after = mesh.status()

    expected: dict[str, int] = {}
    for layer, xs in inputs.items():
        for x in xs:
            for key, n in gate_counts(path, layer, x).items():
                expected[key] = expected.get(key, 0) + n
    assert tokens_delta(before, after) == expected
    assert sum(expected.values()) == spec.top_k * 47 * len(spec.moe_layers)

    assert after["mesh"] == mesh.name and after["model_type"] == "mixtral"
    assert after["model"] == str(Path(path).resolve())
    assert after["routers"] == [f"{mesh.name}/router-0"]
    groups = after["groups"]
    assert sorted(g["name"] for g in groups) == [f"{mesh.name}/group-{k}" for k in range(3)]
    alive_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive_nodes) == 3 and {g["node"] for g in groups} == alive_nodes  # one group per node
    assert all(g["alive"] and g["endpoint"] for g in groups)
    for layer in spec.moe_layers:
        held = sorted(e for g in groups for e in g["experts"][str(layer)])
        assert held == list(range(spec.num_experts)), layer  # every expert exactly once
    for g in groups:
        assignment = {int(layer): experts for layer, experts in g["experts"].items()}
        local = ExpertGroup.from_checkpoint(path, assignment)
        for layer, experts in assignment.items():
            versions = [local.version(layer, e) for e in experts]
            assert g["versions"][str(layer)] == versions, (g["name"], layer)
            assert [info.weight_versions[f"{layer}/{e}"] for e in experts] == versions


def test_reflection_and_health_as_any_grpc_tool_sees_them(batch16):
    """Reflection lists the services; Forward called from descriptors that reflection returned (no
    generated code, as grpcurl does) gives the right answer; grpc.health.v1 says SERVING."""
    path, mesh = batch16
    spec = load_spec(path)
    x = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(4))
    with grpc.insecure_channel(mesh.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("expert_mesh.v1.ExpertMesh")
        method = service.methods_by_name["Forward"]
        request_class = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        forward = channel.unary_unary("/expert_mesh.v1.ExpertMesh/Forward",
                                      request_serializer=request_class.SerializeToString,
                                      response_deserializer=reply_class.FromString)
        request = request_class(layer=spec.moe_layers[-1])
        request.hidden.data, request.hidden.dtype = x.numpy().tobytes(), "float32"
        request.hidden.shape.extend(x.shape)
        reply = forward(request, timeout=30)

        health = health_pb2_grpc.HealthStub(channel)
        statuses = {name: health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
                    for name in ("", "expert_mesh.v1.ExpertMesh")}
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)

    assert services == {"expert_mesh.v1.ExpertMesh", "expert_mesh.v1.MeshAdmin", "grpc.health.v1.Health",
                        "grpc.reflection.v1alpha.ServerReflection"}
    assert {m.name for m in service.methods} == {"Forward", "GetInfo"}
    assert {m.name for m in pool.FindServiceByName("expert_mesh.v1.MeshAdmin").methods} >= {"Status"}
    assert reply.hidden.dtype == "float32" and list(reply.hidden.shape) == list(x.shape)
    out = torch.frombuffer(bytearray(reply.hidden.data), dtype=torch.float32).reshape(x.shape)
    assert rel_err(out, MoELayer.from_pretrained(path, layer=spec.moe_layers[-1])(x)) <= FP32_TOL
    assert statuses == {name: health_pb2.HealthCheckResponse.SERVING for name in statuses}
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


# ---- the CLI, end to end, on its own local cluster ----

def test_cli_up_status_down(tmp_path):
    """`mesh up` (its own 2-node cluster) -> ready line; `mesh status --json`; a Forward through the
    printed address; `mesh down` stops it (exit 0, `up` exits 0, state file gone); `down` again fails."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["EXPERT_MESH_STATE_DIR"] = str(tmp_path / "state")
    name, port = f"cli-{os.getpid()}", free_port()
    with MeshUp(env, "--nodes", "2", "--port", str(port), "--name", name) as up:
        assert up.address == f"127.0.0.1:{port}"

        status = mesh_cli(env, "status", "--json", "--name", name)
        assert status.returncode == 0, status.stderr
        snapshot = json.loads(status.stdout)
        spec = load_spec(snapshot["model"])
        assert snapshot["mesh"] == name and snapshot["model_type"] == spec.model_type
        assert len(snapshot["groups"]) == 2 and all(g["alive"] for g in snapshot["groups"])
        assert len({g["node"] for g in snapshot["groups"]}) == 2
        assert snapshot["routers"] == [f"{name}/router-0"]
        # no GPU here: groups.device auto computes on the host; each shows the weight bytes it holds
        per_expert = 3 * spec.hidden_size * spec.intermediate_size * 4  # float32, w_gate_up + w_down
        held = {g["name"]: sum(map(len, g["experts"].values())) for g in snapshot["groups"]}
        assert all(g["device"] == "cpu" and g["nbytes"] >= held[g["name"]] * per_expert for g in snapshot["groups"])
        printed = mesh_cli(env, "status", "--name", name)
        assert printed.returncode == 0 and f"cpu {snapshot['groups'][0]['nbytes'] / 2**20:.1f} MiB" in printed.stdout

        x = torch.randn(6, spec.hidden_size, generator=torch.Generator().manual_seed(5))
        layer = spec.moe_layers[-1]
        with MeshClient(up.address) as client:
            out = client.forward(layer, x)
        assert rel_err(out, MoELayer.from_pretrained(snapshot["model"], layer=layer)(x)) <= FP32_TOL

        down = mesh_cli(env, "down", "--name", name)
        assert down.returncode == 0, down.stderr
        assert f"stopped mesh {name!r}" in down.stdout
        assert up.wait(timeout_s=90) == 0, up.output()
        assert not (tmp_path / "state" / f"{name}.json").exists()

        again = mesh_cli(env, "down", "--name", name)
        assert again.returncode != 0 and f"no running mesh named {name!r}" in again.stderr
        gone = mesh_cli(env, "status", "--name", name)
        assert gone.returncode != 0 and "no running mesh" in gone.stderr
