"""Method-specific checks from the spec, beyond the shared contract."""

import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_lowrank as kl

from conftest import BACKEND
from conftest import SMALL
from conftest import gemma_backbone
from conftest import perturb
from conftest import to_np
from conftest import token_inputs


def _dense(units=6, n_in=5, seed=0):
    inp = keras.Input((n_in,))
    return keras.Model(inp, keras.layers.Dense(units, name="target")(inp))


def test_rslora_scaling():
    model = _dense(units=32, n_in=32)
    kl.enable_adapter(model, rank=16, alpha=16, rslora=True, targets=["target"])
    assert model.get_layer("target").scaling == 4.0
    model = _dense(units=32, n_in=32)
    kl.enable_adapter(model, rank=16, alpha=16, targets=["target"])
    assert model.get_layer("target").scaling == 1.0


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_lora_init_distributions(init):
    model = _dense(units=64, n_in=400)
    kl.enable_adapter(model, rank=16, init=init, targets=["target"])
    a = to_np(model.get_layer("target").lora_a)
    assert np.all(to_np(model.get_layer("target").lora_b) == 0)
    if init == "kaiming":
        bound = 1 / math.sqrt(400)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    else:
        assert abs(a.std() - 1 / 16) < 0.1 / 16


def test_lora_matches_keras_builtin_lora():
    x = SMALL["dense"][1]
    ours = _dense()
    theirs = _dense()
    theirs.set_weights(ours.get_weights())
    kl.enable_adapter(ours, rank=2, alpha=6, targets=["target"])
    theirs.get_layer("target").enable_lora(2, lora_alpha=6)
    a = ours.get_layer("target")
    perturb(a)
    layer = theirs.get_layer("target")
    layer.lora_kernel_a.assign(to_np(a.lora_a).T)
    layer.lora_kernel_b.assign(a.lora_b)
    np.testing.assert_allclose(to_np(ours(x)), to_np(theirs(x)), rtol=1e-5, atol=1e-6)


def test_dropout_only_in_training():
    model = _dense(units=8, n_in=16)
    kl.enable_adapter(model, rank=4, dropout=0.5, targets=["target"])
    a = model.get_layer("target")
    perturb(a)
    x = np.ones((4, 16), "float32")
    np.testing.assert_array_equal(to_np(model(x)), to_np(model(x)))
    assert not np.allclose(to_np(model(x, training=True)), to_np(model(x)))


def test_dora_norm_equals_magnitude_after_merge():
    model = _dense()
    kl.enable_adapter(model, method="dora", rank=2, targets=["target"])
    a = model.get_layer("target")
    perturb(a)
    m = to_np(a.magnitude)
    kl.merge(model)
    k = to_np(model.get_layer("target").kernel)
    np.testing.assert_allclose(np.sqrt((k**2).sum(0)), m, rtol=1e-5)


def test_dora_norm_is_detached():
    """The gradient w.r.t. A, B flows through the numerator only (§4.3)."""
    x = SMALL["dense"][1]
    model = _dense()
    kl.enable_adapter(model, method="dora", rank=2, targets=["target"])
    a = model.get_layer("target")
    perturb(a)
    k = to_np(a.layer.kernel).astype("float64")
    A, B, m = (to_np(v).astype("float64") for v in (a.lora_a, a.lora_b, a.magnitude))
    A = A.T
    s = a.scaling
    # loss = sum(y); y = x (m/n ⊙ (K + sAB)) + b with n constant:
    # dL/dB = s Aᵀ xᵀ 1 ⊙ (m/n) broadcast on columns.
    v = k + s * A @ B
    n = np.sqrt((v**2).sum(0))
    g_b_detached = s * (A.T @ x.sum(0, keepdims=True).T.astype("float64")) * (m / n)[None, :]
    got = _grad_of_sum(model, x, a.lora_b)
    np.testing.assert_allclose(got, g_b_detached, rtol=1e-4, atol=1e-6)


def _grad_of_sum(model, x, var):
    if BACKEND == "jax":
        import jax

        def f(value):
            with keras.StatelessScope(state_mapping=[(var, value)]):
                return keras.ops.sum(model(x))

        return to_np(jax.grad(f)(var.value))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x))
        return to_np(tape.gradient(loss, var.value))
    import torch

    loss = model(x).sum()
    return to_np(torch.autograd.grad(loss, var.value)[0])


def _decaying_matrix_model(n_in=24, n_out=20):
    rng = np.random.RandomState(0)
    u, _ = np.linalg.qr(rng.normal(size=(n_in, n_in)))
    v, _ = np.linalg.qr(rng.normal(size=(n_out, n_out)))
    s = 2.0 ** -np.arange(min(n_in, n_out))
    k = (u[:, : len(s)] * s) @ v[:, : len(s)].T
    model = _dense(units=n_out, n_in=n_in)
    model.get_layer("target").kernel.assign(k.astype("float32"))
    return model, k, s


@pytest.mark.parametrize("svd_niter", [None, 4])
def test_pissa_takes_the_principal_components(svd_niter):
    model, k, s = _decaying_matrix_model()
    x = np.random.RandomState(1).normal(size=(3, 24)).astype("float32")
    y0 = to_np(model(x))
    kl.enable_adapter(model, method="pissa", rank=3, alpha=6, targets=["target"], svd_niter=svd_niter)
    a = model.get_layer("target")
    np.testing.assert_allclose(to_np(model(x)), y0, atol=1e-5)
    ab = a.scaling * to_np(a.lora_a).astype("float64").T @ to_np(a.lora_b).astype("float64")
    np.testing.assert_allclose(np.linalg.svd(ab, compute_uv=False)[:3], s[:3], rtol=1e-4)
    residual = to_np(a.layer.kernel)
    np.testing.assert_allclose(np.linalg.svd(residual, compute_uv=False)[0], s[3], rtol=1e-3)


def test_pissa_rejects_bad_svd_niter():
    with pytest.raises(ValueError, match="svd_niter"):
        kl.enable_adapter(_dense(), method="pissa", rank=2, svd_niter=-1)


def test_merged_model_loads_without_keras_lowrank(tmp_path):
    import keras_hub

    lm = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    x = token_inputs(20)
    kl.enable_adapter(lm, method="dora", rank=2)
    for _, a in kl.adapters(lm):
        perturb(a, scale=0.1)
    y = to_np(lm(x))
    kl.merge(lm)
    assert type(lm) is keras_hub.models.GemmaCausalLM
    path = str(tmp_path / "merged.keras")
    lm.save(path)
    np.save(tmp_path / "x.npy", x["token_ids"])
    np.save(tmp_path / "y.npy", y)
    script = f"""
import sys, numpy as np, keras, keras_hub
m = keras.saving.load_model({path!r})
assert "keras_lowrank" not in sys.modules
t = np.load({str(tmp_path / 'x.npy')!r})
y = keras.ops.convert_to_numpy(m({{"token_ids": t, "padding_mask": np.ones_like(t)}}))
print(float(np.abs(y - np.load({str(tmp_path / 'y.npy')!r})).max()))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-4
