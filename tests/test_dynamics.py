"""LoRA-FA, Delta-LoRA and AdaLoRA beyond the contract: their options and
errors, Delta-LoRA after its kernel moved (merge, files, quantized base),
AdaLoRA's shrunk adapter files, rank report and a KerasHub fine-tune."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import bases

from conftest import gemma_backbone
from conftest import MLP_X
from conftest import MLP_Y
from conftest import mlp_model
from conftest import to_np
from conftest import token_inputs

X, Y = MLP_X, MLP_Y
_model = mlp_model


def _weights(model):
    return [to_np(w).copy() for w in model.weights]


def _fit(model, steps):
    for _ in range(steps):
        model.fit(X, Y, epochs=1, batch_size=len(X), verbose=0, shuffle=False)


# ----------------------------------------------------------------------
# AdaLoRA options
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(rank=4), "total_steps is required.*total_steps=None"),
        (dict(rank=4, target_rank=5, total_steps=10), "target_rank=5 is larger than rank=4"),
        (dict(rank=4, total_steps=10, tinit=6, tfinal=4), "tinit=6, tfinal=4 and total_steps=10"),
        (dict(rank=4, total_steps=10, beta1=1.0), "beta1"),
        (dict(rank=4, total_steps=0), "total_steps"),
    ],
)
def test_adalora_bad_options_name_the_layer_and_value(kwargs, needle):
    model = _model()
    before = _weights(model)
    with pytest.raises(ValueError, match=needle):
        kl.enable_adapter(model, method="adalora", **kwargs)
    assert not kl.adapters(model)
    for w, v in zip(model.weights, before):
        np.testing.assert_array_equal(to_np(w), v)


def test_adalora_defaults_are_peft_s():
    model = _model()
    kl.enable_adapter(model, method="adalora", total_steps=50)
    a = model.get_layer("ffn")
    assert (a.rank, a.target_rank, a.tinit, a.tfinal, a.delta_t) == (12, 8, 0, 0, 1)
    assert (a.beta1, a.beta2, a.orth_reg_weight) == (0.85, 0.85, 0.5)
    # one schedule per model: a second call with another one is refused
    with pytest.raises(ValueError, match="adalora"):
        kl.enable_adapter(model, method="adalora", total_steps=60, targets=["out"])


def test_adalora_shrunk_adapter_file_loads_back_exactly(tmp_path):
    """After the budget fell, the adapter file holds only the kept
    components (and which they are); loading it onto a fresh model gives the
    same outputs, and so does its plain-LoRA export."""
    model = _model()
    kl.enable_adapter(model, method="adalora", rank=4, target_rank=1, total_steps=6, seed=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    _fit(model, 7)
    y = to_np(model(X))
    report = kl.adalora.rank_report(model)
    kept = {path: nonzero for path, _, _, nonzero in report.rows}
    assert sum(kept.values()) == report.budget == 2  # 2 layers, target 1
    assert all(alloc == nz for _, _, alloc, nz in report.rows)
    f = tmp_path / "ada.safetensors"
    kl.save_adapter(model, f)
    from safetensors.numpy import load_file

    tensors = load_file(str(f))
    for path, k in kept.items():
        assert tensors[f"{path}::lora_e"].shape == (k,)
        assert tensors[f"{path}::lora_a"].shape[0] == k
        assert tensors[f"{path}::rank_mask"].sum() == k
    fresh = _model()
    kl.load_adapter(fresh, f)
    np.testing.assert_allclose(to_np(fresh(X)), y, rtol=1e-5, atol=1e-6)
    g = tmp_path / "ada_as_lora.safetensors"
    kl.save_adapter(model, g, as_lora=True)
    plain = _model()
    summary = kl.load_adapter(plain, g)
    assert {a.method for _, a in kl.adapters(plain)} == {"lora"}
    assert summary.adapter_params < kl.adapters(model)[0][1].trainable_count()
    np.testing.assert_allclose(to_np(plain(X)), y, rtol=1e-5, atol=1e-5)
    # an untrained adapter (λ all zero) keeps every component
    untouched = _model()
    kl.enable_adapter(untouched, method="adalora", rank=4, total_steps=6)
    h = tmp_path / "untrained.safetensors"
    kl.save_adapter(untouched, h)
    assert load_file(str(h))["ffn::lora_a"].shape == (4, 5)


def test_adalora_rank_report_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    model = _model()
    kl.enable_adapter(model, method="adalora", rank=3, target_rank=2, total_steps=4)
    before = kl.adalora.rank_report(model)  # not compiled: no allocator yet
    assert before.budget is None and [r[2] for r in before.rows] == [None, None]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    _fit(model, 5)
    report = kl.adalora.rank_report(model)
    assert report.step == 5 and report.budget == 4
    text = str(report)
    assert "ffn" in text and "proj" in text and "budget 4" in text
    assert report.plot() is not None
    with pytest.raises(ValueError, match="no AdaLoRA adapters"):
        kl.adalora.rank_report(_model())


def test_adalora_on_gemma_causal_lm_allocates_across_layers():
    """A tiny KerasHub Gemma: `fit` with AdaLoRA lowers the loss and ends at
    the target budget, with ranks that differ between layers."""
    hub = pytest.importorskip("keras_hub")
    lm = hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    x = token_inputs(20, batch=4, seq=8)
    y = (x["token_ids"] + 1) % 20
    kl.enable_adapter(lm, method="adalora", rank=4, target_rank=2, total_steps=20, tinit=2, tfinal=4)
    lm.compile(optimizer=keras.optimizers.Adam(2e-2),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = lm.fit(x, y, epochs=24, batch_size=4, verbose=0)
    losses = hist.history["loss"]
    assert losses[-1] < 0.9 * losses[0]
    report = kl.adalora.rank_report(lm)
    n = len(report.rows)
    assert sum(r[2] for r in report.rows) == report.budget == 2 * n
    assert sum(r[3] for r in report.rows) == 2 * n
    assert len({r[2] for r in report.rows}) > 1  # the budget moved between layers


# ----------------------------------------------------------------------
# Delta-LoRA after the kernel moved
def _trained_delta(start=1, steps=4, base="float"):
    model = _model()
    kl.enable_adapter(model, method="delta_lora", rank=2, start_step=start, seed=2, base=base)
    model.compile(optimizer=keras.optimizers.Adam(2e-2), loss="mse")
    _fit(model, steps)
    return model


def test_delta_lora_refuses_dropout():
    model = _model()
    with pytest.raises(ValueError, match=r"'ffn'.*dropout=0.1"):
        kl.enable_adapter(model, method="delta_lora", dropout=0.1)
    assert not kl.adapters(model)


def test_delta_lora_merge_and_files_after_the_kernel_moved(tmp_path):
    model = _trained_delta()
    layer = model.get_layer("ffn")
    assert layer.kernel_shift() is not None
    y = to_np(model(X))
    f = tmp_path / "delta.safetensors"
    kl.save_adapter(model, f)  # carries the snapshot and the step count
    fresh = _model()
    kl.load_adapter(fresh, f)
    np.testing.assert_allclose(to_np(fresh(X)), y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="moved its kernel"):
        kl.save_adapter(model, tmp_path / "x.safetensors", as_lora=True)
    path = str(tmp_path / "delta.keras")
    model.save(path)
    np.testing.assert_allclose(to_np(keras.saving.load_model(path)(X)), y, rtol=1e-5, atol=1e-6)
    kl.merge(model)
    assert not kl.adapters(model)
    np.testing.assert_allclose(to_np(model(X)), y, rtol=1e-5, atol=1e-5)


def test_delta_lora_over_nf4_base_moves_the_kernel_in_effect():
    """The telescoped update needs no write to the frozen kernel, so it works
    on a 4-bit base: the output is x (dequantized K + s A B + λ s Δ) + b, and
    the stored codes never change."""
    model = _model()
    kl.enable_adapter(model, method="delta_lora", rank=2, start_step=1, seed=2, base="nf4")
    layer = model.get_layer("ffn")
    codes = [to_np(v).copy() for v in layer.layer.non_trainable_weights]
    model.compile(optimizer=keras.optimizers.Adam(2e-2), loss="mse")
    _fit(model, 4)
    assert layer.kernel_shift() is not None
    for v, c in zip(layer.layer.non_trainable_weights, codes):
        np.testing.assert_array_equal(to_np(v), c)
    k = to_np(bases.read_kernel(layer.layer)) + to_np(layer.delta_matrix())
    h = X @ k + to_np(layer.layer.bias)
    got = to_np(layer(X))
    np.testing.assert_allclose(got, np.tanh(h), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------
# LoRA-FA
def test_lora_fa_trains_only_b_and_exports_as_lora(tmp_path):
    model = _model()
    summary = kl.enable_adapter(model, method="lora_fa", rank=2)
    assert summary.adapter_params == 2 * 6 + 2 * 6  # r · n_out for ffn and proj
    assert sorted(v.path.split("/")[-1] for v in model.trainable_weights) == ["lora_b", "lora_b"]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    _fit(model, 3)
    y = to_np(model(X))
    f = tmp_path / "fa.safetensors"
    kl.save_adapter(model, f, as_lora=True)
    fresh = _model()
    kl.load_adapter(fresh, f)
    np.testing.assert_allclose(to_np(fresh(X)), y, rtol=1e-5, atol=1e-6)


def test_adalora_allocator_skips_a_step_with_non_finite_gradients():
    """A step whose gradients overflowed (which a loss-scale optimizer
    skips) leaves the EMAs, the masks and λ as they were."""
    from keras import ops

    from keras_lowrank.methods import adalora

    sched = adalora.Schedule(4, 2, 0, 0, 10, 1)
    rng = np.random.RandomState(0)
    params = [tuple(rng.normal(size=s).astype("float32") for s in ((2, 3), (2,), (2, 4)))] * 2
    grads = [tuple(rng.normal(size=s).astype("float32") for s in ((2, 3), (2,), (2, 4)))] * 2
    grads[1] = (grads[1][0], np.array([np.inf, 0.0], "float32"), grads[1][2])
    ipt = np.full((2 * (6 + 2 + 8),), 0.5, "float32")
    mask = np.ones((4,), "float32")
    e, ipt2, unc2, mask2, _ = adalora.allocate(
        sched, 0.85, 0.85, ops.convert_to_tensor(5, "int32"), params, grads, ipt, ipt, mask)
    for got, want in zip(e, params):
        np.testing.assert_array_equal(to_np(got), want[1])
    np.testing.assert_array_equal(to_np(ipt2), ipt)
    np.testing.assert_array_equal(to_np(unc2), ipt)
    np.testing.assert_array_equal(to_np(mask2), mask)
