"""Every KerasHub causal LM and classifier family, adapted with defaults.

A tiny model of each task class the installed KerasHub exports (the
subclasses of `CausalLM`, which include its seq2seq and audio-to-text tasks,
of `TextClassifier` and of `ImageClassifier`) is adapted with
`enable_adapter(model)`, then runs a forward pass, one `fit` step and a
`.keras` round trip. Each family runs once per suite: the families are dealt
in turn to jax, tensorflow and torch (every backend builds, trains and
reloads a third of them; `KLR_ALL_FAMILIES=1` runs all of them on the
backend at hand). A task class KerasHub adds fails
`test_every_family_is_covered` until it gets a tiny config here (or a line
in `NOT_BUILT` saying why it cannot).

Also: layers a parent reads instead of calling (Gemma 4's feed-forward
multiplies by `gating_ffw.kernel` itself, its vision encoder by
`self.dense.kernel`): the adapter's `kernel` is the map it computes, for
every method that can serve one (over float, int8 and NF4 bases, merged,
disabled, named), and the others leave such layers out; and the summary's
count of what `enable_adapter` left out.
"""

import inspect
import os

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

import keras_lowrank
from keras_lowrank import bases
from keras_lowrank import registry
from keras_lowrank import tree

from conftest import ALL_BACKENDS
from conftest import dealt

BACKEND = keras.backend.backend()
M = keras_hub.models
TASK_BASES = (M.CausalLM, M.TextClassifier, M.ImageClassifier)

# One batch of 2 sequences of length 8 (32 x 32 images, 1000 audio samples);
# every model uses the same tiny widths, so JAX compiles each op once.
B, T, V = 2, 8, 16
IMAGE = (32, 32, 3)
AUDIO = 1000
DIMS = dict(hidden_dim=8, intermediate_dim=16)


#: JAX compiles every new op eagerly, one small XLA program at a time; one
#: jitted step per model is faster there. TensorFlow and torch run eagerly.
EAGER = BACKEND != "jax"


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x))


def forward(model, x):
    return to_np(model(x) if EAGER else model.predict_on_batch(x))


def fit_step(model, x, y, loss="auto"):
    if not hasattr(model, "backbone"):  # a plain Keras model has no default loss
        loss = "mse" if loss == "auto" else loss
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, run_eagerly=EAGER)
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)


@pytest.fixture(scope="module", autouse=True)
def _fast_jax():
    """Compile the tiny JAX programs without XLA's optimizations."""
    if BACKEND != "jax":
        yield
        return
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


# ----------------------------------------------------------------------
# Tiny configurations
def _lm(task, backbone, **kw):
    return lambda: task(backbone=backbone(), preprocessor=None, **kw)


def _cls(task, backbone, **kw):
    return lambda: task(backbone=backbone(), num_classes=2, preprocessor=None, **kw)


def _vit(**kw):
    return M.ViTBackbone(image_shape=IMAGE, patch_size=16, num_layers=1, num_heads=2,
                         hidden_dim=8, mlp_dim=16, **kw)


def _blip2(language_model):
    return M.BLIP2Backbone(
        vision_encoder=M.BLIP2VisionEncoder(
            image_size=16, patch_size=8, num_layers=1, num_heads=2, use_patch_bias=True,
            use_class_token=True, use_mha_bias=True, use_mlp_bias=True, dropout_rate=0.0,
            layer_norm_epsilon=1e-6, initializer_range=0.02, **DIMS),
        qformer=M.BLIP2QFormer(
            num_query_tokens=2, num_layers=1, num_heads=2, vision_dim=8,
            cross_attention_frequency=1, dropout=0.0, layer_norm_epsilon=1e-6, **DIMS),
        language_model=language_model,
    )


def _gemma4(**kw):
    return M.Gemma4Backbone(vocabulary_size=V, image_size=None, num_layers=1, num_query_heads=2,
                            num_key_value_heads=1, head_dim=4, sliding_window_size=4, **DIMS, **kw)


def _t5gemma(backbone_cls):
    return backbone_cls(
        vocabulary_size=V, encoder_hidden_dim=8, encoder_intermediate_dim=16, encoder_num_layers=1,
        encoder_num_attention_heads=2, encoder_num_key_value_heads=1, encoder_head_dim=4,
        encoder_layer_types=["full_attention"], decoder_hidden_dim=8, decoder_intermediate_dim=16,
        decoder_num_layers=1, decoder_num_attention_heads=2, decoder_num_key_value_heads=1,
        decoder_head_dim=4, decoder_layer_types=["full_attention"])


GEMMA4_MOE = dict(enable_moe_block=True, num_experts=2, expert_intermediate_dim=8,
                  num_experts_per_token=1)
# Qwen3.5's linear attention walks its 64-token chunk one static slice at a
# time: on JAX that is ~600 XLA programs (about two minutes on a CPU), so
# JAX builds its full-attention layers only; TensorFlow and torch build both.
QWEN3_5 = dict(num_layers=2, num_query_heads=2, num_key_value_heads=1, head_dim=4, hidden_dim=8,
               layer_types=(["full_attention"] * 2 if BACKEND == "jax"
                            else ["linear_attention", "full_attention"]),
               partial_rotary_factor=0.5, linear_num_key_heads=1, linear_num_value_heads=2,
               linear_key_head_dim=4, linear_value_head_dim=4)
MOBILENET_V5 = dict(
    stackwise_block_types=[["er"], ["uir"]], stackwise_num_blocks=[1, 1],
    stackwise_num_filters=[[8], [8]], stackwise_strides=[[2], [2]],
    stackwise_act_layers=[["relu"], ["relu"]], stackwise_exp_ratios=[[2.0], [2.0]],
    stackwise_se_ratios=[[0.0], [0.0]], stackwise_dw_kernel_sizes=[[0], [3]],
    stackwise_dw_start_kernel_sizes=[[0], [0]], stackwise_dw_end_kernel_sizes=[[0], [0]],
    stackwise_exp_kernel_sizes=[[3], [0]], stackwise_pw_kernel_sizes=[[1], [0]],
    stackwise_num_heads=[[0], [0]], stackwise_key_dims=[[0], [0]],
    stackwise_value_dims=[[0], [0]], stackwise_kv_strides=[[0], [0]],
    stackwise_use_cpe=[[False], [False]], use_msfa=False, stem_size=8, num_features=16,
    image_shape=IMAGE,
)

#: case id -> (task class name, builder of the tiny task model)
CASES = {
    # --- causal LMs
    "BloomCausalLM": _lm(M.BloomCausalLM, lambda: M.BloomBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, **DIMS)),
    "FalconCausalLM": _lm(M.FalconCausalLM, lambda: M.FalconBackbone(
        vocabulary_size=V, num_layers=1, num_attention_heads=2, **DIMS)),
    "GPT2CausalLM": _lm(M.GPT2CausalLM, lambda: M.GPT2Backbone(
        vocabulary_size=V, num_layers=1, num_heads=2, max_sequence_length=T, **DIMS)),
    "GPTNeoXCausalLM": _lm(M.GPTNeoXCausalLM, lambda: M.GPTNeoXBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, max_sequence_length=T,
        rotary_percentage=0.5, **DIMS)),
    "GemmaCausalLM": _lm(M.GemmaCausalLM, lambda: M.GemmaBackbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1, head_dim=4,
        **DIMS)),
    "Gemma3CausalLM": _lm(M.Gemma3CausalLM, lambda: M.Gemma3Backbone(
        vocabulary_size=V, image_size=None, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, head_dim=4, vision_encoder=None, **DIMS)),
    "Gemma3nCausalLM": _lm(M.Gemma3nCausalLM, lambda: M.Gemma3nBackbone(
        text_vocab_size=V, text_hidden_size=8, num_hidden_layers=1, pad_token_id=0,
        num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=[16],
        hidden_activation="gelu_approximate", layer_types=["full_attention"], sliding_window=4,
        rope_theta=10000.0, max_position_embeddings=T, vocab_size_per_layer_input=V,
        hidden_size_per_layer_input=2, altup_num_inputs=2, laurel_rank=1)),
    "Gemma4CausalLM": _lm(M.Gemma4CausalLM, _gemma4),
    "Gemma4CausalLM[moe]": _lm(M.Gemma4CausalLM, lambda: _gemma4(**GEMMA4_MOE)),
    "GptOssCausalLM": _lm(M.GptOssCausalLM, lambda: M.GptOssBackbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1, head_dim=4,
        num_experts=2, top_k=1, sliding_window=4, hidden_dim=8, intermediate_dim=8)),
    "LlamaCausalLM": _lm(M.LlamaCausalLM, lambda: M.LlamaBackbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1, **DIMS)),
    "Llama3CausalLM": _lm(M.Llama3CausalLM, lambda: M.Llama3Backbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1, **DIMS)),
    "MistralCausalLM": _lm(M.MistralCausalLM, lambda: M.MistralBackbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        sliding_window=4, **DIMS)),
    "MixtralCausalLM": _lm(M.MixtralCausalLM, lambda: M.MixtralBackbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        num_experts=2, top_k=1, sliding_window=4, **DIMS)),
    "OPTCausalLM": _lm(M.OPTCausalLM, lambda: M.OPTBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, dropout=0.0, max_sequence_length=T,
        **DIMS)),
    "PaliGemmaCausalLM": _lm(M.PaliGemmaCausalLM, lambda: M.PaliGemmaBackbone(
        vocabulary_size=V, image_size=16, num_layers=1, num_query_heads=2,
        num_key_value_heads=1, head_dim=4, vit_patch_size=8, vit_num_heads=2,
        vit_hidden_dim=8, vit_num_layers=1, vit_intermediate_dim=16, **DIMS)),
    "Phi3CausalLM": _lm(M.Phi3CausalLM, lambda: M.Phi3Backbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        max_sequence_length=T, pretraining_sequence_length=T, **DIMS)),
    "QwenCausalLM": _lm(M.QwenCausalLM, lambda: M.QwenBackbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1, **DIMS)),
    "Qwen3CausalLM": _lm(M.Qwen3CausalLM, lambda: M.Qwen3Backbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1, head_dim=4,
        **DIMS)),
    "QwenMoeCausalLM": _lm(M.QwenMoeCausalLM, lambda: M.QwenMoeBackbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        moe_intermediate_dim=8, shared_expert_intermediate_dim=8, num_experts=2, top_k=1,
        **DIMS)),
    "Qwen3MoeCausalLM": _lm(M.Qwen3MoeCausalLM, lambda: M.Qwen3MoeBackbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1, head_dim=4,
        moe_intermediate_dim=8, num_experts=2, top_k=1, **DIMS)),
    "Qwen3_5CausalLM": _lm(M.Qwen3_5CausalLM, lambda: M.Qwen3_5Backbone(
        vocabulary_size=V, intermediate_dim=16, **QWEN3_5)),
    "Qwen3_5MoeCausalLM": _lm(M.Qwen3_5MoeCausalLM, lambda: M.Qwen3_5MoeBackbone(
        vocabulary_size=V, moe_intermediate_dim=8, shared_expert_intermediate_size=8,
        num_experts=2, top_k=1, **QWEN3_5)),
    "RWKV7CausalLM": _lm(M.RWKV7CausalLM, lambda: M.RWKV7Backbone(
        hidden_size=8, head_size=4, num_layers=1, vocabulary_size=V, intermediate_dim=16,
        gate_lora=4, mv_lora=4, aaa_lora=4, decay_lora=4)),
    "SmolLM3CausalLM": _lm(M.SmolLM3CausalLM, lambda: M.SmolLM3Backbone(
        vocabulary_size=V, num_layers=1, num_attention_heads=2, num_key_value_heads=1,
        attention_bias=False, attention_dropout=0.0, rope_layer_enabled_list=[True],
        layer_types=["attention"], mlp_bias=False, layer_norm_epsilon=1e-6,
        max_position_embeddings=T, rope_theta=10000.0, partial_rotary_factor=1.0, **DIMS)),
    "BLIP2CausalLM": lambda: M.BLIP2CausalLM(preprocessor=None, backbone=_blip2(M.BLIP2CustomOPT(
        vocabulary_size=V, num_layers=1, num_heads=2, num_query_tokens=2, dropout=0.0,
        max_sequence_length=T + 2, qformer_hidden_dim=8, **DIMS))),
    # --- seq2seq and audio-to-text (KerasHub's CausalLM subclasses)
    "BartSeq2SeqLM": _lm(M.BartSeq2SeqLM, lambda: M.BartBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, dropout=0.0, max_sequence_length=T,
        **DIMS)),
    "T5Seq2SeqLM": _lm(M.T5Seq2SeqLM, lambda: M.T5Backbone(
        vocabulary_size=V, num_layers=1, num_heads=2, key_value_dim=4, dropout=0.0, **DIMS)),
    "T5GemmaSeq2SeqLM": _lm(M.T5GemmaSeq2SeqLM, lambda: _t5gemma(M.T5GemmaBackbone)),
    "T5Gemma2Seq2SeqLM": _lm(M.T5Gemma2Seq2SeqLM, lambda: _t5gemma(M.T5Gemma2Backbone)),
    "EdRecSeq2SeqLM": _lm(M.EdRecSeq2SeqLM, lambda: M.EdRecBackbone(
        vocab_size=V, num_layers_enc=1, num_layers_dec=1, num_heads=2, **DIMS)),
    "MoonshineAudioToText": _lm(M.MoonshineAudioToText, lambda: M.MoonshineBackbone(
        vocabulary_size=V, filter_dim=8, encoder_num_layers=1, decoder_num_layers=1,
        encoder_num_heads=2, decoder_num_heads=2, partial_rotary_factor=0.5, **DIMS)),
    "BLIP2Seq2SeqLM": lambda: M.BLIP2Seq2SeqLM(preprocessor=None, backbone=_blip2(M.BLIP2FlanT5(
        vocabulary_size=V, num_layers=1, num_heads=2, num_query_tokens=2, qformer_hidden_dim=8,
        key_value_dim=4, dropout=0.0, **DIMS))),
    # --- text classifiers
    "AlbertTextClassifier": _cls(M.AlbertTextClassifier, lambda: M.AlbertBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, embedding_dim=4, max_sequence_length=T,
        **DIMS)),
    "BertTextClassifier": _cls(M.BertTextClassifier, lambda: M.BertBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, max_sequence_length=T, **DIMS)),
    "DebertaV3TextClassifier": _cls(M.DebertaV3TextClassifier, lambda: M.DebertaV3Backbone(
        vocabulary_size=V, num_layers=1, num_heads=2, max_sequence_length=T, bucket_size=4,
        dropout=0.0, **DIMS)),
    "DistilBertTextClassifier": _cls(M.DistilBertTextClassifier, lambda: M.DistilBertBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, max_sequence_length=T, dropout=0.0,
        **DIMS)),
    "ESMProteinClassifier": _cls(M.ESMProteinClassifier, lambda: M.ESMBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, max_sequence_length=T, dropout=0.0,
        **DIMS)),
    "FNetTextClassifier": _cls(M.FNetTextClassifier, lambda: M.FNetBackbone(
        vocabulary_size=V, num_layers=1, max_sequence_length=T, dropout=0.0, **DIMS)),
    "RobertaTextClassifier": _cls(M.RobertaTextClassifier, lambda: M.RobertaBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, max_sequence_length=T, dropout=0.0,
        **DIMS)),
    "RoformerV2TextClassifier": _cls(M.RoformerV2TextClassifier, lambda: M.RoformerV2Backbone(
        vocabulary_size=V, num_layers=1, num_heads=2, head_size=4, dropout=0.0, **DIMS)),
    "XLMRobertaTextClassifier": _cls(M.XLMRobertaTextClassifier, lambda: M.XLMRobertaBackbone(
        vocabulary_size=V, num_layers=1, num_heads=2, max_sequence_length=T, dropout=0.0,
        **DIMS)),
    # --- image classifiers
    "CSPNetImageClassifier": _cls(M.CSPNetImageClassifier, lambda: M.CSPNetBackbone(
        stem_filters=4, stem_kernel_size=3, stem_strides=1, stackwise_depth=[1],
        stackwise_strides=[2], stackwise_num_filters=[8], block_type="dark_block",
        stage_type="dark", image_shape=IMAGE)),
    "DeiTImageClassifier": _cls(M.DeiTImageClassifier, lambda: M.DeiTBackbone(
        image_shape=IMAGE, patch_size=16, num_layers=1, num_heads=2, **DIMS)),
    "DenseNetImageClassifier": _cls(M.DenseNetImageClassifier, lambda: M.DenseNetBackbone(
        stackwise_num_repeats=[1, 1], image_shape=IMAGE, growth_rate=4)),
    # num_features keeps its default: KerasHub's config drops it
    "EfficientNetImageClassifier": _cls(M.EfficientNetImageClassifier, lambda: M.EfficientNetBackbone(
        stackwise_kernel_sizes=[3], stackwise_num_repeats=[1], stackwise_input_filters=[8],
        stackwise_output_filters=[8], stackwise_expansion_ratios=[1],
        stackwise_squeeze_and_excite_ratios=[0.25], stackwise_strides=[2],
        stackwise_block_types=["unfused"], stackwise_width_coefficients=[1.0],
        stackwise_depth_coefficients=[1.0], input_shape=IMAGE, dropout=0.0)),
    "HGNetV2ImageClassifier": _cls(M.HGNetV2ImageClassifier, lambda: M.HGNetV2Backbone(
        depths=[1], embedding_size=8, hidden_sizes=[16], stem_channels=[3, 4, 8],
        hidden_act="relu", use_learnable_affine_block=False,
        stackwise_stage_filters=[(8, 4, 16, 1, 1, 3)], apply_downsample=[False],
        use_lightweight_conv_block=[False], image_shape=IMAGE)),
    "MiTImageClassifier": _cls(M.MiTImageClassifier, lambda: M.MiTBackbone(
        layerwise_depths=[1], num_layers=1, layerwise_num_heads=[1], layerwise_sr_ratios=[1],
        max_drop_path_rate=0.0, layerwise_patch_sizes=[7], layerwise_strides=[4],
        image_shape=IMAGE, hidden_dims=[8])),
    "MobileNetImageClassifier": _cls(M.MobileNetImageClassifier, lambda: M.MobileNetBackbone(
        stackwise_expansion=[[8]], stackwise_num_blocks=[1], stackwise_num_filters=[[8]],
        stackwise_kernel_size=[[3]], stackwise_num_strides=[[2]], stackwise_se_ratio=[[0.25]],
        stackwise_activation=[["relu"]], stackwise_padding=[[1]], output_num_filters=8,
        depthwise_filters=8, depthwise_stride=1, depthwise_residual=False,
        last_layer_filter=16, image_shape=IMAGE, input_num_filters=8)),
    "MobileNetV5ImageClassifier": _cls(M.MobileNetV5ImageClassifier, lambda: M.MobileNetV5Backbone(
        **MOBILENET_V5), head_hidden_size=16),
    "ResNetImageClassifier": _cls(M.ResNetImageClassifier, lambda: M.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
        stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block",
        image_shape=IMAGE)),
    "SwinTransformerImageClassifier": _cls(M.SwinTransformerImageClassifier, lambda: M.SwinTransformerBackbone(
        image_shape=IMAGE, embed_dim=8, depths=[1], num_heads=[2], window_size=4, patch_size=4,
        mlp_ratio=2.0, drop_path=0.0)),
    "VGGImageClassifier": _cls(M.VGGImageClassifier, lambda: M.VGGBackbone(
        stackwise_num_repeats=[1], stackwise_num_filters=[4], image_shape=IMAGE),
        pooling_hidden_dim=8),
    "ViTImageClassifier": _cls(M.ViTImageClassifier, _vit),
    "XceptionImageClassifier": _cls(M.XceptionImageClassifier, lambda: M.XceptionBackbone(
        stackwise_conv_filters=[[4, 8], [8, 8]], stackwise_pooling=[True, False],
        image_shape=IMAGE)),
}

#: task classes that cannot be built and trained here, and why
NOT_BUILT = {
    "Gemma4AssistantCausalLM": (
        "a speculative-decoding draft model: its call() raises by design (it runs only "
        "inside a target Gemma4CausalLM's generate, on the target's KV cache)"
    ),
    "PARSeqCausalLM": (
        "its constructor compiles with its tokenizer's pad id and cannot be rebuilt "
        "without a preprocessor, and PARSeqTokenizer needs tensorflow-text, which is "
        "not installed"
    ),
}

#: families whose only Dense/EinsumDense layers are the task's head: the
#: defaults leave everything out (convolutions are adapted only by kind),
#: so they are adapted by kind (`"conv"`) and by naming the head
HEAD_ONLY = {
    "CSPNetImageClassifier", "DenseNetImageClassifier", "EfficientNetImageClassifier",
    "HGNetV2ImageClassifier", "MobileNetImageClassifier", "MobileNetV5ImageClassifier",
    "ResNetImageClassifier", "VGGImageClassifier", "XceptionImageClassifier",
}

#: KerasHub names these backbones' inner layers after the backbone's own
#: name, which a `.keras` reload changes (`embedder` becomes
#: `hg_net_v2_backbone_embedder`), so adapters on them cannot be found
#: again by layer key: their head alone is adapted here
CONV_KEYS_CHANGE_ON_RELOAD = {"HGNetV2ImageClassifier"}

#: KerasHub's own `.keras` round trip changes these models' outputs on
#: these backends, without any adapter too (every weight reloads equal; the
#: reloaded Gemma3n attention layers do not track their rotary embedding):
#: there the round trip is checked weight by weight only
ROUND_TRIP_OUTPUTS_DIFFER = {"Gemma3nCausalLM": ("jax", "tensorflow")}


def class_of(case):
    return case.split("[")[0]


def discover():
    """Names of the concrete task classes of `TASK_BASES` KerasHub exports."""
    found = set()
    for name in dir(M):
        obj = getattr(M, name)
        if (inspect.isclass(obj) and issubclass(obj, TASK_BASES) and obj not in TASK_BASES
                and getattr(obj, "backbone_cls", None) is not None):
            found.add(obj.__name__)
    return found


def fake_inputs(model, rng):
    """A batch for every input of `model`: token ids below the vocabulary,
    a padding mask with one padded position, positions, zero segments,
    images and audio of fixed sizes."""
    spec = model.input
    if not isinstance(spec, dict):
        shape = [B] + [32 if d is None else d for d in spec.shape[1:]]
        return rng.standard_normal(shape).astype("float32")
    audio = any("values" in name for name in spec)
    data = {}
    for name, t in spec.items():
        if "float" in str(t.dtype):
            size = AUDIO if "values" in name else 32
            data[name] = rng.standard_normal([B] + [size if d is None else d for d in t.shape[1:]])
            data[name] = data[name].astype("float32")
            continue
        shape = [B] + [T if d is None else d for d in t.shape[1:]]
        if name == "encoder_padding_mask" and audio:
            data[name] = np.ones((B, AUDIO), "int32")
        elif "padding_mask" in name:
            data[name] = np.ones(shape, "int32")
            data[name][1, -1] = 0
        elif "position" in name:
            data[name] = np.broadcast_to(np.arange(shape[1], dtype="int32"), shape).copy()
        elif "segment" in name or "response_mask" in name:
            data[name] = np.zeros(shape, "int32")
        else:
            data[name] = rng.integers(1, 8, size=shape).astype("int32")
    return data


def labels(model, x):
    if isinstance(model, M.CausalLM):
        return x["decoder_token_ids"] if "decoder_token_ids" in x else x["token_ids"]
    return np.array([0, 1], "int32")


def adapter_values(model):
    return {p: [to_np(v) for v in a.trainable_weights] for p, a in keras_lowrank.adapters(model)}


def adapted_keys(model):
    return [e.key for e in tree.walk(model) if tree.is_adapter(e.layer)]


def linear_layers(model):
    return [e.path for e in tree.walk(model)
            if isinstance(e.layer, (keras.layers.Dense, keras.layers.EinsumDense))]


# ----------------------------------------------------------------------
def test_every_family_is_covered():
    discovered = discover()
    built = {class_of(c) for c in CASES}
    assert not built & set(NOT_BUILT)
    assert HEAD_ONLY <= built
    missing = discovered - built - set(NOT_BUILT)
    assert not missing, f"KerasHub task classes with no tiny config here: {sorted(missing)}"
    assert not (built | set(NOT_BUILT)) - discovered, "a case names a class KerasHub lacks"
    assert set(ROUND_TRIP_OUTPUTS_DIFFER) <= built


def test_the_families_are_dealt_to_every_backend_once(monkeypatch):
    monkeypatch.delenv("KLR_ALL_FAMILIES", raising=False)
    shares = [dealt(CASES, b) for b in ALL_BACKENDS]
    assert sorted(c for share in shares for c in share) == sorted(CASES)
    assert all(len(share) >= len(CASES) // 3 for share in shares)


@pytest.mark.parametrize("case", dealt(CASES))
def test_family(case, tmp_path):
    model = CASES[case]()
    x = fake_inputs(model, np.random.default_rng(0))

    if class_of(case) in HEAD_ONLY:
        with pytest.raises(ValueError, match="No layer left to adapt"):
            keras_lowrank.enable_adapter(model)
        if class_of(case) in CONV_KEYS_CHANGE_ON_RELOAD:
            summary = keras_lowrank.enable_adapter(model, targets=linear_layers(model))
        else:
            summary = keras_lowrank.enable_adapter(model, targets=["conv"] + linear_layers(model))
            assert summary.kinds["conv"][0] > 0  # their convolutions, by kind
    else:
        summary = keras_lowrank.enable_adapter(model)
    assert summary.adapted_paths

    # (that an adapter starts as a no-op is checked for every method by
    # the contract tests; here: the adapted model trains and reloads)
    before = adapter_values(model)
    fit_step(model, x, labels(model, x))
    after = adapter_values(model)
    moved = max(float(np.abs(a - b).max()) for p in before for a, b in zip(after[p], before[p]))
    assert moved > 0, "one fit step left every adapter variable unchanged"
    y2 = forward(model, x)
    assert np.all(np.isfinite(y2))

    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert adapted_keys(loaded) == adapted_keys(model)  # names Keras makes up may differ
    assert len(loaded.weights) == len(model.weights)
    for v, w in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(to_np(w), to_np(v), err_msg=v.path)
    if BACKEND not in ROUND_TRIP_OUTPUTS_DIFFER.get(class_of(case), ()):
        np.testing.assert_allclose(forward(loaded, x), y2, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------
# Gemma 4 reads its feed-forward kernels instead of calling the layers
FFW = ["ffw_gating", "ffw_gating_2", "ffw_linear"]
GEMMA4_X = {
    "token_ids": np.array([[1, 2, 3, 4], [2, 3, 4, 5]], "int32"),
    "padding_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]], "int32"),
    "position_ids": np.array([[0, 1, 2, 3]] * 2, "int32"),
}


def _gemma4_lm(**kw):
    return M.Gemma4CausalLM(backbone=_gemma4(**GEMMA4_MOE, **kw), preprocessor=None)


def _ffw_paths(model):
    return [f"{model.backbone.name}/decoder_block_0/{name}" for name in FFW]


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, a in keras_lowrank.adapters(model):
        for v in a.trainable_weights:
            v.assign(0.3 * rng.standard_normal(tuple(v.shape)).astype("float32"))


def test_gemma4_kernel_reads_are_adapted():
    model = _gemma4_lm()
    y0 = to_np(model(GEMMA4_X))
    summary = keras_lowrank.enable_adapter(model, rank=2)
    ffw = _ffw_paths(model)
    assert set(ffw) <= set(summary.adapted_paths)
    assert summary.kernel_reads == ffw
    assert "adapted through their kernel" in str(summary)
    # its MoE block's expert stacks are adapted too (keras_lowrank.experts)
    assert "not adaptable" not in summary.left_out, summary.left_out
    assert summary.kinds["embedding"] == (0, 1)  # the table is adapted by kind only
    assert summary.kinds["experts"][0] == summary.kinds["experts"][1] > 0
    np.testing.assert_allclose(to_np(model(GEMMA4_X)), y0, rtol=1e-5, atol=1e-5)  # a no-op at start

    _randomize(model)
    block = model.backbone.get_layer("decoder_block_0")
    a = block.gating_ffw
    k = to_np(a.layer.kernel)
    delta = a.scaling * to_np(ops.matmul(ops.transpose(a.lora_a), a.lora_b))
    np.testing.assert_allclose(to_np(a.kernel), k + delta, rtol=1e-5, atol=1e-6)
    assert a.bias is None
    y_adapted = to_np(model(GEMMA4_X))
    assert np.abs(y_adapted - y0).max() > 1e-3
    with keras_lowrank.disable_adapter(model):  # the original base
        np.testing.assert_allclose(to_np(a.kernel), k, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(to_np(model(GEMMA4_X)), y0, rtol=1e-5, atol=1e-5)
    # the plain model the adapters fold into computes the same
    keras_lowrank.merge(model)
    np.testing.assert_allclose(to_np(model(GEMMA4_X)), y_adapted, rtol=1e-4, atol=1e-5)


def test_gemma4_kernel_reads_train_and_merge_in_place():
    model = _gemma4_lm()
    keras_lowrank.enable_adapter(model, rank=2)
    block = model.backbone.get_layer("decoder_block_0")
    ffw = [block.gating_ffw, block.gating_ffw_2, block.ffw_linear]
    b0 = [to_np(a.lora_b) for a in ffw]
    fit_step(model, GEMMA4_X, GEMMA4_X["token_ids"])
    for a, b in zip(ffw, b0):  # the gradient reached them through `kernel`
        assert np.abs(to_np(a.lora_b) - b).max() > 0, a.name
    y = to_np(model(GEMMA4_X))
    keras_lowrank.merge(model, unload=False)  # merged: the kernel already holds the update
    a = block.gating_ffw
    np.testing.assert_allclose(to_np(a.kernel), to_np(a.layer.kernel), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(to_np(model(GEMMA4_X)), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", ["int8", "nf4"])
def test_gemma4_kernel_reads_over_a_quantized_base(base):
    model = _gemma4_lm()
    keras_lowrank.enable_adapter(model, rank=2, base=base)
    a = model.backbone.get_layer("decoder_block_0").gating_ffw
    # the parent gets the dequantized kernel (Keras's own `kernel` of an
    # int8 layer is its integer codes), plus the adapter's update
    k = to_np(bases.read_kernel(a.layer))
    np.testing.assert_allclose(to_np(a.kernel), k, rtol=1e-6, atol=1e-6)  # B starts at zero
    _randomize(model)
    delta = a.scaling * to_np(ops.matmul(ops.transpose(a.lora_a), a.lora_b))
    np.testing.assert_allclose(to_np(a.kernel), k + delta, rtol=1e-5, atol=1e-5)
    # what the parent computes with it is what calling the layer computes
    # (Keras's int8 call also quantizes the activations: ~1%)
    x = np.random.default_rng(1).standard_normal((2, 4, 8)).astype("float32")
    tol = 3e-2 if base == "int8" else 1e-5
    np.testing.assert_allclose(to_np(ops.matmul(x, a.kernel)), to_np(a(x)), rtol=tol, atol=tol)
    b0 = to_np(a.lora_b)
    fit_step(model, GEMMA4_X, GEMMA4_X["token_ids"])
    assert np.abs(to_np(a.lora_b) - b0).max() > 0


def test_gemma4_vision_encoder_reads_its_dense_kernels():
    """Gemma 4's vision encoder wraps each EinsumDense in a clipping layer
    that multiplies by `self.dense.kernel` with the same equation."""
    enc = M.Gemma4VisionEncoder(image_size=12, patch_size=4, num_heads=2, hidden_dim=8,
                                num_layers=1, intermediate_dim=16, head_dim=4, output_dim=8,
                                pool_size=3, position_embedding_size=8)
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(3), indexing="ij"), -1)
    x = {"pixel_values": np.random.default_rng(0).standard_normal((1, 1, 9, 48)).astype("float32"),
         "pixel_position_ids": grid.reshape(1, 1, 9, 2).astype("int32")}
    y0 = to_np(enc(x))
    summary = keras_lowrank.enable_adapter(enc, rank=2)
    clipped = [f"image_encoder/encoder_block_0/{p}/dense" for p in
               ("attention/query", "attention/key", "attention/value",
                "attention/attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")]
    assert summary.kernel_reads == clipped
    assert set(clipped) <= set(summary.adapted_paths)
    _randomize(enc)
    y = to_np(enc(x))
    assert np.abs(y - y0).max() > 1e-3
    with keras_lowrank.disable_adapter(enc):
        np.testing.assert_allclose(to_np(enc(x)), y0, rtol=1e-5, atol=1e-5)
    keras_lowrank.merge(enc)
    np.testing.assert_allclose(to_np(enc(x)), y, rtol=1e-4, atol=1e-5)


def test_gemma4_named_adapters_serve_the_kernel():
    model = _gemma4_lm()
    y0 = to_np(model(GEMMA4_X))
    keras_lowrank.enable_adapter(model, rank=2, adapter_name="one")
    keras_lowrank.enable_adapter(model, rank=2, adapter_name="two")
    _randomize(model)
    block = model.backbone.get_layer("decoder_block_0")
    s = block.gating_ffw
    assert type(s).__name__ == "AdapterSet"
    keras_lowrank.set_active(model, ["one", "two"])
    np.testing.assert_allclose(to_np(s.kernel), to_np(s.geometry.matrix_to_kernel(s.effective_matrix())),
                               rtol=1e-5, atol=1e-6)
    assert np.abs(to_np(model(GEMMA4_X)) - y0).max() > 1e-3
    keras_lowrank.set_active(model, None)
    np.testing.assert_allclose(to_np(s.kernel), to_np(s.layer.kernel), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(to_np(model(GEMMA4_X)), y0, rtol=1e-5, atol=1e-5)


def test_gemma4_kernel_reads_left_out_where_the_method_cannot_serve_them():
    """DyLoRA samples a rank in each training step where the layer is
    called; a kernel read cannot do that, so those layers stay out."""
    model = _gemma4_lm()
    summary = keras_lowrank.enable_adapter(model, method="dylora", rank=2)
    ffw = _ffw_paths(model)
    assert not set(ffw) & set(summary.adapted_paths)
    assert summary.left_out["read directly by their parent"] == {"EinsumDense": 3}
    assert summary.left_out_paths["read directly by their parent"] == ffw
    assert summary.kernel_reads == []
    assert "3 EinsumDense (read directly by their parent)" in str(summary)
    fit_step(model, GEMMA4_X, GEMMA4_X["token_ids"])
    with pytest.raises(ValueError, match="read their weights instead of calling them, which a 'dylora' adapter cannot serve"):
        keras_lowrank.enable_adapter(_gemma4_lm(), method="dylora", rank=2, targets=FFW)


# ----------------------------------------------------------------------
# Every method: the kernel an adapter serves is the map it computes
class ReadsKernel(keras.layers.Layer):
    """Multiplies by its sublayer's kernel itself, as Gemma 4 does."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = keras.layers.EinsumDense("btd,df->btf", (None, 6), name="proj")

    def build(self, shape):
        self.proj.build(shape)

    def call(self, x):
        return ops.einsum("btd,df->btf", x, self.proj.kernel)

    def compute_output_shape(self, shape):
        return self.proj.compute_output_shape(shape)


def _reads_kernel_model():
    inp = keras.Input((4, 5))
    h = keras.layers.Dense(5, name="pre")(inp)
    h = ReadsKernel(name="block")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(h))


@pytest.mark.parametrize("method", keras_lowrank.methods())
def test_every_method_serves_the_kernel_it_computes(method):
    from conftest import needs
    from conftest import perturb
    from conftest import tunable

    model = _reads_kernel_model()
    x = np.random.default_rng(0).standard_normal((2, 4, 5)).astype("float32")
    options = needs(method, model)
    summary = keras_lowrank.enable_adapter(model, method=method, rank=2, **options)
    serves = registry.get(method).layer_class.serves_kernel_with(options)
    if not serves:
        assert summary.left_out_paths["read directly by their parent"] == ["block/proj"]
        assert summary.adapted_paths == ["pre"]
        return
    assert summary.kernel_reads == ["block/proj"]
    adapter = model.get_layer("block").proj
    perturb(adapter)
    h = to_np(model.get_layer("pre")(x))
    # what the parent computes with `kernel` is what calling the adapter computes
    np.testing.assert_allclose(to_np(ops.einsum("btd,df->btf", h, adapter.kernel)),
                               to_np(adapter(h)), rtol=1e-4, atol=1e-5)
    before = [to_np(v) for v in tunable(adapter)]
    fit_step(model, x, np.zeros((2, 4, 3), "float32") + 1.0, loss="mse")
    assert max(float(np.abs(to_np(v) - b).max()) for v, b in zip(tunable(adapter), before)) > 0


# ----------------------------------------------------------------------
# The summary counts what was left out
def test_summary_counts_what_was_left_out():
    tokens = keras.Input((6,), dtype="int32")
    image = keras.Input((8, 8, 3))
    e = keras.layers.Embedding(10, 4, name="embed")(tokens)
    e = keras.layers.Flatten()(e)
    c = keras.layers.Conv2D(2, 3, name="conv_a")(image)
    c = keras.layers.Conv2D(2, 3, name="conv_b")(c)
    c = keras.layers.LayerNormalization(name="norm")(c)
    c = keras.layers.Flatten()(c)
    h = keras.layers.Concatenate()([e, c])
    h = keras.layers.Dense(8, name="hidden")(h)
    h = keras.layers.Dense(8, name="skipped")(h)
    out = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model([tokens, image], out)

    summary = keras_lowrank.enable_adapter(model, rank=2, exclude=["skipped"])
    assert summary.adapted_paths == ["hidden"]
    assert summary.left_out == {
        "output head": {"Dense": 1},
        "not targeted": {"Embedding": 1, "Conv2D": 2, "Dense": 1},
    }
    assert sorted(summary.left_out_paths["not targeted"]) == ["conv_a", "conv_b", "embed", "skipped"]
    assert summary.left_out_paths["output head"] == ["logits"]
    assert summary.kinds == {"linear": (1, 3), "conv": (0, 2), "embedding": (0, 1)}
    text = str(summary)
    assert "by kind: linear 1 of 3 adapted, conv 0 of 2 adapted, embedding 0 of 1 adapted" in text
    line = next(t for t in text.splitlines() if t.startswith("left out: "))
    assert line.startswith("left out: 1 Dense (output head); ")
    assert all(f"{n} {k}" in line for n, k in ((1, "Embedding"), (2, "Conv2D"), (1, "Dense (not targeted)")))
    assert "adapted layers: 1" in text  # the table and totals are still there


def test_nothing_left_to_adapt_says_what_was_left_out():
    image = keras.Input((8, 8, 3))
    c = keras.layers.Conv2D(2, 3, name="conv")(image)
    c = keras.layers.GlobalAveragePooling2D()(c)
    model = keras.Model(image, keras.layers.Dense(2, name="logits")(c))
    with pytest.raises(ValueError, match=r"Left out: 1 Dense \(output head\); 1 Conv2D \(not targeted\)"
                       r".*targets=\['conv'\]"):
        keras_lowrank.enable_adapter(model)
