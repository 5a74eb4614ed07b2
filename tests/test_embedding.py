"""Embeddings as a kernel kind: every method on a `(vocabulary, dim)` table,
a tied `ReversibleEmbedding` whose output head reads the adapted table,
targeting by kind, a KerasHub causal LM fine-tuned through its embedding,
and PEFT's embedding LoRA (tied with `ensure_weight_tying`) both ways."""

import json

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import registry

from conftest import assert_noop
from conftest import dealt
from conftest import needs
from conftest import perturb
from conftest import to_np

METHODS = kl.methods()
IDS = np.array([[1, 5, 3, 0], [7, 2, 2, 9]], "int32")


@keras.saving.register_keras_serializable(package="klr_tests")
class TinyLM(keras.Model):
    """Token ids -> a tied table -> a projection -> logits from the same table."""

    def __init__(self, **kwargs):
        from keras_hub.layers import ReversibleEmbedding

        super().__init__(**kwargs)
        self.emb = ReversibleEmbedding(20, 8, tie_weights=True, name="emb")
        self.proj = keras.layers.Dense(8, name="proj")

    def call(self, ids):
        return self.emb(self.proj(self.emb(ids)), reverse=True)


def tiny_lm():
    pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    model = TinyLM()
    model(IDS)
    return model


def table_of(adapter):
    return to_np(adapter.merged_matrix(adapter.base_matrix()))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_a_tied_embedding(method):
    """No-op at start; the lookup and the tied output head both read the
    method's adapted table; a merge gives a plain table with the same
    outputs."""
    model = tiny_lm()
    y0 = to_np(model(IDS))
    if getattr(registry.get(method).layer_class, "refuses_embeddings", False):
        # a method that cannot adapt a table (Lily: one mixture per batch of rows)
        before = [to_np(w).copy() for w in model.weights]
        with pytest.raises(ValueError, match="'emb' is an embedding table"):
            kl.enable_adapter(model, method=method, rank=2, targets="embedding", **needs(method, model))
        assert not kl.adapters(model)
        assert all(np.array_equal(to_np(w), v) for w, v in zip(model.weights, before))
        return
    summary = kl.enable_adapter(model, method=method, rank=2, targets="embedding", **needs(method, model))
    assert summary.kinds["embedding"] == (1, 1) and summary.adapted_paths == ["emb"]
    a = model.emb
    y = to_np(model(IDS))
    assert_noop(method, y, y0)
    perturb(a)
    table = table_of(a)
    np.testing.assert_allclose(to_np(a(IDS)), table[IDS], rtol=1e-5, atol=1e-5)
    h = np.random.RandomState(0).normal(size=(3, 8)).astype("float32")
    np.testing.assert_allclose(to_np(a(h, reverse=True)), h @ table.T, rtol=1e-4, atol=1e-5)
    y = to_np(model(IDS))
    kl.merge(model)
    assert type(model.emb).__name__ == "ReversibleEmbedding"
    np.testing.assert_allclose(to_np(model(IDS)), y, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(y).max()))


def test_embedding_lora_trains_and_reloads(tmp_path):
    """In a compiled fit only the embedding's factors (and the other
    adapters) train, the table stays frozen, and `.keras` and adapter files
    round-trip."""
    model = tiny_lm()
    kl.enable_adapter(model, rank=2, targets=["embedding", "all-linear"])
    table = to_np(model.emb.layer.embeddings).copy()
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(IDS, np.roll(IDS, 1, axis=1), epochs=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    np.testing.assert_array_equal(to_np(model.emb.layer.embeddings), table)
    assert np.abs(to_np(model.emb.lora_a)).max() > 0 and np.abs(to_np(model.emb.lora_b)).max() > 0
    y = to_np(model(IDS))
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(to_np(keras.saving.load_model(tmp_path / "m.keras")(IDS)), y, rtol=1e-5, atol=1e-6)
    kl.save_adapter(model, tmp_path / "a.safetensors")
    fresh = tiny_lm()
    kl.load_adapter(fresh, tmp_path / "a.safetensors")
    np.testing.assert_allclose(to_np(fresh(IDS)), y, rtol=1e-5, atol=1e-6)


def test_embeddings_by_kind_only():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(20, 8, name="table")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(keras.layers.Dense(8, name="mid")(h)))
    summary = kl.enable_adapter(model, rank=2)
    assert summary.adapted_paths == ["mid"]  # not in "all-linear", as in PEFT
    assert summary.kinds["embedding"] == (0, 1)
    kl.merge(model)
    with pytest.raises(ValueError, match=r"'table' \(Embedding\): its base stays float"):
        kl.enable_adapter(model, rank=2, targets="embedding", base="int8")
    summary = kl.enable_adapter(model, rank=2, targets=["table"], dropout=0.5)  # no dropout on ids
    y = to_np(model(IDS[:, :4]))
    np.testing.assert_array_equal(to_np(model(IDS[:, :4], training=True)), y)


def _causal_lm(case):
    import keras_hub

    from conftest import gemma_backbone

    keras.utils.set_random_seed(0)
    if case == "gemma":
        return keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    if case == "gpt2":
        backbone = keras_hub.models.GPT2Backbone(vocabulary_size=20, num_layers=1, num_heads=2,
                                                 hidden_dim=8, intermediate_dim=16, max_sequence_length=8)
        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    backbone = keras_hub.models.LlamaBackbone(vocabulary_size=20, num_layers=1, num_query_heads=2,
                                              num_key_value_heads=1, hidden_dim=8, intermediate_dim=16,
                                              tie_word_embeddings=False)
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


@pytest.mark.parametrize("case", dealt(["gemma", "gpt2", "llama"]))
def test_causal_lm_through_its_embedding(case, tmp_path):
    """KerasHub causal LMs (Gemma and GPT-2 tie their table to the output
    head, Llama here does not): LoRA on the embedding and attention
    fine-tunes in a compiled fit; a tied head reads the adapted table, an
    untied one its own weights; the model reloads from `.keras`."""
    pytest.importorskip("keras_hub")
    lm = _causal_lm(case)
    x = {"token_ids": IDS, "padding_mask": np.ones(IDS.shape, "int32")}
    kl.enable_adapter(lm, rank=2, targets=["embedding", "query", "value"])
    lm.compile(optimizer=keras.optimizers.Adam(0.05),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = lm.fit(x, np.roll(IDS, 1, axis=1), epochs=6, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    emb = lm.backbone.token_embedding
    h = to_np(lm.backbone(x))
    head = table_of(emb).T if emb.layer.tie_weights else to_np(emb.layer.reverse_embeddings)
    np.testing.assert_allclose(to_np(lm(x)), h @ head, rtol=1e-4, atol=1e-4)
    lm.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(to_np(back(x)), to_np(lm(x)), rtol=1e-5, atol=1e-5)


def test_tied_embedding_lora_matches_peft(tmp_path):
    """PEFT's LoRA on a tied Gemma's `embed_tokens` and `lm_head` with
    `ensure_weight_tying=True` (one table, adapted for the lookup and the
    head) loads with the same logits and writes back to the same logits; a
    file saved without the tying is refused by name."""
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft_models import close
    from peft_models import hf_model
    from peft_models import keras_backbone
    from peft_models import keras_logits
    from peft_models import load_hf
    from peft_models import randomize_lora
    from peft_models import torch_logits

    base = hf_model("gemma", str(tmp_path / "hf"))
    for tying in (True, False):
        model = peft.get_peft_model(load_hf(base), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q_proj"],
            ensure_weight_tying=tying))
        randomize_lora(model)
        model.save_pretrained(tmp_path / f"peft{tying}")
        backbone = keras_backbone(base)
        if not tying:
            with pytest.raises(ValueError, match="ensure_weight_tying"):
                kl.load_peft_adapter(backbone, tmp_path / f"peft{tying}", base_model=base)
            assert not kl.adapters(backbone)
            continue
        want = torch_logits(model)
        summary = kl.load_peft_adapter(backbone, tmp_path / f"peft{tying}", base_model=base)
        assert summary.kinds["embedding"] == (1, 1)
        close(keras_logits(backbone), want, 1e-5)

    backbone = keras_backbone(base)
    kl.enable_adapter(backbone, rank=2, alpha=4, targets=["embedding", "query"])
    for i, (_, a) in enumerate(kl.adapters(backbone)):
        perturb(a, 0.3, seed=i)
    want = keras_logits(backbone)
    kl.save_peft_adapter(backbone, tmp_path / "back", base)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] and "lm_head" in config["target_modules"]
    back = peft.PeftModel.from_pretrained(load_hf(base), tmp_path / "back")
    close(torch_logits(back), want, 1e-5)
