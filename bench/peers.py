"""The peers bench_mesh compares the mesh with: the same MoE layer served the way a Ray user would
serve it without expert-mesh (same checkpoint, same cluster, same experts split over the same groups).

- plain Ray actors: one `ray.remote` actor per expert group, holding an ExpertGroup. The caller
  gates, dispatches and combines in its own process and calls the groups with `.remote`; no
  cross-request batching.

      [caller: Gate -> dispatch] -> group actors (.remote) -> [caller: combine]

- plain Ray Serve: one deployment per expert group; a router deployment whose `Forward` merges
  concurrent requests with `@serve.batch` and calls the groups through DeploymentHandles; Serve's
  gRPC proxy (ExpertMesh.Forward) is the ingress.

      [gRPC client] -> Serve gRPC proxy -> ServeRouter.Forward (@serve.batch) -> group deployments

Shape legend: T = tokens, H = hidden, N = T * k token copies sorted by expert.

The classes here are shipped to Ray workers by value (`ray.cloudpickle.register_pickle_by_value`),
since bench/ is not an installed package.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import torch
from ray import serve

from experts import CheckpointReader, ExpertGroup, Gate, MoESpec, SharedExpert, dispatch
from protos import expert_mesh_pb2 as pb
from protos import expert_mesh_pb2_grpc as pb_grpc
from protos.wire import from_proto, to_proto

__all__ = ["LocalFrontend", "PlainActorsMoE", "PlainExpertGroup", "ServeClient", "ServeExpertGroup", "ServeRouter",
           "deploy_serve_app", "start_plain_actors", "start_serve"]

_MAX_MESSAGE = 1 << 30
CHANNEL_OPTIONS = [("grpc.max_send_message_length", _MAX_MESSAGE), ("grpc.max_receive_message_length", _MAX_MESSAGE)]


# ---- what both peers share: gate, dispatch and combine in one process, experts elsewhere ----

@dataclasses.dataclass
class GroupCall:
    """The share of one dispatched batch that one group computes."""

    group: int
    experts: list[int]            # ascending, each with rows
    counts: list[int]             # rows per expert
    rows: torch.Tensor            # [n, H] the experts' rows, contiguous
    scale: torch.Tensor | None    # [n] gate weights on the input (Llama 4) or None
    slices: list[slice]           # where those rows sit in the batch's [N, H]


class LocalFrontend:
    """Gate, dispatch and combine of one MoE layer (and its shared experts), in the caller's process."""

    def __init__(self, model_path: str | Path, layer: int, group_experts: list[list[int]]):
        reader = CheckpointReader(model_path)
        try:
            self.spec: MoESpec = reader.spec
            self.gate = Gate(self.spec, reader.gate(layer))
            shared = reader.shared(layer)
        finally:
            reader.close()
        self.shared = None if shared is None else SharedExpert(self.spec, shared)
        self.layer = layer
        self.group_experts = [sorted(experts) for experts in group_experts]

    def scatter(self, x: torch.Tensor):
        """x: [T, H]. Returns (dispatched tokens, one GroupCall per group that has rows)."""
        weights, ids = self.gate(x)  # [T, k], [T, k]
        tokens = dispatch(self.spec, x, weights, ids)
        starts = torch.tensor([0, *tokens.counts]).cumsum(0).tolist()
        calls = []
        for group, held in enumerate(self.group_experts):
            experts = [e for e in held if tokens.counts[e]]
            if not experts:
                continue
            slices = [slice(starts[e], starts[e] + tokens.counts[e]) for e in experts]
            rows = torch.cat([tokens.rows[s] for s in slices])
            scale = None if tokens.scale is None else torch.cat([tokens.scale[s] for s in slices])
            calls.append(GroupCall(group, experts, [tokens.counts[e] for e in experts], rows, scale, slices))
        return tokens, calls

    def gather(self, x: torch.Tensor, tokens, calls: list[GroupCall], results: list[torch.Tensor]) -> torch.Tensor:
        """Place each group's outputs [n, H] back in sorted order and combine; returns [T, H]."""
        y = torch.empty_like(tokens.rows)  # [N, H]
        for call, result in zip(calls, results):
            offset = 0
            for s in call.slices:
                size = s.stop - s.start
                y[s] = result[offset:offset + size]
                offset += size
        out = tokens.combine(y)
        if self.shared is not None:
            out = out + self.shared(x, tokens.shared_weights)
        return out


def _compute(group: ExpertGroup, layer, rows, experts, counts, scale) -> torch.Tensor:
    with torch.inference_mode():
        return group.forward(layer, rows, experts, counts, scale)


# ---- plain Ray actors ----

class PlainExpertGroup:
    """A plain Ray actor body holding one ExpertGroup."""

    def __init__(self, model_path: str, assignment: dict[int, list[int]]):
        self.group = ExpertGroup.from_checkpoint(model_path, assignment)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def compute(self, layer, rows, experts, counts, scale=None) -> torch.Tensor:
        return _compute(self.group, layer, rows, experts, counts, scale)


def start_plain_actors(model_path: str, assignment: list[dict[int, list[int]]], node_ids: list[str]) -> list:
    """One PlainExpertGroup per assignment entry, pinned to node_ids[k]; waits until all are up."""
    import ray

    actor_class = ray.remote(PlainExpertGroup)
    handles = [actor_class.options(num_cpus=0, label_selector={"ray.io/node-id": node}).remote(model_path, experts)
               for experts, node in zip(assignment, node_ids)]
    placed = ray.get([h.node_id.remote() for h in handles])
    if placed != list(node_ids):
        raise RuntimeError(f"plain actors landed on {placed}, asked for {node_ids}")
    return handles


class PlainActorsMoE:
    """The caller's side of the plain-actors peer: forward(x [T, H]) -> [T, H]; thread-safe."""

    def __init__(self, frontend: LocalFrontend, handles: list):
        self.frontend = frontend
        self.handles = handles

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import ray

        tokens, calls = self.frontend.scatter(x)
        refs = [self.handles[c.group].compute.remote(self.frontend.layer, c.rows, c.experts, c.counts, c.scale)
                for c in calls]
        return self.frontend.gather(x, tokens, calls, ray.get(refs))


# ---- plain Ray Serve ----

class ServeExpertGroup:
    """Serve deployment body: one ExpertGroup."""

    def __init__(self, model_path: str, assignment: dict[int, list[int]]):
        self.group = ExpertGroup.from_checkpoint(model_path, assignment)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def compute(self, layer, rows, experts, counts, scale=None) -> torch.Tensor:
        return _compute(self.group, layer, rows, experts, counts, scale)


class ServeRouter:
    """Serve ingress deployment body: `Forward(ForwardRequest) -> ForwardResponse` for Serve's gRPC
    proxy; concurrent requests merged by `@serve.batch` (wait set per app), experts called through
    DeploymentHandles."""

    def __init__(self, model_path: str, layer: int, group_experts: list[list[int]], batch_wait_timeout_s: float,
                 *groups):
        self.frontend = LocalFrontend(model_path, layer, group_experts)
        self.groups = list(groups)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def Forward(self, request: pb.ForwardRequest) -> pb.ForwardResponse:  # noqa: N802 - the RPC's name
        shape = tuple(request.hidden.shape)
        x = from_proto(request.hidden, "hidden").reshape(-1, self.frontend.spec.hidden_size)
        out = await self._batched(x)
        reply = pb.ForwardResponse()
        to_proto(out.reshape(shape), reply.hidden)
        return reply

    async def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @serve.batch(max_batch_size=32)
    async def _batched(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        x = xs[0] if len(xs) == 1 else torch.cat(xs)  # [T, H]
        with torch.inference_mode():
            tokens, calls = self.frontend.scatter(x)
        responses = [self.groups[c.group].compute.remote(self.frontend.layer, c.rows, c.experts, c.counts, c.scale)
                     for c in calls]
        results = await asyncio.gather(*responses)
        with torch.inference_mode():
            out = self.frontend.gather(x, tokens, calls, results)
        return list(torch.split(out, [t.shape[0] for t in xs]))


def start_serve(grpc_port: int, http_port: int) -> None:
    """Serve with its gRPC proxy (ExpertMesh registered) on the head node only, on 127.0.0.1."""
    from ray.serve.config import gRPCOptions

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[
                    "protos.expert_mesh_pb2_grpc.add_ExpertMeshServicer_to_server"]))


def deploy_serve_app(app_name: str, model_path: str, layer: int, assignment: list[dict[int, list[int]]],
                     node_ids: list[str], router_node: str, batch_wait_timeout_s: float,
                     max_ongoing_requests: int = 64) -> None:
    """Deploy the router and one deployment per group (pinned to node_ids[k]); blocks until running."""
    groups = [
        serve.deployment(ServeExpertGroup).options(
            name=f"group-{k}", ray_actor_options={"num_cpus": 0, "label_selector": {"ray.io/node-id": node}},
        ).bind(model_path, experts)
        for k, (experts, node) in enumerate(zip(assignment, node_ids))
    ]
    router = serve.deployment(ServeRouter).options(
        name="router", max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": 0, "label_selector": {"ray.io/node-id": router_node}},
    ).bind(model_path, layer, [experts[layer] for experts in assignment], batch_wait_timeout_s, *groups)
    serve.run(router, name=app_name, route_prefix=f"/{app_name}")


class ServeClient:
    """Calls ExpertMesh.Forward through Serve's gRPC proxy, routed to `app_name`; thread-safe."""

    def __init__(self, address: str, app_name: str, layer: int, timeout_s: float = 60.0):
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.ExpertMeshStub(self.channel)
        self.metadata = (("application", app_name),)
        self.layer, self.timeout_s = layer, timeout_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        request = pb.ForwardRequest(layer=self.layer)
        to_proto(x, request.hidden)
        reply = self.stub.Forward(request, metadata=self.metadata, timeout=self.timeout_s)
        return from_proto(reply.hidden, "ForwardResponse.hidden")

    def close(self) -> None:
        self.channel.close()
