"""MoESpec derivation and the errors for bad checkpoints and bad calls."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from experts import MoELayer, load_spec, spec_from_config
from protos.errors import CheckpointError, UnsupportedModelError

SPEC_CASES = [
    # model_type, config, expected (moe_layers, num_experts, top_k, scoring, shared size)
    ("mixtral", dict(hidden_size=8, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                     intermediate_size=6), ((0, 1), 4, 2, "softmax", 0)),
    ("qwen2_moe", dict(hidden_size=8, num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=6, shared_expert_intermediate_size=10, decoder_sparse_step=2,
                       mlp_only_layers=[3]), ((1,), 4, 2, "softmax", 10)),
    ("qwen3_moe", dict(hidden_size=8, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=6), ((0, 1), 8, 2, "softmax", 0)),
    ("olmoe", dict(hidden_size=8, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                   intermediate_size=6), ((0, 1, 2), 8, 2, "softmax", 0)),
    ("deepseek_v3", dict(hidden_size=8, num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4,
                         moe_intermediate_size=6, first_k_dense_replace=3, n_shared_experts=2, n_group=4,
                         topk_group=2), ((3,), 16, 4, "sigmoid_grouped", 12)),
    ("llama4", dict(text_config=dict(model_type="llama4_text", hidden_size=8, num_hidden_layers=4,
                                     num_local_experts=16, num_experts_per_tok=1, intermediate_size=6,
                                     moe_layers=[1, 3])), ((1, 3), 16, 1, "topk_then_sigmoid", 6)),
    ("deepseek_v32", dict(hidden_size=8, num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4,
                          moe_intermediate_size=6, first_k_dense_replace=1, n_shared_experts=1,
                          mlp_layer_types=["dense", "sparse", "dense", "sparse"]), ((1, 3), 16, 4, "sigmoid_grouped", 6)),
    ("glm4_moe", dict(hidden_size=8, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=6, first_k_dense_replace=1, n_shared_experts=1),
     ((1, 2), 8, 2, "sigmoid_grouped", 6)),
    ("qwen3_next", dict(hidden_size=8, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=6, shared_expert_intermediate_size=10), ((0, 1), 8, 2, "softmax", 10)),
    ("qwen3_5_moe", dict(text_config=dict(model_type="qwen3_5_moe_text", hidden_size=8, num_hidden_layers=2,
                                          num_experts=8, num_experts_per_tok=2, moe_intermediate_size=6,
                                          shared_expert_intermediate_size=10)), ((0, 1), 8, 2, "softmax", 10)),
    ("mistral_large4", dict(text_config=dict(model_type="mistral_large4_text", hidden_size=8, num_hidden_layers=3,
                                             n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=6,
                                             n_shared_experts=1)), ((1, 2), 8, 2, "softmax", 6)),  # 1 dense layer
    ("qwen3_vl_moe", dict(text_config=dict(model_type="qwen3_vl_moe_text", hidden_size=8, num_hidden_layers=2,
                                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=6,
                                           norm_topk_prob=False)), ((0, 1), 8, 2, "softmax", 0)),
    ("qwen3_omni_moe", dict(thinker_config=dict(text_config=dict(
        model_type="qwen3_omni_moe_text", hidden_size=8, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=6, mlp_only_layers=[0]))), ((1, 2), 8, 2, "softmax", 0)),
    ("inkling_text", dict(hidden_size=8, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                          moe_intermediate_size=6, n_shared_experts=2, mlp_layer_types=["dense", "sparse", "sparse"]),
     ((1, 2), 8, 2, "sigmoid_sink", 12)),
    ("inkling_text", dict(hidden_size=8, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                          intermediate_size=6, dense_intermediate_size=32, n_shared_experts=1, dense_mlp_idx=1),
     ((1, 2), 8, 2, "sigmoid_sink", 6)),  # a hub config: intermediate_size is the experts' width
    ("ernie4_5_vl_moe", dict(text_config=dict(model_type="ernie4_5_vl_moe_text", hidden_size=8, num_hidden_layers=3,
                                              moe_num_experts=8, moe_k=2, moe_intermediate_size=[6, 4],
                                              moe_num_shared_experts=2)), ((1, 2), 8, 2, "softmax_grouped", 12)),
    ("nemotron_h", dict(hidden_size=8, layers_block_type=["mamba", "moe", "attention", "moe"], n_routed_experts=8,
                        num_experts_per_tok=2, moe_intermediate_size=6, moe_shared_expert_intermediate_size=10,
                        moe_latent_size=4), ((1, 3), 8, 2, "sigmoid_grouped", 10)),
    ("nemotron_h", dict(hidden_size=8, hybrid_override_pattern="M-E*E", n_routed_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=6, moe_shared_expert_intermediate_size=10),  # a hub config.json
     ((2, 4), 8, 2, "sigmoid_grouped", 10)),
    ("deepseek_v4", dict(hidden_size=8, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=6, mlp_layer_types=["hash_moe", "moe", "moe"]),
     ((0, 1, 2), 8, 2, "sqrtsoftplus", 6)),
]


@pytest.mark.parametrize("config,hash_layers", [
    (dict(mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"]), (0, 1)),
    (dict(num_hash_layers=1), (0,)),  # a hub config.json: no mlp_layer_types
    (dict(), (0, 1, 2)),              # transformers' default: 3
])
def test_deepseek_v4_hash_layers(config, hash_layers):
    base = dict(model_type="deepseek_v4", hidden_size=8, num_hidden_layers=4, n_routed_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=6)
    spec = spec_from_config({**base, **config})
    assert spec.hash_layers == hash_layers and spec.moe_layers == (0, 1, 2, 3)
    assert (spec.swiglu_limit, spec.scaling, spec.renormalize) == (10.0, 1.5, True)


def test_nemotron_h_reads_its_latent_width_and_non_gated_relu2_experts():
    spec = spec_from_config(dict(model_type="nemotron_h", hidden_size=8, hybrid_override_pattern="ME",
                                 n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=6,
                                 moe_shared_expert_intermediate_size=10, moe_latent_size=4, n_group=2, topk_group=1))
    assert (spec.expert_width, spec.gate_up_rows, spec.stored_expert_names) == (4, 6, ("up_proj", "down_proj"))
    assert spec.gated_activation().name == "relu2" and not spec.gated_activation().gated
    assert (spec.num_groups, spec.topk_groups, spec.block_attr) == (2, 1, "mixer")
    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        spec_from_config(dict(model_type="nemotron_h", hidden_size=8, hybrid_override_pattern="E", mlp_bias=True,
                              n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=6,
                              moe_shared_expert_intermediate_size=10))


def test_deepseek_v4_with_another_scoring_func_is_refused():
    config = dict(model_type="deepseek_v4", hidden_size=8, num_hidden_layers=2, n_routed_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=6, scoring_func="sigmoid")
    with pytest.raises(UnsupportedModelError, match="scoring_func='sigmoid'"):
        spec_from_config(config)


def test_mistral_large4_with_gate_groups_takes_the_grouped_softmax():
    config = dict(model_type="mistral_large4_text", hidden_size=8, num_hidden_layers=2, n_routed_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=6, n_group=2, topk_group=1)
    spec = spec_from_config(config)
    assert (spec.scoring, spec.num_groups, spec.topk_groups, spec.group_best) == ("softmax_grouped", 2, 1, 2)
    assert spec_from_config({**config, "n_group": 1}).scoring == "softmax"


def test_mistral4_is_mistral_large4_with_its_router_in_the_model_dtype():
    config = dict(model_type="mistral4", hidden_size=8, num_hidden_layers=2, n_routed_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=6)
    spec = spec_from_config(config)  # transformers' defaults: every layer MoE, renormalised
    assert (spec.moe_layers, spec.renormalize, spec.is_router_fp32, spec.scoring) == ((0, 1), True, False, "softmax")
    assert not spec_from_config({**config, "norm_topk_prob": False}).renormalize
    assert spec_from_config({**config, "first_k_dense_replace": 1}).moe_layers == (1,)


def test_jamba_reads_its_expert_layer_period_and_offset():
    config = dict(model_type="jamba", hidden_size=8, num_hidden_layers=8, num_experts=16, num_experts_per_tok=2,
                  intermediate_size=6)
    assert spec_from_config(config).moe_layers == (1, 3, 5, 7)  # transformers' defaults: period 2, offset 1
    spec = spec_from_config({**config, "expert_layer_period": 4, "expert_layer_offset": 2})
    assert (spec.moe_layers, spec.renormalize, spec.block_attr) == ((2, 6), False, "feed_forward")


def test_granite_moe_families_read_the_published_names_and_refuse_no_experts():
    config = dict(hidden_size=8, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=6)
    for model_type in ("granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa"):
        spec = spec_from_config({**config, "model_type": model_type, "shared_intermediate_size": 10})
        assert (spec.block_attr, spec.checkpoint_gates, spec.shared_intermediate_size) == \
            ("block_sparse_moe", ("router.layer",), 0)  # the shared MLP beside the block stays the model's
    with pytest.raises(UnsupportedModelError, match="granitemoehybrid with num_local_experts=0 has no MoE layer"):
        spec_from_config({**config, "model_type": "granitemoehybrid", "num_local_experts": 0})


def test_kimi_linear_reads_its_own_config_names():
    config = dict(model_type="kimi_linear", hidden_size=8, num_hidden_layers=3, num_experts=8, num_experts_per_token=2,
                  moe_intermediate_size=6, num_expert_group=4, topk_group=2, moe_renormalize=False,
                  num_shared_experts=2, routed_scaling_factor=2.5)
    spec = spec_from_config(config)  # no mlp_layer_types: from first_k_dense_replace, default 1
    assert (spec.moe_layers, spec.num_experts, spec.top_k, spec.num_groups, spec.topk_groups) == ((1, 2), 8, 2, 4, 2)
    assert (spec.renormalize, spec.shared_intermediate_size, spec.scaling) == (False, 12, 2.5)


def test_bailing_hybrid_takes_transformers_defaults_under_kimis_names():
    config = dict(model_type="bailing_hybrid", hidden_size=8, num_hidden_layers=4, num_experts=16,
                  num_experts_per_token=2, moe_intermediate_size=6)
    spec = spec_from_config(config)  # transformers' defaults: 8 groups, the best 4, MoE from layer 2
    assert (spec.moe_layers, spec.num_groups, spec.topk_groups, spec.renormalize) == ((2, 3), 8, 4, True)
    assert spec.score_bias == ("gate.e_score_correction_bias", "gate.expert_bias")


def test_axk2_is_served_without_groups_and_reads_moe_layer_freq():
    config = dict(model_type="axk2", hidden_size=8, num_hidden_layers=6, n_routed_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=6, moe_layer_freq=2)  # a hub config: no mlp_layer_types, n_group unset
    spec = spec_from_config(config)
    assert (spec.moe_layers, spec.num_groups) == ((2, 4), 1)  # from first_k_dense_replace (default 1), every 2nd
    with pytest.raises(UnsupportedModelError, match="axk2 with n_group set is not served: it masks"):
        spec_from_config({**config, "n_group": 4, "topk_group": 2})


def test_afmoe_reads_its_router_and_dense_layers():
    config = dict(model_type="afmoe", hidden_size=8, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=6, num_shared_experts=2, route_scale=2.5)
    spec = spec_from_config(config)  # MoE from num_dense_layers, default 1
    assert (spec.moe_layers, spec.scaling, spec.renormalize, spec.shared_intermediate_size) == ((1, 2), 2.5, True, 12)
    assert (spec.checkpoint_gates, spec.score_bias) == (("router.gate",), ("expert_bias",))


def test_ernie4_5_moe_reads_its_layer_range_and_norm_min():
    config = dict(model_type="ernie4_5_moe", hidden_size=8, num_hidden_layers=6, moe_num_experts=8, moe_k=2,
                  moe_intermediate_size=6, moe_num_shared_experts=2)
    spec = spec_from_config(config)  # transformers' defaults: from layer 1 to the last, every layer
    assert (spec.moe_layers, spec.renorm_min, spec.shared_intermediate_size) == ((1, 2, 3, 4, 5), 1e-12, 12)
    spec = spec_from_config({**config, "moe_layer_interval": 2, "moe_layer_end_index": 4, "moe_norm_min": 0.5})
    assert (spec.moe_layers, spec.renorm_min) == ((1, 3), 0.5)


def test_laguna_reads_its_softcap_scaling_and_shared_expert():
    config = dict(model_type="laguna", hidden_size=8, num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=6, shared_expert_intermediate_size=10, moe_router_logit_softcapping=30.0,
                  moe_routed_scaling_factor=2.5)
    spec = spec_from_config(config)  # no mlp_layer_types: all but the first layer
    assert (spec.moe_layers, spec.logit_softcap, spec.scaling, spec.shared_intermediate_size) == ((1, 2), 30.0, 2.5, 10)


def test_hunyuan_v1_moe_takes_a_top_k_per_layer():
    config = dict(model_type="hunyuan_v1_moe", hidden_size=8, num_hidden_layers=3, num_experts=8, intermediate_size=6,
                  moe_topk=[2, 4, 1])
    spec = spec_from_config(config)
    assert (spec.top_k, spec.layer_top_k, [spec.top_k_of(i) for i in spec.moe_layers]) == (4, (2, 4, 1), [2, 4, 1])
    assert spec.shared_intermediate_size == 6 and spec.checkpoint_gates == ("gate.wg",)
    assert spec_from_config({**config, "moe_topk": 3}).top_k_of(1) == 3
    with pytest.raises(UnsupportedModelError, match="moe_topk lists 2 layers, the model has 3"):
        spec_from_config({**config, "moe_topk": [2, 4]})
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=.* must be in"):
        spec_from_config({**config, "moe_topk": [2, 9, 1]})


def test_phimoe_takes_the_sparsemixer_for_two_experts_only():
    config = dict(model_type="phimoe", hidden_size=8, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                  intermediate_size=6)
    spec = spec_from_config(config)  # router_jitter_noise: transformers' default 0.01
    assert (spec.scoring, spec.jitter_eps, spec.gate_attr, spec.checkpoint_gates) == ("sparsemixer", 0.01, "router",
                                                                                       ("gate",))
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=3 is not served: sparsemixer picks 2"):
        spec_from_config({**config, "num_experts_per_tok": 3})


def test_flint_keeps_its_first_two_layers_dense_by_default():
    config = dict(model_type="flint", hidden_size=8, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=6, shared_expert_intermediate_size=10)
    spec = spec_from_config(config)  # mlp_only_layers: transformers' default [0, 1]
    assert (spec.moe_layers, spec.has_score_bias, spec.shared_intermediate_size) == ((2, 3), False, 10)
    assert spec_from_config({**config, "mlp_only_layers": []}).moe_layers == (0, 1, 2, 3)


def test_longcat_flash_scores_its_identity_experts_too():
    config = dict(model_type="longcat_flash", hidden_size=8, num_layers=3, n_routed_experts=8, zero_expert_num=4,
                  moe_topk=2, expert_ffn_hidden_size=6, routed_scaling_factor=6.0)
    spec = spec_from_config(config)  # num_layers decoder layers (transformers' num_hidden_layers is twice that)
    assert (spec.moe_layers, spec.num_experts, spec.num_identity_experts, spec.num_scored) == ((0, 1, 2), 8, 4, 12)
    assert (spec.scaling, spec.renormalize, spec.checkpoint_gates) == (6.0, False, ("router.classifier",))
    with pytest.raises(UnsupportedModelError, match="longcat_flash with router_bias is not served"):
        spec_from_config({**config, "router_bias": True})


def test_dbrx_reads_its_ffn_config():
    config = dict(model_type="dbrx", d_model=8, n_layers=2, ffn_config=dict(ffn_hidden_size=6, moe_num_experts=4,
                                                                          moe_top_k=2, ffn_act_fn=dict(name="silu")))
    spec = spec_from_config(config)  # moe_normalize_expert_weights: transformers' default 1 (their sum)
    assert (spec.hidden_size, spec.moe_layers, spec.num_experts, spec.top_k) == (8, (0, 1), 4, 2)
    assert spec.intermediate_size == 6
    assert (spec.renormalize, spec.renorm_p, spec.block_attr) == (True, 1.0, "ffn")
    config["ffn_config"]["moe_normalize_expert_weights"] = None
    assert not spec_from_config(config).renormalize


def test_cohere2_moe_averages_with_its_shared_expert():
    config = dict(model_type="cohere2_moe", hidden_size=8, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                  intermediate_size=6, num_shared_experts=1)
    spec = spec_from_config(config)  # transformers' defaults: softmax selection, "average"
    assert (spec.scoring, spec.renormalize, spec.scaling, spec.shared_scale, spec.shared_intermediate_size) == \
        ("softmax", True, 0.5, 0.5, 6)
    summed = spec_from_config({**config, "shared_expert_combination_strategy": "sum"})
    assert (summed.scaling, summed.shared_scale) == (1.0, 1.0)
    sigmoid = spec_from_config({**config, "expert_selection_fn": "sigmoid", "norm_topk_prob": False})
    assert (sigmoid.scoring, sigmoid.renormalize) == ("topk_then_sigmoid", False)
    assert spec_from_config({**config, "expert_selection_fn": "sigmoid"}).renormalize  # norm_topk_prob: True
    with pytest.raises(UnsupportedModelError, match="expert_selection_fn='relu' is not 'softmax' or 'sigmoid'"):
        spec_from_config({**config, "expert_selection_fn": "relu"})


def test_beam_takes_transformers_defaults():
    config = dict(model_type="beam", hidden_size=8, num_hidden_layers=5, num_experts=16, num_experts_per_tok=2,
                  moe_intermediate_size=6)
    spec = spec_from_config(config)  # 8 groups, the best 4, MoE after 3 dense layers, x 2.5
    assert (spec.moe_layers, spec.num_groups, spec.topk_groups, spec.scaling) == ((3, 4), 8, 4, 2.5)
    assert spec.shared_intermediate_size == 0


def test_hy_v4_clamps_its_routed_experts_only():
    config = dict(model_type="hy_v4", hidden_size=8, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=6, n_shared_experts=1)
    spec = spec_from_config(config)  # transformers' defaults: MoE from layer 1, swiglu_limit 10
    assert (spec.moe_layers, spec.swiglu_limit, spec.shared_clamped) == ((1, 2), 10.0, False)
    assert (spec.gated_activation().limit, spec.gated_activation(shared=True).limit) == (10.0, 0.0)


def test_kolibri1_reads_its_bias_beside_the_block():
    config = dict(model_type="kolibri1", hidden_size=8, num_hidden_layers=2, num_local_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=6, shared_expert_intermediate_size=10)
    spec = spec_from_config(config)  # norm_topk_prob: transformers' default False
    assert (spec.scoring, spec.renormalize, spec.has_score_bias) == ("topk_then_sigmoid", False, True)
    assert spec.score_bias[-1] == "../moe.router.expert_bias"  # under the decoder layer, as published


def test_deepseek_v2_reads_its_topk_method():
    config = dict(model_type="deepseek_v2", hidden_size=8, num_hidden_layers=2, n_routed_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=6, n_group=4, topk_group=2)
    greedy, grouped = (spec_from_config({**config, "topk_method": m}) for m in ("greedy", "group_limited_greedy"))
    assert (greedy.num_groups, grouped.num_groups, grouped.topk_groups, grouped.group_best) == (1, 4, 2, 1)
    assert not grouped.renormalize and grouped.is_router_fp32
    with pytest.raises(UnsupportedModelError, match="topk_method='noaux_tc'"):
        spec_from_config({**config, "topk_method": "noaux_tc"})


def test_mimo_v2_flash_reads_its_hub_config():
    """MiMo-V2-Flash's published config.json: `routed_scaling_factor` null (1.0), no shared expert,
    the MoE layers from `mlp_layer_types`."""
    config = dict(model_type="mimo_v2_flash", hidden_size=8, num_hidden_layers=3, n_routed_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=6, routed_scaling_factor=None, n_group=1,
                  topk_group=1, mlp_layer_types=["dense", "sparse", "sparse"])
    spec = spec_from_config(config)
    assert (spec.scaling, spec.shared_intermediate_size, spec.moe_layers, spec.scoring) == \
        (1.0, 0, (1, 2), "sigmoid_grouped")


@pytest.mark.parametrize("config,renormalize", [
    (dict(model_type="qwen2_moe"), False),                          # qwen2_moe: off unless asked
    (dict(model_type="qwen3_next"), True),                          # qwen3_next: on unless turned off
    (dict(model_type="qwen3_next", norm_topk_prob=False), False),
    (dict(model_type="qwen3_5_moe_text", norm_topk_prob=False), True),  # qwen3.5 ignores the field
])
def test_qwen_families_renormalise_as_transformers_does(config, renormalize):
    base = dict(hidden_size=8, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=6)
    assert spec_from_config({**base, **config}).renormalize is renormalize


@pytest.mark.parametrize("model_type,config,expected", SPEC_CASES)
def test_spec_from_config(model_type, config, expected):
    spec = spec_from_config(dict(config, model_type=model_type))
    assert (spec.moe_layers, spec.num_experts, spec.top_k, spec.scoring, spec.shared_intermediate_size) == expected


def test_unsupported_architecture_names_the_model_type():
    with pytest.raises(UnsupportedModelError, match="'llama'.*mixtral"):
        spec_from_config({"model_type": "llama", "hidden_size": 8})


def test_missing_config_field_is_named():
    with pytest.raises(UnsupportedModelError, match="num_local_experts"):
        spec_from_config({"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 2,
                          "num_experts_per_tok": 2, "intermediate_size": 4})


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="not valid JSON"):
        load_spec(tmp_path)


def test_dense_layer_is_refused_with_moe_layers_listed(zoo):
    path = zoo.checkpoint("deepseek_v3")
    with pytest.raises(ValueError, match=r"layer 0 is dense.*\[1, 2\]"):
        MoELayer.from_pretrained(path, layer=0)
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        MoELayer.from_pretrained(path, layer=9)


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(zoo, tmp_path):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    path = _rewrite(zoo.checkpoint("mixtral"), tmp_path / "ckpt", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        MoELayer.from_pretrained(path, layer=1)


def test_wrong_shape_is_named_with_both_shapes(zoo, tmp_path):
    name = "model.layers.0.mlp.experts.gate_up_proj"

    def shrink(tensors):
        tensors[name] = tensors[name][:, :-1].contiguous()

    path = _rewrite(zoo.checkpoint("qwen3_moe", "fused"), tmp_path / "ckpt", shrink)
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')}.*\[6, 47, 48\].*\[6, 48, 48\]"):
        MoELayer.from_pretrained(path, layer=0)


@pytest.mark.parametrize("table,message", [
    (lambda t: t.float(), r"tid2eid.*is F32, expected I64"),
    (lambda t: t + 8, r"tid2eid.*names experts .*outside \[0, 8\)"),
    (lambda t: t[:, :1].contiguous(), r"tid2eid.*shape \[128, 1\], expected \[vocab, 2\]"),
])
def test_bad_token_table_is_named(zoo, tmp_path, table, message):
    name = "model.layers.0.ffn.gate.tid2eid"

    def edit(tensors):
        tensors[name] = table(tensors[name])

    path = _rewrite(zoo.checkpoint("deepseek_v4"), tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=message):
        MoELayer.from_pretrained(path, layer=0)


def test_hash_layer_needs_token_ids_of_the_vocabulary(zoo):
    layer = MoELayer.from_pretrained(zoo.checkpoint("deepseek_v4"), layer=0)
    x = torch.randn(2, 3, 64)
    with pytest.raises(ValueError, match="token_ids are needed"):
        layer(x)
    with pytest.raises(ValueError, match=r"token_ids must have hidden's leading dims \[2, 3\], got \[6\]"):
        layer(x, torch.zeros(6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, 128\), got 0..128"):
        layer(x, torch.tensor([[0, 1, 2], [3, 4, 128]]))


def test_wrong_hidden_size_input_is_refused(zoo):
    layer = MoELayer.from_pretrained(zoo.checkpoint("olmoe"), layer=0)
    with pytest.raises(ValueError, match=r"hidden must be \[T, 48\]"):
        layer(torch.randn(4, 47))


def test_the_mesh_processes_keep_freed_message_buffers():
    import sys

    from experts.memory import keep_freed_memory

    assert keep_freed_memory() == sys.platform.startswith("linux")


def test_experts_go_to_the_device_asked_for_as_they_are_read(tmp_path):
    """CheckpointReader.experts(device=) fills stacks made on that device, one expert at a time (the
    meta device stands in for a GPU here: no data, the same allocation path)."""
    from experts import CheckpointReader
    from experts.builtin import build_model, save_checkpoint

    path = save_checkpoint(build_model("mixtral", seed=1), tmp_path / "mixtral")
    reader = CheckpointReader(path)
    try:
        on_meta = reader.experts(1, [0, 3, 5], device="meta")
        on_host = reader.experts(1, [0, 3, 5])
    finally:
        reader.close()
    assert on_meta.w_gate_up.device.type == "meta" and on_meta.w_down.device.type == "meta"
    assert on_meta.w_gate_up.shape == on_host.w_gate_up.shape and on_meta.checksums == on_host.checksums
