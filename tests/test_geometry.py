"""The matrix view of EinsumDense kernels, for every equation form Keras
accepts, and the adapter applied to activations in that view."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import bases
from keras_lowrank.geometry import EquationError
from keras_lowrank.geometry import KernelGeometry

from conftest import np_matricize
from conftest import perturb
from conftest import needs
from conftest import to_np

# (equation, input shape incl. batch, output_shape arg, bias_axes, n_in, n_out)
CASES = [
    ("ab,cb->ac", (2, 5), (3,), "c", 5, 3),  # contracted axis last in the kernel
    ("btd,ndh->btnh", (2, 4, 5), (4, 2, 3), "nh", 5, 6),  # Gemma query
    ("btnh,nhd->btd", (2, 4, 2, 3), (4, 6), "d", 6, 6),  # Gemma attention_output
    ("abc,cde->abde", (2, 4, 6), (4, 2, 3), "de", 6, 6),  # keras MHA query
    ("bqm,muh->bquh", (2, 4, 8), (4, 4, 2), None, 8, 8),  # Llama query
    ("...d,dnh->...nh", (2, 3, 6), (2, 3), "nh", 6, 6),  # leading ellipsis
    ("ab...,bc->ac...", (2, 5, 3), (4, 3), None, 5, 4),  # trailing ellipsis
]


def _layer(eq, in_shape, out_shape, bias_axes):
    layer = keras.layers.EinsumDense(eq, output_shape=out_shape, bias_axes=bias_axes, name="target")
    layer.build(in_shape)
    return layer


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matrix_view_and_roundtrip(case):
    eq, in_shape, out_shape, bias_axes, n_in, n_out = case
    layer = _layer(eq, in_shape, out_shape, bias_axes)
    g = bases.geometry_of(layer)
    assert (g.n_in, g.n_out, g.batch_shape) == (n_in, n_out, ())
    kernel = to_np(layer.kernel)
    w = to_np(g.kernel_to_matrix(keras.ops.convert_to_tensor(kernel)))
    ref, back = np_matricize(eq, kernel)
    np.testing.assert_array_equal(w, ref)
    np.testing.assert_array_equal(to_np(g.matrix_to_kernel(w)), kernel)
    np.testing.assert_array_equal(back(ref), kernel)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("method", ["lora", "dora", "pissa"])
def test_adapter_on_every_equation_form(case, method):
    eq, in_shape, out_shape, bias_axes, n_in, n_out = case
    inp = keras.Input(in_shape[1:])
    model = keras.Model(inp, _layer(eq, in_shape, out_shape, bias_axes)(inp))
    x = np.random.RandomState(0).normal(size=in_shape).astype("float32")
    y0 = to_np(model(x))
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["target"])
    np.testing.assert_allclose(to_np(model(x)), y0, atol=1e-5)
    a = model.get_layer("target")
    perturb(a)
    y = to_np(model(x))
    from conftest import REFERENCE_MERGED, np_layer_output

    np.testing.assert_allclose(y, np_layer_output(a, x, REFERENCE_MERGED[method]), rtol=1e-4, atol=1e-5)
    kl.merge(model)
    np.testing.assert_allclose(to_np(model(x)), y, rtol=1e-5, atol=1e-5)


def test_rank_is_on_the_full_matrix_as_in_peft():
    # Gemma query: kernel (heads=4, d_model=16, head_dim=4); PEFT's q_proj LoRA
    # has d_model*r + r*heads*head_dim parameters, Keras's last-axis split
    # has heads*d_model*r + r*head_dim.
    layer = _layer("btd,ndh->btnh", (2, 3, 16), (3, 4, 4), None)
    inp = keras.Input((3, 16))
    model = keras.Model(inp, layer(inp))
    kl.enable_adapter(model, method="lora", rank=2, targets=["target"])
    a = model.get_layer("target")
    assert tuple(a.lora_a.shape) == (2, 16)  # Aᵀ: A is (d_model, r)
    assert tuple(a.lora_b.shape) == (2, 16)
    assert a.trainable_count() == 16 * 2 + 2 * 16
    perturb(a)
    delta = to_np(a.delta_matrix())
    assert np.linalg.matrix_rank(delta) == 2


def test_shared_axes_become_a_batch_of_matrices():
    # "bnd,ndk->bnk": one (d x k) matrix per n (a per-head kernel).
    eq, in_shape = "bnd,ndk->bnk", (2, 3, 5)
    layer = _layer(eq, in_shape, (3, 4), "nk")
    g = bases.geometry_of(layer)
    assert g.batch_shape == (3,) and (g.n_in, g.n_out) == (5, 4)
    inp = keras.Input(in_shape[1:])
    model = keras.Model(inp, layer(inp))
    x = np.random.RandomState(0).normal(size=in_shape).astype("float32")
    y0 = to_np(model(x))
    for method in ("lora", "dora", "pissa"):
        m = keras.models.clone_model(model)
        m.set_weights(model.get_weights())
        kl.enable_adapter(m, method=method, **needs(method, m), rank=2, targets=["target"])
        np.testing.assert_allclose(to_np(m(x)), y0, atol=1e-5)
        a = m.get_layer("target")
        perturb(a)
        y = to_np(m(x))
        kernel = to_np(a.layer.kernel).astype("float64")
        ref = np.zeros_like(y, dtype="float64")
        for n in range(3):
            w = kernel[n] + a.scaling * to_np(a.lora_a)[n].T @ to_np(a.lora_b)[n]
            if method == "dora":
                w = to_np(a.magnitude)[n] * w / np.sqrt((w**2).sum(0))
            ref[:, n, :] = x[:, n, :] @ w + to_np(a.layer.bias)[n]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
        kl.merge(m)
        np.testing.assert_allclose(to_np(m(x)), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "eq,shape,msg",
    [
        ("ab,bc", (2, 3), "input,kernel->output"),
        ("ab,b...->a", (3,), "ellipsis"),
        ("ab,bz->a", (3, 4), "neither"),
        ("ab,bc->c", (3, 4), "summed without the kernel"),
    ],
)
def test_unsupported_equations_are_clear_errors(eq, shape, msg):
    with pytest.raises(EquationError, match=msg):
        KernelGeometry(eq, shape)
