"""Router settings (pydantic, validated; part of the mesh's YAML config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protos.serving import TLSConfig

__all__ = ["BatchingConfig", "HedgeConfig", "NAMESPACE", "RouterConfig"]

NAMESPACE = "expert-mesh"  # the Ray namespace of every mesh's actors


class BatchingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_tokens: int = Field(2048, ge=1, description="Most tokens merged into one batch of one layer.")
    max_wait_ms: float = Field(0.0, ge=0.0, le=1000.0, description=(
        "How long a batch waits for more requests once started. 0: take what is queued; requests that "
        "arrive while a batch is in flight form the next batch, so batching happens under load anyway."))
    max_inflight_batches: int = Field(2, ge=1, description=(
        "Batches of one layer in flight at once, per lane: the express lane carries the next request of "
        "callers with nothing in flight, the main lane the rest (router_service/batcher.py)."))
    enabled: bool = Field(True, description="False: every request is its own batch (for benchmarks).")


class HedgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Hedge slow destinations (router_service/hedging.py).")
    factor: float = Field(3.0, gt=1, description="A destination's deadline: factor x the p99 of its group's calls...")
    min_ms: float = Field(50.0, gt=0, description="... at least this ...")
    max_ms: float = Field(500.0, gt=0, description="... at most this.")
    window: int = Field(200, ge=10, description="Calls per group the p99 is taken over.")
    min_samples: int = Field(20, ge=1, description="Calls a group must have answered before it is hedged.")
    budget: float = Field(0.05, ge=0, le=1, description="Hedges per call at most, over time (a retry budget).")
    eject_after: int = Field(3, ge=1, description="Deadlines missed in a row that eject a group from routing...")
    eject_s: float = Field(5.0, gt=0, description="... for this long, doubling while it keeps missing (to 60 s).")


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address the router's gRPC server binds.")
    tls: TLSConfig | None = Field(None, description=(
        "TLS on the router's port (`ca`: clients must present a certificate it signed); none: plaintext."))
    port: int = Field(50051, ge=0, le=65535, description="Router gRPC port (0: any free port).")
    transport: Literal["grpc", "ray", "collective"] = Field("grpc", description=(
        "How token batches reach expert groups: grpc, ray (actor calls) or collective "
        "(torch.distributed send/recv per router-group channel: gloo on CPU, NCCL on CUDA)."))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "Where the router gates, plans and combines: auto, on the GPU Ray gave it (num_gpus) where it has "
        "one, else the host; cpu, the host; cuda, a GPU (the router refuses to start where it sees none)."))
    num_gpus: float = Field(0.0, ge=0, le=1, description=(
        "GPU (share) Ray reserves for each router actor; 0: none, so auto computes on the host."))
    collective_timeout_s: float = Field(2.0, gt=0, description=(
        "Collective transport: a call to a group that does not complete within this fails (retried "
        "on another copy) and its channel is recreated."))
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    max_request_tokens: int = Field(8192, ge=1, description="Most tokens in one Forward request.")
    max_queue_tokens: int = Field(65536, ge=1, description=(
        "Tokens waiting in the router at most; beyond it callers get RESOURCE_EXHAUSTED."))
    max_inflight_bytes: int | None = Field(None, ge=1 << 20, description=(
        "Memory the router gives requests being read, queued, computed and answered; a request of "
        "B bytes is charged FORWARD_FOOTPRINT x B (router_service/server.py). A call it has no room "
        "for gets RESOURCE_EXHAUSTED before its body is read. Default: room for 4 of the largest "
        "requests; it must take at least one."))
    max_concurrent_rpcs: int = Field(1024, ge=1, description=(
        "Calls the router's port takes at once; beyond it callers get RESOURCE_EXHAUSTED."))
    expert_timeout_s: float = Field(30.0, gt=0, description="Deadline of one call to an expert group.")
    hedging: HedgeConfig = Field(default_factory=HedgeConfig)
    load_window_s: float = Field(10.0, gt=0, description="Window of the tokens-per-expert rates reported.")

    @model_validator(mode="after")
    def _queue_fits_a_request(self) -> "RouterConfig":
        if self.max_queue_tokens < self.max_request_tokens:
            raise ValueError(f"max_queue_tokens ({self.max_queue_tokens}) must be >= "
                             f"max_request_tokens ({self.max_request_tokens})")
        return self

    def inflight_bytes(self, hidden_size: int, footprint: float) -> int:
        """max_inflight_bytes, or its default: 4 of the largest requests, `footprint` bytes per byte."""
        return self.max_inflight_bytes or int(4 * footprint * self.max_message_bytes(hidden_size))

    def max_message_bytes(self, hidden_size: int) -> int:
        """gRPC message limit fitting the largest request (fp32) plus headroom."""
        return self.max_request_tokens * hidden_size * 4 + (1 << 20)
