"""The SVD family (MiLoRA, LoRA-XS, SVF, SVFT, SVD-training), the SVD
engine, SVF composition and the spectrum tools, against NumPy restatements
of spec §14, §15, §17, §18 and §19."""

import math

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import registry
from keras_lowrank import svd
from keras_lowrank.geometry import KernelGeometry
from keras_lowrank.methods import spectral

from conftest import REFERENCE_MERGED
from conftest import SVD_FAMILY
from conftest import dealt
from conftest import gemma_backbone
from conftest import np_layer_output
from conftest import np_matricize
from conftest import perturb
from conftest import to_np
from conftest import token_inputs

FAMILY = list(SVD_FAMILY)


def _spectrum_matrix(n_in, n_out, low=1e-3, seed=0):
    """A float32 matrix with singular values spread from 1 down to `low`."""
    rng = np.random.default_rng(seed)
    k = min(n_in, n_out)
    u, _ = np.linalg.qr(rng.normal(size=(n_in, k)))
    v, _ = np.linalg.qr(rng.normal(size=(n_out, k)))
    s = np.geomspace(1.0, low, k) * (1.0 + 0.1 * seed)
    return ((u * s) @ v.T).astype("float32")


def _dense_model(n_in=12, n_out=9, seed=0, activation=None):
    inp = keras.Input((n_in,))
    out = keras.layers.Dense(n_out, activation=activation, name="target")(inp)
    model = keras.Model(inp, out)
    model.get_layer("target").kernel.assign(_spectrum_matrix(n_in, n_out, seed=seed))
    return model


def _x(n_in=12, rows=4, seed=1):
    return np.random.default_rng(seed).normal(size=(rows, n_in)).astype("float32")


def _triplets64(w):
    u, s, vt = np.linalg.svd(w.astype("float64"), full_matrices=False)
    return u, s, vt.T


def _same_subspace_products(u, s, v, u_ref, s_ref, v_ref, rtol=1e-4):
    """`σ_i u_i v_iᵀ` per triplet (independent of each triplet's sign)."""
    scale = max(s_ref.max(), 1e-30)
    for i in range(len(s)):
        mine = s[i] * np.outer(u[:, i], v[:, i])
        ref = s_ref[i] * np.outer(u_ref[:, i], v_ref[:, i])
        np.testing.assert_allclose(mine, ref, atol=rtol * scale)


# ----------------------------------------------------------------------
# The SVD engine
@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (3, 12, 9)])
def test_engine_full_top_and_bottom_match_float64(shape):
    if len(shape) == 2:
        w = _spectrum_matrix(*shape)
    else:
        w = np.stack([_spectrum_matrix(*shape[1:], seed=i) for i in range(shape[0])])
    u, s, v = svd.decompose(w)
    assert u.dtype == s.dtype == v.dtype == np.float32
    k = min(shape[-2:])
    flat_w = w.reshape((-1,) + shape[-2:])
    flat = [x.reshape((-1,) + x.shape[-2:]) for x in (u, v)]
    for i, wi in enumerate(flat_w):
        ui, vi, si = flat[0][i], flat[1][i], s.reshape(-1, k)[i]
        u64, s64, v64 = _triplets64(wi)
        np.testing.assert_allclose(si, s64, rtol=1e-5, atol=1e-7)
        # reconstruction and orthonormality to float32 accuracy
        rec = (ui.astype("float64") * si) @ vi.T.astype("float64")
        assert np.linalg.norm(rec - wi) / np.linalg.norm(wi) < 1e-5
        for q in (ui, vi):
            assert np.abs(q.T.astype("float64") @ q - np.eye(k)).max() < 1e-5
        # the minor triplets too (MiLoRA's): each rank-1 part matches float64
        _same_subspace_products(ui, si, vi, u64, s64, v64, rtol=1e-5)
        # signs: the largest entry of each output-side vector is positive
        peak = vi[np.argmax(np.abs(vi), axis=0), np.arange(k)]
        assert np.all(peak > 0)
    _, top, _ = svd.decompose(w, rank=3)
    _, bottom, _ = svd.decompose(w, rank=3, part="bottom")
    np.testing.assert_array_equal(top, s[..., :3])
    np.testing.assert_array_equal(bottom, s[..., -3:])


def test_engine_rank_deficient_and_randomized():
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(16, 3)) @ rng.normal(size=(3, 12))).astype("float32")  # rank 3
    u, s, v = svd.decompose(w)
    assert np.abs(u.T.astype("float64") @ u - np.eye(12)).max() < 1e-5
    np.testing.assert_allclose((u * s) @ v.T, w, atol=1e-4)
    w2 = _spectrum_matrix(40, 30, low=1e-4)
    ur, sr, vr = svd.decompose(w2, rank=4, niter=4, seed=0)
    np.testing.assert_allclose(sr, np.linalg.svd(w2, compute_uv=False)[:4], rtol=1e-3)
    with pytest.raises(ValueError, match="smallest triplets need the exact SVD"):
        svd.decompose(w2, rank=4, part="bottom", niter=2)
    with pytest.raises(ValueError, match="rank=31"):
        svd.decompose(w2, rank=31)
    with pytest.raises(FloatingPointError, match="NaN"):
        svd.decompose(np.full((4, 3), np.nan, "float32"))


def test_engine_shows_progress_over_many_kernels(capsys):
    layers = [keras.layers.Dense(6, name=f"d{i}") for i in range(7)]
    model = keras.Sequential([keras.Input((6,))] + layers + [keras.layers.Dense(2, name="out")])
    kl.enable_adapter(model, method="svf")
    out = capsys.readouterr().out
    assert "SVD of 7 kernels" in out and "d6" in out
    small = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6, name="a"), keras.layers.Dense(2)])
    kl.enable_adapter(small, method="svf")
    assert "SVD of" not in capsys.readouterr().out


# ----------------------------------------------------------------------
# MiLoRA (§17)
def test_milora_takes_the_minor_components():
    model = _dense_model()
    w = to_np(model.get_layer("target").kernel).astype("float64")
    kl.enable_adapter(model, method="milora", rank=3, alpha=6, targets=["target"])
    a = model.get_layer("target")
    u, s, v = _triplets64(w)
    minor = (u[:, -3:] * s[-3:]) @ v[:, -3:].T
    a0 = to_np(a.lora_a0).astype("float64").T
    b0 = to_np(a.lora_b0).astype("float64")
    np.testing.assert_allclose(a.scaling * a0 @ b0, minor, atol=1e-6)
    np.testing.assert_allclose(to_np(a.layer.kernel), w - minor, atol=1e-6)
    got = np.linalg.svd(a.scaling * a0 @ b0, compute_uv=False)[:3]
    np.testing.assert_allclose(got, s[-3:], rtol=1e-4)


def test_milora_refuses_a_randomized_svd():
    model = _dense_model()
    before = to_np(model.get_layer("target").kernel).copy()
    with pytest.raises(ValueError, match="svd_niter.*smallest singular triplets"):
        kl.enable_adapter(model, method="milora", rank=2, svd_niter=4)
    np.testing.assert_array_equal(to_np(model.get_layer("target").kernel), before)
    assert not kl.adapters(model)


# ----------------------------------------------------------------------
# LoRA-XS (§18)
def test_lora_xs_frozen_factors_and_r_squared():
    model = _dense_model()
    w = to_np(model.get_layer("target").kernel).astype("float64")
    summary = kl.enable_adapter(model, method="lora_xs", rank=4, alpha=8, targets=["target"], seed=0)
    a = model.get_layer("target")
    assert summary.trainable_params == 16
    u, s, v = _triplets64(w)
    fa, fb = to_np(a.xs_a).astype("float64"), to_np(a.xs_b).astype("float64")
    # A_f = U_r diag(σ_r), B_f = V_rᵀ: each rank-1 part σ_i u_i v_iᵀ
    _same_subspace_products(fa / s[:4], s[:4], fb.T, u, s[:4], v, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(fa, axis=0), s[:4], rtol=1e-5)
    np.testing.assert_array_equal(to_np(a.layer.kernel), w.astype("float32"))  # unmodified
    r = to_np(a.xs_r)
    assert 0 < np.abs(r).max() < 1e-4  # N(0, 1e-5²)
    assert [v.name for v in a.trainable_variables] == ["xs_r"]
    perturb(a)
    x = _x()
    expected = x.astype("float64") @ (w + 2.0 * fa @ to_np(a.xs_r).astype("float64") @ fb)
    expected += to_np(a.layer.bias)
    np.testing.assert_allclose(to_np(model(x)), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------
# SVF (§14)
def test_svf_scales_the_full_spectrum():
    model = _dense_model()
    w = to_np(model.get_layer("target").kernel).astype("float64")
    x = _x()
    y0 = to_np(model(x))
    summary = kl.enable_adapter(model, method="svf", targets=["target"])
    a = model.get_layer("target")
    assert summary.trainable_params == 9 and summary.rows[0]["rank"] == 9
    np.testing.assert_array_equal(to_np(model(x)), y0)  # z = 1: exactly the base
    z = np.random.default_rng(0).uniform(0.5, 1.5, 9).astype("float32")
    a.svf_z.assign(z)
    u, s, v = _triplets64(w)
    expected = x.astype("float64") @ ((u * (s * z)) @ v.T) + to_np(a.layer.bias)
    np.testing.assert_allclose(to_np(model(x)), expected, rtol=1e-4, atol=1e-5)


def test_svf_reference_parametrization():
    model = _dense_model()
    w = to_np(model.get_layer("target").kernel).astype("float64")
    x = _x()
    kl.enable_adapter(model, method="svf", targets=["target"], parametrization="reference", seed=3)
    a = model.get_layer("target")
    p = to_np(a.svf_z).astype("float64")
    assert np.all(np.abs(p - 0.1) < 0.06)  # 0.1 + 0.01 N(0, 1)
    u, s, v = _triplets64(w)

    def reference(p):
        z = 1.0 / (1.0 + np.exp(-p))
        return (u * (s * z)) @ v.T * (s.sum() / (s * z).sum())

    np.testing.assert_allclose(to_np(model(x)), x @ reference(p) + to_np(a.layer.bias), rtol=1e-4, atol=1e-5)
    p2 = np.random.default_rng(1).normal(size=9)
    a.svf_z.assign(p2.astype("float32"))
    np.testing.assert_allclose(to_np(model(x)), x @ reference(p2) + to_np(a.layer.bias), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------
# SVFT (§15)
@pytest.mark.parametrize("pattern", spectral.SVFT_PATTERNS)
def test_svft_patterns_counts_and_forward(pattern):
    n_in, n_out, d = 12, 9, 2
    model = _dense_model(n_in, n_out)
    summary = kl.enable_adapter(model, method="svft", targets=["target"], pattern=pattern, off_diag=d,
                                init="reference", seed=4)
    a = model.get_layer("target")
    k = 9
    want = {"plain": k}.get(pattern, k * (2 * d + 1) - d * (d + 1))  # §15's |Ω|
    assert summary.trainable_params == want + 1
    assert registry.get("svft").trainable_count(a.geometry, a.options()) == want + 1
    rows, cols = to_np(a.svft_index)
    if pattern == "plain":
        np.testing.assert_array_equal(rows, np.arange(k))
        np.testing.assert_array_equal(cols, np.arange(k))
    elif pattern == "banded":
        pairs = {(i, j) for i in range(k) for j in range(k) if abs(i - j) <= d}
        assert set(zip(rows.tolist(), cols.tolist())) == pairs and len(rows) == len(pairs)
    elif pattern == "top_k":
        w = to_np(a.layer.kernel).astype("float64")
        u_t, _, _ = np.linalg.svd(w.T, full_matrices=False)  # torch layout W_t = Kᵀ
        # n_out == k: the reference scores C = u (torch U_t, k x k); signs as
        # the engine fixes them (largest entry of each column of V positive)
        sign = np.sign(u_t[np.argmax(np.abs(u_t), axis=0), np.arange(k)])
        c = u_t * sign
        order = np.argsort(-c.ravel(), kind="stable")[:want]
        np.testing.assert_array_equal(rows, order % k)
        np.testing.assert_array_equal(cols, order // k)
    m = to_np(a.svft_m)
    assert abs(m.std() - math.sqrt(2.0 / want)) < 0.6 * math.sqrt(2.0 / want)  # N(0, 2/|Ω|)
    assert float(to_np(a.svft_gate)[0]) == 0.0
    perturb(a)
    x = _x(n_in)
    ref = np_layer_output(a, x, REFERENCE_MERGED["svft"])
    np.testing.assert_allclose(to_np(model(x)), ref, rtol=1e-4, atol=1e-5)
    y = to_np(model(x))
    kl.merge(model)
    np.testing.assert_allclose(to_np(model(x)), y, rtol=1e-4, atol=1e-5)


def test_svft_truncated_rank_keeps_the_residual_and_zeros_init_is_exact():
    model = _dense_model()
    x = _x()
    y0 = to_np(model(x))
    kl.enable_adapter(model, method="svft", rank=4, targets=["target"])
    a = model.get_layer("target")
    np.testing.assert_array_equal(to_np(model(x)), y0)
    assert tuple(a.svft_u.shape) == (12, 4)
    np.testing.assert_array_equal(to_np(a.layer.kernel), to_np(_dense_model().get_layer("target").kernel))


def test_svft_sparse_forward_on_a_batched_einsum_kernel():
    inp = keras.Input((3, 5))
    out = keras.layers.EinsumDense("bnd,ndk->bnk", output_shape=(3, 4), name="target")(inp)
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(2, 3, 5)).astype("float32")
    kl.enable_adapter(model, method="svft", pattern="random", off_diag=1, targets=["target"], seed=1)
    a = model.get_layer("target")
    perturb(a)
    kernel = to_np(a.layer.kernel).astype("float64")  # (n, d, k): one 5x4 matrix per n
    u, v, m = (to_np(getattr(a, n)).astype("float64") for n in ("svft_u", "svft_v", "svft_m"))
    index = to_np(a.svft_index)
    gate = 1 / (1 + np.exp(-to_np(a.svft_gate).astype("float64")))
    expected = np.zeros((2, 3, 4))
    for n in range(3):
        dense = np.zeros((4, 4))
        np.add.at(dense, (index[n, 0], index[n, 1]), m[n])
        k2 = kernel[n] + gate[n, 0] * u[n] @ dense @ v[n].T
        expected[:, n] = x[:, n].astype("float64") @ k2
    np.testing.assert_allclose(to_np(model(x)), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------
# SVD-training (§19)
def test_svd_training_count_of_the_blog():
    """Phi-3-mini: hidden 3072, fused qkv (3072 -> 9216), o (3072 -> 3072),
    gate_up (3072 -> 16384), down (8192 -> 3072) in 32 layers, and lm_head
    (3072 -> 32064): q = int(3072 · 0.1) = 307 per matrix, 129 matrices."""
    spec = registry.get("svd_training")
    options = spec.validate_options({"rank_fraction": 0.1})
    shapes = [(3072, 9216), (3072, 3072), (3072, 16384), (8192, 3072)] * 32 + [(3072, 32064)]
    total = sum(spec.trainable_count(KernelGeometry("...a,ab->...b", s), options) for s in shapes)
    assert total == 39_603


def test_svd_training_trains_the_top_singular_values_only():
    model = _dense_model()
    w = to_np(model.get_layer("target").kernel).astype("float64")
    summary = kl.enable_adapter(model, method="svd_training", rank_fraction=0.5, targets=["target"])
    a = model.get_layer("target")
    assert summary.rows[0]["rank"] == 4 and summary.trainable_params == 4  # int(9 · 0.5)
    assert summary.adapter_params == 4
    assert [v.name for v in a.trainable_variables] == ["st_s"]
    u, s, v = _triplets64(w)
    np.testing.assert_allclose(to_np(a.st_s), s[:4], rtol=1e-5)
    top = (u[:, :4] * s[:4]) @ v[:, :4].T
    np.testing.assert_allclose(to_np(a.layer.kernel), w - top, atol=1e-6)
    x = _x()
    a.st_s.assign((s[:4] * [2.0, 0.5, 1.0, 0.0]).astype("float32"))
    expected = x @ (w - top + (u[:, :4] * (s[:4] * [2.0, 0.5, 1.0, 0.0])) @ v[:, :4].T) + to_np(a.layer.bias)
    np.testing.assert_allclose(to_np(model(x)), expected, rtol=1e-4, atol=1e-5)


def test_svd_training_summary_counts_sigma_apart_from_other_trainables():
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(10, name="a"),
                              keras.layers.LayerNormalization(name="norm"), keras.layers.Dense(3, name="out")])
    summary = kl.enable_adapter(model, method="svd_training", rank_fraction=0.5, trainable_layers=["norm"])
    assert summary.adapter_params == 5
    assert summary.trainable_params == 5 + 20
    assert "adapter params: 5" in str(summary) and "other trainable params: 20" in str(summary)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 2, "rank_fraction": 0.5}, "not both"),
    ({"rank_fraction": 0.05}, r"keeps int\(9 · 0.05\) = 0 singular values"),
    ({"rank_fraction": 1.5}, "rank_fraction"),
    ({"rank": 10}, "rank <= 9"),
])
def test_svd_training_refusals_leave_the_model_unchanged(kwargs, match):
    model = _dense_model()
    before = [to_np(w).copy() for w in model.weights]
    with pytest.raises(ValueError, match=match):
        kl.enable_adapter(model, method="svd_training", targets=["target"], **kwargs)
    assert not kl.adapters(model)
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(to_np(w), b)


@pytest.mark.parametrize("mode", ["int8"])
def test_on_a_kernel_keras_already_quantized(mode):
    """Methods that keep the kernel decompose the dequantized one; methods
    that rewrite it (a residual base) are refused, naming the layer."""
    model = _dense_model()
    model.quantize(mode)
    x = _x()
    y_q = to_np(model(x))
    for method in ("milora", "svd_training"):
        with pytest.raises(ValueError, match="'target' is already quantized by Keras"):
            kl.enable_adapter(model, method=method, rank=2, targets=["target"])
        assert not kl.adapters(model)
    kl.enable_adapter(model, method="svf", targets=["target"])
    a = model.get_layer("target")
    np.testing.assert_array_equal(to_np(model(x)), y_q)
    from keras_lowrank import bases

    w = to_np(bases.read_kernel(a.layer)).astype("float64")
    np.testing.assert_allclose(to_np(a.svf_s), np.linalg.svd(w, compute_uv=False), rtol=1e-5)


# ----------------------------------------------------------------------
# Adapter files without the singular vectors
@pytest.mark.parametrize("method", ["svf", "svft", "lora_xs", "svd_training"])
def test_adapter_file_leaves_the_basis_out_and_checks_the_base(method, tmp_path):
    build = lambda: _dense_model(40, 32)  # noqa: E731
    model = build()
    kl.enable_adapter(model, method=method, rank=4, targets=["target"])
    a = model.get_layer("target")
    perturb(a, scale=0.1)
    x = _x(40)
    y = to_np(model(x))
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)
    from safetensors.numpy import load_file

    names = {k.split("::")[-1] for k in load_file(str(f))}
    assert not names & set(a.derived)
    assert f.stat().st_size < 4096  # 40x32 float32 vectors would be 5 KiB each
    fresh = build()
    kl.load_adapter(fresh, f)
    np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-4, atol=1e-5)
    other = _dense_model(40, 32, seed=5)
    before = to_np(other.get_layer("target").kernel).copy()
    with pytest.raises(ValueError, match="made for another base model"):
        kl.load_adapter(other, f)
    assert not kl.adapters(other)
    np.testing.assert_array_equal(to_np(other.get_layer("target").kernel), before)


# ----------------------------------------------------------------------
# SVF composition
def _svf_model():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="h1"),
                              keras.layers.Dense(5, name="h2"), keras.layers.Dense(3, name="out")])
    return model


def _svf_copies():
    """A function building copies of one `_svf_model` (the same weights)."""
    weights = [to_np(w) for w in _svf_model().weights]

    def copy():
        m = _svf_model()
        for v, value in zip(m.weights, weights):
            v.assign(value)
        return m

    return copy


def test_compose_experts_from_files_and_z_sets(tmp_path):
    copy = _svf_copies()
    rng = np.random.default_rng(0)
    files, sets = [], []
    for i in range(2):
        m = copy()
        kl.enable_adapter(m, method="svf")
        for _, a in kl.adapters(m):
            a.svf_z.assign(rng.uniform(0.5, 1.5, tuple(a.svf_z.shape)).astype("float32"))
        sets.append(kl.svf.z_set(m))
        files.append(tmp_path / f"expert{i}.safetensors")
        kl.save_adapter(m, files[-1])
    model = copy()
    out = kl.svf.compose(model, files, [0.3, 0.7])  # adapters come from the first file
    for p in ("h1", "h2"):
        np.testing.assert_allclose(out[p], 0.3 * sets[0][p] + 0.7 * sets[1][p], rtol=1e-6)
        np.testing.assert_allclose(to_np(model.get_layer(p).svf_z), out[p], rtol=1e-6)
    # the composed model computes U diag(σ ⊙ z') Vᵀ
    x = np.random.default_rng(1).normal(size=(2, 8)).astype("float32")
    h1 = model.get_layer("h1")
    w = to_np(h1.layer.kernel).astype("float64")
    u, s, v = _triplets64(w)
    sub = keras.Model(model.inputs, h1.output)
    np.testing.assert_allclose(to_np(sub(x)), x @ ((u * (s * out["h1"])) @ v.T) + to_np(h1.layer.bias),
                               rtol=1e-4, atol=1e-5)
    per_layer = kl.svf.compose(model, [sets[0], files[1]], {"h1": [1.0, 0.0], "h2": [0.5, 0.5]})
    np.testing.assert_allclose(per_layer["h1"], sets[0]["h1"], rtol=1e-6)
    np.testing.assert_allclose(per_layer["h2"], 0.5 * sets[0]["h2"] + 0.5 * sets[1]["h2"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        kl.svf.compose(model, sets, [0.1, 0.2, 0.3])
    ref = copy()
    kl.enable_adapter(ref, method="svf", parametrization="reference")
    with pytest.raises(ValueError, match="parametrization='reference'"):
        kl.svf.compose(ref, sets)


def test_cem_search_finds_the_mix():
    model = _svf_model()
    kl.enable_adapter(model, method="svf")
    rng = np.random.default_rng(0)
    experts = [{p: rng.uniform(0.0, 2.0, tuple(a.svf_z.shape)) for p, a in kl.svf.svf_layers(model)}
               for _ in range(2)]
    target = {p: 0.2 * experts[0][p] + 0.9 * experts[1][p] for p in experts[0]}

    def scorer(m):
        z = kl.svf.z_set(m)
        return -sum(float(np.abs(z[p] - target[p]).sum()) for p in z)

    result = kl.svf.cem_search(model, experts, scorer, generations=12, seed=0)
    np.testing.assert_allclose(result.weights, [0.2, 0.9], atol=0.05)
    assert result.history[-1][0] >= result.history[0][0]
    assert scorer(model) == pytest.approx(result.score)


def _z_values(model):
    return {p: to_np(a.svf_z).copy() for p, a in kl.svf.svf_layers(model)}


@pytest.mark.parametrize("fault, message", [
    ("late_shape", r"z for layer 'h2' has shape \(3,\); the layer's z has shape \(5,\)"),
    ("length_one", r"z for layer 'h1' has shape \(1,\)"),
    ("nan", "z for layer 'h2' holds NaN"),
    ("weights_nan", "weights must be finite"),
    ("overflow", "overflows at layer"),
])
def test_compose_checks_every_expert_before_writing(fault, message):
    model = _svf_model()
    kl.enable_adapter(model, method="svf")
    rng = np.random.default_rng(0)
    good = {p: rng.uniform(0.5, 1.5, tuple(a.svf_z.shape)).astype("float32")
            for p, a in kl.svf.svf_layers(model)}
    kl.svf.compose(model, [good])
    before = _z_values(model)
    bad, weights = dict(good), None
    if fault == "late_shape":
        bad["h2"] = np.ones(3)
    elif fault == "length_one":
        bad["h1"] = np.ones(1)  # once broadcast over every singular value
    elif fault == "nan":
        bad["h2"] = np.full(5, np.nan)
    elif fault == "weights_nan":
        weights = [0.5, float("nan")]
    else:
        bad = {p: np.full_like(z, 3e38) for p, z in good.items()}
        weights = [1.0, 2.0]
    with pytest.raises(ValueError, match=message):
        kl.svf.compose(model, [good, bad], weights)
    for p, z in _z_values(model).items():
        np.testing.assert_array_equal(z, before[p])


def test_compose_onto_a_plain_model_checks_before_loading(tmp_path):
    copy = _svf_copies()
    src = copy()
    kl.enable_adapter(src, method="svf")
    f = tmp_path / "expert.safetensors"
    kl.save_adapter(src, f)
    plain = copy()
    flags = [v.trainable for v in plain.weights]
    with pytest.raises(ValueError, match="z for layer 'h2' has shape"):
        kl.svf.compose(plain, [f, {"h1": np.ones(6), "h2": np.ones(4)}])
    assert kl.adapters(plain) == [] and [v.trainable for v in plain.weights] == flags
    with pytest.raises(ValueError, match="generations must be an int >= 1"):
        kl.svf.cem_search(plain, [f], lambda m: 0.0, generations=0)
    with pytest.raises(ValueError, match="scorer returned nan"):  # after the file was loaded
        kl.svf.cem_search(plain, [f], lambda m: float("nan"), generations=1, population=2)
    assert kl.adapters(plain) == [] and [v.trainable for v in plain.weights] == flags
    out = kl.svf.compose(plain, [f, {"h1": np.ones(6)}])
    assert sorted(out) == ["h1", "h2"] and len(kl.adapters(plain)) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"generations": -1}, "cem_search: generations must be an int >= 1; received generations=-1"),
    ({"generations": 2.5}, "generations must be an int >= 1"),
    ({"init_std": float("nan")}, "init_std must be a finite number > 0"),
    ({"init_std": -0.1}, "init_std must be a finite number > 0"),
    ({"population": 1}, "population must be an int >= 2"),
    ({"elite_fraction": float("nan")}, r"elite_fraction must be a finite number in \(0, 1\]"),
    ({"seed": "0"}, "seed must be None or an int >= 0"),
    ({"scorer": lambda m: float("nan")}, "scorer returned nan"),
    ({"scorer": lambda m: "good"}, "scorer must return a number"),
])
def test_cem_search_refuses_bad_arguments_and_scores_changing_nothing(kwargs, message):
    model = _svf_model()
    kl.enable_adapter(model, method="svf")
    experts = [{p: np.full(tuple(a.svf_z.shape), v, "float32") for p, a in kl.svf.svf_layers(model)}
               for v in (0.5, 1.5)]
    before = _z_values(model)
    args = {"scorer": lambda m: 0.0, "generations": 2, "population": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        kl.svf.cem_search(model, experts, **args)
    for p, z in _z_values(model).items():
        np.testing.assert_array_equal(z, before[p])


# ----------------------------------------------------------------------
# Spectrum
def test_spectrum_matches_numpy_for_dense_einsum_and_adapters(tmp_path):
    inp = keras.Input((4, 5))
    h = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(4, 2, 3), name="proj")(inp)
    h = keras.layers.Reshape((4, 6))(h)
    out = keras.layers.Dense(3, name="out")(h)
    model = keras.Model(inp, out)
    spectra = kl.spectrum(model)
    assert list(spectra) == ["proj", "out"]
    w, _ = np_matricize("btd,ndh->btnh", to_np(model.get_layer("proj").kernel))
    np.testing.assert_allclose(spectra["proj"], np.linalg.svd(w, compute_uv=False), rtol=1e-5)
    np.testing.assert_allclose(spectra["out"], np.linalg.svd(to_np(model.get_layer("out").kernel),
                                                             compute_uv=False), rtol=1e-5)
    assert list(kl.spectrum(model, targets=["out"])) == ["out"]
    kl.enable_adapter(model, method="svf", targets=["proj"])
    a = model.get_layer("proj")
    a.svf_z.assign(np.full(5, 2.0, "float32"))
    np.testing.assert_allclose(kl.spectrum(model)["proj"], 2 * spectra["proj"], rtol=1e-5)
    share = kl.spectrum_share(spectra, 0.0, float(spectra["out"].max()))
    assert 0 < share <= 1
    fig, share2 = kl.plot_spectrum(spectra, tmp_path / "s.png", value_range=(0.1, 1.1))
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert share2 == pytest.approx(kl.spectrum_share(spectra, 0.1, 1.1))


def test_spectrum_cli(tmp_path, capsys):
    import keras_lowrank_cli as cli

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="h"), keras.layers.Dense(3, name="out")])
    path = tmp_path / "m.keras"
    model.save(path)
    plot = tmp_path / "p.png"
    assert cli.main(["spectrum", str(path), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "h " in out and "out" in out and "in [0.1, 1.1]" in out and "2 kernels, 9 singular values" in out
    assert plot.stat().st_size > 1000
    assert cli.main(["spectrum", str(path), "--range", "2", "1"]) == 2
    assert "LOW < HIGH" in capsys.readouterr().err
    assert cli.main(["spectrum", str(tmp_path / "missing.keras")]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------
# Each method fine-tunes a KerasHub model: pretrain on task A, shift to B
@pytest.fixture(scope="module")
def pretrained_gemma():
    import keras_hub

    keras.utils.set_random_seed(7)
    lm = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    x = token_inputs(20, batch=8, seq=8, seed=1)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    lm.fit(x, (x["token_ids"] + 1) % 20, epochs=15, batch_size=8, verbose=0)  # task A
    return [to_np(w).copy() for w in lm.backbone.weights]


# once per method per suite, on a backend dealt in turn (every method
# learns on every backend in the contract's test_learns)
@pytest.mark.parametrize("method", dealt(FAMILY))
def test_fine_tunes_a_pretrained_kerashub_model(method, pretrained_gemma):
    import keras_hub

    bb = gemma_backbone()
    for w, value in zip(bb.weights, pretrained_gemma):
        w.assign(value)
    lm = keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
    x = token_inputs(20, batch=8, seq=8, seed=2)
    y = (x["token_ids"] + 5) % 20  # task B
    kl.enable_adapter(lm, method=method, rank=4)
    lr = min(0.2, 1e-2 * registry.get(method).lr_scale)
    lm.compile(optimizer=keras.optimizers.Adam(lr),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = lm.fit(x, y, epochs=15, batch_size=8, verbose=0).history["loss"]
    assert losses[-1] < 0.9 * losses[0], losses
