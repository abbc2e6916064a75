"""MeshClient, AsyncMeshClient, RemoteMoE and patch_model against real gRPC servers on 127.0.0.1
that serve a zoo checkpoint with the in-process MoELayer; the clients' shared failover loop and
patch_model with a client that is not a MeshClient, without a server."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from experts import MoELayer, load_spec
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos.wire import DTYPES, TOKEN_DTYPES, from_proto, to_proto
from router_service import AsyncMeshClient, MeshClient, MeshInfo, RemoteMoE, patch_model
from router_service.client import CHANNEL_OPTIONS, _FailoverClient
from tests.checkpoints import FAMILIES, NUM_NEW_TOKENS, PROMPT, generate_greedy, moe_block
from protos.errors import MeshClientError, WireError

LOGITS_TOL = 1e-5  # max abs error <= LOGITS_TOL * max|ref|; scaling the experts' output by 0.99 gives >= 3e-4


class InProcessExpertMesh(pb_grpc.ExpertMeshServicer):
    """ExpertMesh served by MoELayer in this process; can inject a status code or a delay."""

    def __init__(self, path: Path, fail_with: grpc.StatusCode | None = None, delay_s: float = 0.0):
        self.spec = load_spec(path)
        self.layers = {i: MoELayer.from_pretrained(path, layer=i) for i in self.spec.moe_layers}
        self.fail_with, self.delay_s = fail_with, delay_s
        self.info_overrides: dict = {}
        self.num_forwards = 0

    def Forward(self, request, context):
        self.num_forwards += 1
        if self.fail_with is not None:
            context.abort(self.fail_with, "injected failure")
        time.sleep(self.delay_s)
        if request.layer not in self.layers:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"layer {request.layer} is not an MoE layer; they are {list(self.layers)}")
        try:
            hidden = from_proto(request.hidden, field="hidden")
            token_ids = (from_proto(request.token_ids, field="token_ids", dtypes=TOKEN_DTYPES)
                         if request.HasField("token_ids") else None)
        except WireError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ForwardResponse(hidden=to_proto(self.layers[request.layer](hidden, token_ids)), epoch=1)

    def GetInfo(self, request, context):
        fields = dict(model_type=self.spec.model_type, config_hash=self.spec.config_hash(),
                      moe_layers=list(self.spec.moe_layers), hidden_size=self.spec.hidden_size,
                      dtypes=list(DTYPES), max_request_tokens=4096, epoch=1)
        return pb.InfoResponse(**{**fields, **self.info_overrides})


@contextlib.contextmanager
def serving(servicer: InProcessExpertMesh) -> Iterator[tuple[str, grpc.Server]]:
    """A real gRPC server on 127.0.0.1 (port 0 -> the bound port)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS)
    pb_grpc.add_ExpertMeshServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", server
    finally:
        server.stop(grace=None).wait()


def dead_address() -> str:
    """An address on 127.0.0.1 where nothing listens any more."""
    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.stop(grace=None).wait()
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def mixtral(zoo) -> Path:
    return zoo.checkpoint("mixtral")


@pytest.fixture
def mesh(mixtral) -> Iterator[tuple[str, InProcessExpertMesh]]:
    servicer = InProcessExpertMesh(mixtral)
    with serving(servicer) as (address, _):
        yield address, servicer


# ---- Forward and GetInfo ----

SHAPES = {"[T, H]": (7,), "[B, S, H]": (2, 5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_equals_moe_layer(mesh, dtype, shape):
    address, servicer = mesh
    layer = servicer.spec.moe_layers[-1]
    x = torch.randn(*SHAPES[shape], servicer.spec.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    with MeshClient(address) as client:
        out = client.forward(layer, x)
    ref = servicer.layers[layer](x)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out, ref)
    assert out.abs().max() > 0


def test_info_describes_the_served_model(mesh):
    address, servicer = mesh
    with MeshClient(address) as client:
        info = client.info()
    assert isinstance(info, MeshInfo)
    assert (info.model_type, info.config_hash, info.moe_layers, info.hidden_size) == (
        "mixtral", servicer.spec.config_hash(), servicer.spec.moe_layers, 48)
    assert info.dtypes == tuple(DTYPES) and info.max_request_tokens == 4096


# ---- errors ----

BAD_CALLS = [
    # name, layer, make hidden (H -> tensor), expected code, words in the details
    ("dense or missing layer", 99, lambda h: torch.randn(3, h), grpc.StatusCode.INVALID_ARGUMENT, "layer 99"),
    ("int tensor", 0, lambda h: torch.ones(3, h, dtype=torch.int64), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    ("1-D tensor", 0, lambda h: torch.randn(h), grpc.StatusCode.INVALID_ARGUMENT, "[T, H]"),
    ("layer not an int", "0", lambda h: torch.randn(3, h), grpc.StatusCode.INVALID_ARGUMENT, "layer must be an int"),
]


@pytest.mark.parametrize("name,layer,make,code,words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_raise_invalid_argument(mesh, name, layer, make, code, words):
    address, servicer = mesh
    with MeshClient(address) as client:
        with pytest.raises(MeshClientError) as caught:
            client.forward(layer, make(servicer.spec.hidden_size))
    assert caught.value.code == code and words in caught.value.details


@pytest.mark.parametrize("token_ids,words", [
    (torch.zeros(3), "token_ids must be an integer tensor, got torch.float32"),
    ([1, 2, 3], "token_ids must be an integer tensor, got list"),
    (torch.zeros(4, dtype=torch.int64), "token_ids must have hidden's leading dims [3], got [4]"),
])
def test_bad_token_ids_are_refused_before_sending(mesh, token_ids, words):
    address, servicer = mesh
    with MeshClient(address) as client:
        with pytest.raises(MeshClientError) as caught:
            client.forward(0, torch.randn(3, servicer.spec.hidden_size), token_ids)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details
    assert servicer.num_forwards == 0


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.FAILED_PRECONDITION])
def test_server_errors_carry_their_status_code(mixtral, code):
    servicer = InProcessExpertMesh(mixtral, fail_with=code)
    with serving(servicer) as (address, _), MeshClient(address) as client:
        with pytest.raises(MeshClientError) as caught:
            client.forward(0, torch.randn(2, 48))
    assert caught.value.code == code and caught.value.details == "injected failure"
    assert caught.value.address == address and servicer.num_forwards == 1


def test_timeout_gives_deadline_exceeded(mixtral):
    servicer = InProcessExpertMesh(mixtral, delay_s=2.0)
    with serving(servicer) as (address, _), MeshClient(address, timeout_s=0.2) as client:
        start = time.monotonic()
        with pytest.raises(MeshClientError) as caught:
            client.forward(0, torch.randn(2, 48))
        elapsed_s = time.monotonic() - start
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.15 <= elapsed_s < 1.5


def test_closed_client_refuses_calls(mesh):
    client = MeshClient(mesh[0])
    client.close()
    with pytest.raises(MeshClientError) as caught:
        client.info()
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("addresses", ["", [], "no-port", ["127.0.0.1:1", 5]])
def test_bad_addresses_are_refused(addresses):
    with pytest.raises(MeshClientError) as caught:
        MeshClient(addresses)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ---- failover ----

def test_failover_to_second_address_when_first_server_stops(mixtral):
    first, second = InProcessExpertMesh(mixtral), InProcessExpertMesh(mixtral)
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(5))
    with serving(second) as (address_2, _), serving(first) as (address_1, server_1):
        with MeshClient([address_1, address_2]) as client:
            assert torch.equal(client.forward(1, x), first.layers[1](x))
            assert (first.num_forwards, second.num_forwards, client.address) == (1, 0, address_1)
            server_1.stop(grace=None).wait()
            assert torch.equal(client.forward(1, x), second.layers[1](x))
            assert client.forward(0, x).shape == x.shape
            assert (first.num_forwards, second.num_forwards, client.address) == (1, 2, address_2)


def test_connection_failure_fails_over_and_all_down_is_unavailable(mesh):
    address, servicer = mesh
    down = dead_address()
    with MeshClient([down, address]) as client:
        assert client.info().model_type == "mixtral" and client.address == address
    with MeshClient([down, dead_address()]) as client:
        with pytest.raises(MeshClientError) as caught:
            client.forward(0, torch.randn(2, 48))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_invalid_argument_is_not_retried_elsewhere(mixtral):
    first = InProcessExpertMesh(mixtral, fail_with=grpc.StatusCode.INVALID_ARGUMENT)
    second = InProcessExpertMesh(mixtral)
    with serving(first) as (address_1, _), serving(second) as (address_2, _):
        with MeshClient([address_1, address_2]) as client:
            with pytest.raises(MeshClientError) as caught:
                client.forward(0, torch.randn(2, 48))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (first.num_forwards, second.num_forwards) == (1, 0)


# ---- async client ----

def test_async_client_forward_info_and_failover(mixtral):
    servicer = InProcessExpertMesh(mixtral)
    x = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)

    async def calls(address: str) -> tuple[torch.Tensor, MeshInfo, str, grpc.StatusCode]:
        async with AsyncMeshClient([dead_address(), address]) as client:
            out, info = await client.forward(1, x), await client.info()
            try:
                await client.forward(7, x)
            except MeshClientError as exc:
                code = exc.code
            return out, info, client.address, code

    with serving(servicer) as (address, _):
        out, info, used, code = asyncio.run(calls(address))
    assert out.dtype == torch.bfloat16 and torch.equal(out, servicer.layers[1](x))
    assert info.config_hash == servicer.spec.config_hash()
    assert used == address and code == grpc.StatusCode.INVALID_ARGUMENT


def test_async_client_forward_with_epoch_and_close(mesh):
    address, servicer = mesh
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(7))

    async def calls() -> tuple[torch.Tensor, int, grpc.StatusCode]:
        client = AsyncMeshClient(address)
        out, epoch = await client.forward_with_epoch(0, x)
        await client.close()
        try:
            await client.forward(0, x)
        except MeshClientError as exc:
            return out, epoch, exc.code

    out, epoch, code = asyncio.run(calls())
    assert torch.equal(out, servicer.layers[0](x)) and epoch == 1
    assert code == grpc.StatusCode.FAILED_PRECONDITION and servicer.num_forwards == 1


# ---- the failover loop both clients drive ----

class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"fake {self._code.name}"


UNAVAILABLE, INVALID = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT
FAILOVER_CASES = [
    # name, addresses, each one tried answers (None) or fails (a code), the code raised (None: the
    # call was answered), the address first for the next call
    ("first answers", ["a:1", "b:2", "c:3"], [None], None, "a:1"),
    ("unavailable moves on", ["a:1", "b:2", "c:3"], [UNAVAILABLE, UNAVAILABLE, None], None, "c:3"),
    ("other errors raise at once", ["a:1", "b:2"], [INVALID], INVALID, "a:1"),
    ("all unavailable", ["a:1", "b:2"], [UNAVAILABLE, UNAVAILABLE], UNAVAILABLE, "a:1"),
    ("one address", ["a:1"], [UNAVAILABLE], UNAVAILABLE, "a:1"),
]


def drive(client: _FailoverClient, outcomes: list[grpc.StatusCode | None], tried: list[str]) -> None:
    """One call through the loop: the addresses tried answer (None) or fail (a code) in turn."""
    codes = iter(outcomes)
    for attempt in client._attempts():
        code = next(codes)
        tried.append(attempt.address)
        if code is None:
            attempt.response = "answer"
        else:
            attempt.error = FakeRpcError(code)


@pytest.mark.parametrize("name,addresses,outcomes,code,next_first", FAILOVER_CASES, ids=[c[0] for c in FAILOVER_CASES])
def test_failover_loop(name, addresses, outcomes, code, next_first):
    client, tried = _FailoverClient(addresses, timeout_s=1.0), []
    if code is None:
        drive(client, outcomes, tried)
    else:
        with pytest.raises(MeshClientError) as caught:
            drive(client, outcomes, tried)
        assert caught.value.code == code and caught.value.address == tried[-1]
        assert isinstance(caught.value.__cause__, FakeRpcError)
    assert tried == addresses[:len(outcomes)] and client.address == next_first


def test_failover_loop_starts_at_the_address_that_answered_last():
    client, tried = _FailoverClient(["a:1", "b:2", "c:3"], timeout_s=1.0), []
    drive(client, [UNAVAILABLE, None], tried)
    drive(client, [None], tried)
    assert tried == ["a:1", "b:2", "b:2"] and client.address == "b:2"
    client._closed = True
    with pytest.raises(MeshClientError) as caught:
        drive(client, [None], tried)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and len(tried) == 3


# ---- transformers models ----


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_model_generates_the_same_tokens(zoo, family):
    """Greedy tokens equal; the prompt's logits too (tokens alone are coarse: halving the experts'
    output leaves the 20 tokens of qwen3_moe and deepseek_v3 unchanged)."""
    servicer = InProcessExpertMesh(zoo.checkpoint(family))
    spec = servicer.spec
    reference = zoo.model(family)
    patched = copy.deepcopy(reference)
    input_ids = torch.tensor(PROMPT)
    with serving(servicer) as (address, _), MeshClient(address) as client:
        assert patch_model(patched, client) == len(spec.moe_layers)
        tokens = generate_greedy(patched)
        with torch.no_grad():  # Qwen3-Omni's composite has no forward: its thinker gives the text logits
            logits, ref_logits = (getattr(m, "thinker", m)(input_ids).logits for m in (patched, reference))
    for i in range(spec.num_layers):
        block = moe_block(patched, i, spec.block_attr)
        if i in spec.moe_layers:
            assert isinstance(block, RemoteMoE) and sum(p.numel() for p in block.parameters()) == 0
        else:
            assert type(block) is type(moe_block(reference, i, spec.block_attr))
    assert servicer.num_forwards == len(spec.moe_layers) * (NUM_NEW_TOKENS + 1)  # prefill, 19 decodes, logits
    assert (logits - ref_logits).abs().max() <= LOGITS_TOL * ref_logits.abs().max()
    assert len(tokens) == NUM_NEW_TOKENS
    assert tokens == generate_greedy(reference)


def test_ernie4_5_vl_refuses_image_tokens_it_would_send_to_the_text_experts(zoo):
    """Ernie 4.5-VL's vision experts are not served: through patch_model, a forward whose tokens are
    marked image or video (moe_mm_token_type_ids != 0) is refused before any expert runs, where the
    unpatched model answers it; text tokens still equal the unpatched model's."""
    servicer = InProcessExpertMesh(zoo.checkpoint("ernie4_5_vl_moe"))
    reference = zoo.model("ernie4_5_vl_moe")
    patched = copy.deepcopy(reference)
    input_ids = torch.tensor(PROMPT)
    image = torch.zeros_like(input_ids)
    image[0, 2:5] = 1
    with serving(servicer) as (address, _), MeshClient(address) as client:
        patch_model(patched, client)
        with torch.no_grad():
            text = patched.model.language_model(input_ids, moe_mm_token_type_ids=torch.zeros_like(input_ids))
            ref = reference.model.language_model(input_ids, moe_mm_token_type_ids=torch.zeros_like(input_ids))
            reference.model.language_model(input_ids, moe_mm_token_type_ids=image)  # answered unpatched
            forwards = servicer.num_forwards
            with pytest.raises(MeshClientError, match="3 image or video tokens") as caught:
                patched.model.language_model(input_ids, moe_mm_token_type_ids=image)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and servicer.num_forwards == forwards
    scale = ref.last_hidden_state.abs().max()
    assert (text.last_hidden_state - ref.last_hidden_state).abs().max() <= LOGITS_TOL * scale


def test_llama4_feed_forward_keeps_the_block_tuple(zoo):
    """Llama 4's decoder layer unpacks feed_forward's (out [T, H], router_logits) and drops the
    logits; with keep_router the logits are the original router's, and output_router_logits works."""
    servicer = InProcessExpertMesh(zoo.checkpoint("llama4"))
    spec, reference = servicer.spec, zoo.model("llama4")
    patched, with_router = copy.deepcopy(reference), copy.deepcopy(reference)
    layer = spec.moe_layers[0]
    x = torch.randn(2, 5, spec.hidden_size, generator=torch.Generator().manual_seed(8))
    input_ids = torch.tensor(PROMPT)
    with serving(servicer) as (address, _), MeshClient(address) as client:
        patch_model(patched, client)
        patch_model(with_router, client, keep_router=True)
        with torch.no_grad():
            ref_out, ref_logits = moe_block(reference, layer, spec.block_attr)(x)
            out, logits = moe_block(patched, layer, spec.block_attr)(x)
            out_kept, logits_kept = moe_block(with_router, layer, spec.block_attr)(x)
            recorded = with_router(input_ids, output_router_logits=True).router_logits
            ref_recorded = reference(input_ids, output_router_logits=True).router_logits
    assert out.shape == ref_out.shape == (10, spec.hidden_size) and logits is None
    assert torch.allclose(out, ref_out, rtol=0, atol=1e-5 * ref_out.abs().max().item())
    assert torch.equal(out_kept, out) and torch.equal(logits_kept, ref_logits)
    assert len(recorded) == len(ref_recorded) == len(spec.moe_layers)
    assert torch.equal(recorded[0], ref_recorded[0])  # the first MoE layer sees identical inputs
    for a, b in zip(recorded[1:], ref_recorded[1:]):  # later ones see the mesh's output (fp32 tolerance)
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_patch_model_refuses_a_mesh_serving_another_model(zoo):
    model = copy.deepcopy(zoo.model("mixtral"))
    other = InProcessExpertMesh(zoo.checkpoint("qwen3_moe"))
    with serving(other) as (address, _), MeshClient(address) as client:
        with pytest.raises(MeshClientError) as caught:
            patch_model(model, client)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "model_type 'mixtral' here, 'qwen3_moe' on the mesh" in caught.value.details
    assert not any(isinstance(m, RemoteMoE) for m in model.modules())


INFO_MISMATCHES = [
    # what the mesh says it serves, words in the error
    (dict(moe_layers=[1]), "moe_layers [0, 1] here, [1] on the mesh"),
    (dict(config_hash="0" * 64), "config_hash"),
    (dict(dtypes=["bfloat16"]), "the model is float32; the mesh accepts bfloat16"),
]


@pytest.mark.parametrize("overrides,words", INFO_MISMATCHES)
def test_patch_model_refuses_a_mismatched_mesh(zoo, mixtral, overrides, words):
    model = copy.deepcopy(zoo.model("mixtral"))
    servicer = InProcessExpertMesh(mixtral)
    servicer.info_overrides = overrides
    with serving(servicer) as (address, _), MeshClient(address) as client:
        with pytest.raises(MeshClientError) as caught:
            patch_model(model, client)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert words in caught.value.details


class FakeDirectClient:
    """An in-process client of the MoEClient protocol: MoELayer called directly, no gRPC."""

    def __init__(self, servicer: InProcessExpertMesh):
        self.servicer = servicer

    def info(self) -> MeshInfo:
        return MeshInfo.from_proto(self.servicer.GetInfo(pb.GetInfoRequest(), None))

    def forward(self, layer: int, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        self.servicer.num_forwards += 1
        return self.servicer.layers[layer](hidden, token_ids)

    def __repr__(self) -> str:
        return "FakeDirectClient(mixtral)"


def test_patch_model_takes_any_client(zoo, mixtral):
    servicer = InProcessExpertMesh(mixtral)
    reference = zoo.model("mixtral")
    patched, refused = copy.deepcopy(reference), copy.deepcopy(reference)
    client = FakeDirectClient(servicer)
    assert patch_model(patched, client) == len(servicer.spec.moe_layers)
    assert generate_greedy(patched) == generate_greedy(reference)
    assert servicer.num_forwards == len(servicer.spec.moe_layers) * NUM_NEW_TOKENS
    assert "client=FakeDirectClient(mixtral)" in repr(moe_block(patched, 0, servicer.spec.block_attr))
    servicer.info_overrides = dict(moe_layers=[1])
    with pytest.raises(MeshClientError) as caught:
        patch_model(refused, client)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.address == "FakeDirectClient(mixtral)"
