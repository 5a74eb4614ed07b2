"""Tiny Hugging Face models saved locally, their KerasHub conversions, and
logits from both, for the tests that compare adapters with PEFT's (no
download). Import it after `pytest.importorskip` of torch, transformers and
keras_hub."""

import keras_hub
import numpy as np
import torch
import transformers
from keras import ops

TOKENS = np.array([[3, 17, 5, 40, 22, 9, 31, 2], [1, 8, 60, 12, 7, 33, 19, 4]], "int64")
#: every linear module of a Llama/Gemma decoder block (PEFT's target names)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_model(family, path, width=16, inter=24, layers=2):
    """Save a tiny `family` ("llama", "gemma" or "gpt2") causal LM, seeded,
    to `path`; returns `path`."""
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=width, intermediate_size=inter,
                  num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=width // 2, max_position_embeddings=64)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_positions=32, n_embd=width, n_layer=layers, n_head=2))
    elif family == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common))
    else:
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, tie_word_embeddings=False))
    model.save_pretrained(path)
    return path


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def torch_logits(model):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.ones_like(torch.tensor(TOKENS)))
    return out.logits.float().numpy()


def keras_backbone(path):
    return keras_hub.models.Backbone.from_preset(path, dtype="float32")


def keras_logits(backbone):
    x = {"token_ids": TOKENS.astype("int32"), "padding_mask": np.ones(TOKENS.shape, "int32")}
    return np.asarray(ops.convert_to_numpy(backbone.token_embedding(backbone(x), reverse=True)))


def close(got, want, tol=1e-5):
    """`got` equals `want` to `tol`, relative to `want`'s largest magnitude."""
    rel = np.abs(np.asarray(got, "float64") - want).max() / np.abs(want).max()
    assert rel <= tol, rel


def hf_moe_model(family, path):
    """Save a tiny seeded Mixtral or Qwen3-MoE causal LM (4 experts, top-2)
    to `path`, with every weight away from its initializer (Qwen3-MoE
    starts its router at zero); returns `path`."""
    import json
    import os

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                  num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, intermediate_size=24, num_local_experts=4, sliding_window=None))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, intermediate_size=32, moe_intermediate_size=24, num_experts=4,
            decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    if family == "qwen3_moe" and "num_experts" not in config:
        # transformers 5 writes num_local_experts; KerasHub 0.32's converter reads num_experts
        config["num_experts"] = config["num_local_experts"]
        with open(config_path, "w") as f:
            json.dump(config, f)
    return path


def randomize_lora(model, scale=0.3, seed=1):
    """Move every LoRA factor of a PEFT model off its initial value."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn_like(p))
