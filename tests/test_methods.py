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
    # a randomized SVD without oversampling (PEFT's svd_lowrank(q=r)) is
    # close to, not exactly, the top subspace
    rtol = 1e-4 if svd_niter is None else 1e-3
    np.testing.assert_allclose(np.linalg.svd(ab, compute_uv=False)[:3], s[:3], rtol=rtol)
    residual = to_np(a.layer.kernel)
    np.testing.assert_allclose(np.linalg.svd(residual, compute_uv=False)[0], s[3], rtol=1e-3)


def test_pissa_rejects_bad_svd_niter():
    with pytest.raises(ValueError, match="svd_niter"):
        kl.enable_adapter(_dense(), method="pissa", rank=2, svd_niter=-1)


@pytest.mark.one_backend
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


# --- DyLoRA (spec §4) --------------------------------------------------------
def _dylora_model(rank=4, **options):
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, name="a")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="b")(h))
    kl.enable_adapter(model, method="dylora", rank=rank, targets=["a", "b"], **options)
    return model


def test_dylora_at_full_rank_unfrozen_is_lora():
    """spec §4: for ℓ = r_max and frozen=False, DyLoRA ≡ LoRA with α/r_max."""
    x = SMALL["dense"][1]
    dy = _dylora_model(rank=3, alpha=6.0, frozen=False)
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, name="a")(inp)
    lora = keras.Model(inp, keras.layers.Dense(3, name="b")(h))
    for name in ("a", "b"):
        lora.get_layer(name).set_weights([to_np(w) for w in dy.get_layer(name).layer.weights])
    kl.enable_adapter(lora, method="lora", rank=3, alpha=6.0, targets=["a", "b"])
    for name in ("a", "b"):
        perturb(dy.get_layer(name), seed=1)
        for v in ("lora_a", "lora_b"):
            getattr(lora.get_layer(name), v).assign(getattr(dy.get_layer(name), v))
    np.testing.assert_allclose(to_np(dy(x)), to_np(lora(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(dy(x, training=True)), to_np(lora(x)), rtol=1e-5, atol=1e-6)


def test_dylora_any_rank_for_inference_merge_and_export(tmp_path):
    x = SMALL["dense"][1]
    model = _dylora_model(rank=4, alpha=8.0)
    a_layer = model.get_layer("a")
    for name in ("a", "b"):
        perturb(model.get_layer(name), seed=2)
    outputs = {}
    for ell in (1, 2, 4):
        kl.dylora.set_rank(model, ell)
        assert kl.dylora.get_rank(model) == ell and a_layer.eval_rank() == ell
        y = to_np(model(x))
        # NumPy: K + (α/ℓ) A[:, :ℓ] B[:ℓ] in both layers
        h = x.astype("float64")
        for name in ("a", "b"):
            lyr = model.get_layer(name)
            k = to_np(lyr.layer.kernel).astype("float64")
            a = to_np(lyr.lora_a).astype("float64").T[:, :ell]
            b = to_np(lyr.lora_b).astype("float64")[:ell]
            h = h @ (k + (8.0 / ell) * a @ b) + to_np(lyr.layer.bias)
        np.testing.assert_allclose(y, h, rtol=1e-5, atol=1e-5)
        outputs[ell] = y
    # merge at a rank, and the rank-ℓ LoRA export, reproduce that rank
    kl.dylora.set_rank(model, 2)
    f = tmp_path / "as_lora.safetensors"
    kl.save_adapter(model, f, as_lora=True)
    with pytest.raises(ValueError, match="set_rank"):
        kl.dylora.set_rank(model, 9)
    kl.merge(model, unload=False)
    with pytest.raises(ValueError, match="merged"):
        kl.dylora.set_rank(model, 3)
    np.testing.assert_allclose(to_np(model(x)), outputs[2], rtol=1e-5, atol=1e-5)
    kl.unmerge(model)
    plain = _dylora_model(rank=4)
    for name in ("a", "b"):
        plain.get_layer(name).layer.kernel.assign(model.get_layer(name).layer.kernel)
        plain.get_layer(name).layer.bias.assign(model.get_layer(name).layer.bias)
    kl.merge(plain)
    kl.load_adapter(plain, f)
    assert {a.method for _, a in kl.adapters(plain)} == {"lora"}
    assert {a.rank for _, a in kl.adapters(plain)} == {2}
    np.testing.assert_allclose(to_np(plain(x)), outputs[2], rtol=1e-5, atol=1e-5)


def test_dylora_frozen_gradient_reaches_only_the_current_component():
    """spec §4: with frozen=True, the gradient w.r.t. A[:, :ℓ-1] is zero."""
    model = _dylora_model(rank=4)
    a = model.get_layer("a")
    perturb(a, seed=3)
    perturb(model.get_layer("b"), seed=4)
    state = kl.shared.get(model, "dylora")
    state.train_rank.assign(3)
    x = SMALL["dense"][1]

    def train_grads():
        variables = [a.lora_a, a.lora_b]
        if BACKEND == "jax":
            import jax

            def loss_fn(values):
                with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                    out = a.call(x, training=True)
                return keras.ops.sum(out**2)

            return [to_np(g) for g in jax.grad(loss_fn)([v.value for v in variables])]
        if BACKEND == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(a.call(x, training=True) ** 2)
            return [to_np(g) for g in tape.gradient(loss, [v.value for v in variables])]
        import torch

        out = a.call(x, training=True)
        return [to_np(g) for g in torch.autograd.grad((out**2).sum(), [v.value for v in variables])]

    ga, gb = train_grads()
    assert np.abs(ga[:2]).max() == 0 and np.abs(gb[:2]).max() == 0
    assert np.abs(ga[2]).max() > 0 and np.abs(gb[2]).max() > 0
    assert np.abs(ga[3:]).max() == 0 and np.abs(gb[3:]).max() == 0


def test_dylora_evaluate_ranks():
    model = _dylora_model(rank=3)
    for name in ("a", "b"):
        perturb(model.get_layer(name), seed=5)
    model.compile(loss="mse")
    x = SMALL["dense"][1]
    y = np.zeros((3, 3), "float32")
    kl.dylora.set_rank(model, 2)
    res = kl.dylora.evaluate_ranks(model, x, y, verbose=0)
    assert sorted(res) == [1, 2, 3] and kl.dylora.get_rank(model) == 2
    for ell, metrics in res.items():
        kl.dylora.set_rank(model, ell)
        np.testing.assert_allclose(metrics["loss"], float(np.mean(to_np(model(x)) ** 2)), rtol=1e-4)


# --- VeRA (spec §9) ----------------------------------------------------------
def _vera_model(**options):
    inp = keras.Input((5,))
    h = keras.layers.Dense(7, activation="tanh", name="a")(inp)
    h = keras.layers.EinsumDense("bd,dk->bk", output_shape=(4,), bias_axes="k", name="b")(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(h))
    kl.enable_adapter(model, method="vera", rank=4, targets=["a", "b"], **options)
    return model


def _projection_vars(model):
    return [v for v in model.weights if v.path.split("/")[-1] in ("vera_a", "vera_b")]


def test_vera_projections_exist_once_and_stay_tied(tmp_path):
    x = SMALL["dense"][1]
    model = _vera_model(projection_seed=3)
    a, b = model.get_layer("a"), model.get_layer("b")
    assert a.shared_state() is b.shared_state()
    assert sorted(v.path.split("/")[-1] for v in _projection_vars(model)) == ["vera_a", "vera_b"]
    assert tuple(a.shared_state().vera_a.shape) == (7, 4) and tuple(a.shared_state().vera_b.shape) == (4, 7)
    want_a, want_b = kl.vera.projections(4, 7, 7, 3)  # NumPy: the same on every backend
    np.testing.assert_array_equal(to_np(a.shared_state().vera_a), want_a)
    np.testing.assert_array_equal(to_np(a.shared_state().vera_b), want_b)
    assert np.abs(want_a).max() <= np.sqrt(6 / 7) and np.abs(want_b).max() <= np.sqrt(6 / 4)
    for name in ("a", "b"):
        perturb(model.get_layer(name), seed=6)
    y = to_np(model(x))
    # A change made through one layer is seen by every layer that shares it.
    def check_tied(m):
        sa, sb = m.get_layer("a"), m.get_layer("b")
        assert sa.shared_state() is sb.shared_state() and len(_projection_vars(m)) == 2
        old = to_np(sa.shared_state().vera_b).copy()
        y0 = to_np(sb(np.ones((2, 7), "float32")))
        sa.shared_state().vera_b.assign(old * 2)
        assert not np.allclose(to_np(sb(np.ones((2, 7), "float32"))), y0)
        sa.shared_state().vera_b.assign(old)

    check_tied(model)
    # optimizer: one slot set per trainable variable, none for the projections
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, np.zeros((3, 3), "float32"), epochs=1, verbose=0)
    n_train = len(model.trainable_variables)
    assert n_train == 4 and len([v for v in model.optimizer.variables if len(v.shape)]) == 2 * n_train
    y = to_np(model(x))
    # .keras round trip
    path = str(tmp_path / "v.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-6)
    check_tied(loaded)
    # merge(unload=False), disable, unmerge keep the tie; merge drops the state
    kl.merge(model, unload=False)
    kl.unmerge(model)
    with kl.disable_adapter(model):
        pass
    check_tied(model)
    np.testing.assert_allclose(to_np(model(x)), y, rtol=1e-5, atol=1e-5)
    # adapter files hold the projections once (or not at all)
    for save in (True, False):
        m = _vera_model(projection_seed=3, save_projection=save)
        for name in ("a", "b"):
            for v in model.get_layer(name).trainable_variables:
                getattr(m.get_layer(name), v.path.split("/")[-1]).assign(v)
        f = tmp_path / f"v{save}.safetensors"
        kl.save_adapter(m, f)
        _, plan, tensors = kl.saving.read_adapter_file(f)
        shared_keys = sorted(k for k in tensors if k.startswith("@"))
        assert shared_keys == (["@vera::vera_a", "@vera::vera_b"] if save else [])
        inp = keras.Input((5,))
        h = keras.layers.Dense(7, activation="tanh", name="a")(inp)
        h = keras.layers.EinsumDense("bd,dk->bk", output_shape=(4,), bias_axes="k", name="b")(h)
        target = keras.Model(inp, keras.layers.Dense(3, name="out")(h))
        for name in ("a", "b", "out"):
            src = model.get_layer(name)
            inner = src.layer if hasattr(src, "layer") else src
            target.get_layer(name).set_weights([to_np(w) for w in inner.weights])
        kl.load_adapter(target, f)
        check_tied(target)
        np.testing.assert_allclose(to_np(target(x)), y, rtol=1e-5, atol=1e-5)
    kl.merge(model)
    assert kl.shared.states(model) == {} and not _projection_vars(model)


def test_vera_layers_must_share_rank_and_seed():
    inp = keras.Input((5,))
    h = keras.layers.Dense(7, name="a")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(keras.layers.Dense(4, name="b")(h)))
    with pytest.raises(ValueError, match="one rank"):
        kl.enable_adapter(model, method="vera", rank=4, targets=["a", "b"], rank_pattern={"b": 2})
    kl.enable_adapter(model, method="vera", rank=4, targets=["b"])
    with pytest.raises(ValueError, match="projection"):
        kl.enable_adapter(model, method="vera", rank=4, targets=["a"], projection_seed=9)
    assert type(model.get_layer("a")).__name__ == "Dense"


# --- OLoRA (spec §20) --------------------------------------------------------
def test_olora_init_is_the_qr_of_the_transposed_kernel():
    model = _dense(units=6, n_in=5)
    k = to_np(model.get_layer("target").kernel).astype("float64")
    x = SMALL["dense"][1]
    y0 = to_np(model(x))
    kl.enable_adapter(model, method="olora", rank=2, alpha=4.0, targets=["target"])
    a = model.get_layer("target")
    q, r = np.linalg.qr(k.T)
    np.testing.assert_allclose(to_np(a.lora_a), r[:2], rtol=1e-4, atol=1e-5)  # Aᵀ = R_r
    np.testing.assert_allclose(to_np(a.lora_b), q[:, :2].T, rtol=1e-4, atol=1e-5)  # B = Q_rᵀ
    s = 4.0 / 2
    np.testing.assert_allclose(to_np(a.layer.kernel), k - s * r[:2].T @ q[:, :2].T, atol=1e-5)
    np.testing.assert_allclose(to_np(model(x)), y0, atol=1e-5)
    with kl.disable_adapter(model):
        np.testing.assert_allclose(to_np(model(x)), y0, atol=1e-5)
