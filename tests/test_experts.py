"""Stacked expert weights of mixture-of-experts layers (`keras_lowrank.experts`):
every method per expert on a small bank of its own, every KerasHub MoE
family end to end, targeting by kind, and the summary by kind."""


import keras
import numpy as np
import pytest
from keras import ops

import keras_lowrank as kl
from keras_lowrank import experts
from keras_lowrank import registry
from keras_lowrank.experts import ExpertLinear

from conftest import assert_noop
from conftest import dealt
from conftest import needs
from conftest import perturb
from conftest import to_np
from moe_models import MOE_FAMILIES
from moe_models import moe_backbone
from moe_models import moe_inputs

METHODS = kl.methods()
E, D, H = 3, 6, 5


@keras.saving.register_keras_serializable(package="klr_tests")
class TinyExperts(keras.layers.Layer):
    """A bank of `E` two-layer experts kept as stacked raw weights, as
    KerasHub keeps them: `(tokens, D) -> (experts, tokens, D)`."""

    def build(self, input_shape):
        self.w_in = self.add_weight(name="w_in", shape=(E, D, H), initializer="glorot_uniform")
        self.w_out = self.add_weight(name="w_out", shape=(E, H, D), initializer="glorot_uniform")

    def call(self, x):
        h = ops.tanh(ops.einsum("td,edh->eth", x, self.w_in))
        return ops.einsum("eth,ehd->etd", h, self.w_out)


@keras.saving.register_keras_serializable(package="klr_tests")
class TinyMoE(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bank = TinyExperts(name="bank")
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x):
        return self.head(ops.sum(self.bank(x), axis=0))


X = np.random.RandomState(0).normal(size=(4, D)).astype("float32")


def tiny_moe():
    keras.utils.set_random_seed(0)
    model = TinyMoE()
    model(X)
    return model


def np_forward(model, w_in, w_out):
    h = np.tanh(np.einsum("td,edh->eth", X.astype("float64"), w_in))
    y = np.einsum("eth,ehd->etd", h, w_out).sum(0)
    return y @ to_np(model.head.kernel) + to_np(model.head.bias)


def merged_kernel(adapter):
    w = adapter.merged_matrix(adapter.base_matrix())
    return to_np(adapter.geometry.matrix_to_kernel(w)).astype("float64")


def per_expert_variables(adapter):
    own = list(adapter.adapter_variables().values()) + list(adapter.linked_variables())
    return [v for v in own if v.trainable and len(v.shape) and v.shape[0] == E]


def _refuses_expert_stacks(model, method, **kwargs):
    """A method that initializes from sample data refuses expert stacks by
    name (the data cannot say which tokens each expert gets), and the bank
    keeps its plain weights."""
    before = [to_np(w).copy() for w in model.weights]
    with pytest.raises(ValueError, match="expert kernels.*initializes from sample data"):
        kl.enable_adapter(model, method=method, rank=2, targets="experts", **kwargs, **needs(method, model))
    assert not kl.adapters(model) and not experts.slots(model.bank)
    assert all(np.array_equal(to_np(w), v) for w, v in zip(model.weights, before))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_works_per_expert(method):
    """No-op at start, a forward equal to the method's own merged kernels,
    each expert's update from its own slice of the factors, and a merge
    that gives the bank its plain weights back with the same outputs."""
    model = tiny_moe()
    y0 = to_np(model(X))
    if registry.get(method).calibration:
        _refuses_expert_stacks(model, method)
        return
    summary = kl.enable_adapter(model, method=method, rank=2, targets="experts", **needs(method, model))
    assert summary.kinds["experts"] == (2, 2)
    adapters = dict(kl.adapters(model))
    assert sorted(adapters) == ["bank/w_in", "bank/w_out"]
    for a in adapters.values():
        assert a.geometry.matrix_shape[0] == E and isinstance(a.layer, ExpertLinear)
    y = to_np(model(X))
    assert_noop(method, y, y0)
    for i, a in enumerate(adapters.values()):
        perturb(a, seed=i)
    y = to_np(model(X))
    a_in, a_out = adapters["bank/w_in"], adapters["bank/w_out"]
    ref = np_forward(model, merged_kernel(a_in), merged_kernel(a_out))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    assert np.abs(y - y0).max() > 1e-4  # the experts' adapters act
    # expert 0's update reads only expert 0's slice of the per-expert factors
    owned = per_expert_variables(a_in)
    assert owned, f"{method}: no variable has one slice per expert"
    before = merged_kernel(a_in)
    for v in owned:
        value = to_np(v).copy()
        value[1:] += 0.5
        v.assign(value)
    after = merged_kernel(a_in)
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6, atol=1e-6)
    assert np.abs(after[1:] - before[1:]).max() > 1e-4
    y = to_np(model(X))
    spec = registry.get(method)
    tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, np.abs(y).max()))
    if spec.unmergeable:  # in place, and back
        kl.merge(model, unload=False)
        np.testing.assert_allclose(to_np(model(X)), y, **tol)
        kl.unmerge(model)
        np.testing.assert_allclose(to_np(model(X)), y, **tol)
    kl.merge(model)
    assert isinstance(model.bank.w_in, keras.Variable) and isinstance(model.bank.w_out, keras.Variable)
    assert not experts.slots(model.bank)
    assert [(v.name, tuple(v.shape)) for v in model.bank.weights] == [("w_in", (E, D, H)), ("w_out", (E, H, D))]
    np.testing.assert_allclose(to_np(model(X)), y, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(y).max()))


def test_named_adapters_on_expert_stacks(tmp_path):
    """Two named adapters on the same expert stacks: each one active in
    turn gives its own outputs, and a `.keras` file keeps both."""
    model = tiny_moe()
    kl.enable_adapter(model, rank=2, targets="experts", adapter_name="a")
    kl.enable_adapter(model, method="dora", rank=2, targets="experts", adapter_name="b")
    for i, (_, a) in enumerate(kl.adapters(model)):
        perturb(a, seed=i)
    outputs = {}
    for name in ("a", "b"):
        kl.set_active(model, name)
        outputs[name] = to_np(model(X))
    assert np.abs(outputs["a"] - outputs["b"]).max() > 1e-4
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    for name in ("a", "b"):
        kl.set_active(back, name)
        np.testing.assert_allclose(to_np(back(X)), outputs[name], rtol=1e-5, atol=1e-6)
    kl.merge(model, adapter_names=["b"])
    assert isinstance(model.bank.w_in, keras.Variable)
    np.testing.assert_allclose(to_np(model(X)), outputs["b"], rtol=1e-5, atol=1e-5)


def test_lora_forward_never_builds_an_expert_update():
    """The adapter's forward is the factored einsum over experts: it never
    forms the `(experts, in, out)` update (`delta_matrix`)."""
    model = tiny_moe()
    kl.enable_adapter(model, rank=2, targets="experts")
    for _, a in kl.adapters(model):
        perturb(a)
    want = to_np(model(X))

    def refuse(*args, **kwargs):
        raise AssertionError("the forward built the expert update")

    for _, a in kl.adapters(model):
        a.delta_matrix = refuse
        a.merged_matrix = refuse
    np.testing.assert_allclose(to_np(model(X)), want, rtol=1e-6)


def test_qlora_on_expert_weights_and_keras_reload(tmp_path):
    """NF4 expert stacks under LoRA: the forward is the dequantized experts
    plus the update, training moves only the adapters, and a `.keras` round
    trip gives the same outputs."""
    model = tiny_moe()
    kl.enable_adapter(model, rank=2, targets="experts", base="nf4")
    for _, a in kl.adapters(model):
        assert a.layer.geometry.matrix_shape == a.geometry.matrix_shape
        perturb(a)
    a_in, a_out = (dict(kl.adapters(model))[k] for k in ("bank/w_in", "bank/w_out"))
    y = to_np(model(X))
    np.testing.assert_allclose(y, np_forward(model, merged_kernel(a_in), merged_kernel(a_out)),
                               rtol=1e-4, atol=1e-5)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    names = sorted(v.path for v in model.trainable_variables)
    assert all("lora" in n or n.startswith("head/") for n in names), names
    model.fit(X, np.ones((4, 2), "float32"), epochs=2, verbose=0)
    y = to_np(model(X))
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(to_np(back(X)), y, rtol=1e-6, atol=1e-6)


def test_refused_call_leaves_the_bank_as_it_was():
    model = tiny_moe()
    before = [(v.path, to_np(v).copy()) for v in model.weights]
    with pytest.raises(ValueError, match="rank"):
        kl.enable_adapter(model, method="pissa", rank=50, targets="experts")
    assert isinstance(model.bank.w_in, keras.Variable) and not experts.slots(model.bank)
    after = [(v.path, to_np(v)) for v in model.weights]
    assert [p for p, _ in after] == [p for p, _ in before]
    for (_, a), (_, b) in zip(after, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", dealt(sorted(MOE_FAMILIES)))
def test_moe_family_end_to_end(family, tmp_path):
    """Each KerasHub MoE family (each on one backend per suite run): the
    default targets adapt its experts beside attention; a compiled fit
    trains the expert adapters; `.keras` and adapter files round-trip; a
    merge gives back a plain backbone with the same outputs."""
    bb = moe_backbone(family)
    x = moe_inputs(family)
    y0 = to_np(bb(x))
    n_weights = len(bb.weights)
    summary = kl.enable_adapter(bb, rank=2)
    assert summary.kinds["experts"][0] == summary.kinds["experts"][1] >= 2
    assert summary.kinds["linear"][0] >= 2  # attention too
    assert "router" in summary.kinds
    np.testing.assert_array_equal(to_np(bb(x)), y0)
    expert_a = [a for p, a in kl.adapters(bb) if isinstance(a.layer, ExpertLinear)]
    before = [to_np(v).copy() for a in expert_a for v in a.trainable_variables]
    bb.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    target = np.ones(y0.shape, "float32")
    bb.fit(x, target, epochs=2, batch_size=2, verbose=0)
    after = [to_np(v) for a in expert_a for v in a.trainable_variables]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, before) if b.ndim and np.abs(b).max() == 0)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, before))
    y = to_np(bb(x))
    bb.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(to_np(back(x)), y, rtol=1e-5, atol=1e-5)
    kl.save_adapter(bb, tmp_path / "a.safetensors")
    fresh = moe_backbone(family)
    kl.load_adapter(fresh, tmp_path / "a.safetensors")
    np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-5, atol=1e-5)
    kl.merge(bb)
    assert not kl.adapters(bb) and len(bb.weights) == n_weights
    assert not any(isinstance(l, ExpertLinear) for l in bb._flatten_layers())
    np.testing.assert_allclose(to_np(bb(x)), y, rtol=1e-4, atol=1e-5)


@pytest.mark.one_backend
def test_targets_by_kind_and_summary():
    bb = moe_backbone("qwen_moe")
    s = kl.enable_adapter(bb, rank=2, targets="experts")
    assert s.kinds == {"linear": (0, 4), "router": (0, 1), "experts": (2, 2), "shared-experts": (0, 4),
                       "embedding": (0, 1)}
    assert all(r["kind"] == "experts" for r in s.rows)
    assert "by kind: linear 0 of 4 adapted, experts 2 of 2 adapted" in str(s)
    bb = moe_backbone("qwen_moe")
    s = kl.enable_adapter(bb, rank=2, targets=["router", "shared-experts"])
    assert {r["kind"] for r in s.rows} == {"router", "shared-experts"}
    assert s.kinds["experts"] == (0, 2)  # folded back, still counted
    bb = moe_backbone("mixtral")
    s = kl.enable_adapter(bb, rank=2, exclude="router", rank_pattern={"experts": 4})
    assert s.kinds["router"] == (0, 1) and s.kinds["experts"] == (3, 3)
    assert {r["rank"] for r in s.rows if r["kind"] == "experts"} == {4}
    assert {r["rank"] for r in s.rows if r["kind"] == "linear"} == {2}
    bb = moe_backbone("gemma4")
    s = kl.enable_adapter(bb, rank=2, targets="all-linear")
    assert s.kinds == {"linear": (7, 7), "router": (1, 1), "experts": (3, 3), "embedding": (0, 1)}


@pytest.mark.parametrize("base", ["int8", "int4"])
def test_keras_int_quantized_expert_stacks(base, tmp_path):
    """Keras's own int8/int4 quantizers on expert stacks (one scale per
    expert and output column): the frozen experts dequantize to within the
    quantization step, LoRA trains over them, and the model reloads."""
    model = tiny_moe()
    w_in = to_np(model.bank.w_in).astype("float64")
    kl.enable_adapter(model, rank=2, targets="experts", base=base)
    a_in = dict(kl.adapters(model))["bank/w_in"]
    assert a_in.layer.quantization == base
    step = np.abs(w_in).max(axis=1, keepdims=True) / (127 if base == "int8" else 7)
    assert np.all(np.abs(to_np(a_in.layer.dequantized_kernel()) - w_in) <= 0.51 * step + 1e-7)
    assert {str(v.dtype) for v in a_in.layer.storage_variables()} == {"int8", "float32"}
    for _, a in kl.adapters(model):
        perturb(a)
    a_out = dict(kl.adapters(model))["bank/w_out"]
    y = to_np(model(X))
    np.testing.assert_allclose(y, np_forward(model, merged_kernel(a_in), merged_kernel(a_out)),
                               rtol=1e-4, atol=1e-5)
    model.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(to_np(back(X)), y, rtol=1e-6, atol=1e-6)
    kl.merge(model)
    assert isinstance(model.bank.w_in, keras.Variable)
    np.testing.assert_allclose(to_np(model(X)), y, rtol=1e-5, atol=1e-5)


#: every method over NF4 expert stacks on every backend; over int8 and
#: int4 each backend runs a third of the methods (all of them once per suite)
QUANTIZED_CASES = [(m, "nf4") for m in METHODS] + dealt([(m, b) for b in ("int8", "int4") for m in METHODS])


@pytest.mark.parametrize("method, base", QUANTIZED_CASES)
def test_every_method_over_quantized_expert_stacks(method, base):
    """Every method that composes with a quantized base does so per expert
    (its forward is the dequantized experts plus its update); the others
    are refused by name before anything changes."""
    spec = registry.get(method)
    model = tiny_moe()
    if spec.calibration:
        _refuses_expert_stacks(model, method, base=base)
        return
    if base not in spec.base_kinds:
        with pytest.raises(ValueError, match=method):
            kl.enable_adapter(model, method=method, rank=2, targets="experts", base=base, **needs(method, model))
        assert not experts.slots(model.bank)
        return
    kl.enable_adapter(model, method=method, rank=2, targets="experts", base=base, **needs(method, model))
    adapters = dict(kl.adapters(model))
    for i, a in enumerate(adapters.values()):
        assert a.layer.geometry.matrix_shape[0] == E
        perturb(a, seed=i)
    y = to_np(model(X))
    ref = np_forward(model, merged_kernel(adapters["bank/w_in"]), merged_kernel(adapters["bank/w_out"]))
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


class NumpyExperts(keras.layers.Layer):
    """A stacked weight multiplied by NumPy's einsum, not keras.ops's."""

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(E, D, H))

    def call(self, x):
        return np.einsum("td,edh->eth", np.asarray(x), np.asarray(self.w))


def test_only_keras_ops_einsums_are_routed():
    layer = NumpyExperts()
    layer.build((4, D))
    assert experts.expert_weights(layer) == {}
    bank = TinyExperts()
    bank.build((4, D))
    assert sorted(experts.expert_weights(bank)) == ["w_in", "w_out"]
