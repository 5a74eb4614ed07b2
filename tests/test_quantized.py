"""NF4 frozen bases: bit-compatibility with bitsandbytes, storage, and the
adapter contract over an NF4 base for every registered method."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import bases
from keras_lowrank.quant import nf4
from keras_lowrank.quant.layers import NF4Linear

from conftest import REFERENCE_MERGED
from conftest import SMALL
from conftest import gemma_backbone
from conftest import np_layer_output
from conftest import perturb
from conftest import to_np
from conftest import token_inputs

METHODS = kl.methods()


def _np_state(state):
    return {k: np.asarray(to_np(v)) for k, v in state.items()}


def _bnb():
    import torch  # noqa: F401  (bitsandbytes runs on torch tensors)
    import bitsandbytes.functional as F

    return F


_RNG = np.random.RandomState(0)
BLOCKS = {
    "random": _RNG.normal(size=(8, 128)).astype("float32"),
    "small_weights": (_RNG.normal(size=(16, 200)) * 0.02).astype("float32"),
    "all_zero_block": np.concatenate([np.zeros((1, 64)), _RNG.normal(size=(1, 64))], 1).astype("float32"),
    "zero_tail": np.concatenate([_RNG.normal(size=(1, 64)), np.zeros((1, 10))], 1).astype("float32"),
    "single_outlier": np.concatenate(
        [np.r_[[100.0], _RNG.normal(size=63) * 0.01][None], _RNG.normal(size=(1, 64))], 1
    ).astype("float32"),
    "not_divisible_by_64": _RNG.normal(size=(3, 37)).astype("float32"),
    "midpoint_ties": ((nf4.NF4_TABLE[:-1] + nf4.NF4_TABLE[1:]) / 2).reshape(1, -1).astype("float32"),
}


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_nf4_codes_and_values_match_bitsandbytes(name):
    import torch

    F = _bnb()
    w = BLOCKS[name]
    q, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = _np_state(nf4.quantize_nf4(w, double_quant=False))
    np.testing.assert_array_equal(ours["codes"], q.numpy().reshape(-1))
    ref_absmax = st.absmax.numpy()
    if name == "zero_tail":
        # bitsandbytes floors a tail block's absmax at 1e-38; only the value
        # is stored differently where a backend flushes that subnormal.
        ref_absmax, ours["absmax"] = ref_absmax[:-1], ours["absmax"][:-1]
    np.testing.assert_array_equal(ours["absmax"].view(np.uint32), ref_absmax.view(np.uint32))
    deq = to_np(nf4.dequantize_nf4(nf4.quantize_nf4(w, double_quant=False), w.size))
    ref = F.dequantize_4bit(q, st).numpy().reshape(-1)
    np.testing.assert_array_equal(deq.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("name", ["random", "small_weights", "single_outlier", "not_divisible_by_64"])
def test_double_quantization_matches_bitsandbytes(name):
    import torch

    F = _bnb()
    w = np.tile(BLOCKS[name], (40, 1))  # enough blocks for several constants
    q, st = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    # 1. Our dequantization of bitsandbytes' own state is bit-identical.
    state = {
        "codes": q.numpy().reshape(-1),
        "absmax_codes": st.absmax.numpy(),
        "absmax_scale": st.state2.absmax.numpy(),
        "absmax_offset": np.float32(st.offset.item()),
    }
    ours_deq = to_np(nf4.dequantize_nf4({k: keras.ops.convert_to_tensor(v) for k, v in state.items()}, w.size))
    ref_deq = F.dequantize_4bit(q, st).numpy().reshape(-1)
    np.testing.assert_array_equal(ours_deq.view(np.uint32), ref_deq.view(np.uint32))
    # 2. Our state: same 4-bit codes, the mean offset in float64 (within an
    # ulp of torch's float32 mean), and nearest 8-bit codes of absmax - mean
    # (bitsandbytes' reference kernel; its native CPU kernel uses a tree
    # search that differs on a few constants).
    ours = _np_state(nf4.quantize_nf4(w, double_quant=True))
    np.testing.assert_array_equal(ours["codes"], q.numpy().reshape(-1))
    np.testing.assert_allclose(ours["absmax_offset"], st.offset.item(), rtol=1e-6)
    _, plain = F.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=False)
    centred = plain.absmax.numpy() - ours["absmax_offset"]
    code = torch.from_numpy(nf4.DYNAMIC_MAP)
    t = torch.from_numpy(centred)
    n = t.numel()
    full = n - n % 256
    blocks = [t[:full].reshape(-1, 256)] if full else []
    scales = [b.abs().max(dim=-1)[0] for b in blocks]
    scaled = [torch.clamp(b * (1.0 / s.view(-1, 1)), -1, 1).reshape(-1) for b, s in zip(blocks, scales)]
    if n % 256:
        am = t[full:].abs().max()
        scales.append(am.view(1))
        scaled.append(torch.clamp(t[full:] / am, -1, 1))
    ref_codes = torch.bucketize(torch.cat(scaled), (code[:-1] + code[1:]) / 2).numpy()
    np.testing.assert_array_equal(ours["absmax_codes"], ref_codes)
    np.testing.assert_array_equal(ours["absmax_scale"].view(np.uint32), torch.cat(scales).numpy().view(np.uint32))
    agree = np.mean(ours["absmax_codes"] == st.absmax.numpy())
    assert agree > 0.9


def test_dynamic_map_is_bitsandbytes():
    F = _bnb()
    np.testing.assert_array_equal(nf4.DYNAMIC_MAP.view(np.uint32), F.create_dynamic_map().numpy().view(np.uint32))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_kernels_are_rejected(bad):
    dense = keras.layers.Dense(8, name="proj")
    dense.build((None, 64))
    k = to_np(dense.kernel).copy()
    k[3, 2] = bad
    dense.kernel.assign(k)
    with pytest.raises(ValueError, match="'proj'.*NaN or inf"):
        NF4Linear.from_layer(dense)


@pytest.mark.parametrize("double_quant,bits", [(True, 4.127), (False, 4.5)])
def test_bits_per_parameter_from_saved_variables(double_quant, bits, tmp_path):
    inp = keras.Input((1024,))
    model = keras.Model(inp, keras.layers.Dense(1024, name="proj")(inp))
    kl.enable_adapter(model, rank=4, targets=["proj"], base="nf4", double_quant=double_quant)
    path = tmp_path / "q.weights.h5"
    model.save_weights(str(path))
    import h5py

    stored = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if name.endswith("/vars") and "codes" in obj:
                stored.update({k: np.asarray(obj[k]) for k in obj if k != "bias"})
        f.visititems(visit)
    assert "codes" in stored
    total = sum(v.size * v.dtype.itemsize * 8 for v in stored.values())
    assert abs(total / (1024 * 1024) - bits) < 5e-4


# --- the contract over an NF4 base ------------------------------------------
def _nf4_small(method, kind, **options):
    make, x = SMALL[kind]
    model = make()
    y_float = to_np(model(x))
    kl.enable_adapter(model, method=method, rank=2, targets=["target"], base="nf4", **options)
    return model, model.get_layer("target"), x, y_float


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize("method", METHODS)
def test_contract_on_nf4_base(method, kind, tmp_path):
    model, a, x, y_float = _nf4_small(method, kind)
    assert isinstance(a.layer, NF4Linear)
    # 1. start: a no-op on the quantized base (SVD inits: closer to the float
    # base than the quantized base is, QPiSSA).
    y0 = to_np(model(x))
    with kl.disable_adapter(model):
        y_base = to_np(model(x))
    if registry_spec(method).noop_at_init == "exact":
        np.testing.assert_array_equal(y0, y_base)
    else:
        np.testing.assert_allclose(y0, y_base, atol=1e-5)
    # 2. formula over the dequantized kernel
    perturb(a)
    y = to_np(model(x))
    np.testing.assert_allclose(y, np_layer_output(a, x, REFERENCE_MERGED[method]), rtol=1e-4, atol=1e-5)
    # 4. disable gives the base back; in-place merge into 4 bits is refused
    with kl.disable_adapter(model):
        np.testing.assert_allclose(to_np(model(x)), y_base, atol=1e-5)
    with pytest.raises(ValueError, match="re-quantize"):
        kl.merge(model, unload=False)
    # 9. .keras round trip: codes saved as they are
    codes = {v.name: to_np(v).copy() for v in a.layer.weights}
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    la = loaded.get_layer("target")
    assert isinstance(la.layer, NF4Linear)
    for v in la.layer.weights:
        np.testing.assert_array_equal(to_np(v), codes[v.name])
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-6)
    # 3. merge into a float kernel (default)
    kl.merge(model)
    assert type(model.get_layer("target")).__name__ in ("Dense", "EinsumDense")
    np.testing.assert_allclose(to_np(model(x)), y, rtol=1e-5, atol=1e-5 * max(1, np.abs(y).max()))


def registry_spec(method):
    from keras_lowrank import registry

    return registry.get(method)


@pytest.mark.parametrize("method", METHODS)
def test_nf4_gradient_mask_and_adapter_file(method, tmp_path):
    bb = gemma_backbone()
    base_weights = [to_np(w).copy() for w in bb.weights]
    x = token_inputs(20)
    kl.enable_adapter(bb, method=method, rank=2, base="nf4")
    q = [v for _, a in kl.adapters(bb) for v in a.layer.weights]
    before = [to_np(v).copy() for v in q]
    bb.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    for _, a in kl.adapters(bb):
        perturb(a, scale=0.1)
    bb.train_on_batch(x, np.zeros(to_np(bb(x)).shape, "float32"))
    for v, b in zip(q, before):
        np.testing.assert_array_equal(to_np(v), b)  # codes and constants untouched
    assert all(v.path.split("/")[-1] in ("lora_a", "lora_b", "magnitude") for v in bb.trainable_weights)
    y = to_np(bb(x))
    f = tmp_path / "a.safetensors"
    kl.save_adapter(bb, f)
    fresh = gemma_backbone()
    for w, v in zip(fresh.weights, base_weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    assert all(isinstance(a.layer, NF4Linear) for _, a in kl.adapters(fresh))
    np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-5, atol=1e-5)


def test_fit_gemma_on_nf4_base_lowers_the_loss():
    import keras_hub

    lm = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    x = token_inputs(20, batch=4)
    y = (x["token_ids"] + 3) % 20
    kl.enable_adapter(lm, method="lora", rank=4, base="nf4")
    lm.compile(optimizer=keras.optimizers.Adam(2e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = lm.fit(x, y, epochs=12, batch_size=4, verbose=0).history["loss"]
    assert losses[-1] < 0.9 * losses[0]


def _structured_kernel(n_in=256, n_out=192, seed=0):
    """A kernel with a decaying spectrum and outliers, like trained weights."""
    rng = np.random.RandomState(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n_in, n_in)))
    v, _ = np.linalg.qr(rng.normal(size=(n_out, n_out)))
    s = 3.0 / (1 + np.arange(n_out)) ** 0.8
    return ((u[:, :n_out] * s) @ v.T).astype("float32")


def test_qpissa_quantizes_the_residual_with_less_error():
    from keras_lowrank.quant import error_report

    kernels = [_structured_kernel(seed=i) for i in range(3)]
    reports = [error_report(k, rank=16) for k in kernels]
    for r in reports:
        assert r["qpissa_error"] < r["nf4_error"]
    mean_reduction = np.mean([1 - r["qpissa_error"] / r["nf4_error"] for r in reports])
    assert mean_reduction > 0.05


def test_requantizing_merge_reports_its_error():
    make, x = SMALL["dense"]
    model = make()
    kl.enable_adapter(model, rank=2, targets=["target"], base="nf4")
    a = model.get_layer("target")
    perturb(a)
    y = to_np(model(x))
    report = kl.merge(model, requantize=True)
    assert isinstance(model.get_layer("target"), NF4Linear)
    assert set(report) == {"target"} and report["target"]["max_abs_error"] > 0
    assert np.abs(to_np(model(x)) - y).max() <= 2 * report["target"]["max_abs_error"] * np.abs(x).sum(1).max() + 1e-6


def test_bad_base_and_keras_quantized_layers():
    make, _ = SMALL["dense"]
    model = make()
    with pytest.raises(ValueError, match="base='nf5'"):
        kl.enable_adapter(model, rank=2, targets=["target"], base="nf5")
    assert type(model.get_layer("target")).__name__ == "Dense"
    for mode in ("int8", "int4", "float8"):
        m = make()
        m.quantize(mode)
        with pytest.raises(NotImplementedError, match=f"'target'.*mode='{mode}'"):
            kl.enable_adapter(m, rank=2, targets=["target"])
        assert bases.quantization_mode(m.get_layer("target")) == mode
