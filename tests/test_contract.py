"""The adapter contract (spec/adapter-contract.md), once, over the registry.

Every registered method runs every check; a method that cannot meet a point
declares it in its registry entry and the check asserts the declaration.
"""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import registry
from keras_lowrank.adapter import Adapter

from conftest import BACKEND
from conftest import REFERENCE_MERGED
from conftest import SMALL
from conftest import SVD_FAMILY
from conftest import dealt
from conftest import families
from conftest import gemma_backbone
from conftest import np_layer_output
from conftest import perturb
from conftest import needs
from conftest import to_np
from conftest import token_inputs
from conftest import tunable

METHODS = kl.methods()
#: one method per family: the KerasHub end-to-end flows run once per family
FAMILIES = families()
KINDS = sorted(SMALL)


def adapted_small(method, kind, **options):
    make, x = SMALL[kind]
    model = make()
    y_base = to_np(model(x))
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["target"], **options)
    adapter = model.get_layer("target")
    assert isinstance(adapter, Adapter)
    return model, adapter, x, y_base


def snapshot(model):
    return (
        [type(l).__name__ for l in model._flatten_layers()],
        [to_np(w).copy() for w in model.weights],
        [v.trainable for v in model.weights],
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0]
    assert len(after[1]) == len(before[1])
    for a, b in zip(after[1], before[1]):
        np.testing.assert_array_equal(a, b)
    assert after[2] == before[2]


def test_every_method_has_a_numpy_statement():
    missing = [m for m in METHODS if not callable(REFERENCE_MERGED[m])]
    assert not missing, f"register reference=... (a NumPy statement of the formula) for {missing}"


# 1. No-op at start ----------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_noop_at_start(method, kind):
    spec = registry.get(method)
    model, _, x, y_base = adapted_small(method, kind)
    y = to_np(model(x))
    if spec.noop_at_init == "exact":
        np.testing.assert_array_equal(y, y_base)
    elif spec.noop_at_init == "roundoff":
        np.testing.assert_allclose(y, y_base, atol=1e-5 * max(1.0, np.abs(y_base).max()))
    else:
        assert spec.noop_at_init == "no"
        assert np.abs(y - y_base).max() > 0


# 2. Formula -------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_formula(method, kind):
    model, adapter, x, _ = adapted_small(method, kind)
    perturb(adapter)
    y = to_np(model(x))
    ref = np_layer_output(adapter, x, REFERENCE_MERGED[method])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


# 3. Merge parity ----------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_parity(method, kind):
    spec = registry.get(method)
    model, adapter, x, _ = adapted_small(method, kind)
    perturb(adapter)
    y = to_np(model(x))
    assert spec.mergeable
    kl.merge(model)
    assert not kl.adapters(model)
    assert not any(isinstance(l, Adapter) for l in model._flatten_layers())
    names = {v.name for v in model.weights}
    assert names <= {"kernel", "bias"}
    y_merged = to_np(model(x))
    scale = max(1.0, np.abs(y).max())
    assert np.abs(y_merged - y).max() <= 1e-5 * scale


# 4. Unmerge / disable ---------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_disable_and_unmerge(method, kind):
    spec = registry.get(method)
    model, adapter, x, y_base = adapted_small(method, kind)
    perturb(adapter)
    y = to_np(model(x))
    tol = 1e-5 * max(1.0, np.abs(y_base).max())
    with kl.disable_adapter(model):
        np.testing.assert_allclose(to_np(model(x)), y_base, atol=tol)
    np.testing.assert_allclose(to_np(model(x)), y, atol=tol)
    kl.merge(model, unload=False)
    assert adapter.merged
    np.testing.assert_allclose(to_np(model(x)), y, atol=tol)
    with pytest.raises(ValueError, match="unmerge"):
        kl.set_adapter_enabled(model, False)
    if spec.unmergeable:
        kl.unmerge(model)
        assert not adapter.merged
        np.testing.assert_allclose(to_np(model(x)), y, atol=tol)
        with kl.disable_adapter(model):
            np.testing.assert_allclose(to_np(model(x)), y_base, atol=tol)


# 5. Precision -------------------------------------------------------------
# float16 once per family (the same code path as bfloat16, another dtype)
PRECISION_CASES = [(m, "mixed_bfloat16") for m in METHODS] + [(m, "float16") for m in FAMILIES]


@pytest.mark.parametrize("method,policy", PRECISION_CASES)
def test_precision(method, policy):
    keras.config.set_dtype_policy(policy)
    make, x = SMALL["einsum"]
    model = make()
    kernel32 = to_np(model.get_layer("target").kernel).astype("float32")
    y_base = to_np(model(x)).astype("float32")
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["target"])
    adapter = model.get_layer("target")
    y0 = to_np(model(x)).astype("float32")
    tol = 2e-2 * max(1.0, np.abs(y_base).max())
    np.testing.assert_allclose(y0, y_base, atol=tol)
    # Norms / SVDs were taken in float32 of the stored kernel.
    w = adapter.geometry.kernel_to_matrix(keras.ops.convert_to_tensor(kernel32))
    if method == "dora":
        np.testing.assert_allclose(
            to_np(adapter.magnitude).astype("float32"),
            np.sqrt((to_np(w) ** 2).sum(0)), rtol=2e-3,
        )
    if method == "pissa":
        s = np.linalg.svd(to_np(w).astype("float64"), compute_uv=False)[:2]
        a, b = to_np(adapter.lora_a0).astype("float64").T, to_np(adapter.lora_b0).astype("float64")
        got = np.linalg.svd(adapter.scaling * a @ b, compute_uv=False)[:2]
        np.testing.assert_allclose(got, s, rtol=1e-2)
    perturb(adapter, scale=0.1)
    y = to_np(model(x)).astype("float32")
    assert np.all(np.isfinite(y))
    # Backward: finite, non-zero gradients for the adapter.
    grads = _adapter_grads(model, adapter, x)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert any(np.abs(g).max() > 0 for g in grads)
    kl.merge(model)
    y_m = to_np(model(x)).astype("float32")
    np.testing.assert_allclose(y_m, y, atol=5e-2 * max(1.0, np.abs(y).max()))


def _adapter_grads(model, adapter, x):
    variables = tunable(adapter)
    if BACKEND == "jax":
        import jax

        def loss_fn(values):
            mapping = list(zip(variables, values))
            with keras.StatelessScope(state_mapping=mapping):
                out = model(x)
            return keras.ops.sum(keras.ops.cast(out, "float32") ** 2)

        grads = jax.grad(loss_fn)([v.value for v in variables])
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(model(x), "float32") ** 2)
        grads = tape.gradient(loss, [v.value for v in variables])
    else:
        import torch

        out = model(x)
        loss = (out.float() ** 2).sum()
        grads = torch.autograd.grad(loss, [v.value for v in variables])
    return [to_np(g).astype("float32") for g in grads]


# 6. Gradient mask -------------------------------------------------------
def _mask_model():
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(10, 6, name="emb")(inp)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.EinsumDense("btd,dhk->bthk", output_shape=(4, 2, 3), bias_axes="hk", name="proj")(h)
    h = keras.layers.Reshape((4, 6))(h)
    h = keras.layers.Dense(8, activation="relu", name="ffn")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inp, out)


# a trained bias once per family (the bias is the wrapped layer's, not the method's)
MASK_CASES = [(m, False) for m in METHODS] + [(m, True) for m in FAMILIES]


@pytest.mark.parametrize("method,train_bias", MASK_CASES)
def test_gradient_mask(method, train_bias):
    spec = registry.get(method)
    model = _mask_model()
    summary = kl.enable_adapter(model, method=method, **needs(method, model), rank=2, train_bias=train_bias)
    assert summary.adapted_paths == ["proj", "ffn"]  # the head is left alone
    expected = 0
    for _, a in kl.adapters(model):
        g = a.geometry
        n = spec.trainable_count(g, a.options())
        assert a.trainable_count() == n
        expected += n + (math.prod(a.layer.bias.shape) if train_bias else 0)
    # variables tied across layers (model-level state) are counted once
    tied = {id(v): v for _, a in kl.adapters(model) for v in a.linked_variables() if v.trainable}
    expected += sum(math.prod(v.shape) for v in tied.values())
    assert summary.trainable_params == expected
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for _, a in kl.adapters(model):
        perturb(a, scale=0.2)  # B = 0 would leave A without gradient
    before = {id(v): to_np(v).copy() for v in model.weights}
    x = np.random.RandomState(0).randint(0, 10, (8, 4)).astype("int32")
    y = np.random.RandomState(1).randint(0, 10, (8, 4)).astype("int32")
    model.train_on_batch(x, y)
    trainable_ids = {id(v) for v in model.trainable_weights}
    # The model-level state of a method with training parts is its in-step
    # machinery (DyLoRA's rank of the step): it may change; nothing else may.
    machinery = {
        id(v) for m, st in kl.shared.states(model).items() if registry.get(m).training_parts
        for v in st.weights
    }
    for v in model.weights:
        changed = not np.array_equal(to_np(v), before[id(v)])
        if id(v) in trainable_ids:
            assert changed, f"{v.path} did not train"
        elif id(v) not in machinery:
            assert not changed, f"frozen {v.path} changed"
    names = sorted(v.path.split("/")[-1] for v in model.trainable_weights)
    own = sorted({
        id(v): v.path.split("/")[-1] for _, a in kl.adapters(model) for v in tunable(a)
    }.values())
    assert names == own
    has_bias = any(v.path.endswith("bias") for v in model.trainable_weights)
    assert has_bias == train_bias


# 7. Learns -------------------------------------------------------------
def _fit_losses(model, x, y, epochs=12, lr=2e-2):
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = model.fit(x, y, epochs=epochs, batch_size=len(y), verbose=0)
    return hist.history["loss"]


@pytest.mark.parametrize("method", METHODS)
def test_learns(method):
    """Every method lowers the loss of `fit` on a small model."""
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(10, 8, name="emb")(inp)
    h = keras.layers.Dense(8, activation="tanh", name="ffn")(h)
    h = keras.layers.EinsumDense("btd,dk->btk", output_shape=(4, 8), name="proj")(h)
    model = keras.Model(inp, keras.layers.Dense(10, name="logits")(h))
    x = np.random.RandomState(0).randint(0, 10, (16, 4)).astype("int32")
    y = (x + 3) % 10
    kl.enable_adapter(model, method=method, **needs(method, model), rank=4)
    scale = registry.get(method).lr_scale
    # Methods that train a few numbers on the scale of σ (lr_scale > 1) have
    # a few dozen parameters on this toy model: less room to fit it; so has
    # LoRA-FA, which trains only B through a frozen random A (measured on
    # jax: 2.31 -> 2.09 in 30 epochs, 1.71 in 60, where LoRA reaches 0.28 in
    # 60). These get 60 epochs and a lower bar.
    slow = scale != 1 or method == "lora_fa"
    losses = _fit_losses(model, x, y, epochs=60 if slow else 30, lr=min(0.5, 5e-2 * scale))
    assert losses[-1] < (0.95 if slow else 0.9) * losses[0]


# The SVD family's methods each fine-tune a pretrained KerasHub Gemma in
# tests/test_svd_family.py (pretrain on one task, shift to another). Every
# method learns on every backend above (test_learns); on a KerasHub model
# each family learns once per suite, on a backend dealt in turn.
@pytest.mark.parametrize("method", dealt([m for m in FAMILIES if m not in SVD_FAMILY]))
def test_learns_gemma_causal_lm(method):
    import keras_hub

    lm = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    x = token_inputs(20, batch=4, seq=8)
    y = (x["token_ids"] + 3) % 20
    kl.enable_adapter(lm, method=method, **needs(method, lm), rank=2)
    losses = _fit_losses(lm, x, y, lr=2e-2 * min(5.0, registry.get(method).lr_scale))
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("model_name", dealt(["llama", "bert", "gpt2"]))
def test_learns_other_hub_models(model_name):
    import conftest

    bb = getattr(conftest, f"{model_name}_backbone")()
    x = token_inputs(10, batch=4, seq=8, segment=model_name == "bert")
    seq_out = bb(x)["sequence_output"] if model_name == "bert" else bb(x)
    assert seq_out.shape[-1] > 0
    inputs = {k: keras.Input((8,), dtype="int32", name=k) for k in x}
    feats = bb(inputs)
    feats = feats["sequence_output"] if model_name == "bert" else feats
    out = keras.layers.Dense(10, name="logits")(feats)
    model = keras.Model(inputs, out)
    y = (x["token_ids"] + 1) % 10
    summary = kl.enable_adapter(model, method="lora", rank=2, trainable_layers=["logits"])
    assert "logits" not in summary.adapted_paths
    losses = _fit_losses(model, x, y, epochs=40, lr=3e-2)
    assert losses[-1] < 0.9 * losses[0]


# 8. Training-time machinery: tests/test_training.py, over the same registry
# (test_training_parts_act_inside_fit and the resume-after-reload tests).


# 9. .keras round trip -------------------------------------------------------
def _subclassed_model():
    @keras.saving.register_keras_serializable(package="klr_tests")
    class Tiny(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.proj = keras.layers.EinsumDense("bd,dk->bk", output_shape=(6,), name="proj")
            self.hidden = keras.layers.Dense(6, activation="relu", name="hidden")
            self.logits = keras.layers.Dense(3, name="logits")

        def call(self, x):
            return self.logits(self.hidden(self.proj(x)))

    m = Tiny()
    m(np.zeros((1, 5), "float32"))
    return m


def _roundtrip_models():
    return {
        "functional": (lambda: SMALL["einsum"][0](), SMALL["einsum"][1]),
        "sequential": (
            lambda: keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, name="a"), keras.layers.Dense(3, name="logits")]),
            SMALL["dense"][1],
        ),
        "subclassed": (_subclassed_model, SMALL["dense"][1]),
    }


def _train_one_step_changes_adapters(model, x):
    y_ref = to_np(model(x))
    target = np.random.RandomState(3).normal(size=y_ref.shape).astype("float32")
    # One eager step: what is checked is which variables the reloaded model
    # trains (its tracking), the same traced or not; the compiled step after
    # a reload is test_training.py's test_training_resumes_after_a_keras_reload.
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", run_eagerly=True)
    before = [to_np(v).copy() for v in model.trainable_weights]
    assert before, "no trainable adapter variable after reload"
    model.train_on_batch(x, target)
    after = [to_np(v) for v in model.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))


# KerasHub's round trip, once per family: test_keras_roundtrip_task_model
ROUNDTRIP_CASES = (
    [(m, "functional") for m in METHODS]
    + [(m, k) for m in FAMILIES for k in ("sequential", "subclassed")]
)


@pytest.mark.parametrize("method,kind", ROUNDTRIP_CASES)
def test_keras_roundtrip(method, kind, tmp_path):
    make, x = _roundtrip_models()[kind]
    model = make()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=None if kind != "functional" else ["target"])
    for _, a in kl.adapters(model):
        perturb(a)
    y = to_np(model(x))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-5)
    assert [(p, a.method, a.rank) for p, a in kl.adapters(loaded)] == [
        (p, a.method, a.rank) for p, a in kl.adapters(model)
    ]
    assert sorted(v.path.split("/")[-1] for v in loaded.trainable_weights) == sorted(
        v.path.split("/")[-1] for v in model.trainable_weights
    )
    _train_one_step_changes_adapters(loaded, x)


@pytest.mark.parametrize("method", FAMILIES)
def test_keras_roundtrip_task_model(method, tmp_path):
    import keras_hub

    lm = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    x = token_inputs(20)
    kl.enable_adapter(lm, method=method, **needs(method, lm), rank=2)
    for _, a in kl.adapters(lm):
        perturb(a, scale=0.1)
    y = to_np(lm(x))
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded).__name__ == "GemmaCausalLM"
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-5)
    assert [(p, a.method, a.rank) for p, a in kl.adapters(loaded)] == [
        (p, a.method, a.rank) for p, a in kl.adapters(lm)
    ]
    assert sorted(v.path for v in loaded.trainable_weights) == sorted(v.path for v in lm.trainable_weights)


# 10. Adapter-only file ---------------------------------------------------
ADAPTER_FILE_CASES = [(m, False, False) for m in METHODS] + [(m, True, False) for m in FAMILIES] + [
    (m, False, True) for m in FAMILIES
]


@pytest.mark.parametrize("method,train_bias,hub", ADAPTER_FILE_CASES)
def test_adapter_file(method, train_bias, hub, tmp_path):
    make = gemma_backbone if hub else _bert_like
    bb = make()
    base_weights = [to_np(w).copy() for w in bb.weights]
    x = token_inputs(20) if hub else np.random.RandomState(0).normal(size=(2, 5)).astype("float32")
    kl.enable_adapter(bb, method=method, **needs(method, bb), rank=2, train_bias=train_bias)
    for _, a in kl.adapters(bb):
        perturb(a)
        if train_bias:
            a.layer.bias.assign(np.full(a.layer.bias.shape, 0.25, "float32"))
    y = to_np(bb(x))
    f = tmp_path / "adapter.safetensors"
    kl.save_adapter(bb, f)
    assert f.stat().st_size < 64 * 1024
    fresh = make()
    for w, v in zip(fresh.weights, base_weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-5, atol=1e-5)
    assert [(p, a.method) for p, a in kl.adapters(fresh)] == [(p, a.method) for p, a in kl.adapters(bb)]


def _bert_like():
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="relu", name="ffn")(inp)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_residual_init_as_lora(method, tmp_path):
    bb = gemma_backbone()
    base_weights = [to_np(w).copy() for w in bb.weights]
    x = token_inputs(20)
    kl.enable_adapter(bb, method=method, **needs(method, bb), rank=2, alpha=4)
    for _, a in kl.adapters(bb):
        perturb(a)
    y = to_np(bb(x))
    f = tmp_path / "as_lora.safetensors"
    kl.save_adapter(bb, f, as_lora=True)
    fresh = gemma_backbone()
    for w, v in zip(fresh.weights, base_weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    assert {a.method for _, a in kl.adapters(fresh)} == {"lora"}
    assert {a.rank for _, a in kl.adapters(fresh)} == {4}
    assert {a.scaling for _, a in kl.adapters(fresh)} == {2.0}
    np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-4, atol=1e-4)


# 11. Cross-backend -------------------------------------------------------
CROSS_SCRIPT = r"""
import json, os, sys
import numpy as np, keras
import keras_lowrank as kl
out = sys.argv[1]
keras.utils.set_random_seed(7)
x = np.random.RandomState(0).normal(size=(2, 4, 5)).astype("float32")
result = {}
for method, base in [(m, b) for m in json.loads(sys.argv[2]) for b in (None, "nf4")]:
    tag = method + "_" + str(base)
    inp = keras.Input((4, 5))
    h = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(4, 2, 3), bias_axes="nh", name="target")(inp)
    h = keras.layers.Reshape((4, 6))(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="mix")(h))
    weights = [keras.ops.convert_to_numpy(w) for w in model.weights]
    extra = dict(kl.registry.get(method).example_options)
    if kl.registry.get(method).calibration == "inputs":  # EVA, CorDA: sample inputs
        extra.update(data=x, **({"rho": 1.0} if method == "eva" else {}))
    elif kl.registry.get(method).calibration == "gradients":  # LoRA-GA: a loss and targets
        model.compile(loss="mse")
        extra["data"] = (x, np.ones((2, 4, 3), "float32"))
    kl.enable_adapter(model, method=method, **extra, rank=2, targets=["target", "mix"], base=base)
    rng = np.random.RandomState(1)
    for _, a in kl.adapters(model):
        for v in list(a.trainable_variables) + a.linked_variables():
            val = rng.normal(scale=0.3, size=tuple(v.shape)).astype("float32")
            v.assign(np.abs(val) + 0.5 if v.name == "magnitude" else val)
    y = keras.ops.convert_to_numpy(model(x))
    model.save(os.path.join(out, tag + ".keras"))
    kl.save_adapter(model, os.path.join(out, tag + ".safetensors"))
    np.savez(os.path.join(out, tag + ".npz"), y=y, *weights)
print(json.dumps({"backend": keras.backend.backend()}))
"""


#: each backend loads the files of the next one: every backend writes and
#: every backend reads, in three child processes rather than six
CROSS_SOURCE = {"jax": "torch", "torch": "tensorflow", "tensorflow": "jax"}


@pytest.mark.parametrize("source", [CROSS_SOURCE[BACKEND]])
def test_cross_backend(source, tmp_path):
    env = dict(os.environ, KERAS_BACKEND=source)
    proc = subprocess.run(
        [sys.executable, "-c", CROSS_SCRIPT, str(tmp_path), json.dumps(FAMILIES)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["backend"] == source
    x = np.random.RandomState(0).normal(size=(2, 4, 5)).astype("float32")
    for tag in [f"{m}_{b}" for m in FAMILIES for b in (None, "nf4")]:
        saved = np.load(tmp_path / f"{tag}.npz")
        loaded = keras.saving.load_model(str(tmp_path / f"{tag}.keras"))
        np.testing.assert_allclose(to_np(loaded(x)), saved["y"], rtol=1e-5, atol=1e-5)
        # adapter-only file onto a fresh base with the saved base weights
        inp = keras.Input((4, 5))
        h = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(4, 2, 3), bias_axes="nh", name="target")(inp)
        h = keras.layers.Reshape((4, 6))(h)
        fresh = keras.Model(inp, keras.layers.Dense(3, name="mix")(h))
        for i, w in enumerate(fresh.weights):
            w.assign(saved[f"arr_{i}"])
        kl.load_adapter(fresh, tmp_path / f"{tag}.safetensors")
        np.testing.assert_allclose(to_np(fresh(x)), saved["y"], rtol=1e-5, atol=1e-5)


# 12. Bad input --------------------------------------------------------------
def _bad_model():
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(10, 6, name="emb")(inp)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Dense(5, name="ffn")(h)
    h = keras.layers.EinsumDense("btd,dk->btk", output_shape=(4, 3), name="proj")(h)
    return keras.Model(inp, keras.layers.Dense(2, name="logits")(h))


BAD_CALLS = [
    ("rank0", dict(rank=0), ValueError, "rank"),
    ("rank_negative", dict(rank=-2), ValueError, "rank=-2"),
    ("rank_float", dict(rank=2.0), ValueError, "rank=2.0"),
    ("rank_str", dict(rank="4"), ValueError, "rank='4'"),
    ("unknown_option", dict(rank=2, colour="red"), ValueError, "colour"),
    ("bad_dropout", dict(rank=2, dropout=1.5), ValueError, "dropout"),
    ("targets_nothing", dict(rank=2, targets=["nope"]), ValueError, "Layer paths that exist"),
    ("targets_glob_nothing", dict(rank=2, targets=["*/nothing*"]), ValueError, "nothing"),
    ("exclude_nothing", dict(rank=2, exclude=["nope"]), ValueError, "nope"),
    ("unsupported_layer", dict(rank=2, targets=["norm"]), TypeError, "norm"),
    ("rank_per_layer", dict(rank=2, rank_pattern={"proj": 0}), ValueError, "proj"),
]


@pytest.mark.parametrize("method", METHODS)
def test_bad_input_leaves_model_unchanged(method):
    """Each bad call of BAD_CALLS, on one model: a clear error that names the
    value at fault, and the model as it was."""
    model = _bad_model()
    before = snapshot(model)
    for case, kwargs, exc, needle in BAD_CALLS:
        with pytest.raises(exc, match=needle.replace("*", r"\*")):
            kl.enable_adapter(model, method=method, **needs(method, model), **kwargs)
        assert_unchanged(model, before)


def test_unknown_method_leaves_model_unchanged():
    model = _bad_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="Unknown adapter method 'loraa'"):
        kl.enable_adapter(model, method="loraa", rank=2)
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_rank_larger_than_layer_allows(method):
    spec = registry.get(method)
    model = _bad_model()
    before = snapshot(model)
    if spec.rank_bounded:
        # proj is a 5x3 matrix: rank <= 3; the error names the layer and rank
        with pytest.raises(ValueError, match=r"rank=4 .*'proj'"):
            kl.enable_adapter(model, method=method, **needs(method, model), rank=4)
        assert_unchanged(model, before)
    else:
        kl.enable_adapter(model, method=method, **needs(method, model), rank=4)
        assert model.get_layer("proj").rank == 4


@pytest.mark.parametrize("method", METHODS)
def test_second_adapter_on_same_layer(method):
    model = _bad_model()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["ffn"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="'ffn' already has"):
        kl.enable_adapter(model, method="lora", rank=2, targets=["ffn", "proj"])
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_file_for_another_model_or_method(method, tmp_path):
    model = _bad_model()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2)
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)
    # another model: different layer paths
    other = SMALL["dense"][0]()
    before = snapshot(other)
    with pytest.raises(ValueError, match="different model"):
        kl.load_adapter(other, f)
    assert_unchanged(other, before)
    # same paths, other shapes
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(10, 6, name="emb")(inp)
    h = keras.layers.Dense(7, name="ffn")(h)
    h = keras.layers.EinsumDense("btd,dk->btk", output_shape=(4, 3), name="proj")(h)
    wrong = keras.Model(inp, keras.layers.Dense(2, name="logits")(h))
    before = snapshot(wrong)
    with pytest.raises(ValueError, match=r"'ffn' has a kernel of shape \(6, 7\)"):
        kl.load_adapter(wrong, f)
    assert_unchanged(wrong, before)
    # same model, other method already in place
    other_method = next(m for m in METHODS if m != method)
    fresh = _bad_model()
    kl.enable_adapter(fresh, method=other_method, **needs(other_method, fresh), rank=2)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=f"holds a '{method}' adapter"):
        kl.load_adapter(fresh, f)
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("method", METHODS)
def test_merge_producing_nan_is_refused(method):
    model = _bad_model()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2)
    a = model.get_layer("ffn")
    bad = np.full(tuple(tunable(a)[0].shape), np.inf, "float32")
    tunable(a)[0].assign(bad)
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="'ffn'"):
        kl.merge(model)
    assert_unchanged(model, before)
    with pytest.raises(FloatingPointError, match="'ffn'"):
        kl.merge(model, unload=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["bert_classifier", "llama", "gpt2"])
def test_keras_roundtrip_more_hub_models(kind, tmp_path):
    import keras_hub

    import conftest

    if kind == "bert_classifier":
        model = keras_hub.models.BertTextClassifier(
            backbone=conftest.bert_backbone(), num_classes=2, preprocessor=None
        )
        x = token_inputs(10, segment=True)
        targets = ["all-linear", "logits"]  # the top-level functional head too
    else:
        model = getattr(conftest, f"{kind}_backbone")()
        x = token_inputs(10)
        targets = None
    kl.enable_adapter(model, method="lora", rank=2, targets=targets)
    for _, a in kl.adapters(model):
        perturb(a, scale=0.2)
    y = to_np(model(x))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-5)
    assert [p for p, _ in kl.adapters(loaded)] == [p for p, _ in kl.adapters(model)]
    _train_one_step_changes_adapters(loaded, x)
