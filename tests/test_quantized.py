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
from conftest import families
from conftest import gemma_backbone
from conftest import np_layer_output
from conftest import perturb
from conftest import needs
from conftest import to_np
from conftest import token_inputs
from conftest import tunable

METHODS = kl.methods()
FAMILIES = families()
#: every method over NF4 (keras-lowrank's own storage); Keras's int8/int4
#: once per method family (the storage axis is independent of the method)
STORAGE_CASES = [(m, "nf4") for m in METHODS] + [(m, b) for m in FAMILIES for b in ("int8", "int4")]


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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_nf4_layer_computes_in_its_compute_dtype_like_bitsandbytes(dtype):
    """A bfloat16/float16 Dense quantized to NF4 holds bitsandbytes' codes, its
    kernel dequantizes bit-identically to bitsandbytes' `dequantize_4bit`
    into that dtype, and the layer multiplies in that dtype."""
    import torch

    F = _bnb()
    w = BLOCKS["small_weights"]  # torch layout (out, in)
    dense = keras.layers.Dense(w.shape[0], dtype=dtype, name="proj")
    dense.build((None, w.shape[1]))
    dense.kernel.assign(w.T)
    q = NF4Linear.from_layer(dense, double_quant=False)
    tw = torch.from_numpy(w).to(getattr(torch, dtype))
    ref_q, ref_st = F.quantize_4bit(tw, blocksize=64, quant_type="nf4", compress_statistics=False)
    np.testing.assert_array_equal(to_np(q._state["codes"]), ref_q.numpy().reshape(-1))
    ref = F.dequantize_4bit(ref_q, ref_st)
    assert str(ref.dtype) == f"torch.{dtype}"
    ours = keras.ops.convert_to_numpy(keras.ops.cast(q.dequantized_matrix(dtype), "float32"))
    np.testing.assert_array_equal(ours.T, ref.float().numpy())
    x = np.random.RandomState(1).normal(size=(3, w.shape[1])).astype("float32")
    y = q(keras.ops.cast(x, dtype))
    assert keras.backend.standardize_dtype(y.dtype) == dtype
    want = keras.ops.matmul(keras.ops.cast(x, dtype), keras.ops.cast(ref.float().numpy().T, dtype))
    np.testing.assert_array_equal(to_np(keras.ops.cast(y, "float32")), to_np(keras.ops.cast(want, "float32")))


@pytest.mark.parametrize(
    "equation,kernel_shape",
    [("...a,ab->...b", (96, 200)), ("btd,ndh->btnh", (3, 40, 24)), ("abc,bcd->abd", (5, 24, 40))],
)
def test_quantizing_piece_by_piece_equals_one_pass(equation, kernel_shape, monkeypatch):
    """Large kernels are quantized a few output units at a time (a bounded
    float32 working set): the state is the one a single pass gives."""
    kernel = np.random.RandomState(2).normal(size=kernel_shape).astype("float32")
    layer = NF4Linear(equation, kernel_shape)
    layer.build()
    matrix = to_np(layer.geometry.kernel_to_matrix(kernel))
    one_pass = _np_state(nf4.quantize_nf4(np.swapaxes(matrix, -1, -2)))
    monkeypatch.setattr(nf4, "CHUNK", 128)  # many pieces
    layer.quantize_kernel(kernel)
    # and as `from_layer` builds one (TensorFlow: codes written into the
    # variable in place, a few pieces at a time)
    monkeypatch.setattr(nf4, "WRITE_BYTES", 100)
    built = NF4Linear(equation, kernel_shape)
    built.build_quantized(keras.ops.convert_to_tensor(kernel))
    for state in (layer._state, built._state):
        pieces = _np_state(state)
        assert pieces.keys() == one_pass.keys()
        for name in one_pass:
            np.testing.assert_array_equal(pieces[name], one_pass[name], err_msg=name)
    np.testing.assert_allclose(to_np(layer.dequantized_kernel()), kernel, atol=0.6)


def test_nf4_codes_by_comparison_equal_the_binary_search():
    """The per-bound comparison that makes NF4 codes gives what a binary
    search (torch.bucketize, right=False) gives, ties included."""
    bounds = nf4._midpoints(nf4.NF4_TABLE)
    x = np.random.RandomState(3).uniform(-1, 1, 4096).astype("float32")
    x[:15] = bounds  # a value on a midpoint goes down
    x[15:17] = (-1.0, 1.0)
    np.testing.assert_array_equal(nf4._nf4_codes(x, bounds), nf4._bucketize(x, bounds))


def test_finiteness_check_tells_overflow_from_inf():
    """The pre-check sums the kernel (no temporary); a sum of finite values
    that overflows is not mistaken for an inf."""
    huge = np.full((4, 64), 3e38, "float32")
    nf4.check_finite(keras.ops.convert_to_tensor(huge))  # sum overflows: no error
    huge[1, 5] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        nf4.check_finite(keras.ops.convert_to_tensor(huge), "'k'")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_kernels_are_rejected(bad):
    dense = keras.layers.Dense(8, name="proj")
    dense.build((None, 64))
    k = to_np(dense.kernel).copy()
    k[3, 2] = bad
    dense.kernel.assign(k)
    with pytest.raises(ValueError, match="'proj'.*NaN or inf"):
        NF4Linear.from_layer(dense)


def test_nf4_conversion_lets_go_of_each_float_kernel(monkeypatch):
    """`base="nf4"` frees each float kernel once it is quantized, before the
    next one: nothing in the model, the plan, TensorFlow's checkpoint
    tracking or torch's ParameterDicts keeps the old layers."""
    import gc
    import weakref

    from keras_lowrank import plan
    from keras_lowrank import tree

    monkeypatch.setattr(plan, "GC_BYTES", 0)  # collect after every layer
    model = gemma_backbone()
    kernels, tensors = {}, {}
    for e in tree.walk(model):
        if bases.is_linear_layer(e.layer) and not bases.is_embedding(e.layer):
            kernels[e.path] = weakref.ref(bases.kernel_variable(e.layer))
            # the backend's own tensor too (torch's ParameterDicts of every
            # ancestor hold it, not the Keras variable)
            tensors[e.path] = weakref.ref(bases.kernel_variable(e.layer).value)
    storage = bases.STORAGES["nf4"]
    done, still_alive = [], []
    convert = storage.convert

    def converting(layer, double_quant=True):
        still_alive.extend(p for p in done if kernels[p]() is not None or tensors[p]() is not None)
        done.extend(p for p, ref in kernels.items() if ref() is bases.kernel_variable(layer))
        return convert(layer, double_quant=double_quant)

    monkeypatch.setattr(storage, "convert", converting)
    summary = kl.enable_adapter(model, rank=2, base="nf4")
    assert len(done) == len(kernels) and still_alive == []
    gc.collect()
    assert set(summary.adapted_paths) == set(kernels)
    assert [p for p, ref in kernels.items() if ref() is not None] == []
    assert [p for p, ref in tensors.items() if ref() is not None] == []
    assert np.all(np.isfinite(to_np(model(token_inputs(20)))))


@pytest.mark.parametrize("dtype,bad", [("float32", np.nan), ("bfloat16", np.inf)])
def test_non_finite_kernel_is_refused_before_anything_is_quantized(dtype, bad):
    inp = keras.Input((64,))
    h = keras.layers.Dense(64, name="first")(inp)
    model = keras.Model(inp, keras.layers.Dense(8, name="second")(keras.layers.Dense(64, dtype=dtype, name="bad")(h)))
    k = to_np(keras.ops.cast(model.get_layer("bad").kernel, "float32")).copy()
    k[1, 1] = bad
    model.get_layer("bad").kernel.assign(k)
    before = [to_np(keras.ops.cast(v, "float32")).copy() for v in model.weights]
    with pytest.raises(ValueError, match="'bad'.*NaN or inf"):
        kl.enable_adapter(model, rank=2, base="nf4")
    assert [type(layer).__name__ for layer in model.layers[1:]] == ["Dense"] * 3
    assert all(v.trainable for v in model.weights)
    for v, b in zip(model.weights, before):
        np.testing.assert_array_equal(to_np(keras.ops.cast(v, "float32")), b)


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


# --- the contract over quantized bases --------------------------------------
QBASES = ["nf4", "int8", "int4"]


def _quantized_small(method, kind, base, **options):
    make, x = SMALL[kind]
    model = make()
    y_float = to_np(model(x))
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["target"], base=base, **options)
    return model, model.get_layer("target"), x, y_float


def _reference_on_own_base(adapter, x, method):
    """The adapted output restated in NumPy around the wrapped layer's own
    output (Keras int8 also quantizes the activations, so `x K` is whatever
    the frozen layer computes)."""
    y_inner = to_np(adapter.layer(x)).astype("float64")
    b = to_np(adapter.layer.bias).astype("float64")
    w = to_np(bases.read_kernel(adapter.layer)).astype("float64")
    if method == "dora":
        from keras_lowrank.methods.reference import factor_a

        low = adapter.scaling * (x.astype("float64") @ factor_a(adapter)) @ to_np(adapter.lora_b).astype("float64")
        v = w + adapter.scaling * factor_a(adapter) @ to_np(adapter.lora_b).astype("float64")
        g = to_np(adapter.magnitude).astype("float64") / np.sqrt((v**2).sum(0))
        return np.tanh(b + g * (y_inner - b + low))
    delta = REFERENCE_MERGED[method](adapter, w) - w
    return np.tanh(y_inner + x.astype("float64") @ delta)


@pytest.mark.parametrize("kind", sorted(SMALL))
@pytest.mark.parametrize("method,base", STORAGE_CASES)
def test_contract_on_quantized_base(method, kind, base, tmp_path):
    model, a, x, y_float = _quantized_small(method, kind, base)
    assert bases.base_kind(a.layer) == base
    # 1. start: a no-op on the quantized base (SVD inits quantize the
    # residual of the full-precision kernel: a no-op on that base).
    y0 = to_np(model(x))
    with kl.disable_adapter(model):
        y_base = to_np(model(x))
    noop = registry_spec(method).noop_at_init
    if noop == "exact":
        np.testing.assert_array_equal(y0, y_base)
    else:  # round-off, or a small start (LoRA-XS's R ~ N(0, 1e-10))
        np.testing.assert_allclose(y0, y_base, atol=1e-5 if noop == "roundoff" else 1e-3)
    # 2. formula over the dequantized kernel (int8: around the layer's own
    # W8A8 output)
    perturb(a)
    y = to_np(model(x))
    if base == "int8":
        if kind == "dense":
            np.testing.assert_allclose(y, _reference_on_own_base(a, x, method), rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_allclose(y, np_layer_output(a, x, REFERENCE_MERGED[method]), rtol=1e-4, atol=1e-5)
    # 4. disable gives the base back; in-place merge into the codes is refused
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
    assert bases.base_kind(la.layer) == base
    for v in la.layer.weights:
        np.testing.assert_array_equal(to_np(v), codes[v.name])
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-6)
    # 3. merge into a float kernel (default), exact in float32
    kl.merge(model)
    merged = model.get_layer("target")
    assert type(merged).__name__ in ("Dense", "EinsumDense") and bases.base_kind(merged) == "float"
    if base != "int8":  # int8's W8A8 base output is not x·dequant(K)
        np.testing.assert_allclose(to_np(model(x)), y, rtol=1e-5, atol=1e-5 * max(1, np.abs(y).max()))
    else:
        np.testing.assert_allclose(to_np(model(x)), y, atol=0.05 * max(1, np.abs(y).max()))


def registry_spec(method):
    from keras_lowrank import registry

    return registry.get(method)


def _two_layers():
    inp = keras.Input((5,))
    h = keras.layers.Dense(8, activation="relu", name="ffn")(inp)
    h = keras.layers.EinsumDense("bd,dk->bk", output_shape=(6,), bias_axes="k", name="proj")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))


def _gradient_mask_and_adapter_file(make, x, method, base, tmp_path):
    model = make()
    base_weights = [to_np(w).copy() for w in model.weights]
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, base=base)
    q = [v for _, a in kl.adapters(model) for v in a.layer.weights]
    before = [to_np(v).copy() for v in q]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    for _, a in kl.adapters(model):
        perturb(a, scale=0.1)
    model.train_on_batch(x, np.zeros(to_np(model(x)).shape, "float32"))
    for v, b in zip(q, before):
        np.testing.assert_array_equal(to_np(v), b)  # codes and constants untouched
    own = {v.path.split("/")[-1] for _, a in kl.adapters(model) for v in tunable(a)}
    assert {v.path.split("/")[-1] for v in model.trainable_weights} == own
    y = to_np(model(x))
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)
    fresh = make()
    for w, v in zip(fresh.weights, base_weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    assert all(bases.base_kind(a.layer) == base for _, a in kl.adapters(fresh))
    for (_, a), (_, b) in zip(kl.adapters(fresh), kl.adapters(model)):
        for u, v in zip(a.layer.weights, b.layer.weights):  # same codes again
            np.testing.assert_array_equal(to_np(u), to_np(v))
    np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,base", STORAGE_CASES)
def test_quantized_gradient_mask_and_adapter_file(method, base, tmp_path):
    """Methods over the bases, on small layers."""
    x = np.random.RandomState(0).normal(size=(4, 5)).astype("float32")
    _gradient_mask_and_adapter_file(_two_layers, x, method, base, tmp_path)


def test_nf4_base_on_a_kerashub_backbone(tmp_path):
    """The same flow on a KerasHub Gemma (all its projections are
    EinsumDense) over NF4. Keras's int8/int4 bases on KerasHub are
    test_model_quantized_by_keras_before_adapting's."""
    _gradient_mask_and_adapter_file(gemma_backbone, token_inputs(20), "lora", "nf4", tmp_path)


def test_fit_gemma_on_nf4_base_lowers_the_loss():
    import keras_hub

    lm = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    x = token_inputs(20, batch=4)
    y = (x["token_ids"] + 3) % 20
    kl.enable_adapter(lm, method="lora", rank=4, base="nf4")
    # On JAX the codes' buffers are the host arrays they were made in: the
    # compiled train step (which donates the model's state) keeps them intact.
    stored = [v for _, a in kl.adapters(lm) for v in a.layer.storage_variables()]
    before = [to_np(v).copy() for v in stored]
    lm.compile(optimizer=keras.optimizers.Adam(2e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = lm.fit(x, y, epochs=12, batch_size=4, verbose=0).history["loss"]
    assert losses[-1] < 0.9 * losses[0]
    import gc

    gc.collect()
    _ = [np.full((1 << 16,), 255, "uint8") for _ in range(64)]  # reuse any freed memory
    for v, b in zip(stored, before):
        np.testing.assert_array_equal(to_np(v), b)


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
    assert report["target"]["storage"] == "nf4"
    assert np.abs(to_np(model(x)) - y).max() <= 2 * report["target"]["max_abs_error"] * np.abs(x).sum(1).max() + 1e-6


def test_bad_base_and_unsupported_keras_modes():
    make, _ = SMALL["dense"]
    model = make()
    with pytest.raises(ValueError, match="base='nf5'"):
        kl.enable_adapter(model, rank=2, targets=["target"], base="nf5")
    assert type(model.get_layer("target")).__name__ == "Dense"
    m = make()
    m.quantize("float8")
    with pytest.raises(NotImplementedError, match="'target'.*mode='float8'"):
        kl.enable_adapter(m, rank=2, targets=["target"])
    assert bases.quantization_mode(m.get_layer("target")) == "float8"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_model_quantized_by_keras_before_adapting(mode, tmp_path):
    import keras_hub

    lm = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    # Only the projections: Keras's own int4 ReversibleEmbedding does not
    # survive a .keras round trip (outputs drift ~1e-2 with no adapter at all).
    lm.quantize(mode, filters=lambda layer: isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)))
    x = token_inputs(20, batch=4)
    y_q = to_np(lm(x))
    before = snapshot_weights(lm)
    with pytest.raises(ValueError, match=f"already quantized by Keras \\(mode='{mode}'\\)"):
        kl.enable_adapter(lm, method="pissa", rank=2)
    assert [to_np(w).tolist() for w in lm.weights] == before
    kl.enable_adapter(lm, method="dora", rank=2)
    assert {bases.base_kind(a.layer) for _, a in kl.adapters(lm)} == {mode}
    np.testing.assert_array_equal(to_np(lm(x)), y_q)
    if mode == "int4":
        return  # training and saving over a Keras-quantized base: int8 below (the same code path)
    lm.compile(optimizer=keras.optimizers.Adam(2e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = lm.fit(x, (x["token_ids"] + 3) % 20, epochs=3, batch_size=4, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    path = str(tmp_path / "q.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_np(loaded(x)), to_np(lm(x)), rtol=1e-5, atol=1e-5)


def snapshot_weights(model):
    return [to_np(w).tolist() for w in model.weights]


def test_int8_lora_on_a_kernel_whose_contracted_axis_is_last():
    """Keras's own int8 + LoRA crashes on `ab,cb->ac` (keras-notes §2.5)."""
    inp = keras.Input((5,))
    model = keras.Model(inp, keras.layers.EinsumDense("ab,cb->ac", output_shape=(3,), name="target")(inp))
    x = np.random.RandomState(0).normal(size=(4, 5)).astype("float32")
    kl.enable_adapter(model, rank=2, targets=["target"], base="int8")
    a = model.get_layer("target")
    perturb(a)
    y = to_np(model(x))
    assert y.shape == (4, 3) and np.all(np.isfinite(y))
    np.testing.assert_allclose(y, to_np(a.layer(x)) + to_np(x @ to_np(a.lora_a).T @ to_np(a.lora_b)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", QBASES)
def test_requantizing_merge_in_the_base_storage(base):
    make, x = SMALL["dense"]
    model = make()
    kl.enable_adapter(model, rank=2, targets=["target"], base=base)
    perturb(model.get_layer("target"))
    report = kl.merge(model, requantize=True)
    assert report["target"]["storage"] == base
    assert 0 < report["target"]["max_abs_error"] < 0.5
    assert bases.base_kind(model.get_layer("target")) == base


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "float16"])
@pytest.mark.parametrize("method", FAMILIES)
def test_precision_on_nf4_base(method, policy):
    """Contract point 5 over NF4: forward, backward and merge under reduced
    precision; the kernel is dequantized in float32, then cast."""
    keras.config.set_dtype_policy(policy)
    make, x = SMALL["einsum"]
    model = make()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["target"], base="nf4")
    a = model.get_layer("target")
    # adapter variables are float32 under every policy; they compute in the layer's dtype
    assert {keras.backend.standardize_dtype(v.dtype) for v in tunable(a)} == {"float32"}
    y0 = to_np(model(x)).astype("float32")
    with kl.disable_adapter(model):
        y_base = to_np(model(x)).astype("float32")
    np.testing.assert_allclose(y0, y_base, atol=2e-2 * max(1.0, np.abs(y_base).max()))
    perturb(a, scale=0.1)
    y = to_np(model(x)).astype("float32")
    assert np.all(np.isfinite(y))
    from test_contract import _adapter_grads

    grads = _adapter_grads(model, a, x)
    assert all(np.all(np.isfinite(g)) for g in grads) and any(np.abs(g).max() > 0 for g in grads)
    kl.merge(model)
    np.testing.assert_allclose(to_np(model(x)).astype("float32"), y, atol=5e-2 * max(1.0, np.abs(y).max()))


def test_pissa_file_onto_a_keras_quantized_model_is_refused(tmp_path):
    make, _ = SMALL["dense"]
    model = make()
    kl.enable_adapter(model, method="pissa", rank=2, targets=["target"])
    f = tmp_path / "p.safetensors"
    kl.save_adapter(model, f)
    other = make()
    other.quantize("int8")
    before = snapshot_weights(other)
    with pytest.raises(ValueError, match="'target' is quantized by Keras"):
        kl.load_adapter(other, f)
    assert snapshot_weights(other) == before
    assert bases.base_kind(other.get_layer("target")) == "int8"


def test_quantizing_many_layers_shows_progress(capsys):
    layers = [keras.layers.Dense(64, name=f"d{i}") for i in range(7)]
    model = keras.Sequential([keras.Input((64,))] + layers + [keras.layers.Dense(2, name="out")])
    kl.enable_adapter(model, rank=2, base="nf4")
    out = capsys.readouterr().out
    assert "NF4 conversion of 7 kernels" in out and "d6" in out
