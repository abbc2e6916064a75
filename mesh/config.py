"""The mesh's configuration: pydantic models loaded from YAML (`mesh up --config FILE`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protos.errors import ConfigError
from protos.serving import TLSConfig
from router_service.config import RouterConfig

__all__ = ["AutoscaleConfig", "GroupsConfig", "MeshConfig", "load_config"]


class GroupsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_groups: int | None = Field(None, ge=1, description=(
        "Expert groups (actors); default: one per GPU where the groups compute on GPUs, else one per node."))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "Where a group holds its experts and computes: auto, on the GPU Ray gives it where the groups' nodes "
        "have GPUs, else the host; cpu, the host (no GPU reserved); cuda, a GPU (the mesh refuses to start "
        "where the nodes have none)."))
    replicas: int = Field(1, ge=1, description="Copies of every expert, on distinct groups.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "Dtype experts are held and compute in; auto: bfloat16 where the groups compute on GPUs, else float32."))
    torch_threads: int = Field(0, ge=0, description="torch threads per group actor (0: torch's default).")
    num_cpus: float = Field(0.0, ge=0, description="Ray CPUs reserved per group actor.")
    node_labels: dict[str, str] = Field(default_factory=dict, description=(
        "Groups run only on nodes carrying all these Ray node labels (`ray start --labels k=v`, or "
        "Ray's own such as ray.io/accelerator-type); empty: on any node."))
    memory_fraction: float = Field(0.8, gt=0, le=1, description=(
        "Share of a node's Ray memory that its groups' expert weights may take."))
    channel_budget_bytes: int = Field(1 << 30, ge=0, description=(
        "Memory a group gives the buffers (request and reply) of its collective channels (one per router or direct "
        "client, max_batch_tokens x top_k rows each); past it, a new channel is refused and that caller's "
        "slices go over grpc."))


class AutoscaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Follow measured load (also `mesh autoscale on|off`).")
    target_tokens_per_s: float = Field(2000.0, gt=0, description="Tokens/s one expert copy should carry.")
    max_copies: int | None = Field(None, ge=1, description="Most copies of one expert; default: live groups.")
    hysteresis: float = Field(0.25, ge=0, lt=1, description="Band around the target where nothing changes.")
    period_s: float = Field(2.0, gt=0, description="How often the controller re-plans.")


class MeshConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("mesh", pattern=r"^[A-Za-z0-9_.-]+$", description="Mesh name; actors are <name>/...")
    model: str | None = Field(None, description="Checkpoint folder; default: the built-in model.")
    groups: GroupsConfig = Field(default_factory=GroupsConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    router_dtype: Literal["float32", "bfloat16"] = Field("float32", description="Dtype of gates and shared experts.")
    health_period_s: float = Field(1.0, gt=0, description=(
        "Period of the reconcile loop: groups observed, routers resynced, dead groups restored."))
    group_timeout_s: float = Field(5.0, gt=0, description=(
        "A control call to a group (an observation, a load) that takes longer than this has failed."))
    group_start_timeout_s: float = Field(300.0, gt=0, description=(
        "A group start (deploy or restart) not serving within this has failed (an actor Ray cannot place, a node "
        "gone): the change rolls back and the lock is free for the next."))
    failure_threshold: int = Field(3, ge=1, description=(
        "A group is dead when Ray reports its actor dead, or after this many observations in a row it "
        "missed; one that missed fewer is `suspect` in `mesh status` and still routed."))
    max_timeout_deaths: int | None = Field(None, ge=1, description=(
        "Most groups one round declares dead on missed observations alone (Ray's word of a death always "
        "counts); more than this together and it waits and logs. None: the most crowded node's groups + 1."))
    push_timeout_s: float = Field(2.0, gt=0, description=(
        "A router that takes no routing table within this is skipped and resynced next round."))
    drain_s: float = Field(1.0, ge=0, description="Wait between moving traffic off a copy and releasing it.")
    direct_lease_s: float = Field(10.0, gt=0, description=(
        "Lease of a direct client (router_service/direct.py), renewed by its polls: a change's drain waits "
        "for every live direct client to leave the older epochs, and for a silent one no longer than this."))
    admin_token: str | None = Field(None, description=(
        "Token that mutating admin calls must carry (EXPERT_MESH_ADMIN_TOKEN overrides); none: refused."))
    swap_roots: list[str] = Field(default_factory=list, description=(
        "Folders a hot swap may read checkpoints from (resolved on the controller's node); empty: the "
        "model checkpoint's parent folder."))
    swap_probe_experts: int = Field(8, ge=0, description=(
        "Experts of a hot swap whose probe outputs are checked against this controller's own compute (one "
        "expert in its memory at a time); every swapped expert's sha256 is checked on every holder."))
    read_token: str | None = Field(None, description=(
        "Token that Status and Placement may carry (EXPERT_MESH_READ_TOKEN overrides): once it or the "
        "admin token is set, they need one of the two; with neither, they are open to every caller of the "
        "router's port."))
    internal_tls: TLSConfig | None = Field(None, description=(
        "Mutual TLS between routers and expert groups (gRPC): groups serve with cert/key and routers "
        "present them; each side checks the other against `ca` (routers: for `server_name`). Not with "
        "transport: collective."))
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)
    num_routers: int = Field(1, ge=1, le=8, description="Routers started by `mesh up` (ports port, port+1, ...).")
    placement_balance: float = Field(0.5, ge=0, description=(
        "`mesh rebalance` may lift a group's load to (1 + this) x the mean group load to bring hot "
        "experts nearer the routers."))


    @model_validator(mode="after")
    def _tls_covers_the_transport(self) -> "MeshConfig":
        if self.internal_tls is not None and self.router.transport != "grpc":
            raise ValueError(f"internal_tls cannot cover router.transport: {self.router.transport}: its traffic "
                             "(gloo / NCCL tensors, or Ray's object transfers) does not go through gRPC and is not "
                             "encrypted; use transport: grpc with internal_tls, or drop internal_tls")
        if self.internal_tls is not None and not (self.internal_tls.ca and self.internal_tls.cert
                                                   and self.internal_tls.key):
            raise ValueError("internal_tls needs cert and key (the groups serve with them) and ca (routers "
                             "check the groups' certificates against it)")
        return self


def load_config(path: str | Path | None, **overrides) -> MeshConfig:
    """Config from YAML (or defaults), with non-None `overrides` of top-level fields applied."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a mapping, got {type(data).__name__}")
    for key, value in overrides.items():
        if value is not None:
            section, _, field = key.partition(".")
            if field:
                data.setdefault(section, {})[field] = value
            else:
                data[key] = value
    try:
        return MeshConfig(**data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config{f' {path}' if path else ''}: {problems}") from exc
