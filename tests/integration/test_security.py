"""Who gets in, on a real 3-node Ray cluster: no group or probe port computes or echoes for a caller
without the mesh's secret; admin calls take `authorization: Bearer` metadata (the old field still
works) and any token bytes get PERMISSION_DENIED, never INTERNAL; Status and Placement need the
read token or the admin token once either is set; a body that does not decode is INVALID_ARGUMENT naming its type;
ExpertWorker.Compute checks its input as Forward does. After each, the mesh still answers right.
"""

from __future__ import annotations

import grpc
import msgpack
import pytest
import ray
import torch

from experts import MoELayer, load_spec
from mesh.controller import NAMESPACE
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos.serving import SECRET_KEY
from protos.wire import to_proto
from router_service import MeshClient
from tests.integration.mesh_helpers import FP32_TOL, rel_err

TOKEN, READ = "admin-s3cret", "read-s3cret"


@pytest.fixture(scope="module")
def secured(meshes, zoo):
    path = zoo.checkpoint("mixtral")
    mesh = meshes.get(path, key="secured", admin_token=TOKEN, read_token=READ)
    spec = load_spec(path)
    return mesh, spec, {layer: MoELayer.from_pretrained(path, layer=layer) for layer in spec.moe_layers}


def assert_serves(mesh, spec, layers, seed: int = 0) -> None:
    x = torch.randn(6, spec.hidden_size, generator=torch.Generator().manual_seed(seed))
    with MeshClient(mesh.address) as client:
        for layer, local in layers.items():
            assert rel_err(client.forward(layer, x), local(x)) <= FP32_TOL, layer


def group_infos(mesh) -> list[dict]:
    state = msgpack.unpackb(ray.get(mesh.controller.snapshot.remote()), strict_map_key=False)
    return [ray.get(ray.get_actor(g["name"], namespace=NAMESPACE).info.remote()) for g in state["groups"]]


def probe_endpoints(mesh) -> list[str]:
    """The probes' endpoints (a Placement call starts them; `start` is idempotent)."""
    with grpc.insecure_channel(mesh.address) as channel:
        pb_grpc.MeshAdminStub(channel).Placement(pb.PlacementRequest(), timeout=120,
                                                 metadata=[("authorization", f"Bearer {READ}")])
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and a["name"].startswith(f"{mesh.name}/probe-")]
    assert names
    return [ray.get(ray.get_actor(n, namespace=NAMESPACE).start.remote("ignored"))[1] for n in names]


def a_batch(info: dict, hidden_size: int, rows: int = 3) -> pb.ExpertBatch:
    layer, experts = next(iter(info["experts"].items()))
    request = pb.ExpertBatch(layer=int(layer), experts=[experts[0]], counts=[rows])
    to_proto(torch.randn(rows, hidden_size), request.hidden)
    return request


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, timeout=30, **kwargs)
    return error.value


OUTSIDERS = {"no secret": None, "a wrong secret": [(SECRET_KEY, "guess")], "an empty secret": [(SECRET_KEY, "")]}


def test_no_group_or_probe_port_serves_an_outsider(secured):
    mesh, spec, layers = secured
    infos = group_infos(mesh)
    for info in infos:
        with grpc.insecure_channel(info["endpoint"]) as channel:
            stub = pb_grpc.ExpertWorkerStub(channel)
            for who, metadata in OUTSIDERS.items():
                for call, request in ((stub.Compute, a_batch(info, spec.hidden_size)),
                                      (stub.Ping, pb.PingRequest(payload=b"x" * 64))):
                    error = refused(call, request, metadata=metadata)
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (info["name"], who, error.details())
    for endpoint in probe_endpoints(mesh):
        with grpc.insecure_channel(endpoint) as channel:
            for who, metadata in OUTSIDERS.items():
                error = refused(pb_grpc.MeshProbeStub(channel).Echo, pb.PingRequest(payload=b"x"), metadata=metadata)
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (endpoint, who)
    assert [i["tokens_served"] for i in group_infos(mesh)] == [i["tokens_served"] for i in infos]  # nothing computed
    secret = ray.get(mesh.controller.data_secret.remote())
    assert secret.encode() not in ray.get(mesh.controller.snapshot.remote())  # mesh status never shows it
    for info in infos:  # the secret is what lets a caller in
        with grpc.insecure_channel(info["endpoint"]) as channel:
            reply = pb_grpc.ExpertWorkerStub(channel).Compute(a_batch(info, spec.hidden_size), timeout=30,
                                                              metadata=[(SECRET_KEY, secret)])
            assert list(reply.hidden.shape) == [3, spec.hidden_size]
    assert_serves(mesh, spec, layers)


def test_admin_token_in_bearer_metadata_and_any_token_bytes_are_denied(secured):
    mesh, spec, layers = secured
    with grpc.insecure_channel(mesh.address) as channel:
        autoscale = pb_grpc.MeshAdminStub(channel).Autoscale
        off = pb.AutoscaleRequest(enabled=False)
        assert autoscale(off, timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")]).ok
        assert autoscale(pb.AutoscaleRequest(token=TOKEN, enabled=False), timeout=30).ok  # deprecated field
        for token in ("", "wrong", "tökén ✓ \u0000", TOKEN + " ", "Bearer " + TOKEN, "é" * 300):
            error = refused(autoscale, pb.AutoscaleRequest(token=token, enabled=False))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (token, error.details())
        for header in ("Bearer wrong", "Basic " + TOKEN, "Bearer", TOKEN):
            error = refused(autoscale, off, metadata=[("authorization", header)])
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (header, error.details())
        error = refused(autoscale, off, metadata=[("authorization-bin", "tökén".encode())])
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert_serves(mesh, spec, layers, seed=1)


def test_status_and_placement_need_the_read_token_once_set(secured):
    mesh, spec, layers = secured
    with grpc.insecure_channel(mesh.address) as channel:
        admin = pb_grpc.MeshAdminStub(channel)
        for call, request in ((admin.Status, pb.StatusRequest()), (admin.Placement, pb.PlacementRequest())):
            assert refused(call, request).code() == grpc.StatusCode.PERMISSION_DENIED
            assert refused(call, request, metadata=[("authorization", "Bearer no")]).code() == \
                grpc.StatusCode.PERMISSION_DENIED
        for token in (READ, TOKEN):
            reply = admin.Status(pb.StatusRequest(), timeout=30, metadata=[("authorization", f"Bearer {token}")])
            assert msgpack.unpackb(reply.snapshot, strict_map_key=False)["mesh"] == mesh.name
        info = pb_grpc.ExpertMeshStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30)  # stays open
        assert list(info.moe_layers) == list(spec.moe_layers)


def test_with_only_an_admin_token_status_and_placement_need_it(meshes, zoo):
    """Placement makes every probe time echoes to every other: an admin token alone closes it too."""
    mesh = meshes.get(zoo.checkpoint("mixtral"), key="admin-only", admin_token=TOKEN)
    try:
        with grpc.insecure_channel(mesh.address) as channel:
            admin = pb_grpc.MeshAdminStub(channel)
            for call, request in ((admin.Status, pb.StatusRequest()), (admin.Placement, pb.PlacementRequest())):
                assert refused(call, request).code() == grpc.StatusCode.PERMISSION_DENIED
                assert refused(call, request, metadata=[("authorization", f"Bearer {READ}")]).code() == \
                    grpc.StatusCode.PERMISSION_DENIED
            reply = admin.Status(pb.StatusRequest(), timeout=30, metadata=[("authorization", f"Bearer {TOKEN}")])
            assert msgpack.unpackb(reply.snapshot, strict_map_key=False)["mesh"] == mesh.name
    finally:
        meshes.stop("admin-only")


METHODS = ["/expert_mesh.v1.ExpertMesh/Forward", "/expert_mesh.v1.ExpertMesh/GetInfo",
           "/expert_mesh.v1.MeshAdmin/Status", "/expert_mesh.v1.MeshAdmin/Scale", "/expert_mesh.v1.MeshAdmin/Swap"]
GARBAGE = [b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc", bytes(range(256)) * 4]


def test_a_body_that_does_not_decode_is_invalid_argument_naming_its_type(secured):
    mesh, spec, layers = secured
    with grpc.insecure_channel(mesh.address) as channel:
        for method in METHODS:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            for body in GARBAGE:
                error = refused(call, body)
                name = method.rsplit("/", 1)[1]
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, body[:8], error.details())
                assert "is not a valid expert_mesh.v1." in error.details() and name[:3] in error.details(), \
                    error.details()
    assert_serves(mesh, spec, layers, seed=2)


def test_expert_worker_compute_checks_its_input_as_forward_does(secured):
    mesh, spec, layers = secured
    info = group_infos(mesh)[0]
    metadata = [(SECRET_KEY, ray.get(mesh.controller.data_secret.remote()))]
    layer, experts = next(iter(info["experts"].items()))
    not_held = next(e for e in range(spec.num_experts) if e not in experts)
    h = spec.hidden_size

    def batch(rows=4, hidden=h, counts=(4,), expert=experts[0], scale=None, fill=None) -> pb.ExpertBatch:
        x = torch.randn(rows, hidden)
        if fill is not None:
            x[0, 0] = fill
        request = pb.ExpertBatch(layer=int(layer), experts=[expert], counts=list(counts))
        to_proto(x, request.hidden)
        if scale is not None:
            to_proto(scale, request.scale)
        return request

    cases = {  # case -> (request, words the details must hold)
        "scale [N, 1] (would broadcast to [N, N, H])": (batch(scale=torch.ones(4, 1)), ["ExpertBatch.scale", "[4]"]),
        "scale of 3 for 4 rows": (batch(scale=torch.ones(3)), ["ExpertBatch.scale", "[4]"]),
        "negative count": (batch(counts=(-1,)), ["ExpertBatch.counts", "non-negative"]),
        "counts short of the rows": (batch(counts=(3,)), ["ExpertBatch.counts", "4 rows"]),
        "wrong hidden size": (batch(hidden=h + 1), ["ExpertBatch.hidden", f"[N, {h}]"]),
        "NaN": (batch(fill=float("nan")), ["NaN or Inf"]),
        "an expert the group does not hold": (batch(expert=not_held), [f"[{not_held}]", "does not hold"]),
        "a layer the group does not hold": (pb.ExpertBatch(layer=99, experts=[0], counts=[0],
                                                           hidden=pb.Tensor(dtype="float32", shape=[0, h])),
                                            ["layer 99"]),
    }
    with grpc.insecure_channel(info["endpoint"]) as channel:
        compute = pb_grpc.ExpertWorkerStub(channel).Compute
        for case, (request, words) in cases.items():
            error = refused(compute, request, metadata=metadata)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, error.details())
            assert all(w in error.details() for w in words), (case, error.details())
        assert list(compute(batch(), timeout=30, metadata=metadata).hidden.shape) == [4, h]
    assert_serves(mesh, spec, layers, seed=3)


def test_a_swap_reads_only_under_swap_roots(secured, tmp_path):
    mesh, spec, layers = secured
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with grpc.insecure_channel(mesh.address) as channel:
        swap = pb_grpc.MeshAdminStub(channel).Swap
        for source in ("/etc", str(outside), "", "/.."):
            error = refused(swap, pb.SwapRequest(layer=min(spec.moe_layers), experts=[0], source_dir=source),
                            metadata=[("authorization", f"Bearer {TOKEN}")])
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (source, error.details())
            assert "swap refused, nothing changed" in error.details(), error.details()
            assert "outside swap_roots" in error.details() or "empty" in error.details(), error.details()
    assert_serves(mesh, spec, layers, seed=4)
