"""What a new user meets: files that load onto any fresh build, inputs that
never poison the frozen base, refusals that change nothing, clear errors."""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import _compat
from keras_lowrank import bases
from keras_lowrank import registry
from keras_lowrank import tree

from conftest import BACKEND
from conftest import families
from conftest import gemma_backbone
from conftest import perturb
from conftest import needs
from conftest import to_np
from conftest import token_inputs
from conftest import tunable

METHODS = kl.methods()
#: one method per family, for lifecycle checks that do not depend on the method
FAMILIES = families()


def snapshot(model):
    """Every weight (bit for bit), layer type and trainable flag."""
    return (
        [type(layer).__name__ for layer in model._flatten_layers()],
        [(w.path, to_np(w).copy()) for w in model.weights],
        [(w.path, w.trainable) for w in model.weights],
        [layer.trainable for layer in model._flatten_layers()],
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0]
    assert [p for p, _ in after[1]] == [p for p, _ in before[1]]
    for (_, a), (_, b) in zip(after[1], before[1]):
        np.testing.assert_array_equal(a, b)
    assert after[2] == before[2]
    assert after[3] == before[3]


# ----------------------------------------------------------------------
# 1. Adapter files load onto any freshly built copy of the model
class _Sub(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = keras.layers.EinsumDense("bd,dk->bk", output_shape=(6,))
        self.hidden = keras.layers.Dense(6, activation="relu")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(self.proj(x)))


keras.saving.register_keras_serializable(package="klr_tests")(_Sub)


def _sequential():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(6), keras.layers.Dense(6), keras.layers.Dense(3)])


def _functional():
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="tanh")(inp)
    h = keras.layers.EinsumDense("bd,dk->bk", output_shape=(6,), bias_axes="k")(h)
    return keras.Model(inp, keras.layers.Dense(3)(h))


def _nested():
    inner = keras.Sequential([keras.layers.Dense(6), keras.layers.Dense(6)])
    inp = keras.Input((5,))
    return keras.Model(inp, keras.layers.Dense(3)(inner(inp)))


def _subclassed():
    m = _Sub()
    m(np.zeros((1, 5), "float32"))
    return m


def _gemma_lm():
    import keras_hub

    return keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)


X5 = np.random.RandomState(0).normal(size=(2, 5)).astype("float32")
KINDS = {
    "sequential": (_sequential, X5),
    "functional": (_functional, X5),
    "nested_sequential": (_nested, X5),
    "subclassed": (_subclassed, X5),
    "gemma_backbone": (gemma_backbone, token_inputs(20)),
    "gemma_causal_lm": (_gemma_lm, token_inputs(20)),
}


def _adapted(kind, method="lora"):
    make, x = KINDS[kind]
    model = make()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2)
    for _, a in kl.adapters(model):
        perturb(a, scale=0.2)
    return model, x


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapter_file_onto_a_second_build_in_this_process(kind, tmp_path):
    make, x = KINDS[kind]
    model, x = _adapted(kind)
    base = make()  # built after: Keras gives its unnamed layers other names
    y = to_np(model(x))
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)
    with kl.disable_adapter(model):
        base_weights = [to_np(w) for w in _base_weights(model)]
    for w, v in zip(_base_weights(base), base_weights):
        w.assign(v)
    kl.load_adapter(base, f)
    np.testing.assert_allclose(to_np(base(x)), y, rtol=1e-5, atol=1e-5)
    # and the .keras file of the adapted model reloads
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.testing.assert_allclose(to_np(keras.saving.load_model(path)(x)), y, rtol=1e-5, atol=1e-5)


def _base_weights(model):
    """The weights of the model as it was before adapters (kernels, biases,
    embeddings, norms), in model order."""
    out = []
    for layer in [model] + [e.layer for e in tree.walk(model, into_adapters=True)]:
        if tree.is_adapter(layer):
            continue
        out.extend(_compat.created_trainable(layer))
    return out


TWO_PROCESS_SCRIPT = r"""
import os, sys
import numpy as np, keras
import keras_lowrank as kl
sys.path.insert(0, sys.argv[2])
import test_hardening as th
out = sys.argv[1]
for kind in sorted(th.KINDS):
    keras.utils.set_random_seed(3)
    model, x = th._adapted(kind)
    np.save(os.path.join(out, kind + ".npy"), keras.ops.convert_to_numpy(model(x)))
    kl.save_adapter(model, os.path.join(out, kind + ".safetensors"))
    with kl.disable_adapter(model):
        base = [keras.ops.convert_to_numpy(w) for w in th._base_weights(model)]
    np.savez(os.path.join(out, kind + ".npz"), *base)
print("ok")
"""


@pytest.mark.one_backend
def test_adapter_files_from_another_process(tmp_path):
    """Files written by a fresh process (layers named dense, dense_1, ...)
    load here, where Keras has numbered many layers since."""
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run(
        [sys.executable, "-c", TWO_PROCESS_SCRIPT, str(tmp_path), here],
        env=dict(os.environ, KERAS_BACKEND=BACKEND), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for _ in range(2):  # move Keras's name counters on
        _sequential(), _functional(), _nested()
    for kind, (make, x) in sorted(KINDS.items()):
        model = make()
        saved = np.load(tmp_path / f"{kind}.npz")
        for i, w in enumerate(_base_weights(model)):
            w.assign(saved[f"arr_{i}"])
        kl.load_adapter(model, tmp_path / f"{kind}.safetensors")
        np.testing.assert_allclose(to_np(model(x)), np.load(tmp_path / f"{kind}.npy"), rtol=1e-5, atol=1e-5)


def _write_file(path, tensors, plan, version="2"):
    from safetensors.numpy import save_file

    meta = {"format": "keras_lowrank.adapter", "version": version, "model": "Functional",
            "plan": plan if isinstance(plan, str) else json.dumps(plan)}
    save_file(tensors, str(path), metadata=meta)


def _read(path):
    return kl.saving.read_adapter_file(path)


def test_format_1_files_still_load_or_say_how(tmp_path):
    """Format 1 (keyed by path) loads onto a model with those names; onto
    another the error says what to do."""
    inp = keras.Input((5,))
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(keras.layers.Dense(6, name="ffn")(inp)))
    kl.enable_adapter(model, rank=2, alpha=4)
    perturb(model.get_layer("ffn"))
    y = to_np(model(X5))
    _, plan, tensors = _read(_save(model, tmp_path / "v2.safetensors"))
    v1_layers = {}
    for key, cfg in plan["layers"].items():
        v1 = {"method": cfg["method"], **cfg["options"], "base": cfg["base"],
              "double_quant": cfg["double_quant"], "kernel_shape": cfg["kernel_shape"],
              "equation": cfg["equation"]}
        v1_layers[cfg["path"]] = v1
    f1 = tmp_path / "v1.safetensors"
    # (the key of every layer here is its path: the names were given)
    _write_file(f1, tensors, {"layers": v1_layers, "trainable_layers": None}, version="1")
    inp2 = keras.Input((5,))
    same_names = keras.Model(inp2, keras.layers.Dense(3, name="out")(keras.layers.Dense(6, name="ffn")(inp2)))
    with kl.disable_adapter(model):
        for w, v in zip(_base_weights(same_names), [to_np(w) for w in _base_weights(model)]):
            w.assign(v)
    kl.load_adapter(same_names, f1)
    np.testing.assert_allclose(to_np(same_names(X5)), y, rtol=1e-5, atol=1e-5)
    other = _sequential()
    with pytest.raises(ValueError, match="format 1.*save it again"):
        kl.load_adapter(other, f1)


def _save(model, path):
    kl.save_adapter(model, path)
    return path


# ----------------------------------------------------------------------
# 2. Nothing in a file or an option poisons the base
def _small(name="ffn"):
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="relu", name=name)(inp)
    h = keras.layers.EinsumDense("bd,dk->bk", output_shape=(4,), bias_axes="k", name="proj")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))


def _poisoned(tmp_path, method, base, change):
    model = _small()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, base=base)
    for _, a in kl.adapters(model):
        perturb(a)
    meta, plan, tensors = _read(_save(model, tmp_path / "ok.safetensors"))
    tensors, plan = change(dict(tensors), plan)
    f = tmp_path / "bad.safetensors"
    _write_file(f, tensors, plan)
    return f


def _refused(model, f, match, exc=ValueError):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        kl.load_adapter(model, f)
    assert_unchanged(model, before)


@pytest.mark.parametrize("base", ["float", "nf4"])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_file_is_refused_before_anything_is_written(method, base, tmp_path):
    same = _small()
    kl.enable_adapter(same, method=method, **needs(method, same), rank=2, base=base)
    for bad in (np.nan, np.inf):
        def change(tensors, plan):
            # the layer's own tensor, or the tied pair it reads (LoRA-drop)
            own = [k for k in sorted(tensors) if k.startswith("proj::")]
            key = own[0] if own else next(k for k in sorted(tensors) if k.startswith("@"))
            value = tensors[key].copy()
            value.flat[0] = bad
            tensors[key] = value
            return tensors, plan

        f = _poisoned(tmp_path, method, base, change)
        _refused(_small(), f, "NaN or inf")
        # also onto a model that has the same adapters already
        _refused(same, f, "NaN or inf")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("base", ["float", "nf4", "int8", "int4", "keras_int8"])
def test_non_finite_frozen_kernels_are_refused_by_every_method(base, bad):
    """One rule on every base: no adapter goes on a kernel holding NaN or
    inf (a quantized kernel: on its scales); refused before anything
    changes, for every method (the SVD inits and QLoRA included)."""
    model = _small()
    if base == "keras_int8":  # a model Keras quantized itself: its scales
        model.quantize("int8", filters=lambda layer: layer.name == "ffn")
        scale = model.get_layer("ffn").kernel_scale
        value = to_np(scale).copy()
        value.flat[0] = bad
        scale.assign(value)
        base = None
    else:
        kernel = model.get_layer("ffn").kernel
        value = to_np(kernel).copy()
        value.flat[3] = bad
        kernel.assign(value)
    before = snapshot(model)
    for method in METHODS:
        spec = registry.get(method)
        if (base or "float") not in spec.base_kinds or (base is None and spec.layer_class.rewrites_kernel):
            continue
        with pytest.raises(ValueError, match="Layer 'ffn': its frozen kernel .* holds NaN or inf"):
            kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["ffn"], base=base)
        assert_unchanged(model, before)


@pytest.mark.parametrize("base", ["float", "nf4"])
@pytest.mark.parametrize("method", ["pissa", "milora", "olora"])
def test_a_file_cannot_rewrite_the_base_into_something_else(method, base, tmp_path):
    """The residual methods subtract the file's initial factors from the
    kernel: factors that are not the init's decomposition of that kernel
    (huge finite ones that cancel it in float32, or ones made for another
    kernel) are refused before the base is touched."""
    keras.utils.set_random_seed(7)
    src = _small()
    weights = [to_np(w).copy() for w in src.weights]

    def fresh():
        m = _small()
        for v, w in zip(m.weights, weights):
            v.assign(w)
        return m

    kl.enable_adapter(src, method=method, rank=2, alpha=4, base=base)
    for _, a in kl.adapters(src):
        perturb(a)
    y = to_np(src(X5))
    f = _save(src, tmp_path / "ok.safetensors")
    ok = fresh()
    kl.load_adapter(ok, f)  # a genuine file loads and computes what it did
    np.testing.assert_allclose(to_np(ok(X5)), y, rtol=1e-4, atol=1e-4)
    _, plan, tensors = _read(f)
    huge = dict(tensors)
    huge["ffn::lora_a0"] = tensors["ffn::lora_a0"] * 1e8
    _write_file(tmp_path / "huge.safetensors", huge, plan)
    _refused(fresh(), tmp_path / "huge.safetensors", f"'ffn': the initial factors .* not {method}'s")
    other = _small()  # another kernel: the factors are not its decomposition
    _refused(other, f, f"not {method}'s decomposition")


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_non_float_tensors_are_refused(dtype, tmp_path):
    def change(tensors, plan):
        key = next(iter(tensors))
        tensors[key] = np.ones(tensors[key].shape, dtype)
        return tensors, plan

    _refused(_small(), _poisoned(tmp_path, "lora", None, change), f"has dtype {dtype}")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("activation", "relu", r"Unknown field|activation"),
        ("dtype", "float16", r"dtype"),
        ("alpha", 0.0, "alpha"),
        ("alpha", -2.0, "alpha"),
        ("alpha", float("nan"), "alpha"),
        ("rank", 2.5, "rank"),
        ("train_bias", "no", "train_bias"),
        ("dropout", 2.0, "dropout"),
    ],
)
def test_file_options_are_validated_like_enable_adapter(field, value, match, tmp_path):
    def change(tensors, plan):
        cfg = plan["layers"]["ffn"]
        cfg["options"][field] = value
        return tensors, plan

    f = _poisoned(tmp_path, "lora", None, change)
    _refused(_small(), f, match)


def test_tensors_outside_the_plan_and_malformed_fields_are_refused(tmp_path):
    def extra(tensors, plan):
        tensors["out::lora_a"] = np.ones((2, 4), "float32")
        return tensors, plan

    _refused(_small(), _poisoned(tmp_path, "lora", None, extra), "belongs to no layer")

    def unknown_field(tensors, plan):
        plan["layers"]["ffn"]["activation"] = "relu"
        return tensors, plan

    _refused(_small(), _poisoned(tmp_path, "lora", None, unknown_field), "unknown fields")

    def unmatched_trainable(tensors, plan):
        plan["trainable_layers"] = ["nope"]
        return tensors, plan

    _refused(_small(), _poisoned(tmp_path, "lora", None, unmatched_trainable), "trainable_layers")

    def bad_regex(tensors, plan):
        plan["trainable_layers"] = ["re:("]
        return tensors, plan

    _refused(_small(), _poisoned(tmp_path, "lora", None, bad_regex), "Invalid regex")


@pytest.mark.parametrize(
    "bytes_or_meta,match",
    [
        (b"not a safetensors file at all", "not a readable safetensors"),
        ({"format": "other"}, "not a keras_lowrank adapter file"),
        ({"format": "keras_lowrank.adapter", "version": "2"}, "no adapter plan"),
        ({"format": "keras_lowrank.adapter", "version": "2", "plan": "{not json"}, "not valid JSON"),
        ({"format": "keras_lowrank.adapter", "version": "2", "plan": "[1, 2]"}, "malformed"),
        ({"format": "keras_lowrank.adapter", "version": "2", "plan": json.dumps({"layers": {"ffn": 3}, "format_version": 2})}, "not a mapping"),
        ({"format": "keras_lowrank.adapter", "version": "2", "plan": json.dumps({"layers": {"ffn": {"method": "nope"}}, "format_version": 2})}, "Unknown adapter method"),
        ({"format": "keras_lowrank.adapter", "version": "9", "plan": "{}"}, "format '9'"),
    ],
)
def test_malformed_files_get_a_clear_error_naming_the_file(bytes_or_meta, match, tmp_path):
    from safetensors.numpy import save_file

    f = tmp_path / "bad.safetensors"
    if isinstance(bytes_or_meta, bytes):
        f.write_bytes(bytes_or_meta)
    else:
        save_file({"x": np.zeros((1,), "float32")}, str(f), metadata=bytes_or_meta)
    model = _small()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        kl.load_adapter(model, f)
    assert "bad.safetensors" in str(info.value) or "Unknown adapter method" in str(info.value)
    assert_unchanged(model, before)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        kl.load_adapter(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a file"):
        kl.load_adapter(model, tmp_path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e20])
def test_dora_on_zero_tiny_and_huge_kernels(scale):
    inp = keras.Input((5,))
    model = keras.Model(inp, keras.layers.Dense(4, name="target")(inp))
    k = np.random.RandomState(0).normal(size=(5, 4)).astype("float32") * np.float32(scale)
    k[:, 0] = 0.0  # a zero column always
    model.get_layer("target").kernel.assign(k)
    x = np.random.RandomState(1).normal(size=(3, 5)).astype("float32")
    y_base = to_np(model(x))
    kl.enable_adapter(model, method="dora", rank=2, targets=["target"])
    a = model.get_layer("target")
    assert np.all(np.isfinite(to_np(a.magnitude)))
    np.testing.assert_array_equal(to_np(model(x)), y_base)
    perturb(a, scale=0.1)
    # magnitudes near the column norms, as training keeps them
    norms = np.sqrt((k.astype("float64") ** 2).sum(0))
    a.magnitude.assign((norms * (1 + 0.1 * np.random.RandomState(2).normal(size=4))).astype("float32"))
    y = to_np(model(x))
    assert np.all(np.isfinite(y))
    kl.merge(model)
    y_m = to_np(model(x))
    assert np.all(np.isfinite(y_m))
    np.testing.assert_allclose(y_m, y, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(y).max()))


def test_loading_onto_merged_adapters_is_refused(tmp_path):
    model = _small()
    kl.enable_adapter(model, rank=2)
    perturb(model.get_layer("ffn"))
    f = _save(model, tmp_path / "a.safetensors")
    kl.merge(model, unload=False)
    _refused(model, f, "unmerge")


@pytest.mark.parametrize("method", FAMILIES)
def test_activity_regularizer_stays_on_the_layer_output(method, tmp_path):
    def build():
        inp = keras.Input((5,))
        h = keras.layers.Dense(6, activation="relu", activity_regularizer=keras.regularizers.L2(0.5), name="ffn")(inp)
        return keras.Model(inp, keras.layers.Dense(3, name="out")(h))

    x = np.random.RandomState(0).normal(size=(4, 5)).astype("float32")
    y = np.zeros((4, 3), "float32")
    plain = build()
    model = build()
    model.set_weights(plain.get_weights())
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["ffn"])

    def loss(m):
        m.compile(optimizer="sgd", loss="mse")
        return m.evaluate(x, y, verbose=0)

    # LoRA-XS starts close to, not at, the base (R ~ N(0, 1e-10))
    start_tol = 1e-5 if registry.get(method).noop_at_init != "no" else 1e-3
    np.testing.assert_allclose(loss(model), loss(plain), rtol=start_tol)
    a = model.get_layer("ffn")
    assert a.activity_regularizer is not None and a.layer.activity_regularizer is None
    perturb(a)
    adapted_loss = loss(model)
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.testing.assert_allclose(loss(keras.saving.load_model(path)), adapted_loss, rtol=1e-5)
    kl.merge(model)
    assert model.get_layer("ffn").activity_regularizer is not None
    np.testing.assert_allclose(loss(model), adapted_loss, rtol=1e-4)


def test_nf4_base_under_mixed_float16_is_right():
    keras.config.set_dtype_policy("mixed_float16")
    inp = keras.Input((64,))
    model = keras.Model(inp, keras.layers.Dense(32, name="target")(inp))
    x = np.random.RandomState(0).normal(size=(4, 64)).astype("float32")
    kl.enable_adapter(model, rank=2, targets=["target"], base="nf4")
    a = model.get_layer("target")
    k = to_np(bases.read_kernel(a.layer)).astype("float64")
    ref = x.astype("float64") @ k + to_np(a.layer.bias)
    y = to_np(model(x)).astype("float64")
    assert np.abs(y - ref).max() < 2e-2 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_model_trains_its_float32_adapters_with_adam(method):
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", dtype="bfloat16", name="ffn")(inp)
    model = keras.Model(inp, keras.layers.Dense(4, dtype="bfloat16", name="out")(h))
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["ffn"])
    a = model.get_layer("ffn")
    assert {keras.backend.standardize_dtype(v.dtype) for v in tunable(a)} == {"float32"}
    assert a.compute_dtype == "bfloat16"
    perturb(a, scale=0.1)
    before = [to_np(v).copy() for v in tunable(a)]
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    x = np.random.RandomState(0).normal(size=(16, 8)).astype("float32")
    y = np.random.RandomState(1).normal(size=(16, 4)).astype("float32")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for b, v in zip(before, tunable(a)):
        assert not np.array_equal(b, to_np(v)), f"{v.path} did not train"


@pytest.mark.parametrize("method", FAMILIES)
def test_disabled_state_survives_a_keras_round_trip(method, tmp_path):
    model = _small()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2)
    for _, a in kl.adapters(model):
        perturb(a)
    with kl.disable_adapter(model):
        y_base = to_np(model(X5))
    kl.set_adapter_enabled(model, False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert not any(a.adapter_enabled for _, a in kl.adapters(loaded))
    np.testing.assert_allclose(to_np(loaded(X5)), y_base, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------
# 3. A refused call changes nothing, at every entry point
BAD_ENABLE = [
    dict(rank=2, alpha=0),
    dict(rank=2, alpha=-1.0),
    dict(rank=2, alpha=float("nan")),
    dict(rank=2, alpha=float("inf")),
    dict(rank=2, alpha="2"),
    dict(rank=2, train_bias="no"),
    dict(rank=2, dropout="0.1"),
    dict(rank=2, seed="x"),
    dict(rank=True),
    dict(rank=2, trainable_layers=["nope"]),
    dict(rank=2, trainable_layers=["re:("]),
    dict(rank=2, targets=["re:("]),
    dict(rank=2, exclude=["re:[a"]),
    dict(rank=2, rank_pattern={"re:(": 2}),
    dict(rank=2, rank_pattern=["ffn"]),
    dict(rank=2, targets=3),
    dict(rank=10**12),
    dict(rank=2, base="nf4", double_quant="yes"),
]


@pytest.mark.parametrize("method", METHODS)
def test_refused_enable_adapter_changes_nothing(method):
    """Every bad call of BAD_ENABLE, one after the other on one model that
    already has adapters: each is refused and leaves it exactly as it was."""
    model = _small()
    kl.enable_adapter(model, method="lora", rank=2, targets=["proj"])  # a model with adapters
    before = snapshot(model)
    spec = registry.get(method)
    own = {"tied": False} if "tied" in spec.defaults else {}  # LoRA-drop's pair, counted per layer
    huge = spec.trainable_count(kl.KernelGeometry("...a,ab->...b", (6, 5)),
                                {**spec.defaults, "rank": 10**12, **own}) > 2**31
    for kwargs in BAD_ENABLE:
        if kwargs == dict(rank=10**12) and not huge:
            continue  # LoKr: a rank past PEFT's bound only makes its factors full
        try:
            kl.enable_adapter(model, method=method, **needs(method, model), **{"targets": ["ffn"], **kwargs})
        except (ValueError, TypeError):
            pass
        else:
            raise AssertionError(f"{method}: {kwargs} was not refused")
        assert_unchanged(model, before)
    # and the same call with valid arguments still works afterwards
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2, targets=["ffn"])


@pytest.mark.parametrize("step", ["init", "freeze", "switch"])
def test_a_step_that_fails_while_applying_puts_everything_back(step, monkeypatch):
    """Whatever step of `Plan.apply` fails, its undo log puts the model
    back: an adapter's initialization (the layer it took over gets its
    activation back, which it did not before the log), freezing, or
    switching to the new named adapter."""
    from keras_lowrank import adapter_set
    from keras_lowrank import freezing

    model = _small()
    kl.enable_adapter(model, rank=2, targets=["proj"], adapter_name="a")
    before = snapshot(model)
    activations = [getattr(layer, "activation", None) for layer in model._flatten_layers()]
    y = to_np(model(X5))

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    if step == "init":
        cls = registry.get("pissa").layer_class
        init, calls = cls.initialize_from_base, []

        def initialize(self):
            calls.append(self)
            if len(calls) == 1:
                fail()
            return init(self)

        monkeypatch.setattr(cls, "initialize_from_base", initialize)
    else:
        monkeypatch.setattr(*((freezing, "freeze") if step == "freeze" else (adapter_set, "activate")), fail)
    with pytest.raises(RuntimeError, match="injected"):
        kl.enable_adapter(model, method="pissa", rank=2, targets=["ffn", "proj"], adapter_name="b")
    assert_unchanged(model, before)
    assert [getattr(layer, "activation", None) for layer in model._flatten_layers()] == activations
    assert kl.adapter_names(model) == ["a"] and kl.active_adapters(model) == ["a"]
    np.testing.assert_array_equal(to_np(model(X5)), y)


def test_errors_name_the_option_and_layer():
    model = _small()
    for kwargs, match in [
        (dict(targets=["re:("]), r"regex in targets: 're:\('"),
        (dict(exclude=["re:("]), r"regex in exclude"),
        (dict(rank_pattern={"re:(": 2}), r"regex in rank_pattern"),
        (dict(trainable_layers=["re:("]), r"regex in trainable_layers"),
        (dict(trainable_layers=["nope"]), r"trainable_layers pattern 'nope' matches no layer"),
        (dict(alpha=0), r"alpha for 'enable_adapter' must be None or a finite float > 0; received alpha=0"),
        (dict(rank_pattern={"proj": -1}), r"rank for 'proj' must be a positive int; received rank=-1"),
        (dict(rank=10**12), r"Layer 'ffn'.*'lora_a'.*5x6 kernel matrix.*rank=1000000000000.*nothing was allocated"),
        (dict(train_bias="no"), r"train_bias .* must be True or False; received train_bias='no'"),
    ]:
        with pytest.raises(ValueError, match=match):
            kl.enable_adapter(model, **{"rank": 2, **kwargs})


def test_rank_above_the_matrix_rank_is_allowed_with_one_warning():
    model = _small()
    with pytest.warns(UserWarning, match=r"ffn: rank=7 > min\(n_in, n_out\)=5.*proj: rank=7") as record:
        kl.enable_adapter(model, rank=7)
    assert len([r for r in record if "ranks above" in str(r.message)]) == 1
    assert model.get_layer("ffn").rank == 7


@pytest.mark.parametrize("method", FAMILIES)
def test_in_place_merge_rolls_back_bit_exactly(method):
    model = _small()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2)
    for _, a in kl.adapters(model):
        perturb(a)
    bad = model.get_layer("proj")  # the second adapter fails, the first is rolled back
    v = tunable(bad)[0]
    v.assign(np.full(tuple(v.shape), np.inf, "float32"))
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="'proj'"):
        kl.merge(model, unload=False)
    assert_unchanged(model, before)
    assert not any(a.merged for _, a in kl.adapters(model))


def test_refused_merge_unmerge_and_disable_change_nothing():
    model = _small()
    kl.enable_adapter(model, method="dora", rank=2)
    for _, a in kl.adapters(model):
        perturb(a)
    before = snapshot(model)
    for call, exc in [
        (lambda: kl.merge(model, unload=False, requantize=True), ValueError),
        (lambda: kl.merge(model, unload="no"), ValueError),
        (lambda: kl.set_adapter_enabled(model, "off"), ValueError),
        (lambda: kl.unmerge(_small()), ValueError),
    ]:
        with pytest.raises(exc):
            call()
        assert_unchanged(model, before)
    kl.merge(model, unload=False)
    merged = snapshot(model)
    with pytest.raises(ValueError, match="unmerge"):
        kl.set_adapter_enabled(model, False)
    assert_unchanged(model, merged)
    # an unmerge that cannot be exact (a zero magnitude) changes nothing
    a = model.get_layer("proj")
    a.magnitude.assign(np.zeros(a.magnitude.shape, "float32"))
    merged = snapshot(model)
    with pytest.raises(FloatingPointError, match="'proj'"):
        kl.unmerge(model)
    assert_unchanged(model, merged)


@pytest.mark.parametrize("method", FAMILIES)
def test_refused_load_onto_another_method_or_options_changes_nothing(method, tmp_path):
    model = _small()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2)
    f = _save(model, tmp_path / "a.safetensors")
    other = _small()
    kl.enable_adapter(other, method=method, **needs(method, other), rank=4)  # another rank (GraLoRA needs a multiple of its k=2)
    _refused(other, f, "options|shape")
    half = _small()
    kl.enable_adapter(half, method="lora" if method != "lora" else "dora", rank=2, targets=["proj"])
    _refused(half, f, "holds a")


# ----------------------------------------------------------------------
# 5. What a new user meets first
def test_the_head_is_found_by_position_in_every_model_kind():
    seq = _sequential()
    s = kl.enable_adapter(seq, rank=2)
    assert s.heads == [seq.layers[-1].name] and s.head_rule == "position"
    assert seq.layers[-1].name not in s.adapted_paths and len(s.adapted_paths) == 2
    sub = _subclassed()
    s = kl.enable_adapter(sub, rank=2)
    assert s.heads == [sub.out.name] and s.head_rule == "position"
    assert type(sub.out).__name__ == "Dense"
    soft = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6), keras.layers.Dense(3), keras.layers.Softmax()])
    s = kl.enable_adapter(soft, rank=2)
    assert s.heads == [soft.layers[1].name]
    text = str(s)
    assert "output head" in text and "base" in text.splitlines()[0]


def test_summary_counts_parameters_not_packed_bytes():
    model = _small()
    n = model.count_params()
    s = kl.enable_adapter(model, rank=2, base="nf4")
    adapters = sum(a.trainable_count() for _, a in kl.adapters(model))
    assert s.total_params == n + adapters
    assert {r["base"] for r in s.rows} == {"nf4"}


LOAD_WITHOUT_IMPORT = r"""
import sys, keras
try:
    keras.saving.load_model(sys.argv[1])
except Exception as e:
    print(type(e).__name__, str(e)[:2000])
"""


def test_loading_without_import_names_keras_lowrank(tmp_path):
    bb = gemma_backbone()
    kl.enable_adapter(bb, rank=2)
    path = str(tmp_path / "g.keras")
    bb.save(path)
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_IMPORT, path],
        env=dict(os.environ, KERAS_BACKEND=BACKEND), capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    assert "keras_lowrank" in out and "imported" in out, out + proc.stderr[-2000:]
    assert "backbone" not in out.split("Full object config")[0]


def test_trainable_count_formula_is_unchanged_by_the_plan():
    model = _small()
    kl.enable_adapter(model, rank=2)
    for path, a in kl.adapters(model):
        g = a.geometry
        spec = registry.get(a.method)
        assert a.trainable_count() == spec.trainable_count(g, a.options())
        assert math.prod(a.lora_a.shape) == 2 * g.n_in


ONEDNN_FIT = r"""
import json, numpy as np, keras, keras_lowrank as kl, sys
for method in json.loads(sys.argv[1]):
    inp = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="ffn")(inp)
    model = keras.Model(inp, keras.layers.Dense(4, name="out")(h))
    x = np.random.rand(32, 8).astype("float32")
    y = np.random.rand(32, 4).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    extra = dict(kl.registry.get(method).example_options)
    if kl.registry.get(method).calibration:  # the inits that read sample data
        extra["data"] = (x, y)
    kl.enable_adapter(model, method=method, **extra, rank=2, targets=["ffn"])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
print("fit ok")
"""


@pytest.mark.one_backend
def test_fit_logs_no_graph_rewriter_errors():
    """TensorFlow's oneDNN rewriter (on by default on recent Intel CPUs)
    fused MatMul + bias + Add + Relu into a node it cannot run and logged
    errors on every traced step; the adapters' update avoids that pattern.
    A TensorFlow graph rewriter: the child is TensorFlow whatever the
    parent's backend, once per suite."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="1")
    from conftest import families

    proc = subprocess.run([sys.executable, "-c", ONEDNN_FIT, json.dumps(families())], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "fit ok" in proc.stdout, proc.stderr[-3000:]
    for needle in ("No registered", "remapper", "empty op name", "does not specify an operation"):
        assert needle not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_merging_disabled_adapters_gives_the_base(method):
    """A disabled adapter folds to the base it computes (PiSSA: K_res + s A0 B0);
    an in-place merge of a disabled adapter is refused."""
    model = _small()
    kl.enable_adapter(model, method=method, **needs(method, model), rank=2)
    for _, a in kl.adapters(model):
        perturb(a)
    kl.set_adapter_enabled(model, False)
    y_base = to_np(model(X5))
    before = snapshot(model)
    with pytest.raises(ValueError, match="disabled"):
        kl.merge(model, unload=False)
    assert_unchanged(model, before)
    kl.merge(model)
    assert not kl.adapters(model)
    np.testing.assert_allclose(to_np(model(X5)), y_base, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------
# 7. A KerasHub task's own layers train; backbone and task files mix
def _bert_classifier(seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=10, num_layers=1, num_heads=2, hidden_dim=4,
                                             intermediate_dim=8, max_sequence_length=8)
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3, preprocessor=None)


def _gemma_lm(seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)


def test_a_classifier_head_trains_and_travels_in_adapter_files(tmp_path):
    model = _bert_classifier()
    summary = kl.enable_adapter(model, rank=2)
    head = model.get_layer("logits")
    assert summary.heads == ["logits"] and "logits" not in summary.adapted_paths
    assert summary.task_layers == ["logits"]
    assert "trained in full" in str(summary) and "logits" in str(summary)
    assert all(v.trainable for v in head.weights)
    x = token_inputs(10, batch=4, segment=True)
    y = np.array([0, 1, 2, 1])
    before = to_np(head.kernel).copy()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    assert np.abs(to_np(head.kernel) - before).max() > 1e-4  # it trained
    out = to_np(model.predict(x, verbose=0))
    f = tmp_path / "cls.safetensors"
    kl.save_adapter(model, f)
    fresh = _bert_classifier(seed=0)
    kl.load_adapter(fresh, f)  # the head comes back with the adapters
    np.testing.assert_allclose(to_np(fresh.predict(x, verbose=0)), out, atol=1e-5)
    assert all(v.trainable for v in fresh.get_layer("logits").weights)
    other = _bert_classifier(seed=0)
    summary = kl.enable_adapter(other, rank=2, train_task_layers=False)
    assert summary.task_layers == [] and not any(v.trainable for v in other.get_layer("logits").weights)
    with pytest.raises(ValueError, match="train_task_layers must be True or False"):
        kl.enable_adapter(_bert_classifier(), train_task_layers="yes")


def test_a_causal_lm_tied_head_stays_frozen():
    lm = _gemma_lm()
    summary = kl.enable_adapter(lm, rank=2)
    assert summary.task_layers == []
    assert not lm.backbone.token_embedding.embeddings.trainable


def test_backbone_and_task_adapter_files_load_onto_each_other(tmp_path):
    x = token_inputs(20)
    src = _gemma_lm()
    kl.enable_adapter(src.backbone, rank=2)
    for _, a in kl.adapters(src):
        perturb(a)
    y = to_np(src(x))
    kl.save_adapter(src.backbone, tmp_path / "backbone.safetensors")
    kl.save_adapter(src, tmp_path / "task.safetensors")
    lm = _gemma_lm()
    kl.load_adapter(lm, tmp_path / "backbone.safetensors")
    np.testing.assert_allclose(to_np(lm(x)), y, atol=1e-5)
    lm = _gemma_lm()
    kl.load_adapter(lm.backbone, tmp_path / "task.safetensors")
    np.testing.assert_allclose(to_np(lm(x)), y, atol=1e-5)
    # a classifier's file trains its head in full: not onto the backbone alone
    cls = _bert_classifier()
    kl.enable_adapter(cls, rank=2)
    kl.save_adapter(cls, tmp_path / "cls.safetensors")
    target = _bert_classifier().backbone
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"trains the task's own layers \['logits'\].*load it onto the task model"):
        kl.load_adapter(target, tmp_path / "cls.safetensors")
    assert_unchanged(target, before)


# ----------------------------------------------------------------------
# Every numeric or flag argument of a public function is checked by name
def _lora_model():
    model = _small()
    kl.enable_adapter(model, rank=2)
    return model


ARGUMENTS = [
    ("spectrum_share", lambda: kl.spectrum_share(np.ones(3), low=float("nan")), "spectrum_share: low must be"),
    ("spectrum_share", lambda: kl.spectrum_share(np.ones(3), high=-1), "spectrum_share: high must be"),
    ("spectrum_share", lambda: kl.spectrum_share(np.ones(3), low=2.0, high=1.0), "low must be <= high"),
    ("plot_spectrum", lambda: kl.plot_spectrum({"a": np.ones(3)}, value_range=("0", 1)), "plot_spectrum: low must be"),
    ("plot_spectrum", lambda: kl.plot_spectrum({"a": np.ones(3)}, max_layers=0), "max_layers must be a positive int"),
    ("merge", lambda: kl.merge(_lora_model(), requantize=1), "merge: requantize must be True or False"),
    ("set_adapter_enabled", lambda: kl.set_adapter_enabled(_lora_model(), 1), "enabled must be True or False"),
    ("save_adapter", lambda: kl.save_adapter(_lora_model(), "x.safetensors", as_lora=1), "as_lora must be"),
    ("count_params", lambda: kl.count_params(_small(), trainable_only="x"), "trainable_only must be"),
    ("svd.decompose", lambda: kl.svd.decompose(np.ones((4, 3)), rank=2.5), "rank must be None or a positive int"),
    ("svd.decompose", lambda: kl.svd.decompose(np.ones((4, 3)), niter=-1), "niter must be None or an int >= 0"),
    ("svd.decompose", lambda: kl.svd.decompose(np.ones((4, 3)), seed="x"), "seed must be None or an int"),
    ("enable_adapter", lambda: kl.enable_adapter(_small(), base="nf4", double_quant=1), "double_quant must be"),
]


@pytest.mark.parametrize("case", range(len(ARGUMENTS)), ids=[f"{a[0]}-{i}" for i, a in enumerate(ARGUMENTS)])
def test_public_arguments_are_checked_by_name(case):
    _, call, message = ARGUMENTS[case]
    with pytest.raises(ValueError, match=message):
        call()
