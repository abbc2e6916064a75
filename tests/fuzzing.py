"""A seeded fuzzer of the mesh's gRPC surface: Forward, ExpertWorker.Compute and every MeshAdmin
method. Shared by tests/integration/test_fuzz.py (1,000 cases) and bench/fuzz_mesh.py (10,000).

Each case is one call as raw bytes: a valid request with one field mutated (shapes, dims, dtypes,
layers, data lengths, NaN/Inf, tokens, counts, scales, unknown fields, wrong wire types, admin
tokens), random or truncated bytes, or a flood of 64 in flight. A case names the status codes it
may get; an OK answer is checked against the in-process reference. UNKNOWN and INTERNAL are never
allowed.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import grpc
import torch

from protos import expert_mesh_pb2 as pb
from protos.serving import SECRET_KEY

__all__ = ["CATEGORIES", "Case", "Fuzzer", "Outcome", "Target", "alive_check", "fuzz_target", "run"]

INVALID, EXHAUSTED, DENIED, UNAUTH = "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED"
FORWARD, COMPUTE = "/expert_mesh.v1.ExpertMesh/Forward", "/expert_mesh.v1.ExpertWorker/Compute"
ADMIN = {name: f"/expert_mesh.v1.MeshAdmin/{name}"
         for name in ("Status", "Scale", "Swap", "Autoscale", "Placement", "Rebalance")}
DTYPE_NAMES = ["float32", "bfloat16", "float16", "float64", "int8", "", "f32", "FLOAT32", "bool", "\u00e9", "x" * 300]
CATEGORIES = ("shapes", "dims", "dtypes", "layers", "data lengths", "nan inf", "tokens", "counts", "scales",
              "unknown fields", "wire types", "admin", "random bytes", "truncated bytes", "no secret", "floods")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # max |out - ref| <= TOL x max |ref|


@dataclasses.dataclass(frozen=True)
class Target:
    """What the fuzzer needs to know of one running mesh."""

    router: str                                   # "host:port"
    group: str                                    # one group's endpoint
    secret: str
    hidden_size: int
    moe_layers: tuple[int, ...]
    max_request_tokens: int
    forward_ref: Callable[[int, torch.Tensor], torch.Tensor]   # (layer, x [T, H] fp32) -> [T, H]
    group_layer: int                              # a layer the group holds, and its experts
    group_experts: tuple[int, ...]
    compute_ref: Callable[[int, torch.Tensor, list, list, torch.Tensor | None], torch.Tensor]


@dataclasses.dataclass
class Case:
    category: str
    address: str
    method: str
    body: bytes
    metadata: tuple = ()
    allowed: frozenset = frozenset({INVALID})
    check: Callable[[bytes], str | None] | None = None   # an OK reply's bytes -> None or what is wrong


@dataclasses.dataclass
class Outcome:
    codes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (category, code)
    failures: list = dataclasses.field(default_factory=list)


def _tensor(x: torch.Tensor) -> pb.Tensor:
    names = {v: k for k, v in DTYPES.items()}
    return pb.Tensor(data=x.contiguous().view(torch.uint8).numpy().tobytes(), dtype=names[x.dtype],
                     shape=list(x.shape))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _decode(tensor: pb.Tensor) -> torch.Tensor:
    """A tensor message as it claims to be (dtype, shape and byte count already known right)."""
    dtype = DTYPES[tensor.dtype]
    if not tensor.data:
        return torch.zeros(list(tensor.shape), dtype=dtype)
    return torch.frombuffer(bytearray(tensor.data), dtype=dtype).reshape(list(tensor.shape))


def _decoded(reply: bytes, message) -> torch.Tensor:
    return _decode(message.FromString(reply).hidden)


def _close(out: torch.Tensor, ref: torch.Tensor) -> str | None:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"answer {list(out.shape)} {out.dtype}, expected {list(ref.shape)} {ref.dtype}"
    if not ref.numel():
        return None
    err = (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-12)
    return None if err <= TOL[ref.dtype] else f"answer off by {err:.2e} (> {TOL[ref.dtype]})"


class Fuzzer:
    """Cases for `target`, reproducible from `seed`."""

    def __init__(self, target: Target, seed: int = 0):
        self.t, self.rng = target, random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    # -- valid requests and their checks --------------------------------------------------------

    def _x(self, tokens: int, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(tokens, self.t.hidden_size, generator=self.gen).to(dtype)

    def forward(self, layer: int | None = None, x: torch.Tensor | None = None, shape: list | None = None) -> pb.ForwardRequest:
        layer = self.rng.choice(self.t.moe_layers) if layer is None else layer
        x = self._x(self.rng.randint(1, 8)) if x is None else x
        request = pb.ForwardRequest(layer=layer, hidden=_tensor(x))
        if shape is not None:
            request.hidden.shape[:] = shape
        return request

    def forward_check(self, request: pb.ForwardRequest) -> Callable[[bytes], str | None]:
        """The check of an OK answer to `request`: the reference on the decoded input."""
        x = _decode(request.hidden)
        ref = self.t.forward_ref(request.layer, x.float().reshape(-1, self.t.hidden_size)).to(x.dtype).reshape(x.shape)
        return lambda reply: _close(_decoded(reply, pb.ForwardResponse), ref)

    def compute(self, counts: list[int] | None = None, scale: torch.Tensor | None = None) -> pb.ExpertBatch:
        n = self.rng.randint(1, len(self.t.group_experts)) if counts is None else len(counts)
        experts = sorted(self.rng.sample(self.t.group_experts, n))
        counts = [self.rng.randint(0, 4) for _ in experts] if counts is None else counts
        request = pb.ExpertBatch(layer=self.t.group_layer, experts=experts, counts=counts,
                                 hidden=_tensor(self._x(max(sum(counts), 0))))
        if scale is not None:
            request.scale.CopyFrom(_tensor(scale))
        return request

    def compute_check(self, request: pb.ExpertBatch) -> Callable[[bytes], str | None]:
        x = _decode(request.hidden)
        scale = _decode(request.scale) if request.scale.dtype else None
        ref = self.t.compute_ref(request.layer, x, list(request.experts), list(request.counts), scale)
        return lambda reply: _close(_decoded(reply, pb.ExpertResult), ref)

    def _forward_case(self, category: str, request: pb.ForwardRequest, allowed=frozenset({INVALID})) -> Case:
        """A Forward that is OK (and then checked) if and only if it is valid as sent."""
        check = self.forward_check(request) if self._forward_is_valid(request) else None
        return Case(category, self.t.router, FORWARD, request.SerializeToString(),
                    allowed=frozenset({"OK"}) if check else allowed, check=check)

    def _forward_is_valid(self, request: pb.ForwardRequest) -> bool:
        hidden, h = request.hidden, self.t.hidden_size
        sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
        shape = list(hidden.shape)
        if request.layer not in self.t.moe_layers or hidden.dtype not in sizes or len(shape) not in (2, 3):
            return False
        if shape[-1] != h or any(d < 0 or d > 2**31 - 1 for d in shape):
            return False
        tokens = math.prod(shape) // h
        if not 0 < tokens <= self.t.max_request_tokens or len(hidden.data) != math.prod(shape) * sizes[hidden.dtype]:
            return False
        return bool(torch.isfinite(_decode(hidden)).all())

    def _compute_case(self, category: str, request: pb.ExpertBatch, valid: bool) -> Case:
        check = self.compute_check(request) if valid else None
        return Case(category, self.t.group, COMPUTE, request.SerializeToString(), ((SECRET_KEY, self.t.secret),),
                    frozenset({"OK"}) if valid else frozenset({INVALID}), check)

    # -- categories ------------------------------------------------------------------------------

    def cases(self, category: str, n: int) -> Iterator[Case]:
        make = getattr(self, "_" + category.replace(" ", "_"))
        for _ in range(n):
            yield make()

    def _dim(self) -> int:
        h = self.t.hidden_size
        return self.rng.choice([0, 1, 2, 3, -1, -(2**40), h, h - 1, h + 1, 2**31 - 1, 2**31, 2**61, 2**63 - 1,
                                self.rng.randint(0, 64)])

    def _shapes(self) -> Case:  # the shape field alone, data as it was
        x = self._x(self.rng.randint(1, 6))
        h, t = self.t.hidden_size, x.shape[0]
        shape = self.rng.choice([[t, h], [1, t, h], [t, 1, h], [h, t], [t * h], [t, h, 1], [0, h], [t, 0, h],
                                 [self._dim(), h], [t, self._dim()], [self._dim(), self._dim(), h]])
        return self._forward_case("shapes", self.forward(x=x, shape=shape))

    def _dims(self) -> Case:  # how many dims
        rank = self.rng.choice([0, 1, 4, 5, 8, 9, 64])
        shape = [self._dim() for _ in range(rank)]
        return self._forward_case("dims", self.forward(shape=shape))

    def _dtypes(self) -> Case:
        request = self.forward()
        request.hidden.dtype = self.rng.choice(DTYPE_NAMES)
        if request.hidden.dtype in ("bfloat16", "float16") and self.rng.random() < 0.5:  # a valid half request
            dtype = torch.bfloat16 if request.hidden.dtype == "bfloat16" else torch.float16
            request.hidden.CopyFrom(_tensor(self._x(self.rng.randint(1, 6), dtype)))
        return self._forward_case("dtypes", request)

    def _layers(self) -> Case:
        layer = self.rng.choice([*self.t.moe_layers, -1, 0, 2**31 - 1, -(2**31), self.rng.randint(-5, 100)])
        return self._forward_case("layers", self.forward(layer=layer))

    def _data_lengths(self) -> Case:
        request = self.forward()
        data = request.hidden.data
        cut = self.rng.choice([0, 1, 3, 4, len(data) // 2])
        request.hidden.data = self.rng.choice([data[:-cut] if cut else b"", data + bytes(self.rng.choice([1, 4, 9]))])
        return self._forward_case("data lengths", request)

    def _nan_inf(self) -> Case:
        x = self._x(self.rng.randint(1, 6))
        x.view(-1)[self.rng.randrange(x.numel())] = self.rng.choice([float("nan"), float("inf"), float("-inf")])
        return self._forward_case("nan inf", self.forward(x=x))

    def _tokens(self) -> Case:
        limit = self.t.max_request_tokens
        tokens = self.rng.choice([1, 2, limit - 1, limit, limit + 1, 2 * limit, self.rng.randint(1, limit)])
        return self._forward_case("tokens", self.forward(x=self._x(tokens)))

    def _counts(self) -> Case:
        request = self.compute()
        counts = list(request.counts)
        mutation = self.rng.choice(["negative", "short", "long", "extra", "fewer", "same"])
        i = self.rng.randrange(len(counts))
        if mutation == "negative":
            counts[i] = -self.rng.randint(1, 3)
        elif mutation in ("short", "long"):
            counts[i] = max(counts[i] + (1 if mutation == "long" else -1), 0)
        elif mutation == "extra":
            counts.append(1)
        elif mutation == "fewer" and len(counts) > 1:
            counts.pop()
        request.counts[:] = counts
        rows = request.hidden.shape[0]
        valid = len(counts) == len(request.experts) and all(c >= 0 for c in counts) and sum(counts) == rows
        return self._compute_case("counts", request, valid)

    def _scales(self) -> Case:
        request = self.compute(counts=[self.rng.randint(1, 4) for _ in range(1)])
        rows = request.hidden.shape[0]
        shape = self.rng.choice([[rows], [rows, 1], [1, rows], [rows + 1], [max(rows - 1, 0)], [1], [rows, rows]])
        scale = torch.rand(shape, generator=self.gen)
        if scale.numel() and self.rng.random() < 0.2:
            scale.view(-1)[0] = float("nan")
        request.scale.CopyFrom(_tensor(scale))
        valid = shape == [rows] and bool(torch.isfinite(scale).all())
        return self._compute_case("scales", request, valid)

    def _unknown_fields(self) -> Case:  # unknown fields are skipped by protobuf: still valid
        request = self.forward()
        tag = self.rng.choice([15, 99, 1000, 536870911])
        extra = _varint(tag << 3 | 2) + _varint(3) + b"abc" if self.rng.random() < 0.5 else _varint(tag << 3) + _varint(7)
        case = self._forward_case("unknown fields", request)
        return dataclasses.replace(case, body=case.body + extra)

    def _wire_types(self) -> Case:  # a known field sent with another wire type
        request = self.forward()
        field = self.rng.choice([(1, 2, _varint(3) + b"abc"), (2, 0, _varint(5)), (1, 5, b"\x01\x00\x00\x00"),
                                 (2, 1, bytes(8)), (1, 3, b""), (2, 4, b"")])
        number, wire, payload = field
        body = request.SerializeToString() + _varint(number << 3 | wire) + payload
        return Case("wire types", self.t.router, FORWARD, body, allowed=frozenset({INVALID, "OK"}),
                    check=self._lenient_forward_check(body))

    def _lenient_forward_check(self, body: bytes) -> Callable[[bytes], str | None]:
        """For a body protobuf may parse one way or another: the answer must be the reference's for
        what it parsed as."""
        def check(reply: bytes) -> str | None:
            return self.forward_check(pb.ForwardRequest.FromString(body))(reply)
        return check

    def _admin(self) -> Case:
        name = self.rng.choice(list(ADMIN))
        token = self.rng.choice(["", "wrong", "t\u00f6k\u00e9n \u2713", "\x00", "a" * 5000, "Bearer x"])
        request = {"Status": pb.StatusRequest(), "Placement": pb.PlacementRequest(),
                   "Scale": pb.ScaleRequest(token=token, layer=self.rng.randint(-3, 9), expert=self.rng.randint(-3, 99),
                                            replicas=self.rng.randint(-2, 9)),
                   "Swap": pb.SwapRequest(token=token, layer=1, experts=[0], source_dir=self.rng.choice(["/", "..", ""])),
                   "Autoscale": pb.AutoscaleRequest(token=token, enabled=self.rng.random() < 0.5),
                   "Rebalance": pb.RebalanceRequest(token=token, dry_run=self.rng.random() < 0.5)}[name]
        metadata = ()
        if self.rng.random() < 0.5:
            metadata = (("authorization", self.rng.choice(["Bearer wrong", "Bearer ", "Basic abc", "bearer x" * 50])),)
        return Case("admin", self.t.router, ADMIN[name], request.SerializeToString(), metadata,
                    frozenset({DENIED}))

    def _random_bytes(self) -> Case:
        method = self.rng.choice([FORWARD, COMPUTE, *ADMIN.values()])
        body = bytes(self.rng.getrandbits(8) for _ in range(self.rng.choice([1, 2, 7, 64, 1000])))
        return self._raw("random bytes", method, body)

    def _truncated_bytes(self) -> Case:
        method = self.rng.choice([FORWARD, COMPUTE])
        valid = (self.forward() if method == FORWARD else self.compute()).SerializeToString()
        return self._raw("truncated bytes", method, valid[:self.rng.randrange(1, len(valid))])

    def _raw(self, category: str, method: str, body: bytes) -> Case:
        """Bytes that may or may not parse: whatever they parse as must be refused or answered right."""
        if method == COMPUTE:
            return Case(category, self.t.group, method, body, ((SECRET_KEY, self.t.secret),),
                        frozenset({INVALID, "OK"}), check=lambda reply: self._raw_compute_check(body, reply))
        if method == FORWARD:
            return Case(category, self.t.router, method, body, allowed=frozenset({INVALID, "OK"}),
                        check=self._lenient_forward_check(body))
        return Case(category, self.t.router, method, body, allowed=frozenset({INVALID, DENIED}))

    def _raw_compute_check(self, body: bytes, reply: bytes) -> str | None:
        return self.compute_check(pb.ExpertBatch.FromString(body))(reply)

    def _no_secret(self) -> Case:
        method = self.rng.choice([COMPUTE, "/expert_mesh.v1.ExpertWorker/Ping"])
        body = self.compute().SerializeToString() if method == COMPUTE else pb.PingRequest(payload=b"x").SerializeToString()
        metadata = self.rng.choice([(), ((SECRET_KEY, "guess"),), ((SECRET_KEY, self.t.secret[:-1]),)])
        return Case("no secret", self.t.group, method, body, metadata, frozenset({UNAUTH}))

    def floods(self) -> list[Case]:
        """64 valid Forwards in flight together: each OK and right, or RESOURCE_EXHAUSTED."""
        cases = []
        for _ in range(64):
            case = self._forward_case("floods", self.forward(x=self._x(self.rng.randint(1, self.t.max_request_tokens))))
            cases.append(dataclasses.replace(case, allowed=frozenset({"OK", EXHAUSTED})))
        return cases


def fuzz_target(mesh, path, max_request_tokens: int) -> Target:
    """What the fuzzer needs of `mesh` (serving checkpoint `path`): endpoints, the secret, references."""
    import msgpack
    import ray

    from experts import ExpertGroup, MoELayer, load_spec
    from mesh.controller import NAMESPACE

    spec = load_spec(path)
    layers = {layer: MoELayer.from_pretrained(path, layer=layer) for layer in spec.moe_layers}
    state = msgpack.unpackb(ray.get(mesh.controller.snapshot.remote()), strict_map_key=False)
    info = ray.get(ray.get_actor(state["groups"][0]["name"], namespace=NAMESPACE).info.remote())
    layer, experts = next(iter(info["experts"].items()))
    reference = ExpertGroup.from_checkpoint(path, {int(layer): list(experts)})

    def compute_ref(layer, x, experts, counts, scale):
        with torch.inference_mode():
            return reference.forward(layer, x, experts, counts, scale)

    def forward_ref(layer, x):
        return layers[layer](x)

    return Target(mesh.address, info["endpoint"], ray.get(mesh.controller.data_secret.remote()), spec.hidden_size,
                  spec.moe_layers, max_request_tokens, forward_ref, int(layer), tuple(experts), compute_ref)


def alive_check(target: Target) -> Callable[[], None]:
    """A valid Forward on every MoE layer, answered right (raises AssertionError otherwise)."""
    from router_service import MeshClient

    x = torch.randn(5, target.hidden_size, generator=torch.Generator().manual_seed(11))

    def check() -> None:
        with MeshClient(target.router) as client:
            for layer in target.moe_layers:
                wrong = _close(client.forward(layer, x), target.forward_ref(layer, x))
                assert wrong is None, f"layer {layer}: {wrong}"

    return check


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def call(channels: dict, case: Case, timeout_s: float = 60.0) -> tuple[str, bytes | None, str]:
    """(code name, reply bytes or None, details) of one case."""
    channel = channels.setdefault(case.address, grpc.insecure_channel(case.address))
    method = channel.unary_unary(case.method, request_serializer=None, response_deserializer=None)
    try:
        return "OK", method(case.body, metadata=case.metadata or None, timeout=timeout_s), ""
    except grpc.RpcError as exc:
        return exc.code().name, None, exc.details() or ""


def judge(case: Case, code: str, reply: bytes | None, details: str, outcome: Outcome) -> None:
    outcome.codes[(case.category, code)] += 1
    if code not in case.allowed:
        outcome.failures.append(f"{case.category} {case.method}: {code} ({details[:200]}), allowed "
                                f"{sorted(case.allowed)}; body {case.body[:48]!r}")
    elif code == "OK" and case.check is not None:
        wrong = case.check(reply)
        if wrong:
            outcome.failures.append(f"{case.category} {case.method}: OK but {wrong}")


def run(fuzzer: Fuzzer, per_category: int, check_alive: Callable[[], None], every: int = 100,
        progress: Callable[[str], None] = lambda _: None) -> Outcome:
    """`per_category` cases of each category (floods: in batches of 64), `check_alive()` after every
    `every` cases (a valid Forward, answered right)."""
    outcome, channels, done = Outcome(), {}, 0
    try:
        for category in CATEGORIES:
            if category == "floods":
                with ThreadPoolExecutor(64) as pool:
                    for _ in range(-(-per_category // 64)):
                        cases = fuzzer.floods()
                        for case, (code, reply, details) in zip(cases, pool.map(lambda c: call(channels, c), cases)):
                            judge(case, code, reply, details, outcome)
                        done += len(cases)
                        check_alive()
                continue
            for case in fuzzer.cases(category, per_category):
                judge(case, *call(channels, case), outcome)
                done += 1
                if done % every == 0:
                    check_alive()
                    progress(f"{done} cases, {len(outcome.failures)} failures")
        check_alive()
    finally:
        for channel in channels.values():
            channel.close()
    return outcome
