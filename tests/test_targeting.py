"""Targets, exclusion, per-layer overrides, freezing, and the summary."""

import re

import keras
import numpy as np
import pytest

import keras_lowrank as kl

from conftest import bert_backbone
from conftest import gemma_backbone
from conftest import llama_backbone
from conftest import to_np
from conftest import token_inputs

GEMMA_BLOCK = [
    "attention/query", "attention/key", "attention/value", "attention/attention_output",
    "ffw_gating", "ffw_gating_2", "ffw_linear",
]


def test_default_targets_every_linear_layer_of_gemma():
    bb = gemma_backbone()
    summary = kl.enable_adapter(bb, rank=2)
    expected = [f"decoder_block_{i}/{p}" for i in range(2) for p in GEMMA_BLOCK]
    assert summary.adapted_paths == expected
    # Matrix views are PEFT's (d_model x heads*head_dim), not Keras's last axis.
    q = dict(kl.adapters(bb))["decoder_block_0/attention/query"]
    assert (q.geometry.n_in, q.geometry.n_out) == (16, 16)
    # Only adapter variables train; the table prints.
    assert all(
        any(v.path.endswith(n) for n in ("lora_a", "lora_b")) for v in bb.trainable_weights
    )
    text = str(summary)
    assert "decoder_block_1/ffw_linear" in text and "trainable params" in text


def test_model_method_is_the_same_call():
    bb = gemma_backbone()
    summary = bb.enable_adapter(method="dora", rank=2, targets=["query", "value"])
    assert summary.adapted_paths == [
        "decoder_block_0/attention/query", "decoder_block_0/attention/value",
        "decoder_block_1/attention/query", "decoder_block_1/attention/value",
    ]


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["query"], ["decoder_block_0/attention/query", "decoder_block_1/attention/query"]),
        (["decoder_block_1/attention/query"], ["decoder_block_1/attention/query"]),
        (["attention/value"], ["decoder_block_0/attention/value", "decoder_block_1/attention/value"]),
        (["decoder_block_0/ffw_*"], ["decoder_block_0/ffw_gating", "decoder_block_0/ffw_gating_2", "decoder_block_0/ffw_linear"]),
        (["re:.*_1/attention/(key|value)"], ["decoder_block_1/attention/key", "decoder_block_1/attention/value"]),
        ([re.compile(r".*ffw_linear")], ["decoder_block_0/ffw_linear", "decoder_block_1/ffw_linear"]),
    ],
)
def test_target_forms(targets, expected):
    bb = gemma_backbone()
    assert [e.path for e in kl.resolve_targets(bb, targets)] == expected


def test_exclude_and_all_linear():
    bb = gemma_backbone()
    chosen = kl.resolve_targets(bb, "all-linear", exclude=["decoder_block_1/*", "re:.*ffw.*"])
    assert [e.path for e in chosen] == [f"decoder_block_0/{p}" for p in GEMMA_BLOCK[:4]]


def test_per_layer_rank_and_alpha():
    bb = gemma_backbone()
    kl.enable_adapter(
        bb, rank=2, alpha=4, targets=["query", "ffw_linear"],
        rank_pattern={"ffw_linear": 4}, alpha_pattern={"decoder_block_1/*": 1.0},
    )
    got = {p: (a.rank, a.alpha) for p, a in kl.adapters(bb)}
    assert got == {
        "decoder_block_0/attention/query": (2, 4.0),
        "decoder_block_0/ffw_linear": (4, 4.0),
        "decoder_block_1/attention/query": (2, 1.0),
        "decoder_block_1/ffw_linear": (4, 1.0),
    }


def test_output_head_is_left_out_by_default_on_a_task_model():
    import keras_hub

    clf = keras_hub.models.BertTextClassifier(backbone=bert_backbone(), num_classes=2, preprocessor=None)
    summary = kl.enable_adapter(clf, rank=2)
    assert "logits" not in summary.adapted_paths
    assert any(p.endswith("/pooled_dense") for p in summary.adapted_paths)
    assert any(p.endswith("self_attention_layer/query") for p in summary.adapted_paths)
    # The head can be named explicitly, and becomes an adapter in the graph.
    clf2 = keras_hub.models.BertTextClassifier(backbone=bert_backbone(), num_classes=2, preprocessor=None)
    x = token_inputs(10, segment=True)
    y0 = to_np(clf2(x))
    kl.enable_adapter(clf2, rank=2, targets=["logits"])
    assert type(clf2.get_layer("logits")).__name__ == "LoRA"
    np.testing.assert_allclose(to_np(clf2(x)), y0, atol=1e-6)


def test_trainable_layers_and_bias():
    bb = llama_backbone()
    kl.enable_adapter(bb, rank=2, targets=["query"], train_bias=True, trainable_layers=["token_embedding"])
    names = sorted({v.path.split("/")[-1] for v in bb.trainable_weights})
    assert names == ["embeddings", "lora_a", "lora_b", "reverse_embeddings"]  # no query bias in Llama


def test_fit_after_compile_recompiles():
    bb = gemma_backbone()
    import keras_hub

    lm = keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
    lm.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = token_inputs(20)
    lm.fit(x, x["token_ids"], epochs=1, verbose=0)  # the optimizer is built on all weights
    kl.enable_adapter(lm, rank=2)
    before = [to_np(v).copy() for v in lm.backbone.weights]
    lm.fit(x, x["token_ids"], epochs=1, verbose=0)
    changed = [
        v.path for v, b in zip(lm.backbone.weights, before) if not np.array_equal(to_np(v), b)
    ]
    assert changed and all(p.split("/")[-1] in ("lora_a", "lora_b") for p in changed)
