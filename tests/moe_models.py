"""Tiny mixture-of-experts models of every KerasHub MoE family (built from
their constructors, no download), for the expert-weight tests."""

import keras
import numpy as np

#: family -> (backbone class name, constructor arguments)
MOE_FAMILIES = {
    "mixtral": ("MixtralBackbone", dict(
        vocabulary_size=20, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=12, num_experts=4, top_k=2, sliding_window=8)),
    "qwen_moe": ("QwenMoeBackbone", dict(
        vocabulary_size=20, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=12, moe_intermediate_dim=6,
        shared_expert_intermediate_dim=10, num_experts=4, top_k=2)),
    "qwen3_moe": ("Qwen3MoeBackbone", dict(
        vocabulary_size=20, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        head_dim=4, hidden_dim=8, intermediate_dim=12, moe_intermediate_dim=6,
        num_experts=4, top_k=2)),
    "qwen3_5_moe": ("Qwen3_5MoeBackbone", dict(
        vocabulary_size=20, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        head_dim=8, hidden_dim=8, moe_intermediate_dim=6, shared_expert_intermediate_size=10,
        num_experts=4, top_k=2, layer_types=["full_attention"])),
    "gpt_oss": ("GptOssBackbone", dict(
        vocabulary_size=20, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=6, num_experts=4, top_k=2, head_dim=4)),
    "gemma4": ("Gemma4Backbone", dict(
        vocabulary_size=20, image_size=None, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=8, intermediate_dim=12, head_dim=4,
        enable_moe_block=True, num_experts=4, expert_intermediate_dim=6,
        num_experts_per_token=2, layer_types=["full_attention"])),
}

TOKENS = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], "int32")


def moe_backbone(family, seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    name, kwargs = MOE_FAMILIES[family]
    backbone = getattr(keras_hub.models, name)(**kwargs)
    rng = np.random.RandomState(seed)
    for v in backbone.weights:  # Gemma 4 starts its experts at zero
        if len(v.shape) == 3 and not np.any(keras.ops.convert_to_numpy(v)):
            v.assign(rng.normal(scale=0.2, size=tuple(v.shape)).astype(v.dtype))
    return backbone


def moe_inputs(family=None):
    x = {"token_ids": TOKENS, "padding_mask": np.ones(TOKENS.shape, "int32")}
    if family == "gemma4":
        x["position_ids"] = np.tile(np.arange(TOKENS.shape[1], dtype="int32"), (TOKENS.shape[0], 1))
    return x
