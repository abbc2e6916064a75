"""Small MoE models built from transformers configs with seeded random weights: no download, ever.

`build_model(family)` gives a transformers model of one of the supported families;
`save_checkpoint(model, path, fused)` writes it in either checkpoint layout;
`builtin_model_dir()` is the embedded default (a small Mixtral), built once into a cache folder.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch

from experts.spec import text_config_path

__all__ = ["FAMILIES", "VOCAB_SIZE", "build_model", "builtin_model_dir", "save_checkpoint"]

logger = logging.getLogger(__name__)

VOCAB_SIZE = 128  # of the families' models built here (unless overridden)
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

_DEEPSEEK = dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
                 first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                 num_experts_per_tok=3, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
                 q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=12)

# Each family: (config class name, kwargs). Sizes are deliberately not powers of two where it is free.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                      num_local_experts=6, num_experts_per_tok=2)),
    "minimax": ("MiniMaxConfig", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_local_experts=6,
                                      num_experts_per_tok=2, head_dim=12,
                                      layer_types=["linear_attention", "full_attention"])),
    "granitemoe": ("GraniteMoeConfig", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                            num_local_experts=6, num_experts_per_tok=3)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                                        num_local_experts=6, num_experts_per_tok=3,
                                                        shared_intermediate_size=32)),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                                        num_local_experts=6, num_experts_per_tok=3,
                                                        shared_intermediate_size=32, layer_types=["mamba", "attention"],
                                                        mamba_n_heads=8, mamba_d_state=8, mamba_chunk_size=16)),
    "granitemoe_swa": ("GraniteMoeSWAConfig", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                                   num_local_experts=6, num_experts_per_tok=3,
                                                   shared_intermediate_size=32, sliding_window=4)),
    "phimoe": ("PhimoeConfig", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_local_experts=8,
                                    num_experts_per_tok=2, router_jitter_noise=0.3)),  # a band that holds several
    "dbrx": ("DbrxConfig", dict(d_model=48, n_heads=4, n_layers=2, max_seq_len=256,
                                attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                                ffn_config=dict(ffn_hidden_size=24, moe_num_experts=6, moe_top_k=3,
                                                moe_normalize_expert_weights=2.0))),  # a p-norm that bites
    "cohere2_moe": ("Cohere2MoeConfig", dict(hidden_size=48, intermediate_size=24, num_hidden_layers=2, num_experts=6,
                                             num_experts_per_tok=2, num_shared_experts=1, sliding_window=4,
                                             shared_expert_combination_strategy="average")),
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40, num_hidden_layers=3,
                                         decoder_sparse_step=1, mlp_only_layers=[1], num_experts=6,
                                         num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                         num_hidden_layers=2, num_experts=6, num_experts_per_tok=3,
                                         head_dim=12, norm_topk_prob=True)),
    "jamba": ("JambaConfig", dict(hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_experts=6,
                                  num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
                                  attn_layer_period=4, attn_layer_offset=1, mamba_d_state=4,
                                  mamba_dt_rank=8)),  # MoE in layer 1 (attention) and 3 (Mamba)
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                                num_hidden_layers=3, moe_num_experts=8, moe_k=3,
                                                moe_num_shared_experts=1, moe_norm_min=0.9)),  # a clamp that bites
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeTextConfig", dict(hidden_size=48, intermediate_size=64,
                                                         moe_intermediate_size=[24, 16], num_hidden_layers=3,
                                                         moe_num_experts=8, moe_k=3, moe_num_shared_experts=1,
                                                         moe_norm_min=0.9,  # a clamp that bites
                                                         rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                              mrope_section=[2, 2, 2]))),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(hidden_size=48, intermediate_size=24, num_hidden_layers=3,
                                                  head_dim=12, num_experts=6, moe_topk=[2, 3, 1],  # a k per layer
                                                  eos_token_id=127)),  # the seed-7 model says 2 (eos) at token 14
    "qwen3_vl_moe": ("Qwen3VLMoeTextConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=32,
                                                  num_hidden_layers=2, num_experts=6, num_experts_per_tok=3,
                                                  head_dim=12, norm_topk_prob=False,  # ignored: always renormalised
                                                  rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                       mrope_section=[2, 2, 2]),
                                                  eos_token_id=127)),
    "qwen3_omni_moe": ("Qwen3OmniMoeTextConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=32,
                                                      num_hidden_layers=2, num_experts=6, num_experts_per_tok=3,
                                                      head_dim=12, norm_topk_prob=False,
                                                      rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                           mrope_section=[2, 2, 2]))),
    "flint": ("FlintConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                  shared_expert_intermediate_size=40, num_hidden_layers=3, head_dim=12, num_experts=8,
                                  num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[0], sliding_window=4)),
    "inkling_text": ("InklingTextConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                               num_hidden_layers=2, head_dim=12, swa_num_attention_heads=4,
                                               swa_num_key_value_heads=2, swa_head_dim=12, sliding_window_size=4,
                                               rel_extent=16, d_rel=4, n_routed_experts=8, num_experts_per_tok=3,
                                               n_shared_experts=2, route_scale=2.5,
                                               mlp_layer_types=["dense", "sparse"])),
    "nemotron_h": ("NemotronHConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                           moe_shared_expert_intermediate_size=40, moe_latent_size=32, head_dim=12,
                                           layers_block_type=["mamba", "moe", "attention", "moe"], n_routed_experts=8,
                                           num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                           norm_topk_prob=False, mamba_num_heads=8, mamba_head_dim=12,
                                           ssm_state_size=8, n_groups=2, chunk_size=16)),
    "kolibri1": ("Kolibri1Config", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                        shared_expert_intermediate_size=40, num_hidden_layers=2, head_dim=12,
                                        num_experts=8, num_experts_per_tok=3, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(hidden_size=48, intermediate_size=24, num_hidden_layers=2, num_experts=6,
                                  num_experts_per_tok=2)),
    "flex_olmo": ("FlexOlmoConfig", dict(hidden_size=48, intermediate_size=24, num_hidden_layers=2, num_experts=6,
                                         num_experts_per_tok=3, norm_topk_prob=True)),
    "mellum": ("MellumConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                    num_hidden_layers=3, num_local_experts=6, num_experts_per_tok=3, head_dim=12,
                                    mlp_layer_types=["dense", "sparse", "sparse"], norm_topk_prob=False)),
    "dots1": ("Dots1Config", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                  num_hidden_layers=3, first_k_dense_replace=1, head_dim=12, n_routed_experts=8,
                                  num_experts_per_tok=3, n_group=2, topk_group=1, n_shared_experts=1,
                                  routed_scaling_factor=2.5, norm_topk_prob=True)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", dict(_DEEPSEEK, mlp_layer_types=["dense", "sparse", "sparse"],
                                                norm_topk_prob=False)),
    "solar_open": ("SolarOpenConfig", dict(hidden_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                                           head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_group=2,
                                           topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5,
                                           norm_topk_prob=False)),
    "glm_moe_dsa": ("GlmMoeDsaConfig", dict(_DEEPSEEK, index_topk=4, index_head_dim=16, index_n_heads=2,
                                            mlp_layer_types=["dense", "sparse", "sparse"], head_dim=8)),
    "hy_v3": ("HYV3Config", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
                                 head_dim=12, num_experts=8, num_experts_per_tok=3, num_shared_experts=1,
                                 router_scaling_factor=2.5, mlp_layer_types=["dense", "sparse", "sparse"])),
    "exaone_moe": ("ExaoneMoeConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                           num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"],
                                           head_dim=12, num_experts=8, num_experts_per_tok=3, num_shared_experts=1,
                                           n_group=2, topk_group=1, routed_scaling_factor=1.5, sliding_window=4)),
    "mimo_v2_flash": ("MiMoV2FlashConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                                num_hidden_layers=3, head_dim=12, v_head_dim=8, sliding_window=4,
                                                n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
                                                routed_scaling_factor=2.5, norm_topk_prob=False,
                                                mlp_layer_types=["dense", "sparse", "sparse"])),
    "kimi_linear": ("KimiLinearConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                             num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=16,
                                             q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=12,
                                             num_experts=8, num_experts_per_token=3, num_expert_group=4, topk_group=2,
                                             num_shared_experts=1, routed_scaling_factor=2.5, moe_renormalize=False,
                                             layer_types=["linear_attention", "full_attention", "linear_attention"],
                                             mlp_layer_types=["dense", "sparse", "sparse"], linear_head_dim=12,
                                             linear_num_heads=4)),  # its published config names
    "bailing_hybrid": ("BailingHybridConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                                   num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=16,
                                                   qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=12, head_dim=12,
                                                   num_experts=8, num_experts_per_token=3, num_expert_group=4,
                                                   topk_group=2, num_shared_experts=1, moe_renormalize=False,
                                                   first_k_dense_replace=1, layer_group_size=2)),
    "axk2": ("AXK2Config", dict(_DEEPSEEK, n_group=None, topk_group=None, norm_topk_prob=False, index_topk=4,
                                index_head_dim=16, index_n_heads=2, gated_norm_rank=4,
                                mlp_layer_types=["dense", "sparse", "sparse"])),
    "afmoe": ("AfmoeConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
                                  head_dim=12, num_experts=8, num_experts_per_tok=3, num_shared_experts=1,
                                  route_scale=2.5, sliding_window=4, global_attn_every_n_layers=2)),
    "longcat_flash": ("LongcatFlashConfig", dict(hidden_size=48, ffn_hidden_size=64, expert_ffn_hidden_size=24,
                                                 num_layers=2, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
                                                 qk_rope_head_dim=4, qk_nope_head_dim=8, head_dim=4, v_head_dim=12,
                                                 n_routed_experts=8, zero_expert_num=4, moe_topk=3,
                                                 routed_scaling_factor=2.5)),
    "laguna": ("LagunaConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=40, num_hidden_layers=3, head_dim=12,
                                    num_experts=8, num_experts_per_tok=3, moe_routed_scaling_factor=2.5,
                                    moe_router_logit_softcapping=1.0)),  # a cap that bites
    "beam": ("BeamConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
                                head_dim=12, num_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
                                routed_scaling_factor=2.5, norm_topk_prob=False, sliding_window=4,
                                mlp_layer_types=["dense", "sparse", "sparse"],
                                eos_token_id=127)),  # the seed-7 model says 2 (eos) at token 11
    "hy_v4": ("HYV4Config", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
                                 num_key_value_heads=4, head_dim=12, n_routed_experts=8, n_shared_experts=1,
                                 num_experts_per_tok=3, routed_scaling_factor=2.5, n_group=2, topk_group=1,
                                 norm_topk_prob=False, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                 qk_rope_head_dim=4, v_head_dim=12, index_topk=4, index_head_dim=16, index_n_heads=2,
                                 swiglu_limit=0.5)),  # a limit that bites the routed experts
    "deepseek_v2": ("DeepseekV2Config", dict(_DEEPSEEK, topk_method="group_limited_greedy")),
    "deepseek_v3": ("DeepseekV3Config", _DEEPSEEK),
    "deepseek_v32": ("DeepseekV32Config", dict(_DEEPSEEK, index_topk=4, index_head_dim=16, index_n_heads=2)),
    "glm4_moe": ("Glm4MoeConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                       num_hidden_layers=3, first_k_dense_replace=1, head_dim=12,
                                       n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
                                       n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                       use_qk_norm=True)),
    "glm4v_moe": ("Glm4vMoeTextConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                             num_hidden_layers=3, first_k_dense_replace=1, head_dim=12,
                                             n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
                                             n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                             rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                  partial_rotary_factor=0.5,
                                                                  mrope_section=[1, 1, 1]),
                                             eos_token_id=127)),  # the seed-7 model says 2 (eos) at token 7
    "lfm2_moe": ("Lfm2MoeConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                       num_hidden_layers=3, num_dense_layers=1, num_experts=8, num_experts_per_tok=3,
                                       routed_scaling_factor=1.5, layer_types=["full_attention", "conv",
                                                                               "full_attention"])),
    "minimax_m2": ("MiniMaxM2Config", dict(hidden_size=48, intermediate_size=24, num_hidden_layers=2, head_dim=12,
                                           num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_next": ("Qwen3NextConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                           shared_expert_intermediate_size=40, num_hidden_layers=2, head_dim=12,
                                           linear_num_key_heads=2, linear_num_value_heads=4,
                                           linear_key_head_dim=12, linear_value_head_dim=12, num_experts=6,
                                           num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
                                           mlp_only_layers=[0])),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", dict(hidden_size=48, moe_intermediate_size=24,
                                                 shared_expert_intermediate_size=40, num_hidden_layers=2, head_dim=12,
                                                 linear_num_key_heads=2, linear_num_value_heads=4,
                                                 linear_key_head_dim=12, linear_value_head_dim=12, num_experts=6,
                                                 num_experts_per_tok=2,
                                                 layer_types=["linear_attention", "full_attention"])),
    "gpt_oss": ("GptOssConfig", dict(hidden_size=48, intermediate_size=24, num_hidden_layers=2, head_dim=12,
                                     num_local_experts=6, num_experts_per_tok=2, sliding_window=4,
                                     swiglu_limit=1.5, max_position_embeddings=131072)),  # a limit that bites
    "llama4": ("Llama4TextConfig", dict(hidden_size=48, intermediate_size=24, intermediate_size_mlp=40,
                                        num_hidden_layers=4, num_local_experts=6, num_experts_per_tok=1,
                                        head_dim=12, interleave_moe_layer_step=2)),
    "mistral_large4": ("MistralLarge4TextConfig", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                                       num_hidden_layers=3, first_k_dense_replace=1,
                                                       n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                                       routed_scaling_factor=1.5, q_lora_rank=16, kv_lora_rank=16,
                                                       qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=12,
                                                       index_topk=4, index_head_dim=16, index_n_heads=2,
                                                       num_key_value_heads=4, max_position_embeddings=1048576)),
    "mistral4": ("Mistral4Config", dict(hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                                        num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=3,
                                        n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=False,
                                        routed_scaling_factor=1.5, q_lora_rank=16, kv_lora_rank=16,
                                        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=12,
                                        num_key_value_heads=4, max_position_embeddings=4096)),
    "deepseek_v4": ("DeepseekV4Config", dict(hidden_size=64, moe_intermediate_size=24, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                             partial_rotary_factor=0.25, q_lora_rank=32, o_groups=2,
                                             o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=4,
                                             sliding_window=8, n_routed_experts=8, num_experts_per_tok=2,
                                             n_shared_experts=1, hc_mult=4, swiglu_limit=1.5,  # a limit that bites
                                             layer_types=["sliding_attention", "compressed_sparse_attention",
                                                          "heavily_compressed_attention"],
                                             compress_rates={"compressed_sparse_attention": 4,
                                                             "heavily_compressed_attention": 8},
                                             mlp_layer_types=["hash_moe", "moe", "moe"])),
}

# Families whose causal LM transformers registers under another auto class than AutoModelForCausalLM.
_AUTO_CLASS = {"mistral4": "AutoModelForImageTextToText"}

# Families served as the text model of a composite (multimodal) model: the composite's auto class,
# its config class and the config's other parts, kept tiny (the text config is FAMILIES' entry, put
# where `text_config_path` says).
_COMPOSITE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_vl_moe": ("AutoModelForImageTextToText", "Qwen3VLMoeConfig",
                     dict(vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                             out_hidden_size=48, patch_size=14, spatial_merge_size=2,
                                             temporal_patch_size=2, deepstack_visual_indexes=[0],
                                             num_position_embeddings=16))),
    "glm4v_moe": ("AutoModelForImageTextToText", "Glm4vMoeConfig",
                  dict(vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                          out_hidden_size=48, patch_size=14, spatial_merge_size=2,
                                          temporal_patch_size=2))),
    "qwen3_omni_moe": ("AutoModelForMultimodalLM", "Qwen3OmniMoeConfig",  # the thinker alone: no talker
                       dict(enable_audio_output=False, thinker_config=dict(
                           vision_start_token_id=120,  # generate() reads it; the config class has no default
                           vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                              out_hidden_size=48, patch_size=14, spatial_merge_size=2,
                                              temporal_patch_size=2, deepstack_visual_indexes=[0],
                                              num_position_embeddings=16),
                           audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                                             encoder_ffn_dim=64, output_dim=48, num_mel_bins=16, n_window=4,
                                             downsample_hidden_size=16)))),
    "ernie4_5_vl_moe": ("AutoModelForImageTextToText", "Ernie4_5_VLMoeConfig",
                        dict(vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2))),
    "mistral_large4": ("AutoModelForImageTextToText", "MistralLarge4Config",
                       dict(vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                                               patch_size=14, image_size=56))),
}

_BUILTIN = ("mixtral", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_local_experts=8,
                            num_experts_per_tok=2, vocab_size=512))
_BUILTIN_VERSION = "v2"


def build_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A transformers causal LM of `family` with seeded random weights (fp32, eval mode); for a
    family in `_COMPOSITE`, the composite model around its text model (`overrides` go to the text config).

    Router weights, DeepSeek's score-correction bias, gpt-oss's biases and DeepSeek-V4's token ->
    experts tables are randomised too (their defaults are zeros, which would make every token pick
    the same experts).
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    class_name, kwargs = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**_ATTENTION, **kwargs, **overrides})
    auto_class = _AUTO_CLASS.get(family, "AutoModelForCausalLM")
    if family in _COMPOSITE:
        auto_class, composite_class, parts = _COMPOSITE[family]
        *outer, last = text_config_path(family)
        composite = where = copy.deepcopy(parts)
        for key in outer:
            where = where.setdefault(key, {})
        where[last] = config.to_dict()
        config = getattr(transformers, composite_class)(**composite)
    torch.manual_seed(seed)
    model = getattr(transformers, auto_class).from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight", "gate_up_proj", "down_proj", "gate_proj", "up_proj")):
                param.normal_(0.0, 0.2)  # the last two: Inkling's stacked shared experts
            elif name.endswith("latent_proj.weight"):  # Nemotron-H's: its init leaves the experts' input tiny
                param.normal_(0.0, 0.2)
            elif name.endswith("gate.global_scale"):  # Inkling's learned scale: away from its 1.0 default
                param.fill_(1.5)
            elif name.endswith(("router.bias", "gate_up_proj_bias", "down_proj_bias")):  # gpt-oss
                param.normal_(0.0, 0.5)
            elif name.endswith(("e_score_correction_bias", "expert_bias")):  # Ernie 4.5's, AFMoE's: parameters
                param.uniform_(-0.1, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):  # DeepSeek-V3's, LFM2-MoE's
                buffer.uniform_(-0.1, 0.1)
            elif name.endswith("tid2eid"):  # DeepSeek-V4's token -> experts table
                buffer.copy_(torch.randint(0, model.config.num_local_experts, buffer.shape))
    return model


def save_checkpoint(model: torch.nn.Module, path: str | Path, fused: bool = False,
                    max_shard_size: str | None = None) -> Path:
    """Write `model` as a safetensors checkpoint: per-expert names (default) or fused; in shards
    of at most `max_shard_size` ("4MB") with an index, as published checkpoints are, when given."""
    path = Path(path)
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if fused:
        model.save_pretrained(path, save_original_format=False, **shards)
    else:
        model.save_pretrained(path, **shards)
    return path


def _cache_root() -> Path:
    return Path(os.environ.get("EXPERT_MESH_CACHE", Path.home() / ".cache" / "expert-mesh"))


def builtin_model_dir() -> Path:
    """The embedded default model (a 4-layer Mixtral, H=256, 8 experts, top-2), built once."""
    path = _cache_root() / f"builtin-mixtral-{_BUILTIN_VERSION}"
    if (path / "config.json").exists():
        return path
    logger.info("building the built-in model into %s", path)
    family, overrides = _BUILTIN
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_checkpoint(build_model(family, seed=1234, **overrides), tmp)
    tmp.rename(path)
    return path
