"""MoESpec: what one MoE model's expert layers are, derived from its config.json.

The families served are `_FAMILIES`' keys (SUPPORTED_MODEL_TYPES), each a function from its
config.json to the spec; a composite (multimodal) model in TEXT_MODELS is served through its text
model's config. `NOT_SERVED` names the others examined, with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from protos.errors import UnsupportedModelError

if TYPE_CHECKING:
    from kernels.expert_mlp import GatedActivation

__all__ = ["MoESpec", "NOT_SERVED", "SUPPORTED_MODEL_TYPES", "TEXT_MODELS", "load_config", "load_spec",
           "spec_from_config", "text_config_path"]

Scoring = Literal["softmax", "sigmoid_grouped", "softmax_grouped", "topk_then_sigmoid", "sqrtsoftplus", "sparsemixer",
                  "sigmoid_sink"]
# What the MoE block's forward returns: "hidden" out [B, S, H]; "flat_and_router" (out [T, H], its
# router's second output) (Llama 4); "hidden_and_router" (out [B, S, H], the same) (gpt-oss).
BlockOutput = Literal["hidden", "flat_and_router", "hidden_and_router"]


@dataclasses.dataclass(frozen=True)
class MoESpec:
    model_type: str
    hidden_size: int
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int                      # experts per token (the largest, where `layer_top_k` has one per layer)
    intermediate_size: int          # per routed expert
    activation: str
    scoring: Scoring
    renormalize: bool
    num_groups: int = 1             # sigmoid_grouped and softmax_grouped only
    topk_groups: int = 1
    group_best: int = 2             # a group is scored by the sum of its best 1 or 2 experts' scores
    scaling: float = 1.0
    renorm_min: float = 1e-20       # renormalised by max(sum of the top-k weights, this) (Ernie 4.5: moe_norm_min)
    renorm_p: float = 1.0           # softmax: renormalised by the top-k weights' p-norm (DBRX); 1: their sum
    jitter_eps: float = 0.0         # sparsemixer (PhiMoE): each round's softmax keeps experts within 2x this, relative
    logit_softcap: float = 0.0      # > 0: logits soft-capped, cap * tanh(logits / cap), before the sigmoid (Laguna)
    has_score_bias: bool = False    # DeepSeek-V3 e_score_correction_bias
    is_router_fp32: bool = False    # the router's logits are computed in float32 whatever the model dtype
    shared_intermediate_size: int = 0   # 0: no shared expert
    has_shared_gate: bool = False   # Qwen2-MoE: sigmoid(x @ w) scales the shared expert
    shared_attr: str = "shared_expert"  # attribute of the MoE block holding the shared expert(s)
    shared_scale: float = 1.0       # the shared experts' output x this (Cohere2-MoE's average: 0.5, routed x 0.5 too)
    # where the score bias is, under the block: the first of these names that the checkpoint has (a
    # name starting "../" is under the decoder layer instead: Kolibri's `moe.router.expert_bias`)
    score_bias: tuple[str, ...] = ("gate.e_score_correction_bias",)
    # other names of the block in checkpoints (vendors' own); "": the gate and experts sit directly
    # in the decoder layer (Mistral's `layers.N.gate.weight`)
    checkpoint_blocks: tuple[str, ...] = ()
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert names: gate, up, down
    # the shared expert's gate, up, down in vendors' checkpoints (transformers' gate_proj, up_proj,
    # down_proj are read where these are absent)
    shared_expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    gate_on_input: bool = False     # Llama 4: gate weights scale the expert input
    block_attr: str = "mlp"         # attribute of the decoder layer holding the MoE block
    gate_attr: str = "gate"         # attribute of the MoE block holding the router
    checkpoint_gates: tuple[str, ...] = ()   # other names of the router in checkpoints, tried first
    # other names of the shared expert module in checkpoints, under the block ("../": under the decoder
    # layer, Ernie 4.5-VL's beside its text_moe)
    checkpoint_shared: tuple[str, ...] = ()
    # the fused experts' gate_up [E, 2I, H] and down [E, H, I] in vendors' checkpoints, under the
    # block (transformers' experts.gate_up_proj, experts.down_proj are read where these are absent)
    checkpoint_fused: tuple[str, ...] = ()
    # DBRX: every expert's gate, up and down stacked along dim 0, [E * I, H] each (down transposed), under the block
    checkpoint_stacked: tuple[str, ...] = ()
    has_gate_bias: bool = False     # gpt-oss: the router's linear has a bias (added to the logits)
    has_expert_bias: bool = False   # gpt-oss: biases on the experts' gate_up and down projections
    # gpt-oss: gate and up alternate along 2I in fused checkpoints (the orientation, [E, 2I, H] or
    # [E, H, 2I], the reader takes from the stored shapes)
    interleaved_gate_up: bool = False
    swiglu_limit: float = 0.0       # > 0: gate clamped to <= limit, up to [-limit, limit] (gpt-oss, DeepSeek-V4)
    shared_clamped: bool = True     # the shared experts' SwiGLU clamped too (HY-V4 clamps the routed experts' only)
    swiglu_alpha: float = 1.0       # gpt-oss: act(gate) = gate * sigmoid(alpha * gate)
    swiglu_up_offset: float = 0.0   # gpt-oss: act(gate) * (up + 1)
    block_output: BlockOutput = "hidden"
    # DeepSeek-V4: MoE layers whose experts a token-id table (`gate.tid2eid [vocab, k]`) picks; the
    # gate's scores only weigh them. A Forward of such a layer needs the token ids.
    hash_layers: tuple[int, ...] = ()
    # per MoE layer (in `moe_layers`' order) its top-k, where they differ (Hunyuan-A13B's moe_topk list)
    layer_top_k: tuple[int, ...] = ()
    # LongCat-Flash's zero-compute experts: the gate scores num_experts + these; a copy picked for one
    # (id >= num_experts) is the token itself, added by whoever gates (router, MoELayer), never sent
    num_identity_experts: int = 0
    # Inkling ("sigmoid_sink"): the gate scores this many shared experts after the routed ones (its
    # weight [E + S, H]), each shared expert (of the routed experts' size) scaled by its own weight,
    # and every weight x the layer's learned `gate.global_scale`
    num_shared_scored: int = 0
    # Nemotron-H: the experts (and shared experts) are not gated, down(act(up x)); per expert, the
    # checkpoint holds `expert_names[1:]` (up, down)
    gated_experts: bool = True
    # > 0 (Nemotron-H's moe_latent_size): the router projects the tokens to this width for the
    # experts (the block's `fc1_latent_proj`) and their combined output back (`fc2_latent_proj`)
    latent_size: int = 0
    # Ernie 4.5-VL: the block's text experts are served; its vision experts (for image and video
    # tokens, of another width) are not, and patch_model refuses a forward that carries such tokens
    text_experts_only: bool = False
    # the decoder's names in checkpoints start with this (Qwen3-Omni: "thinker.", its talker's MoE
    # layers beside it are another model's, not served)
    checkpoint_root: str = ""

    def check_layer(self, layer: int) -> None:
        """Raise ValueError unless `layer` (a decoder-layer index) is an MoE layer."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer must be an int, got {layer!r}")
        if layer not in self.moe_layers:
            kind = "dense" if 0 <= layer < self.num_layers else "out of range"
            raise ValueError(f"layer {layer} is {kind}; the MoE layers of this {self.model_type} "
                             f"model are {list(self.moe_layers)}")

    @property
    def num_scored(self) -> int:
        """Experts the gate picks from: the real ones, then the identity ones."""
        return self.num_experts + self.num_identity_experts

    @property
    def gate_rows(self) -> int:
        """Rows of the gate's weight: the experts it picks from, then the shared ones it scores (Inkling)."""
        return self.num_scored + self.num_shared_scored

    @property
    def expert_width(self) -> int:
        """The width of the rows the experts take and give: the latent width where there is one, else H."""
        return self.latent_size or self.hidden_size

    @property
    def gate_up_rows(self) -> int:
        """Rows of one expert's gate_up weight: 2I (gate, then up), or I (up) for non-gated experts."""
        return (2 if self.gated_experts else 1) * self.intermediate_size

    @property
    def stored_expert_names(self) -> tuple[str, ...]:
        """Per-expert weight names a checkpoint holds: gate, up, down; up, down for non-gated experts."""
        return self.expert_names if self.gated_experts else self.expert_names[1:]

    def top_k_of(self, layer: int) -> int:
        """Experts per token of MoE layer `layer`."""
        return self.layer_top_k[self.moe_layers.index(layer)] if self.layer_top_k else self.top_k

    def gated_activation(self, shared: bool = False) -> "GatedActivation":
        """The routed experts' gated activation, or (`shared`) the shared experts'."""
        from kernels.expert_mlp import GatedActivation  # spec itself stays free of torch

        limit = self.swiglu_limit if self.shared_clamped or not shared else 0.0
        return GatedActivation(self.activation, limit, self.swiglu_alpha, self.swiglu_up_offset, self.gated_experts)

    def config_hash(self) -> str:
        """sha256 of the spec's fields: two servers agree on the model's MoE layout iff equal."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoESpec":
        tuples = ("moe_layers", "score_bias", "checkpoint_blocks", "expert_names", "shared_expert_names", "hash_layers",
                  "checkpoint_gates", "checkpoint_shared", "checkpoint_fused", "checkpoint_stacked", "layer_top_k")
        return cls(**{**data, **{name: tuple(data[name]) for name in tuples}})


def _get(config: dict[str, Any], key: str, model_type: str) -> Any:
    """config[key]; `key` may be "a|b" to accept either name (the hub's and transformers' own)."""
    for name in key.split("|"):
        if name in config:
            return config[name]
    raise UnsupportedModelError(f"config.json of model_type {model_type!r} lacks the field {key.replace('|', ' or ')!r}")


def _common(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    return dict(
        model_type=model_type,
        hidden_size=int(_get(config, "hidden_size", model_type)),
        num_layers=int(_get(config, "num_hidden_layers", model_type)),
        top_k=int(_get(config, "num_experts_per_tok", model_type)),
        activation=str(config.get("hidden_act", "silu")),
    )


def _qwen_moe_layers(config: dict[str, Any], model_type: str) -> tuple[int, ...]:
    """`mlp_layer_types` ("dense" / "sparse" per layer, Mellum) when given, else every
    `decoder_sparse_step`-th layer not in `mlp_only_layers`."""
    num_layers = int(_get(config, "num_hidden_layers", model_type))
    if config.get("mlp_layer_types"):
        return _deepseek_moe_layers(config, num_layers)
    step = int(config.get("decoder_sparse_step", 1))
    dense = set(config.get("mlp_only_layers") or [])
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


_MIXTRAL_NAMES = dict(checkpoint_blocks=("block_sparse_moe",), expert_names=("w1", "w3", "w2"))


def _mixtral(config: dict[str, Any], mt: str) -> MoESpec:
    common = _common(config, mt)
    return MoESpec(**common, moe_layers=tuple(range(common["num_layers"])),
                   num_experts=int(_get(config, "num_local_experts", mt)),
                   intermediate_size=int(_get(config, "intermediate_size", mt)),
                   scoring="softmax", renormalize=True, **_MIXTRAL_NAMES)


def _granitemoe(config: dict[str, Any], mt: str) -> MoESpec:
    """Granite MoE: Mixtral's routing (top-k of the logits, then their softmax), its block the decoder
    layer's `block_sparse_moe`, published fused as `input_linear.weight` [E, 2I, H] and
    `output_linear.weight` [E, H, I] with the router's linear at `router.layer`. The shared MLP of
    `granitemoeshared`, `granitemoehybrid` and `granitemoe_swa` sits on the decoder layer beside the
    block (`shared_mlp`): the model computes it, the mesh serves the block."""
    if not int(_get(config, "num_local_experts", mt)):
        raise UnsupportedModelError(f"{mt} with num_local_experts=0 has no MoE layer")
    return dataclasses.replace(_mixtral(config, mt), block_attr="block_sparse_moe", gate_attr="router",
                               checkpoint_blocks=(), checkpoint_gates=("router.layer",),
                               checkpoint_fused=("input_linear.weight", "output_linear.weight"))


def _phimoe(config: dict[str, Any], mt: str) -> MoESpec:
    """PhiMoE: the sparsemixer gate (two experts; `router_jitter_noise` sets each round's band), its
    router at `mlp.router`, published as Mixtral's (`block_sparse_moe.gate`, experts `w1, w3, w2`)."""
    spec = dataclasses.replace(_mixtral(config, mt), scoring="sparsemixer", renormalize=False,
                               jitter_eps=float(config.get("router_jitter_noise", 0.01)), block_attr="mlp",
                               gate_attr="router", checkpoint_gates=("gate",))
    if spec.top_k != 2:
        raise UnsupportedModelError(f"{mt} with num_experts_per_tok={spec.top_k} is not served: sparsemixer picks 2")
    return spec


def _cohere2_moe(config: dict[str, Any], mt: str) -> MoESpec:
    """Cohere2-MoE: top-k of the logits, then their softmax (`expert_selection_fn` "softmax") or their
    sigmoid ("sigmoid", renormalised if `norm_topk_prob`); `num_shared_experts` of the experts' size,
    added to the routed output, or averaged with it (`shared_expert_combination_strategy` "average": both x 0.5);
    MoE layers from `mlp_layer_types` (else from `first_k_dense_replace`, default 0)."""
    selection = config.get("expert_selection_fn", "softmax")
    strategy = config.get("shared_expert_combination_strategy", "average")
    if selection not in ("softmax", "sigmoid"):
        raise UnsupportedModelError(f"{mt}: expert_selection_fn={selection!r} is not 'softmax' or 'sigmoid'")
    if strategy not in ("sum", "average"):
        raise UnsupportedModelError(f"{mt}: shared_expert_combination_strategy={strategy!r} is not 'sum' or 'average'")
    common, size = _common(config, mt), int(_get(config, "intermediate_size", mt))
    shared = size * int(config.get("num_shared_experts") or 0)
    half = 0.5 if shared and strategy == "average" else 1.0
    return MoESpec(**common, moe_layers=_deepseek_moe_layers(config, common["num_layers"]),
                   num_experts=int(_get(config, "num_experts", mt)), intermediate_size=size,
                   scoring="softmax" if selection == "softmax" else "topk_then_sigmoid",
                   renormalize=selection == "softmax" or bool(config.get("norm_topk_prob", True)), scaling=half,
                   shared_intermediate_size=shared,
                   shared_attr="shared_experts", shared_scale=half)


def _dbrx(config: dict[str, Any], mt: str) -> MoESpec:
    """DBRX: softmax, top-k, renormalised by the weights' `moe_normalize_expert_weights`-norm (none:
    not renormalised); its decoder `transformer.blocks`, each block's `ffn` with the router's linear
    at `router.layer` and the experts stacked as `experts.mlp.w1, v1, w2`; sizes in `ffn_config`."""
    ffn = config.get("ffn_config") or {}
    config = {**_renamed(config, dict(hidden_size="d_model", num_hidden_layers="n_layers")),
              "num_experts_per_tok": _get(ffn, "moe_top_k", mt),
              "hidden_act": (ffn.get("ffn_act_fn") or {}).get("name", "silu")}
    common = _common(config, mt)
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    return MoESpec(**common, moe_layers=tuple(range(common["num_layers"])),
                   num_experts=int(_get(ffn, "moe_num_experts", mt)),
                   intermediate_size=int(_get(ffn, "ffn_hidden_size", mt)),
                   scoring="softmax", renormalize=p is not None, renorm_p=float(p or 1.0), block_attr="ffn",
                   gate_attr="router", checkpoint_gates=("router.layer",),
                   checkpoint_stacked=("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2"))


def _minimax_m2(config: dict[str, Any], mt: str) -> MoESpec:
    """Sigmoid + score bias (kept on the block), top-k, renormalised: DeepSeek-V3's gate with one
    group and no scaling; Mixtral's names."""
    common = _common(config, mt)
    return MoESpec(**common, moe_layers=tuple(range(common["num_layers"])),
                   num_experts=int(_get(config, "num_local_experts", mt)),
                   intermediate_size=int(_get(config, "intermediate_size", mt)),
                   scoring="sigmoid_grouped", renormalize=True, has_score_bias=True,
                   score_bias=("e_score_correction_bias",), **_MIXTRAL_NAMES)


def _lfm2_moe(config: dict[str, Any], mt: str) -> MoESpec:
    """LFM2-MoE: MiniMax-M2's gate (sigmoid, `expert_bias` for the choice when `use_expert_bias`,
    top-k, renormalised if `norm_topk_prob`) x `routed_scaling_factor`, its block the decoder
    layer's `feed_forward`, from layer `num_dense_layers` on."""
    common = _common(config, mt)
    return MoESpec(**common, moe_layers=tuple(range(int(config.get("num_dense_layers", 0)), common["num_layers"])),
                   num_experts=int(_get(config, "num_experts|num_local_experts", mt)),
                   intermediate_size=int(_get(config, "moe_intermediate_size", mt)), scoring="sigmoid_grouped",
                   renormalize=bool(config.get("norm_topk_prob", True)),
                   scaling=float(config.get("routed_scaling_factor", 1.0)),
                   has_score_bias=bool(config.get("use_expert_bias", True)), score_bias=("expert_bias",),
                   block_attr="feed_forward", expert_names=("w1", "w3", "w2"))


def _qwen2_moe(config: dict[str, Any], mt: str) -> MoESpec:
    shared = int(config.get("shared_expert_intermediate_size") or 0)
    return MoESpec(**_common(config, mt), moe_layers=_qwen_moe_layers(config, mt),
                   num_experts=int(_get(config, "num_experts|num_local_experts", mt)),
                   intermediate_size=int(_get(config, "moe_intermediate_size", mt)),
                   scoring="softmax", renormalize=bool(config.get("norm_topk_prob", False)),
                   shared_intermediate_size=shared, has_shared_gate=shared > 0)


def _ernie4_5_moe(config: dict[str, Any], mt: str) -> MoESpec:
    """Ernie 4.5 MoE: a float32 softmax, a score bias for the choice only, top-k, renormalised by
    max(their sum, `moe_norm_min`); `moe_num_shared_experts`; MoE layers every `moe_layer_interval`-th
    from `moe_layer_start_index` to `moe_layer_end_index` (-1: the last). Its names: `moe_num_experts`,
    `moe_k`; the bias published as `mlp.moe_statics.e_score_correction_bias` [1, E]."""
    config = _renamed(config, dict(num_experts_per_tok="moe_k", num_experts="moe_num_experts"))
    common = _common(config, mt)
    last = int(config.get("moe_layer_end_index", -1))
    first, every = int(config.get("moe_layer_start_index", 1)), int(config.get("moe_layer_interval", 1))
    last = common["num_layers"] - 1 if last == -1 else last
    moe_size = int(_get(config, "moe_intermediate_size", mt))
    return MoESpec(**common, moe_layers=tuple(i for i in range(first, last + 1) if (i + 1) % every == 0),
                   num_experts=int(_get(config, "num_experts", mt)), intermediate_size=moe_size,
                   scoring="softmax_grouped", renormalize=True, renorm_min=float(config.get("moe_norm_min", 1e-12)),
                   is_router_fp32=True, has_score_bias=True,
                   score_bias=("gate.moe_statics.e_score_correction_bias", "moe_statics.e_score_correction_bias"),
                   shared_intermediate_size=moe_size * int(config.get("moe_num_shared_experts") or 0),
                   shared_attr="shared_experts")


def _ernie4_5_vl_moe_text(config: dict[str, Any], mt: str) -> MoESpec:
    """Ernie 4.5-VL's text model: Ernie 4.5's gate and experts, in the `text_moe` of each MoE block
    (`text_experts_only`: its `vision_moe` is not served); `moe_intermediate_size` [text, vision];
    MoE layers: the "sparse" of `mlp_layer_types` (default: all but the first); the shared experts
    beside `text_moe`. Published: the text experts are `mlp.experts.0..E-1` (the vision ones follow),
    the gate `mlp.gate.weight` [H, E] (the reader transposes it), the bias
    `mlp.moe_statics.e_score_correction_bias` [2, E] (row 0: text)."""
    sizes = config.get("moe_intermediate_size") or [1536, 512]
    num_layers = int(_get(config, "num_hidden_layers", mt))
    kinds = config.get("mlp_layer_types") or ["dense"] + ["sparse"] * (num_layers - 1)
    text = {**config, "moe_intermediate_size": sizes[0] if isinstance(sizes, list) else sizes}
    return dataclasses.replace(_ernie4_5_moe(text, mt),
                               moe_layers=tuple(i for i, kind in enumerate(kinds[:num_layers]) if kind == "sparse"),
                               checkpoint_blocks=("mlp.text_moe",), checkpoint_shared=("../mlp.shared_experts",),
                               text_experts_only=True)


def _hunyuan_v1_moe(config: dict[str, Any], mt: str) -> MoESpec:
    """Hunyuan-A13B: a float32 router (`gate.wg`), softmax, top-k renormalised, `moe_topk` one k or
    one per layer; a shared MLP of the experts' size in the block (`shared_mlp`); every layer MoE."""
    num_layers, experts = int(_get(config, "num_hidden_layers", mt)), _get(config, "num_experts", mt)
    if isinstance(experts, list) and len(set(experts)) > 1:
        raise UnsupportedModelError(f"{mt} with a different num_experts per layer ({experts}) is not served")
    top_k = _get(config, "moe_topk", mt)
    per_layer = tuple(int(k) for k in top_k) if isinstance(top_k, list) else ()
    if per_layer and len(per_layer) != num_layers:
        raise UnsupportedModelError(f"{mt}: moe_topk lists {len(per_layer)} layers, the model has {num_layers}")
    size = int(_get(config, "intermediate_size", mt))
    common = _common({**config, "num_experts_per_tok": max(per_layer or [int(top_k)])}, mt)
    return MoESpec(**common, moe_layers=tuple(range(num_layers)),
                   layer_top_k=per_layer if len(set(per_layer)) > 1 else (),
                   num_experts=int(experts[0] if isinstance(experts, list) else experts), intermediate_size=size,
                   scoring="softmax", renormalize=True, is_router_fp32=True, checkpoint_gates=("gate.wg",),
                   shared_intermediate_size=size, shared_attr="shared_mlp")


def _jamba(config: dict[str, Any], mt: str) -> MoESpec:
    """Jamba: a softmax top-k never renormalised, the block the decoder layer's `feed_forward` (in
    Mamba and attention layers alike) with its router at `router`, on every `expert_layer_period`-th
    layer from `expert_layer_offset`."""
    common = _common(config, mt)
    period, offset = int(config.get("expert_layer_period", 2)), int(config.get("expert_layer_offset", 1))
    return MoESpec(**common, moe_layers=tuple(i for i in range(common["num_layers"]) if i % period == offset),
                   num_experts=int(_get(config, "num_experts|num_local_experts", mt)),
                   intermediate_size=int(_get(config, "intermediate_size", mt)), scoring="softmax",
                   renormalize=False, block_attr="feed_forward", gate_attr="router")


def _qwen3_moe(config: dict[str, Any], mt: str) -> MoESpec:
    return MoESpec(**_common(config, mt), moe_layers=_qwen_moe_layers(config, mt),
                   num_experts=int(_get(config, "num_experts|num_local_experts", mt)),
                   intermediate_size=int(_get(config, "moe_intermediate_size", mt)),
                   scoring="softmax", renormalize=bool(config.get("norm_topk_prob", True)))


def _qwen3_vl_moe_text(config: dict[str, Any], mt: str) -> MoESpec:
    """Qwen3-VL's text model: Qwen3-MoE's block, always renormalised (norm_topk_prob is ignored);
    its published experts are fused and transposed ([E, H, 2I], [E, I, H])."""
    return dataclasses.replace(_qwen3_moe(config, mt), renormalize=True)


def _qwen3_omni_moe_text(config: dict[str, Any], mt: str) -> MoESpec:
    """Qwen3-Omni's thinker: Qwen3-MoE's block (`norm_topk_prob` read), its decoder under `thinker.`
    in checkpoints; the talker's MoE layers beside it (a gated shared expert) stay in the model."""
    return dataclasses.replace(_qwen3_moe(config, mt), checkpoint_root="thinker.")


def _inkling_text(config: dict[str, Any], mt: str) -> MoESpec:
    """Inkling: a float32 router scoring the routed and the `n_shared_experts` shared experts by
    sigmoid; top-k routed by score + bias (for the choice only); the chosen and the shared scores
    normalised together, x `route_scale` x the layer's learned `gate.global_scale`; each shared
    expert, of the routed experts' size, weighted by its own score. MoE layers: the "sparse" of
    `mlp_layer_types` (hub configs: all from `dense_mlp_idx`, whose `intermediate_size` is then the
    experts' width beside `dense_intermediate_size`)."""
    common = _common(config, mt)
    num_shared = int(config.get("n_shared_experts") or 0)
    if num_shared < 1:
        raise UnsupportedModelError(f"{mt} with n_shared_experts={num_shared} is not served: its router's "
                                    f"scores end with the shared experts'")
    first_sparse = int(config.get("dense_mlp_idx") or 0)
    kinds = config.get("mlp_layer_types") or ["dense" if i < first_sparse else "sparse"
                                              for i in range(common["num_layers"])]
    size = _get(config, "intermediate_size" if "dense_intermediate_size" in config else "moe_intermediate_size", mt)
    return MoESpec(**common, moe_layers=tuple(i for i, kind in enumerate(kinds[:common["num_layers"]])
                                              if kind == "sparse"),
                   num_experts=int(_get(config, "n_routed_experts|num_local_experts", mt)), intermediate_size=int(size),
                   scoring="sigmoid_sink", renormalize=True, scaling=float(config.get("route_scale", 8.0)),
                   is_router_fp32=True, has_score_bias=True, shared_intermediate_size=int(size) * num_shared,
                   shared_attr="shared_experts", num_shared_scored=num_shared)


def _nemotron_h(config: dict[str, Any], mt: str) -> MoESpec:
    """Nemotron-H: the MoE block is the `mixer` of the "moe" layers of `layers_block_type` (hub
    configs: the "E"s of `hybrid_override_pattern`); DeepSeek-V3's gate (a float32 sigmoid + score
    bias, `n_group` / `topk_group`, renormalised if `norm_topk_prob`, x `routed_scaling_factor`);
    non-gated experts (`mlp_hidden_act`: relu^2) on the tokens projected to `moe_latent_size` where
    set (the block's `fc1_latent_proj`, back through `fc2_latent_proj`); one non-gated shared expert
    of `moe_shared_expert_intermediate_size` on the tokens themselves. Published fused as
    `experts.up_proj` [E, I, L] and `experts.down_proj` [E, L, I]."""
    kinds = config.get("layers_block_type") or config.get("layer_types")
    if not kinds:
        kinds = ["moe" if kind == "E" else "other" for kind in str(_get(config, "hybrid_override_pattern", mt))]
    if config.get("mlp_bias"):
        raise UnsupportedModelError(f"{mt} with mlp_bias=True is not served: its latent projections and shared "
                                    f"expert would carry biases")
    config = {**config, "num_hidden_layers": len(kinds), "hidden_act": config.get("mlp_hidden_act", "relu2")}
    return MoESpec(**_common(config, mt), moe_layers=tuple(i for i, kind in enumerate(kinds) if kind == "moe"),
                   num_experts=int(_get(config, "n_routed_experts|num_local_experts", mt)),
                   intermediate_size=int(_get(config, "moe_intermediate_size", mt)), scoring="sigmoid_grouped",
                   num_groups=int(config.get("n_group") or 1), topk_groups=int(config.get("topk_group") or 1),
                   renormalize=bool(config.get("norm_topk_prob", True)),
                   scaling=float(config.get("routed_scaling_factor") or 1.0), is_router_fp32=True, has_score_bias=True,
                   shared_intermediate_size=int(_get(config, "moe_shared_expert_intermediate_size", mt)),
                   shared_attr="shared_experts", block_attr="mixer", gated_experts=False,
                   latent_size=int(config.get("moe_latent_size") or 0),
                   checkpoint_fused=("experts.up_proj", "experts.down_proj"))


def _kolibri1(config: dict[str, Any], mt: str) -> MoESpec:
    """Kolibri: a float32 router; top-k of the logits + a score bias (for the choice only), weights the
    sigmoid of the chosen logits, renormalised if `norm_topk_prob` (default off); one ungated shared
    expert block (`shared_experts`, `shared_expert_intermediate_size`); every layer MoE. Its bias is
    published beside the block, `moe.router.expert_bias`."""
    common = _common(config, mt)
    return MoESpec(**common, moe_layers=tuple(range(common["num_layers"])),
                   num_experts=int(_get(config, "num_local_experts|num_experts", mt)),
                   intermediate_size=int(_get(config, "moe_intermediate_size", mt)), scoring="topk_then_sigmoid",
                   renormalize=bool(config.get("norm_topk_prob", False)), is_router_fp32=True, has_score_bias=True,
                   score_bias=("gate.e_score_correction_bias", "../moe.router.expert_bias"),
                   shared_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
                   shared_attr="shared_experts")


def _flint(config: dict[str, Any], mt: str) -> MoESpec:
    """Flint: a float32 router, sigmoid scores without a bias, top-k, renormalised if `norm_topk_prob`
    (DeepSeek-V3's gate with one group and no bias); one ungated shared expert (`shared_expert`,
    `shared_expert_intermediate_size`); MoE layers as Qwen2-MoE's, `mlp_only_layers` default [0, 1]."""
    dense = config.get("mlp_only_layers")
    config = {**config, "mlp_only_layers": [0, 1] if dense is None else dense}
    return MoESpec(**_common(config, mt), moe_layers=_qwen_moe_layers(config, mt),
                   num_experts=int(_get(config, "num_experts", mt)),
                   intermediate_size=int(_get(config, "moe_intermediate_size", mt)), scoring="sigmoid_grouped",
                   renormalize=bool(config.get("norm_topk_prob", True)), is_router_fp32=True,
                   shared_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0))


def _olmoe(config: dict[str, Any], mt: str) -> MoESpec:
    common = _common(config, mt)
    return MoESpec(**common, moe_layers=tuple(range(common["num_layers"])),
                   num_experts=int(_get(config, "num_experts|num_local_experts", mt)),
                   intermediate_size=int(_get(config, "intermediate_size", mt)),
                   scoring="softmax", renormalize=bool(config.get("norm_topk_prob", False)))


def _deepseek_v3(config: dict[str, Any], mt: str) -> MoESpec:
    """DeepSeek-V3 and the families with its MoE block: GLM-4.5 `glm4_moe`, GLM-4.7-Flash
    `glm4_moe_lite`, DeepSeek-V3.2, GLM-5 `glm_moe_dsa`, dots.llm1 `dots1`, Solar Open `solar_open`,
    K-EXAONE `exaone_moe` (`_exaone_moe`: its own names `num_experts`, `num_shared_experts`)."""
    common = _common(config, mt)
    moe_size = int(_get(config, "moe_intermediate_size", mt))
    shared = int(config.get("n_shared_experts") or config.get("num_shared_experts") or 0)
    return MoESpec(**common, moe_layers=_deepseek_moe_layers(config, common["num_layers"]),
                   num_experts=int(_get(config, "n_routed_experts|num_local_experts|num_experts", mt)),
                   intermediate_size=moe_size, scoring="sigmoid_grouped",
                   renormalize=bool(config.get("norm_topk_prob", True)),
                   num_groups=int(config.get("n_group") or 1), topk_groups=int(config.get("topk_group") or 1),
                   scaling=float(config.get("routed_scaling_factor") or 1.0), has_score_bias=True,
                   shared_intermediate_size=moe_size * shared, shared_attr="shared_experts")


def _renamed(config: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """`config` with transformers' names (the keys of `names`) set from a vendor's (its values) where given."""
    return {**config, **{ours: config[theirs] for ours, theirs in names.items() if theirs in config}}


# Kimi Linear's and Ling's config names for DeepSeek-V3's (transformers' attribute_map)
_KIMI_NAMES = dict(n_routed_experts="num_experts", num_experts_per_tok="num_experts_per_token",
                   n_group="num_expert_group", norm_topk_prob="moe_renormalize", n_shared_experts="num_shared_experts")


def _kimi_linear(config: dict[str, Any], mt: str) -> MoESpec:
    """Kimi Linear: DeepSeek-V3's block beside linear attention, under its own config names; MoE
    layers from `mlp_layer_types`, else from `first_k_dense_replace` (default 1); published as
    `block_sparse_moe` with experts `w1, w3, w2`."""
    spec = _deepseek_v3({"first_k_dense_replace": 1, **_renamed(config, _KIMI_NAMES)}, mt)
    return dataclasses.replace(spec, **_MIXTRAL_NAMES)


def _bailing_hybrid(config: dict[str, Any], mt: str) -> MoESpec:
    """Ling hybrid (`bailing_hybrid`): Kimi Linear's config names with transformers' defaults (8
    groups, the best 4, MoE from layer 2); its score bias published as `mlp.gate.expert_bias`."""
    defaults = {"first_k_dense_replace": 2, "n_group": 8, "topk_group": 4}
    spec = _deepseek_v3({**defaults, **_renamed(config, _KIMI_NAMES)}, mt)
    return dataclasses.replace(spec, score_bias=("gate.e_score_correction_bias", "gate.expert_bias"))


def _axk2(config: dict[str, Any], mt: str) -> MoESpec:
    """A.X K2: DeepSeek-V3.2's block without groups while `n_group` is unset (A.X-K2-Light); MoE
    layers from `first_k_dense_replace` (default 1), every `moe_layer_freq`-th."""
    if config.get("n_group") is not None:
        raise UnsupportedModelError(f"{mt} with n_group set is not served: it masks the groups not chosen with 0, "
                                    f"not -inf, which the grouped gate does not do")
    return _deepseek_v3({"first_k_dense_replace": 1, **config}, mt)


def _beam(config: dict[str, Any], mt: str) -> MoESpec:
    """Beam: DeepSeek-V3's gate and experts (8 groups, the best 4, MoE after 3 dense layers, x 2.5 by
    default), no shared expert; its routed_scaling_factor applied to the experts' sum (the same
    product); SwiGLU evaluated in float32 (bf16 weights: within the bf16 tolerance here)."""
    defaults = {"n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5}
    return _deepseek_v3({**defaults, **{k: v for k, v in config.items() if v is not None}}, mt)


def _deepseek_v2(config: dict[str, Any], mt: str) -> MoESpec:
    """DeepSeek-V2: a float32 softmax over all experts, top-k over all (`topk_method` "greedy") or
    among the `topk_group` groups holding the best experts ("group_limited_greedy"), never
    renormalised, x `routed_scaling_factor`; `n_shared_experts` ungated; MoE layers from
    `first_k_dense_replace`."""
    common = _common(config, mt)
    method = config.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(f"{mt} with topk_method={method!r} is not served "
                                    f"(only 'greedy' and 'group_limited_greedy')")
    grouped = method == "group_limited_greedy"
    moe_size = int(_get(config, "moe_intermediate_size", mt))
    return MoESpec(**common, moe_layers=_deepseek_moe_layers(config, common["num_layers"]),
                   num_experts=int(_get(config, "n_routed_experts|num_local_experts|num_experts", mt)),
                   intermediate_size=moe_size, scoring="softmax_grouped", renormalize=False,
                   num_groups=int(config.get("n_group") or 1) if grouped else 1,
                   topk_groups=int(config.get("topk_group") or 1) if grouped else 1, group_best=1,
                   scaling=float(config.get("routed_scaling_factor", 1.0)), is_router_fp32=True,
                   shared_intermediate_size=moe_size * int(config.get("n_shared_experts") or 0),
                   shared_attr="shared_experts")


def _hy_v4(config: dict[str, Any], mt: str) -> MoESpec:
    """HY-V4: DeepSeek-V3's block (MoE from layer 1 by default) beside DeepSeek-V4's hyper-connections;
    the routed experts' SwiGLU clamped at `swiglu_limit` (default 10), the shared expert's not; its
    published shared expert's gate is `linear_gate`."""
    return dataclasses.replace(_deepseek_v3({"first_k_dense_replace": 1, **config}, mt),
                               swiglu_limit=float(config.get("swiglu_limit", 10.0)), shared_clamped=False,
                               shared_expert_names=("linear_gate", "up_proj", "down_proj"))


def _exaone_moe(config: dict[str, Any], mt: str) -> MoESpec:
    """DeepSeek-V3's block; its published checkpoints keep the score bias on the block
    (`mlp.e_score_correction_bias`), transformers' fused layout under the gate."""
    return dataclasses.replace(_deepseek_v3(config, mt),
                               score_bias=("gate.e_score_correction_bias", "e_score_correction_bias"))


def _hy_v3(config: dict[str, Any], mt: str) -> MoESpec:
    """Hunyuan 3: DeepSeek-V3's gate with one group, always renormalised, x `router_scaling_factor`;
    `num_shared_experts`. Its published names: `mlp.router.gate`, the score bias `mlp.expert_bias`,
    the shared expert `mlp.shared_mlp`."""
    return dataclasses.replace(_deepseek_v3(config, mt), renormalize=True,
                               scaling=float(config.get("router_scaling_factor", 1.0)),
                               score_bias=("e_score_correction_bias", "expert_bias", "gate.e_score_correction_bias"),
                               checkpoint_gates=("router.gate",), checkpoint_shared=("shared_mlp",))


def _afmoe(config: dict[str, Any], mt: str) -> MoESpec:
    """AFMoE (Arcee Trinity): DeepSeek-V3's gate with one group, always renormalised, x `route_scale`;
    `num_shared_experts`; MoE layers from `num_dense_layers` (default 1). Its router's linear sits at
    `router.gate`, its score bias on the block (`expert_bias`)."""
    common = _common(config, mt)
    moe_size = int(_get(config, "moe_intermediate_size", mt))
    return MoESpec(**common, moe_layers=tuple(range(int(config.get("num_dense_layers", 1)), common["num_layers"])),
                   num_experts=int(_get(config, "num_experts", mt)), intermediate_size=moe_size,
                   scoring="sigmoid_grouped", renormalize=True, scaling=float(config.get("route_scale") or 1.0),
                   has_score_bias=True, score_bias=("expert_bias",), gate_attr="router",
                   checkpoint_gates=("router.gate",), shared_attr="shared_experts",
                   shared_intermediate_size=moe_size * int(config.get("num_shared_experts") or 0))


def _longcat_flash(config: dict[str, Any], mt: str) -> MoESpec:
    """LongCat-Flash: a float32 router (`router.classifier`) over the experts and `zero_expert_num`
    identity experts, softmax, a score bias for the choice, top-k, never renormalised, x
    `routed_scaling_factor`; one MoE block (`mlp`) in each of its `num_layers` decoder layers."""
    if config.get("router_bias"):
        raise UnsupportedModelError(f"{mt} with router_bias is not served: the router's linear has no bias here")
    config = _renamed(config, dict(num_hidden_layers="num_layers", num_experts_per_tok="moe_topk"))
    common = _common(config, mt)
    return MoESpec(**common, moe_layers=tuple(range(common["num_layers"])),
                   num_experts=int(_get(config, "n_routed_experts", mt)),
                   num_identity_experts=int(config.get("zero_expert_num") or 0),
                   intermediate_size=int(_get(config, "expert_ffn_hidden_size", mt)), scoring="softmax_grouped",
                   renormalize=False, scaling=float(config.get("routed_scaling_factor", 1.0)), is_router_fp32=True,
                   has_score_bias=True, score_bias=("router.e_score_correction_bias",), gate_attr="router",
                   checkpoint_gates=("router.classifier",))


def _laguna(config: dict[str, Any], mt: str) -> MoESpec:
    """Laguna: sigmoid scores of logits soft-capped at `moe_router_logit_softcapping`, a score bias
    for the choice only, top-k, always renormalised, x `moe_routed_scaling_factor`; one ungated shared
    expert of `shared_expert_intermediate_size`; MoE layers from `mlp_layer_types` (default: all but
    the first). Published: the bias as `mlp.experts.e_score_correction_bias`, the shared expert as
    `mlp.shared_expert`."""
    common = _common(config, mt)
    return MoESpec(**common, moe_layers=_deepseek_moe_layers(config, common["num_layers"], first_dense=1),
                   num_experts=int(_get(config, "num_experts", mt)),
                   intermediate_size=int(_get(config, "moe_intermediate_size", mt)), scoring="sigmoid_grouped",
                   renormalize=True, scaling=float(config.get("moe_routed_scaling_factor") or 1.0),
                   logit_softcap=float(config.get("moe_router_logit_softcapping") or 0.0), has_score_bias=True,
                   score_bias=("gate.e_score_correction_bias", "experts.e_score_correction_bias"),
                   shared_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
                   shared_attr="shared_experts", checkpoint_shared=("shared_expert",))


def _deepseek_moe_layers(config: dict[str, Any], num_layers: int, first_dense: int = 0) -> tuple[int, ...]:
    """`mlp_layer_types` ("dense" / "sparse" per layer, DeepSeek-V3.2) when given, else every
    `moe_layer_freq`-th layer (default 1) from `first_k_dense_replace` (default `first_dense`) on."""
    kinds = config.get("mlp_layer_types")
    if kinds:
        return tuple(i for i, kind in enumerate(kinds[:num_layers]) if kind == "sparse")
    first, every = int(config.get("first_k_dense_replace", first_dense)), int(config.get("moe_layer_freq") or 1)
    return tuple(i for i in range(first, num_layers) if i % every == 0)


def _mistral_large4_text(config: dict[str, Any], mt: str) -> MoESpec:
    """Mistral Large 3: DeepSeek-V3's block scored by a float32 softmax, always renormalised, times
    `routed_scaling_factor`; with `n_group` > 1, the top-k among the `topk_group` groups whose best
    two scores sum highest. Mistral's own names (`layers.N.gate`, `experts.E.w1|w3|w2`,
    `shared_experts.w1|w3|w2`) or transformers' under `mlp.`."""
    common = _common(config, mt)
    num_groups = int(config.get("n_group") or 1)
    grouped = dict(scoring="softmax_grouped", num_groups=num_groups, topk_groups=int(config.get("topk_group") or 1))
    moe_size = int(_get(config, "moe_intermediate_size", mt))
    return MoESpec(**common, moe_layers=_deepseek_moe_layers(config, common["num_layers"], first_dense=1),
                   num_experts=int(_get(config, "n_routed_experts|num_local_experts", mt)),
                   intermediate_size=moe_size, **(grouped if num_groups > 1 else dict(scoring="softmax")),
                   renormalize=True,
                   scaling=float(config.get("routed_scaling_factor", 1.0)), is_router_fp32=True,
                   shared_intermediate_size=moe_size * int(config.get("n_shared_experts") or 0),
                   shared_attr="shared_experts", checkpoint_blocks=("",), expert_names=("w1", "w3", "w2"),
                   shared_expert_names=("w1", "w3", "w2"))


def _mistral4(config: dict[str, Any], mt: str) -> MoESpec:
    """Mistral Small 4: Mistral Large 3's block with the router's linear in the model dtype,
    renormalised if `norm_topk_prob` (default on), MoE layers from `first_k_dense_replace` (default 0)."""
    spec = _mistral_large4_text(config, mt)
    return dataclasses.replace(spec, is_router_fp32=False, renormalize=bool(config.get("norm_topk_prob", True)),
                               moe_layers=_deepseek_moe_layers(config, spec.num_layers))


def _qwen3_next(config: dict[str, Any], mt: str) -> MoESpec:
    """Qwen2-MoE's block; norm_topk_prob defaults to True."""
    return dataclasses.replace(_qwen2_moe(config, mt), renormalize=bool(config.get("norm_topk_prob", True)))


def _qwen3_5_moe_text(config: dict[str, Any], mt: str) -> MoESpec:
    """Qwen2-MoE's block; the top-k weights are always renormalised (norm_topk_prob is ignored)."""
    return dataclasses.replace(_qwen2_moe(config, mt), renormalize=True)


def _llama4_text(config: dict[str, Any], mt: str) -> MoESpec:
    common = _common(config, mt)
    moe_layers = config.get("moe_layers")
    if moe_layers is None:
        step = int(config.get("interleave_moe_layer_step", 1))
        moe_layers = list(range(step - 1, common["num_layers"], step))
    size = int(_get(config, "intermediate_size", mt))
    return MoESpec(**common, moe_layers=tuple(int(i) for i in moe_layers),
                   num_experts=int(_get(config, "num_local_experts", mt)), intermediate_size=size,
                   scoring="topk_then_sigmoid", renormalize=False, shared_intermediate_size=size,
                   gate_on_input=True, block_attr="feed_forward", gate_attr="router",
                   block_output="flat_and_router")


def _gpt_oss(config: dict[str, Any], mt: str) -> MoESpec:
    """Softmax over the top-k of biased logits (= softmax, top-k, renormalise); experts with biases,
    gate/up interleaved in [E, H, 2I], SwiGLU clamped with alpha and (up + 1); no shared expert."""
    common = _common(config, mt)
    return MoESpec(**dict(common, activation="silu"), moe_layers=tuple(range(common["num_layers"])),
                   num_experts=int(_get(config, "num_local_experts|num_experts", mt)),
                   intermediate_size=int(_get(config, "intermediate_size", mt)), scoring="softmax",
                   renormalize=True, gate_attr="router", has_gate_bias=True, has_expert_bias=True,
                   interleaved_gate_up=True, swiglu_limit=float(config.get("swiglu_limit", 7.0)),
                   swiglu_alpha=float(config.get("swiglu_alpha", 1.702)), swiglu_up_offset=1.0,
                   block_output="hidden_and_router")


def _deepseek_v4(config: dict[str, Any], mt: str) -> MoESpec:
    """DeepSeek-V4: sqrt(softplus) scores + score bias, top-k, always renormalised, x
    `routed_scaling_factor`; the "hash_moe" layers of `mlp_layer_types` pick experts by token id;
    routed and shared experts are SwiGLU clamped at `swiglu_limit`. Vendor names: the block is
    `ffn.`, experts `w1|w3|w2`, the score bias `gate.bias`."""
    common = _common(config, mt)
    if config.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
        raise UnsupportedModelError(f"{mt} with scoring_func={config['scoring_func']!r} is not served "
                                    f"(only 'sqrtsoftplus')")
    num_layers, moe_size = common["num_layers"], int(_get(config, "moe_intermediate_size|intermediate_size", mt))
    kinds = config.get("mlp_layer_types")
    if not kinds:  # hub configs: the first `num_hash_layers` (default 3)
        num_hash = min(num_layers, int(config.get("num_hash_layers", 3)))
        kinds = ["hash_moe"] * num_hash + ["moe"] * (num_layers - num_hash)
    return MoESpec(**common, moe_layers=tuple(range(num_layers)),
                   num_experts=int(_get(config, "n_routed_experts|num_local_experts", mt)),
                   intermediate_size=moe_size, scoring="sqrtsoftplus", renormalize=True,
                   scaling=float(config.get("routed_scaling_factor", 1.5)), has_score_bias=True,
                   score_bias=("gate.e_score_correction_bias", "gate.bias"),
                   shared_intermediate_size=moe_size, shared_attr="shared_experts", checkpoint_blocks=("ffn",),
                   expert_names=("w1", "w3", "w2"), shared_expert_names=("w1", "w3", "w2"),
                   swiglu_limit=float(config.get("swiglu_limit", 10.0)),
                   hash_layers=tuple(i for i, kind in enumerate(kinds[:num_layers]) if kind == "hash_moe"))


_FAMILIES = {
    "mixtral": _mixtral,
    "minimax": _mixtral,
    "granitemoe": _granitemoe,
    "phimoe": _phimoe,
    "dbrx": _dbrx,
    "cohere2_moe": _cohere2_moe,
    "granitemoeshared": _granitemoe,
    "granitemoehybrid": _granitemoe,
    "granitemoe_swa": _granitemoe,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "jamba": _jamba,
    "hunyuan_v1_moe": _hunyuan_v1_moe,
    "ernie4_5_moe": _ernie4_5_moe,
    "ernie4_5_vl_moe_text": _ernie4_5_vl_moe_text,
    "mellum": _qwen3_moe,
    "qwen3_vl_moe_text": _qwen3_vl_moe_text,
    "qwen3_omni_moe_text": _qwen3_omni_moe_text,
    "flint": _flint,
    "nemotron_h": _nemotron_h,
    "inkling_text": _inkling_text,
    "kolibri1": _kolibri1,
    "beam": _beam,
    "olmoe": _olmoe,
    "flex_olmo": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "deepseek_v32": _deepseek_v3,
    "glm4_moe": _deepseek_v3,
    "glm4_moe_lite": _deepseek_v3,
    "glm4v_moe_text": _deepseek_v3,
    "dots1": _deepseek_v3,
    "kimi_linear": _kimi_linear,
    "bailing_hybrid": _bailing_hybrid,
    "mimo_v2_flash": _deepseek_v3,
    "exaone_moe": _exaone_moe,
    "hy_v3": _hy_v3,
    "hy_v4": _hy_v4,
    "afmoe": _afmoe,
    "laguna": _laguna,
    "longcat_flash": _longcat_flash,
    "solar_open": _deepseek_v3,
    "glm_moe_dsa": _deepseek_v3,
    "axk2": _axk2,
    "minimax_m2": _minimax_m2,
    "lfm2_moe": _lfm2_moe,
    "qwen3_next": _qwen3_next,
    "qwen3_5_moe_text": _qwen3_5_moe_text,
    "llama4_text": _llama4_text,
    "gpt_oss": _gpt_oss,
    "mistral_large4_text": _mistral_large4_text,
    "mistral4": _mistral4,
    "deepseek_v4": _deepseek_v4,
}
# Examined in transformers 5.23 and not served: model_type -> why, as `mesh up` and `mesh check`
# say it. The README's not-served table is this dict, and tests/unit/experts/test_family_inventory.py
# holds both to the installed transformers' MoE model folders.
NOT_SERVED: dict[str, str] = {
    # the same block as a served family, not wired and tested yet
    "qwen4_exp": "Qwen3-Next's block in the text model, hyper-connections around it; not wired and tested yet",
    "dots3_note": "dots1's block in a vision-language model, shared experts sized by their own field; not wired yet",
    "aria": "top-k then softmax in the model dtype, experts stored transposed, in a vision-language model; "
            "not wired yet",
    # a gate or expert the kernels do not have
    "deepseek_ocr2": "DeepSeek-V2's gate: softmax top-k never renormalised, with ungated shared experts",
    "unlimited_ocr": "DeepSeek-V2's gate: softmax top-k never renormalised, with ungated shared experts",
    "glm5_next": "DeepSeek-V3's gate with routed and shared SwiGLU clamped at swiglu_limit, hyper-connections",
    "step3p7": "routed and shared experts clamped after SiLU on the layers swiglu_limits lists",
    "inkling2": "soft-capped SwiGLU experts (tanh caps on gate and up)",
    "minimax_m3_vl": "gpt-oss's clamped SwiGLU without biases, sigmoid + bias routing, x 2, a shared expert",
    "muse_spark": "router logits scaled before the sigmoid, experts at a narrower width with norms around them",
    "axk1": "the block's output (routed + shared) RMS-normed before the residual",
    "inkling_mm_model": "multimodal Inkling: its published names (model.llm.layers, experts.w13_weight with gate "
                        "and up interleaved) are not read; its text model, inkling_text, is served",
    # a different shape of layer
    "diffusion_gemma": "a block-diffusion encoder-decoder, not a causal decoder",
    "openai_privacy_filter": "a bidirectional encoder for token classification, not a causal decoder",
    "gemma4": "router and experts on the decoder layer beside a dense MLP",
    "doge": "product-key experts, not a routed top-k over expert MLPs",
    "jetmoe": "mixture of attention experts as well as MLP experts",
    "zaya": "router state carried from layer to layer",
    "nllb_moe": "an encoder-decoder model",
    "switch_transformers": "an encoder-decoder model",
}
# Composite (multimodal) models: the text model is served, its config at `text_config` (Qwen3-Omni's
# at `thinker_config.text_config`: `_TEXT_CONFIG_AT`).
TEXT_MODELS = {"llama4": "llama4_text", "qwen3_5_moe": "qwen3_5_moe_text",
               "mistral_large4": "mistral_large4_text", "glm4v_moe": "glm4v_moe_text",
               "qwen3_vl_moe": "qwen3_vl_moe_text", "qwen3_omni_moe": "qwen3_omni_moe_text",
               "ernie4_5_vl_moe": "ernie4_5_vl_moe_text"}
_TEXT_CONFIG_AT = {"qwen3_omni_moe": ("thinker_config", "text_config")}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


def text_config_path(model_type: str) -> tuple[str, ...]:
    """Where the config.json of a composite model (in TEXT_MODELS) keeps its text model's config."""
    return _TEXT_CONFIG_AT.get(model_type, ("text_config",))


def spec_from_config(config: dict[str, Any]) -> MoESpec:
    """Derive the MoE spec from a config.json dict; UnsupportedModelError for other architectures."""
    model_type = config.get("model_type")
    if model_type in TEXT_MODELS:
        for key in text_config_path(model_type):
            config = (config.get(key) if isinstance(config, dict) else None) or {}
        model_type = TEXT_MODELS[model_type]
    if model_type in NOT_SERVED:
        raise UnsupportedModelError(f"model_type {model_type!r} is not served: {NOT_SERVED[model_type]}")
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(f"unsupported model_type {model_type!r} in config.json; "
                                    f"expert-mesh serves {', '.join(SUPPORTED_MODEL_TYPES)}")
    spec = _FAMILIES[model_type](config, model_type)
    if not spec.moe_layers:
        raise UnsupportedModelError(f"config.json of this {model_type} model has no MoE layer")
    if not all(1 <= k <= spec.num_scored for k in (spec.top_k, *spec.layer_top_k)):
        raise UnsupportedModelError(f"num_experts_per_tok={spec.layer_top_k or spec.top_k} must be in "
                                    f"[1, {spec.num_scored}]")
    return spec


def load_config(path: str | Path) -> dict[str, Any]:
    """`<path>/config.json` (or `path` itself if it is a file) as a dict."""
    path = Path(path)
    config_path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise UnsupportedModelError(f"no config.json at {config_path}") from exc
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"config.json at {config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"config.json at {config_path} is a {type(config).__name__}, not an object")
    return config


def load_spec(path: str | Path) -> MoESpec:
    """Read `<path>/config.json` (or `path` itself if it is a file) and derive the spec."""
    return spec_from_config(load_config(path))
