"""TLS end to end on a real 3-node Ray cluster: a CA and certificates generated here; the router's
port with mutual TLS (router.tls) and the groups' ports with TLS (internal_tls). Forward (sync and
async clients), admin with a bearer token, health and reflection all work over TLS; a plaintext
client, a client without a certificate and one from another CA are refused."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress

import grpc
import pytest
import ray
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from experts import MoELayer, load_spec
from mesh.config import load_config
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos.serving import SECRET_KEY, TLSConfig, channel
from protos.wire import from_proto, to_proto
from router_service import AsyncMeshClient, MeshClient
from tests.integration.mesh_helpers import FP32_TOL, rel_err
from protos.errors import ConfigError, MeshClientError

TOKEN = "tls-admin"
NAME = "expert-mesh"  # the name on the servers' certificate


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, ca: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(folder, stem: str, cert, key) -> tuple[str, str]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """{"ca", "server", "client", "stranger" (signed by another CA)}: (cert path, key path)."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca, other = _cert("mesh CA", ca_key, ca=True), _cert("other CA", other_key, ca=True)
    out = {"ca": _write(folder, "ca", ca, ca_key)}
    for stem, issuer, issuer_key in (("server", ca, ca_key), ("client", ca, ca_key), ("stranger", other, other_key)):
        key = _key()
        out[stem] = _write(folder, stem, _cert(stem, key, issuer, issuer_key), key)
    return out


@pytest.fixture(scope="module")
def tls_mesh(meshes, zoo, pki):
    path = zoo.checkpoint("mixtral")
    server_cert, server_key = pki["server"]
    ca = pki["ca"][0]
    mesh = meshes.get(path, key="tls", admin_token=TOKEN,
                      router={"tls": {"cert": server_cert, "key": server_key, "ca": ca}},
                      internal_tls={"cert": server_cert, "key": server_key, "ca": ca, "server_name": NAME})
    spec = load_spec(path)
    return mesh, spec, {layer: MoELayer.from_pretrained(path, layer=layer) for layer in spec.moe_layers}


def client_tls(pki, who: str = "client") -> TLSConfig:
    cert, key = pki[who] if who else (None, None)
    return TLSConfig(ca=pki["ca"][0], cert=cert, key=key, server_name=NAME)


def test_forward_admin_health_and_reflection_over_mutual_tls(tls_mesh, pki):
    mesh, spec, layers = tls_mesh
    x = torch.randn(7, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    with MeshClient(mesh.address, tls=client_tls(pki)) as client:
        for layer, local in layers.items():
            assert rel_err(client.forward(layer, x), local(x)) <= FP32_TOL, layer

    async def async_forward():
        client = AsyncMeshClient(mesh.address, tls=client_tls(pki))
        try:
            return await client.forward(min(layers), x)
        finally:
            await client.close()

    assert rel_err(asyncio.run(async_forward()), layers[min(layers)](x)) <= FP32_TOL
    with channel(mesh.address, client_tls(pki), aio=False) as secure:
        reply = pb_grpc.MeshAdminStub(secure).Autoscale(pb.AutoscaleRequest(enabled=False), timeout=30,
                                                        metadata=[("authorization", f"Bearer {TOKEN}")])
        assert reply.ok
        health = health_pb2_grpc.HealthStub(secure).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listing = next(reflection_pb2_grpc.ServerReflectionStub(secure).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        services = {s.name for s in listing.list_services_response.service}
        assert {"expert_mesh.v1.ExpertMesh", "expert_mesh.v1.MeshAdmin", "grpc.health.v1.Health"} <= services


def test_the_serve_ingress_reaches_a_tls_router_over_mutual_tls(tls_mesh, pki, zoo):
    """The Serve replica's body (cluster/serve_app.MeshIngress, built here as Serve builds it) adopts
    the TLS mesh and forwards over mutual TLS with router.tls: answers equal the in-process layer."""
    from cluster.serve_app import MeshIngress

    mesh, spec, layers = tls_mesh
    server_cert, server_key = pki["server"]
    config = {"name": mesh.name, "model": str(zoo.checkpoint("mixtral")), "admin_token": TOKEN,
              "router": {"port": 0, "tls": {"cert": server_cert, "key": server_key, "ca": pki["ca"][0],
                                            "server_name": NAME}},
              "internal_tls": {"cert": server_cert, "key": server_key, "ca": pki["ca"][0], "server_name": NAME}}
    x = torch.randn(5, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    layer = min(layers)

    async def forward():
        ingress = MeshIngress.__new__(MeshIngress)
        await ingress.__init__(config)
        assert not ingress.created and ingress.mesh.addresses == mesh.addresses  # adopted, not deployed
        request = pb.ForwardRequest(layer=layer)
        to_proto(x, request.hidden)
        try:
            return from_proto((await ingress.Forward(request)).hidden, "hidden")
        finally:
            await asyncio.gather(*(c.close() for c in ingress._channels))

    assert rel_err(asyncio.run(forward()), layers[layer](x)) <= FP32_TOL


@pytest.mark.parametrize("who", ["plaintext", "no client certificate", "stranger"])
def test_a_client_outside_the_pki_is_refused(tls_mesh, pki, who):
    mesh, spec, layers = tls_mesh
    tls = {"plaintext": None, "no client certificate": client_tls(pki, who=None),
           "stranger": client_tls(pki, "stranger")}[who]
    with MeshClient(mesh.address, timeout_s=5, tls=tls) as client:
        with pytest.raises(MeshClientError) as error:
            client.forward(min(layers), torch.randn(2, spec.hidden_size))
    assert error.value.code == grpc.StatusCode.UNAVAILABLE, error.value


def _internal_endpoint(mesh, kind: str) -> str:
    """An expert group's ExpertWorker port, or a latency probe's MeshProbe port, of `mesh`."""
    import msgpack

    from mesh.controller import NAMESPACE

    state = msgpack.unpackb(ray.get(mesh.controller.snapshot.remote()), strict_map_key=False)
    if kind == "group":
        return ray.get(ray.get_actor(state["groups"][0]["name"], namespace=NAMESPACE).info.remote())["endpoint"]
    links = ray.get(mesh.controller.measure_links.remote(), timeout=120)  # the probes measure each other over TLS
    assert all(rtt > 0 for row in links["rtt_ms"] for rtt in row), links
    probe = ray.get_actor(f"{mesh.name}/probe-{links['nodes'][0][:12]}", namespace=NAMESPACE)
    return ray.get(probe.start.remote(ray.get(mesh.controller.data_secret.remote())))[1]  # started: its endpoint


def _ping(kind: str, link, secret: str) -> bytes:
    stub = pb_grpc.ExpertWorkerStub(link).Ping if kind == "group" else pb_grpc.MeshProbeStub(link).Echo
    return stub(pb.PingRequest(payload=b"x"), timeout=10, metadata=[(SECRET_KEY, secret)]).payload


@pytest.mark.parametrize("kind", ["group", "probe"])
def test_the_internal_ports_speak_mutual_tls_only(tls_mesh, pki, kind):
    mesh, spec, _ = tls_mesh
    secret = ray.get(mesh.controller.data_secret.remote())
    endpoint = _internal_endpoint(mesh, kind)
    with grpc.insecure_channel(endpoint) as plain:
        with pytest.raises(grpc.RpcError) as error:
            _ping(kind, plain, secret)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with channel(endpoint, TLSConfig(ca=pki["ca"][0], server_name=NAME), aio=False) as no_certificate:
        with pytest.raises(grpc.RpcError) as error:  # mutual: the mesh's own ends present the internal certificate
            _ping(kind, no_certificate, secret)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    cert, key = pki["server"]
    with channel(endpoint, TLSConfig(ca=pki["ca"][0], cert=cert, key=key, server_name=NAME), aio=False) as secure:
        assert _ping(kind, secure, secret) == b"x"


def test_tls_between_routers_and_groups_is_refused_with_the_collective_transport(pki):
    server_cert, server_key = pki["server"]
    with pytest.raises(ConfigError, match="internal_tls cannot cover router.transport: collective.*not encrypted"):
        load_config(None, **{"router.transport": "collective"},
                    internal_tls={"cert": server_cert, "key": server_key, "ca": pki["ca"][0]})
