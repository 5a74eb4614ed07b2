"""LoftQ (`method="loftq"`): PEFT's `loftq_init` on the same kernel, the
error it removes, the int8/int4 bases, files, and refusals."""

import inspect

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import bases
from keras_lowrank.methods import loftq
from keras_lowrank.quant.layers import NF4Linear
from keras_lowrank.quant.nf4 import NF4_TABLE

from conftest import perturb
from conftest import to_np

N_IN, N_OUT = 128, 6  # two NF4 blocks of 64 inputs per output unit


def _kernel(seed=0):
    rng = np.random.RandomState(seed)
    low = rng.normal(size=(N_IN, 3)) @ rng.normal(size=(3, N_OUT))
    return (0.3 * low + rng.standard_t(3, size=(N_IN, N_OUT))).astype("float32")


def _model(kernel):
    inp = keras.Input((N_IN,))
    h = keras.layers.Dense(N_OUT, name="target")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
    model.get_layer("target").kernel.assign(kernel)
    return model


def _peft_loftq(weight, rank, iters):
    """PEFT's `loftq_init` (4-bit: bitsandbytes' NF4, blocks of 64, no
    double quantization) on a torch `(out, in)` weight. PEFT moves the
    weight to a GPU first; the function is run as it is written with the
    CPU as its device (bitsandbytes quantizes on the CPU here)."""
    import torch
    from peft.utils import loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init).replace('"cuda"', '"cpu"')
    namespace = dict(vars(loftq_utils))
    exec(source, namespace)
    q, lora_a, lora_b = namespace["loftq_init"](
        torch.tensor(weight), num_bits=4, reduced_rank=rank, num_iter=iters
    )
    return q.numpy(), lora_a.numpy(), lora_b.numpy()


def _nf4_codes(q):
    """The NF4 index of each value of a dequantized matrix view (blocks of
    64 of the torch-layout weight; each block's absmax is its largest value)."""
    blocks = q.T.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    scaled = blocks / np.where(absmax > 0, absmax, 1)
    return np.abs(scaled[..., None] - NF4_TABLE).argmin(axis=-1)


def _factors(adapter):
    return to_np(adapter.lora_a).T, to_np(adapter.lora_b)  # A (n_in, r), B (r, n_out)


def _same_up_to_sign(a, b, ref_a, ref_b):
    """Factors of an SVD agree up to the sign of each component."""
    sign = np.sign(np.sum(a * ref_a, axis=0))
    np.testing.assert_allclose(a * sign, ref_a, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b * sign[:, None], ref_b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_nf4_base_and_factors_equal_peft_loftq_init(iters):
    kernel = _kernel()
    q_peft, a_peft, b_peft = _peft_loftq(kernel.T.copy(), rank=2, iters=iters)
    model = _model(kernel)
    kl.enable_adapter(model, method="loftq", rank=2, targets=["target"], base="nf4",
                      double_quant=False, loftq_iter=iters)
    a = model.get_layer("target")
    q = to_np(bases.read_kernel(a.layer))
    # the same NF4 codes, block for block (torch layout: 64 inputs of one
    # unit); after one round the same input, so the same values to the bit;
    # later rounds quantize W - s A B, whose float32 rounding (ours: float64,
    # rounded once; PEFT's: a float32 matmul) may move a block's absmax by
    # an ulp
    np.testing.assert_array_equal(_nf4_codes(q), _nf4_codes(q_peft.T))
    if iters == 1:
        np.testing.assert_array_equal(q, q_peft.T)
    else:
        np.testing.assert_allclose(q, q_peft.T, rtol=1e-6, atol=0)
    got_a, got_b = _factors(a)
    _same_up_to_sign(got_a, got_b, a_peft.T, b_peft.T)
    # the base's codes are the last round's: no requantization of W - A B
    if iters > 1:
        requantized = loftq.nf4_roundtrip(loftq.shifted_kernel(kernel, got_a, got_b, 1.0))
        assert np.any(requantized != q)


def test_float_base_takes_peft_factors_and_keeps_the_exact_residual():
    kernel = _kernel(1)
    _, a_peft, b_peft = _peft_loftq(kernel.T.copy(), rank=2, iters=2)
    model = _model(kernel)
    x = np.random.RandomState(2).normal(size=(3, N_IN)).astype("float32")
    y0 = to_np(model(x))
    kl.enable_adapter(model, method="loftq", rank=2, targets=["target"], loftq_iter=2)
    a = model.get_layer("target")
    got_a, got_b = _factors(a)
    _same_up_to_sign(got_a, got_b, a_peft.T, b_peft.T)
    np.testing.assert_allclose(to_np(a.layer.kernel), kernel - got_a @ got_b, atol=1e-6)
    np.testing.assert_allclose(to_np(model(x)), y0, atol=1e-4)


def _init_error(kernel, method, base, **options):
    model = _model(kernel)
    kl.enable_adapter(model, method=method, rank=4, targets=["target"], base=base, **options)
    a = model.get_layer("target")
    approx = to_np(bases.read_kernel(a.layer)) + to_np(a.delta_matrix())
    return np.linalg.norm(kernel - approx) / np.linalg.norm(kernel)


@pytest.mark.parametrize("base", ["nf4", "int8", "int4"])
def test_loftq_lowers_the_init_error_of_each_base(base):
    kernel = _kernel(3)
    plain = _init_error(kernel, "lora", base)  # B = 0: the base's own error
    one = _init_error(kernel, "loftq", base)
    five = _init_error(kernel, "loftq", base, loftq_iter=5)
    assert one < 0.95 * plain
    assert five <= one * 1.001


@pytest.mark.parametrize("base", ["int8", "int4"])
def test_keras_base_holds_the_last_rounds_codes(base):
    """The base is Keras's own quantization of the last round's input
    (`W - s A_res B_res`), which a float layer quantized by Keras gives
    again."""
    kernel = _kernel(4)
    model = _model(kernel)
    kl.enable_adapter(model, method="loftq", rank=2, targets=["target"], base=base, loftq_iter=2, alpha=4)
    a = model.get_layer("target")
    a_res, b_res = to_np(a.lora_a_res).T, to_np(a.lora_b_res)
    assert np.abs(a_res).max() > 0  # two rounds: the residual was shifted
    again = _model(loftq.shifted_kernel(kernel, a_res, b_res, a.scaling)).get_layer("target")
    again.quantize(base)
    for u, v in zip(a.layer.weights, again.weights):
        np.testing.assert_array_equal(to_np(u), to_np(v))


@pytest.mark.parametrize("base", ["nf4", "int4", None])
def test_adapter_file_onto_the_original_float_kernel(base, tmp_path):
    kernel = _kernel(5)
    model = _model(kernel)
    weights = [to_np(w).copy() for w in model.weights]
    kl.enable_adapter(model, method="loftq", rank=2, base=base, loftq_iter=2, alpha=4)
    for _, a in kl.adapters(model):
        perturb(a, scale=0.1)
    x = np.random.RandomState(6).normal(size=(3, N_IN)).astype("float32")
    y = to_np(model(x))
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)
    fresh = _model(kernel)
    for w, v in zip(fresh.weights, weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    for (_, a), (_, b) in zip(kl.adapters(fresh), kl.adapters(model)):
        for u, v in zip(a.layer.weights, b.layer.weights):  # the same codes again
            np.testing.assert_array_equal(to_np(u), to_np(v))
    np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-5, atol=1e-5)


def test_keras_file_keeps_the_codes_and_merge_is_exact(tmp_path):
    model = _model(_kernel(7))
    kl.enable_adapter(model, method="loftq", rank=2, targets=["target"], base="nf4", loftq_iter=2)
    a = model.get_layer("target")
    perturb(a, scale=0.1)
    x = np.random.RandomState(8).normal(size=(3, N_IN)).astype("float32")
    y = to_np(model(x))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    la = loaded.get_layer("target")
    assert la.loftq_iter == 2
    for u, v in zip(la.layer.weights, a.layer.weights):
        np.testing.assert_array_equal(to_np(u), to_np(v))
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-6)
    kl.merge(loaded)
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-5)


def _snapshot(model):
    return [type(l).__name__ for l in model._flatten_layers()], [to_np(w).copy() for w in model.weights]


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after[0] == before[0]
    for u, v in zip(after[1], before[1]):
        np.testing.assert_array_equal(u, v)


def test_refusals_leave_the_model_unchanged(tmp_path):
    model = _model(_kernel(9))
    before = _snapshot(model)
    with pytest.raises(ValueError, match="loftq_iter"):
        kl.enable_adapter(model, method="loftq", rank=2, targets=["target"], base="nf4", loftq_iter=0)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"rank=7 .*'target'"):
        kl.enable_adapter(model, method="loftq", rank=7, targets=["target"], base="nf4")
    _assert_unchanged(model, before)
    # a kernel already quantized has no full-precision W to fit
    dense = keras.layers.Dense(N_OUT, name="target")
    dense.build((None, N_IN))
    dense.kernel.assign(_kernel(9))
    inp = keras.Input((N_IN,))
    nf4_model = keras.Model(inp, NF4Linear.from_layer(dense)(inp))
    before = _snapshot(nf4_model)
    with pytest.raises(ValueError, match="'target'.* already stored as nf4; LoftQ needs the full-precision"):
        kl.enable_adapter(nf4_model, method="loftq", rank=2, targets=["target"])
    _assert_unchanged(nf4_model, before)
    keras_int8 = _model(_kernel(9))
    keras_int8.get_layer("target").quantize("int8")
    before = _snapshot(keras_int8)
    with pytest.raises(ValueError, match="'target' is already quantized by Keras"):
        kl.enable_adapter(keras_int8, method="loftq", rank=2, targets=["target"])
    _assert_unchanged(keras_int8, before)
    # the plain LoRA form is refused: Q + s A0 B0 is not the original kernel
    lq = _model(_kernel(9))
    kl.enable_adapter(lq, method="loftq", rank=2, targets=["target"], base="nf4")
    with pytest.raises(ValueError, match="loftq"):
        kl.save_adapter(lq, tmp_path / "l.safetensors", as_lora=True)


@pytest.mark.parametrize("base", ["nf4", "int8", None])
def test_a_file_made_for_another_kernel_or_altered_is_refused(base, tmp_path):
    """Loading runs the rounds again with the quantizer the file names
    (`loftq_storage`): factors that are not what they give on this kernel
    are refused before the model changes."""
    import json

    from safetensors.numpy import save_file

    kernel = _kernel(10)
    model = _model(kernel)
    weights = [to_np(w).copy() for w in model.weights]
    kl.enable_adapter(model, method="loftq", rank=2, base=base, loftq_iter=2)
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)

    def fresh(k):
        m = _model(k)
        for w, v in zip(m.weights[1:], weights[1:]):
            w.assign(v)
        return m

    def refused(m, path):
        before = _snapshot(m)
        with pytest.raises(ValueError, match="'target': the initial factors .* not LoftQ's init"):
            kl.load_adapter(m, path)
        _assert_unchanged(m, before)

    refused(fresh(_kernel(11)), f)  # another kernel
    meta, plan, tensors = kl.saving.read_adapter_file(f)
    for variable in ("lora_a0", "lora_a_res"):
        key = next(k for k in tensors if k.endswith("::" + variable))
        bad = tmp_path / f"{variable}.safetensors"
        save_file(dict(tensors, **{key: tensors[key] * 1.01}), str(bad), metadata=dict(meta, plan=json.dumps(plan)))
        refused(fresh(kernel), bad)
    kl.load_adapter(fresh(kernel), f)  # the genuine file still loads
