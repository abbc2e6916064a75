"""MoELayer and ExpertGroup against the transformers blocks of every family, both layouts."""

from __future__ import annotations

import copy

import pytest
import torch

from experts import CheckpointReader, ExpertGroup, MoELayer, dispatch, load_spec
from experts.layer import Gate, Latent
from tests.checkpoints import FAMILIES, LAYOUTS, block_output, moe_block, token_ids_for

FP32_TOL = 1e-5   # max abs error <= FP32_TOL * max|ref|
BF16_TOL = 3e-2   # bf16 keeps 8 mantissa bits; both sides round differently in the combine

CASES = [(family, layout) for family in FAMILIES for layout in LAYOUTS]
# blocks that scale the experts' sum after their gate (the others scale in it, where `_gate` has it):
# Laguna's and Beam's routed_scaling_factor, Cohere2-MoE's average with its shared expert
SCALED_AFTER_THE_GATE = ("laguna", "cohere2_moe", "beam")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("family,layout", CASES)
def test_every_moe_layer_matches_transformers_fp32(zoo, family, layout):
    path = zoo.checkpoint(family, layout)
    spec = load_spec(path)
    torch.manual_seed(0)
    x = torch.randn(3, 11, spec.hidden_size)
    for layer in spec.moe_layers:
        ids = token_ids_for(spec, layer, (3, 11))  # [B, S] for a hash-routed layer, else None
        ref = block_output(moe_block(zoo.model(family), layer, spec.block_attr), x, ids)
        out = MoELayer.from_pretrained(path, layer=layer)(x, ids)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert _rel_err(out, ref) <= FP32_TOL, (family, layout, layer)
        flat = MoELayer.from_pretrained(path, layer=layer)(x.reshape(-1, spec.hidden_size),
                                                           None if ids is None else ids.reshape(-1))
        assert torch.equal(flat, out.reshape(-1, spec.hidden_size))


def _routed(block, spec):
    """The module holding `block`'s gate and routed experts: itself, or Ernie 4.5-VL's `text_moe`."""
    return block.text_moe if spec.text_experts_only else block


def _gate(block, spec, x, token_ids=None):
    """transformers' gate of `block` on x [T, H]: (logits [T, E], weights [T, k], ids [T, k]);
    Inkling's logits are [T, E + S], the shared experts' last;
    MiniMax-M2, LFM2-MoE and AFMoE keep their score bias on the block and hand it to the gate;
    DeepSeek-V4's hash layers take the token ids."""
    block = _routed(block, spec)
    gate = getattr(block, spec.gate_attr)
    bias = getattr(block, "e_score_correction_bias", None)
    bias = getattr(block, "expert_bias", None) if bias is None else bias
    if token_ids is not None:
        return gate(x, token_ids)
    if spec.model_type == "afmoe":  # its router takes [B, S, H]
        return gate(x[None], bias)
    if spec.model_type == "dbrx":  # its router gives the logits, its block routes them
        logits = gate(x)
        return logits, *block.route_tokens_to_experts(logits)
    return (gate(x) if bias is None else gate(x, bias))[:3]  # Inkling's gives the shared experts' weights 4th


def _router_logits(block, spec, x, token_ids=None):
    """[T, E] logits of the transformers router (what ties are judged on)."""
    with torch.no_grad():
        return block.router(x)[1] if spec.gate_on_input else _gate(block, spec, x, token_ids)[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_matches_transformers_within_stated_tolerance(zoo, family):
    """bf16: tokens routed alike agree within BF16_TOL. A token may be routed differently only
    where two bf16 logits tie exactly at the k-th place (torch.topk breaks such ties either way;
    expert-mesh always picks the lower expert index); the test checks that this is the only cause."""
    path = zoo.checkpoint(family)
    spec = load_spec(path)
    model_bf16 = copy.deepcopy(zoo.model(family)).to(torch.bfloat16)
    x = torch.randn(18, spec.hidden_size, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    for layer in spec.moe_layers:
        block = moe_block(model_bf16, layer, spec.block_attr)
        ids = token_ids_for(spec, layer, (18,))
        ref = block_output(block, x[None], None if ids is None else ids[None])[0]
        out = MoELayer.from_pretrained(path, layer=layer, dtype=torch.bfloat16)(x, ids)
        assert out.dtype == torch.bfloat16
        top = _router_logits(block, spec, x, ids).float().sort(dim=1, descending=True).values
        is_tied = top[:, spec.top_k_of(layer) - 1] == top[:, spec.top_k_of(layer)]
        if ids is not None:  # the token table picks the experts: no tie can change them
            is_tied[:] = False
        token_err = (out.float() - ref.float()).abs().max(dim=1).values / ref.float().abs().max()
        assert (token_err[~is_tied] <= BF16_TOL).all(), (family, layer, token_err)
        assert is_tied.sum() <= 2, "too many exact ties for this check to mean anything"


def _transformers_subset_contribution(block, spec, x, subset):
    """What the experts in `subset` add to each token, computed by transformers' own modules."""
    with torch.no_grad():
        if spec.gate_on_input:  # Llama 4: zero the router scores of the other experts
            scores, _ = block.router(x)
            keep = torch.zeros(spec.num_experts, dtype=torch.bool)
            keep[subset] = True
            scores = scores.masked_fill(~keep, 0.0)
            routed_in = x.repeat(scores.shape[1], 1) * scores.transpose(0, 1).reshape(-1, 1)
            return block.experts(routed_in).reshape(scores.shape[1], -1, x.shape[-1]).sum(0)
        _, weights, ids = _gate(block, spec, x)
        weights = weights * torch.isin(ids, torch.tensor(subset))
        if spec.latent_size:  # Nemotron-H: the experts work on the latent projection
            return block.fc2_latent_proj(block.experts(block.fc1_latent_proj(x), ids, weights))
        out = _routed(block, spec).experts(x, ids, weights).reshape(x.shape)  # DBRX's experts give [T, 1, H]
        return out * (spec.scaling if spec.model_type in SCALED_AFTER_THE_GATE else 1.0)


@pytest.mark.parametrize("family,layout", CASES)
def test_expert_group_subset_gives_those_experts_contribution(zoo, family, layout):
    path = zoo.checkpoint(family, layout)
    spec = load_spec(path)
    layer, subset = spec.moe_layers[-1], [spec.num_experts - 1, 1]
    x = torch.randn(40, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    ref = _transformers_subset_contribution(moe_block(zoo.model(family), layer, spec.block_attr), spec, x, subset)

    reader = CheckpointReader(path)
    gate = Gate(spec, reader.gate(layer))
    group = ExpertGroup.from_checkpoint(path, {layer: subset})
    assert group.layers[layer].experts == sorted(subset)
    weights, ids = gate(x)
    latent = reader.latent(layer)
    latent = None if latent is None else Latent(latent)
    tokens = dispatch(spec, x if latent is None else latent.into(x), weights, ids)
    y = torch.zeros_like(tokens.rows)
    start = 0
    for expert, count in enumerate(tokens.counts):  # the rows of experts not held stay zero
        if expert in subset and count:
            rows = slice(start, start + count)
            scale = None if tokens.scale is None else tokens.scale[rows]
            y[rows] = group.forward(layer, tokens.rows[rows], [expert], [count], scale)
        start += count
    out = tokens.combine(y)
    assert ref.abs().max() > 0
    assert _rel_err(out if latent is None else latent.out_of(out), ref) <= FP32_TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_of_two_experts_reads_only_their_bytes(zoo, layout):
    path = zoo.checkpoint("mixtral", layout)
    spec = load_spec(path)
    reader = CheckpointReader(path)
    ExpertGroup.from_checkpoint(path, {0: [2, 4]}, reader=reader)
    per_expert = 3 * spec.hidden_size * spec.intermediate_size * 4  # gate, up, down in fp32
    assert reader.bytes_read == 2 * per_expert
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert reader.bytes_read < total / 5  # 2 of the 12 experts in the file, and nothing else


def test_sharded_checkpoint_reads_like_single_file(zoo, tmp_path):
    model = zoo.model("qwen2_moe")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    x = torch.randn(13, model.config.hidden_size)
    for layer in load_spec(tmp_path).moe_layers:
        sharded = MoELayer.from_pretrained(tmp_path, layer=layer)(x)
        single = MoELayer.from_pretrained(zoo.checkpoint("qwen2_moe"), layer=layer)(x)
        assert torch.equal(sharded, single)


def test_a_published_qwen3_5_layout_reads_like_the_text_model(zoo, tmp_path):
    """Qwen3.5-MoE as published: a composite config (its text model in `text_config`), the decoder
    under `model.language_model.layers.`, a vision tower and a multi-token-prediction layer beside
    it (`mtp.layers.0`, itself an MoE layer)."""
    import json

    from safetensors.torch import load_file, save_file

    source = zoo.checkpoint("qwen3_5_moe")
    tensors = {name.replace("model.layers.", "model.language_model.layers."): t
               for name, t in load_file(source / "model.safetensors").items()}
    extra = {name.replace("model.language_model.layers.0.", "mtp.layers.0."): t.clone()
             for name, t in tensors.items() if name.startswith("model.language_model.layers.0.")}
    save_file({**tensors, **extra, "model.visual.blocks.0.attn.qkv.weight": torch.zeros(4, 4)},
              tmp_path / "model.safetensors")
    text = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe", "text_config": text}))
    x = torch.randn(11, text["hidden_size"], generator=torch.Generator().manual_seed(4))
    for layer in load_spec(source).moe_layers:
        assert torch.equal(MoELayer.from_pretrained(tmp_path, layer=layer)(x),
                           MoELayer.from_pretrained(source, layer=layer)(x)), layer


def test_qwen3_omni_moe_reads_the_thinker_not_the_talker_beside_it(zoo, tmp_path):
    """Qwen3-Omni as published: the thinker's decoder under `thinker.model.layers.`, and the talker's
    MoE layers beside it under `talker.model.layers.`, here more of them than the thinker has and
    with other weights. The reader takes the thinker's (`checkpoint_root`), so the layers read equal
    the thinker's own."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = zoo.checkpoint("qwen3_omni_moe")
    spec = load_spec(source)
    tensors = load_file(source / "model.safetensors")
    talker = {name.replace("thinker.model.layers.0.", f"talker.model.layers.{i}."): -t
              for name, t in tensors.items() if name.startswith("thinker.model.layers.0.")
              for i in range(spec.num_layers + 1)}
    save_file({**tensors, **talker}, tmp_path / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    x = torch.randn(11, spec.hidden_size, generator=torch.Generator().manual_seed(4))
    for layer in spec.moe_layers:
        ref = block_output(moe_block(zoo.model("qwen3_omni_moe"), layer, spec.block_attr), x[None])[0]
        assert _rel_err(MoELayer.from_pretrained(tmp_path, layer=layer)(x), ref) <= FP32_TOL, layer


def test_qwen3_vl_moe_reads_its_published_transposed_experts(zoo, tmp_path):
    """Qwen3-VL as published: fused experts stored transposed, [E, H, 2I] and [E, I, H] (transformers
    transposes them as it loads; save_pretrained writes them back unchanged). The reader tells the
    orientation from the stored shapes: transformers loads this folder to the same model, and
    MoELayer reads it to the same layer."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    source = zoo.checkpoint("qwen3_vl_moe")
    spec = load_spec(source)
    transposed = ("experts.gate_up_proj", "experts.down_proj")
    save_file({name: t.transpose(1, 2).contiguous() if name.endswith(transposed) else t
               for name, t in load_file(source / "model.safetensors").items()}, tmp_path / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    x = torch.randn(2, 11, spec.hidden_size, generator=torch.Generator().manual_seed(4))
    published = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    for layer in spec.moe_layers:
        ref = block_output(moe_block(zoo.model("qwen3_vl_moe"), layer, spec.block_attr), x)
        assert torch.equal(block_output(moe_block(published, layer, spec.block_attr), x), ref)
        out = MoELayer.from_pretrained(tmp_path, layer=layer)(x.reshape(-1, spec.hidden_size))
        assert _rel_err(out, ref.reshape(-1, spec.hidden_size)) <= FP32_TOL, layer


def test_the_reader_tells_transposed_experts_where_gate_up_is_square(zoo, tmp_path):
    """Qwen3-MoE's tiny model has H == 2I: gate_up [E, 2I, H] and its transpose have one shape; the
    reader tells them apart by down_proj's, and reads the same experts either way."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = zoo.checkpoint("qwen3_moe", "fused")
    spec = load_spec(source)
    assert spec.hidden_size == 2 * spec.intermediate_size
    transposed = ("experts.gate_up_proj", "experts.down_proj")
    save_file({name: t.transpose(1, 2).contiguous() if name.endswith(transposed) else t
               for name, t in load_file(source / "model.safetensors").items()}, tmp_path / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    readers = [CheckpointReader(path) for path in (tmp_path, source)]
    got, want = (reader.experts(spec.moe_layers[-1], [0, 5]) for reader in readers)
    for reader in readers:
        reader.close()
    assert torch.equal(got.w_gate_up, want.w_gate_up) and torch.equal(got.w_down, want.w_down)


def test_group_versions_follow_source_bytes(zoo):
    legacy = ExpertGroup.from_checkpoint(zoo.checkpoint("mixtral", "legacy"), {1: [0, 3]})
    fused = ExpertGroup.from_checkpoint(zoo.checkpoint("mixtral", "fused"), {1: [0, 3]})
    assert legacy.checksum() == fused.checksum()  # same bytes, in either layout
    assert legacy.version(1, 0) != legacy.version(1, 3)


def test_a_vendor_deepseek_v4_layout_reads_like_the_saved_one(zoo, tmp_path):
    """DeepSeek-V4 as the vendor publishes it: no `model.` prefix (`layers.N.ffn.gate.bias`,
    `layers.N.ffn.experts.E.w1`, `embed.weight`) and a multi-token-prediction block `mtp.0.*`."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = zoo.checkpoint("deepseek_v4")
    tensors = {name.removeprefix("model.").replace("embed_tokens.", "embed."): t
               for name, t in load_file(source / "model.safetensors").items()}
    extra = {name.replace("layers.0.", "mtp.0."): t.clone()
             for name, t in tensors.items() if name.startswith("layers.0.")}
    save_file({**tensors, **extra}, tmp_path / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    x = torch.randn(11, 64, generator=torch.Generator().manual_seed(4))
    ids = torch.randint(0, 128, (11,), generator=torch.Generator().manual_seed(5))
    for layer in load_spec(source).moe_layers:
        assert torch.equal(MoELayer.from_pretrained(tmp_path, layer=layer)(x, ids),
                           MoELayer.from_pretrained(source, layer=layer)(x, ids)), layer


@pytest.mark.parametrize("family,changed", [
    ("mixtral", dict(renormalize=False)),  # always renormalised
    ("qwen2_moe", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("qwen3_moe", dict(renormalize=False)),
    ("olmoe", dict(renormalize=True)),  # norm_topk_prob False by default
    ("qwen3_next", dict(renormalize=False)),  # True by default
    ("qwen3_5_moe", dict(renormalize=False)),  # always renormalised
    ("minimax_m2", dict(renormalize=False)),
    ("gpt_oss", dict(renormalize=False)),  # softmax over the top-k
    ("deepseek_v3", dict(num_groups=1, topk_groups=1)),
    ("deepseek_v3", dict(scaling=1.0)),
    ("deepseek_v3", dict(renormalize=False)),
    ("deepseek_v32", dict(num_groups=1, topk_groups=1)),
    ("glm4_moe", dict(num_groups=1, topk_groups=1)),
    ("glm4_moe", dict(scaling=1.0)),
    ("mistral_large4", dict(scaling=1.0)),
    ("mistral_large4", dict(renormalize=False)),
    ("deepseek_v4", dict(scaling=1.0)),
    ("deepseek_v4", dict(renormalize=False)),
    ("deepseek_v2", dict(num_groups=1, topk_groups=1)),  # group-limited, not greedy
    ("deepseek_v2", dict(renormalize=True)),  # V2 never renormalises
    ("deepseek_v2", dict(scaling=1.0)),  # x routed_scaling_factor
    ("dots1", dict(num_groups=1, topk_groups=1)),
    ("solar_open", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("exaone_moe", dict(scaling=1.0)),
    ("glm4_moe_lite", dict(renormalize=True)),
    ("hy_v3", dict(renormalize=False)),  # always renormalised
    ("hy_v3", dict(scaling=1.0)),  # x router_scaling_factor
    ("lfm2_moe", dict(scaling=1.0)),
    ("mellum", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("beam", dict(num_groups=1, topk_groups=1)),
    ("beam", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("beam", dict(scaling=1.0)),  # x routed_scaling_factor, after the experts' sum
    ("cohere2_moe", dict(scaling=1.0)),  # the average: routed x 0.5 (and shared x 0.5)
    ("dbrx", dict(renorm_p=1.0)),  # moe_normalize_expert_weights 2 in its tiny model
    ("ernie4_5_moe", dict(renorm_min=1e-20)),  # moe_norm_min 0.9 in its tiny model
    ("flint", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("granitemoe", dict(renormalize=False)),  # the softmax over the top-k logits
    ("hunyuan_v1_moe", dict(renormalize=False)),
    ("jamba", dict(renormalize=True)),  # never renormalised
    ("qwen3_vl_moe", dict(renormalize=False)),  # always renormalised (its tiny model's norm_topk_prob is False)
    ("qwen3_omni_moe", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("kolibri1", dict(renormalize=False)),  # norm_topk_prob True in its tiny model
    ("inkling_text", dict(scaling=1.0)),  # x route_scale
    ("ernie4_5_vl_moe", dict(renorm_min=1e-20)),  # moe_norm_min 0.9 in its tiny model
    ("nemotron_h", dict(scaling=1.0)),  # x routed_scaling_factor
    ("nemotron_h", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("nemotron_h", dict(num_groups=1, topk_groups=1)),
    ("longcat_flash", dict(renormalize=True)),  # never renormalised
    ("longcat_flash", dict(scaling=1.0)),
    ("phimoe", dict(jitter_eps=0.01)),  # router_jitter_noise 0.3 in its tiny model
    ("laguna", dict(logit_softcap=0.0)),  # moe_router_logit_softcapping 1.0 in its tiny model
    ("laguna", dict(scaling=1.0)),  # x moe_routed_scaling_factor
    ("afmoe", dict(renormalize=False)),  # always renormalised
    ("afmoe", dict(scaling=1.0)),  # x route_scale
    ("axk2", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("axk2", dict(scaling=1.0)),
    ("bailing_hybrid", dict(num_groups=1, topk_groups=1)),
    ("bailing_hybrid", dict(renormalize=True)),  # moe_renormalize False in its tiny model
    ("kimi_linear", dict(num_groups=1, topk_groups=1)),
    ("kimi_linear", dict(renormalize=True)),  # moe_renormalize False in its tiny model
    ("kimi_linear", dict(scaling=1.0)),
    ("mimo_v2_flash", dict(num_groups=1, topk_groups=1)),
    ("mistral4", dict(scoring="softmax", num_groups=1, topk_groups=1)),
    ("mistral4", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("mistral4", dict(scaling=1.0)),
    ("mimo_v2_flash", dict(renormalize=True)),  # norm_topk_prob False in its tiny model
    ("mimo_v2_flash", dict(scaling=1.0)),
    ("flex_olmo", dict(renormalize=False)),  # norm_topk_prob True in its tiny model
])
def test_the_tiny_models_routing_options_each_change_the_output(zoo, family, changed):
    """The routing options of a family's tiny model are set where each matters: the block computed
    without one differs from transformers' by more than 100x the fp32 tolerance, so the equality
    tests above would catch a gate that ignored it."""
    import dataclasses

    path = zoo.checkpoint(family)
    spec = load_spec(path)
    x = torch.randn(3, 11, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = next(i for i in spec.moe_layers if i not in spec.hash_layers)  # a layer its gate routes
    ref = block_output(moe_block(zoo.model(family), layer, spec.block_attr), x)
    altered = MoELayer.from_pretrained(path, layer=layer)
    altered.gate.spec = dataclasses.replace(spec, **changed)
    assert _rel_err(altered(x), ref) > 100 * FP32_TOL, changed


def test_hy_v4_clamps_the_routed_experts_swiglu_not_the_shared_one(tmp_path):
    """With the shared expert's weights scaled up so that its limit would bite too: clamping the shared
    expert, or not clamping the routed ones, each moves the block by more than 100x the fp32 tolerance."""
    from experts.builtin import build_model, save_checkpoint

    model = build_model("hy_v4")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".shared_experts." in name:
                param.mul_(20.0)
    path = save_checkpoint(model, tmp_path / "hy_v4")
    spec = load_spec(path)
    layer = spec.moe_layers[0]
    x = torch.randn(3, 11, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    ref = block_output(moe_block(model, layer, spec.block_attr), x)
    shared_clamped, routed_unclamped = (MoELayer.from_pretrained(path, layer=layer) for _ in range(2))
    shared_clamped.shared.activation = spec.gated_activation()
    routed_unclamped.experts.activation = spec.gated_activation(shared=True)
    assert _rel_err(MoELayer.from_pretrained(path, layer=layer)(x), ref) <= FP32_TOL
    assert _rel_err(shared_clamped(x), ref) > 100 * FP32_TOL and _rel_err(routed_unclamped(x), ref) > 100 * FP32_TOL


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_cohere2_moes_sigmoid_selection_matches_transformers(tmp_path, norm_topk_prob):
    """Cohere2-MoE with expert_selection_fn "sigmoid": the top-k-then-sigmoid gate, renormalised or
    not as norm_topk_prob says; the other one differs by > 100x the tolerance."""
    import dataclasses

    from experts.builtin import build_model, save_checkpoint

    model = build_model("cohere2_moe", expert_selection_fn="sigmoid", norm_topk_prob=norm_topk_prob)
    path = save_checkpoint(model, tmp_path / "sigmoid")
    spec = load_spec(path)
    x = torch.randn(3, 11, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in spec.moe_layers:
        ref = block_output(moe_block(model, layer, spec.block_attr), x)
        layer_out = MoELayer.from_pretrained(path, layer=layer)
        assert _rel_err(layer_out(x), ref) <= FP32_TOL, layer
        layer_out.gate.spec = dataclasses.replace(spec, renormalize=not norm_topk_prob)
        assert _rel_err(layer_out(x), ref) > 100 * FP32_TOL, layer


def test_a_grouped_mistral_large4_matches_transformers(tmp_path):
    """Mistral Large 3 with n_group > 1: transformers' group-limited softmax (a group scored by its
    best two), in both layouts; without the groups the block differs by > 100x the tolerance."""
    import dataclasses

    from experts.builtin import build_model, save_checkpoint

    model = build_model("mistral_large4", seed=3, n_group=4, topk_group=2, num_experts_per_tok=3)
    x = torch.randn(3, 11, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layout in LAYOUTS:
        path = save_checkpoint(model, tmp_path / layout, fused=layout == "fused")
        spec = load_spec(path)
        assert (spec.scoring, spec.num_groups, spec.topk_groups, spec.group_best) == ("softmax_grouped", 4, 2, 2)
        for layer in spec.moe_layers:
            ref = block_output(moe_block(model, layer, spec.block_attr), x)
            assert _rel_err(MoELayer.from_pretrained(path, layer=layer)(x), ref) <= FP32_TOL, (layout, layer)
    ungrouped = MoELayer.from_pretrained(path, layer=spec.moe_layers[0])
    ungrouped.gate.spec = dataclasses.replace(spec, num_groups=1, topk_groups=1)
    assert _rel_err(ungrouped(x), block_output(moe_block(model, spec.moe_layers[0], spec.block_attr), x)) > 1e-3
