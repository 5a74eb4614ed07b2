"""Several named adapters in one model: switching, training, files, merge,
delete and combination (keras_lowrank.named), on every backend."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl

from conftest import gemma_backbone
from conftest import mlp_model as model_fn
from conftest import perturb
from conftest import to_np
from conftest import token_inputs

X = np.random.RandomState(0).normal(size=(6, 5)).astype("float32")
Y = np.random.RandomState(1).normal(size=(6, 3)).astype("float32")


def three_adapters(targets=("out",)):
    """`out` (linear, so contributions add) with a LoRA "a", a PiSSA "b"
    (rewrites the kernel) and a DoRA "c", each moved off its start."""
    model = model_fn()
    y0 = to_np(model(X))
    outs = {}
    for i, (name, method) in enumerate((("a", "lora"), ("b", "pissa"), ("c", "dora"))):
        kl.enable_adapter(model, method=method, rank=2, targets=list(targets), adapter_name=name)
        for path, adapter in kl.adapters(model):
            if path.endswith("@" + name):
                perturb(adapter, seed=i)
        outs[name] = to_np(model(X))
    return model, y0, outs


def member(model, path, name):
    return model.get_layer(path).members[name]


def test_switching_without_recompiling():
    model, y0, outs = three_adapters()
    assert kl.adapter_names(model) == ["a", "b", "c"]
    assert kl.active_adapters(model) == ["c"]  # the newest is the active one
    assert not np.allclose(outs["a"], y0, atol=1e-3)
    model.compile(optimizer="adam", loss="mse")
    np.testing.assert_allclose(model.predict(X, verbose=0), outs["c"], atol=1e-5)
    fn = model.predict_function
    for names, want in (
        ("a", outs["a"]),
        ("b", outs["b"]),
        (None, y0),  # nothing active: the original model (PiSSA gives its part back)
        (["a", "b", "c"], outs["a"] + outs["b"] + outs["c"] - 2 * y0),  # PEFT's sum
    ):
        kl.set_active(model, names, trainable=False)
        np.testing.assert_allclose(model.predict(X, verbose=0), want, atol=2e-5)
        assert model.predict_function is fn  # not retraced or recompiled
    with kl.disable_adapter(model):
        np.testing.assert_allclose(to_np(model(X)), y0, atol=1e-5)
    np.testing.assert_allclose(to_np(model(X)), outs["a"] + outs["b"] + outs["c"] - 2 * y0, atol=2e-5)


def test_fit_trains_only_the_active_adapters():
    model, _, _ = three_adapters(targets=("ffn", "out"))
    kl.set_active(model, "a")

    def values(name):
        return [to_np(v).copy() for v in member(model, "out", name)._adapter_vars.values()]

    model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.1), loss="mse")
    before = {n: values(n) for n in "abc"}
    trainable = {id(v) for v in model.trainable_variables}
    assert all(id(v) in trainable for v in member(model, "out", "a").trainable_weights[:2])
    assert not any(id(v) in trainable for n in "bc" for v in member(model, "out", n)._adapter_vars.values())
    model.fit(X, Y, epochs=2, verbose=0)
    after = {n: values(n) for n in "abc"}
    assert any(not np.array_equal(p, q) for p, q in zip(before["a"], after["a"]))
    for n in "bc":
        assert all(np.array_equal(p, q) for p, q in zip(before[n], after[n])), n
    kl.set_active(model, "c")  # now c trains, inside the compiled step
    model.fit(X, Y, epochs=2, verbose=0)
    final = {n: values(n) for n in "abc"}
    assert all(np.array_equal(p, q) for p, q in zip(after["a"], final["a"]))
    assert any(not np.array_equal(p, q) for p, q in zip(after["c"], final["c"]))


def test_files_carry_every_name_or_one(tmp_path):
    model, y0, outs = three_adapters(targets=("ffn", "out"))
    kl.set_active(model, ["a", "c"])
    y_ac = to_np(model(X))
    # .keras: every adapter, the active set, switching still works
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert kl.adapter_names(loaded) == ["a", "b", "c"] and kl.active_adapters(loaded) == ["a", "c"]
    np.testing.assert_allclose(to_np(loaded(X)), y_ac, atol=1e-5)
    kl.set_active(loaded, "b")
    kl.set_active(model, "b")
    np.testing.assert_allclose(to_np(loaded(X)), to_np(model(X)), atol=1e-5)
    kl.set_active(model, ["a", "c"])
    # adapter file: all names onto a fresh model, then one name
    kl.save_adapter(model, tmp_path / "all.safetensors")
    fresh = model_fn()
    kl.load_adapter(fresh, tmp_path / "all.safetensors")
    assert kl.adapter_names(fresh) == ["a", "b", "c"] and kl.active_adapters(fresh) == ["a", "c"]
    np.testing.assert_allclose(to_np(fresh(X)), y_ac, atol=1e-5)
    kl.save_adapter(model, tmp_path / "b.safetensors", adapter_name="b")
    only_b = model_fn()
    kl.load_adapter(only_b, tmp_path / "b.safetensors")
    assert kl.adapter_names(only_b) == ["b"] and kl.active_adapters(only_b) == ["b"]
    kl.set_active(model, "b")
    np.testing.assert_allclose(to_np(only_b(X)), to_np(model(X)), atol=1e-5)
    # beside the named adapters a model has
    kl.enable_adapter(fresh := model_fn(), rank=1, targets=["ffn"], adapter_name="mine")
    kl.load_adapter(fresh, tmp_path / "b.safetensors")
    assert kl.adapter_names(fresh) == ["mine", "b"] and kl.active_adapters(fresh) == ["b"]
    np.testing.assert_allclose(to_np(fresh(X)), to_np(model(X)), atol=1e-5)
    with pytest.raises(ValueError, match="'zz'"):
        kl.save_adapter(model, tmp_path / "z.safetensors", adapter_name="zz")


def test_keras_roundtrip_kerashub_two_methods_two_targets(tmp_path):
    backbone = gemma_backbone()
    x = token_inputs(20)
    kl.enable_adapter(backbone, method="lora", rank=2, targets=["*/attention/*"], adapter_name="attn")
    kl.enable_adapter(backbone, method="loha", rank=2, targets=["*ffw*"], adapter_name="ffw")
    kl.set_active(backbone, ["attn", "ffw"])
    for i, (_, a) in enumerate(kl.adapters(backbone)):
        perturb(a, scale=0.1, seed=i)
    y = to_np(backbone(x))
    backbone.save(tmp_path / "g.keras")
    loaded = keras.saving.load_model(tmp_path / "g.keras")
    assert kl.active_adapters(loaded) == ["attn", "ffw"]
    np.testing.assert_allclose(to_np(loaded(x)), y, atol=1e-5)
    kl.set_active(loaded, "ffw")
    kl.set_active(backbone, "ffw")
    np.testing.assert_allclose(to_np(loaded(x)), to_np(backbone(x)), atol=1e-5)


def test_merge_folds_the_active_set():
    model, y0, outs = three_adapters(targets=("ffn", "out"))
    kl.set_active(model, ["a", "b"])
    y_ab = to_np(model(X))
    with pytest.raises(ValueError, match="'c' is not active"):
        kl.merge(model, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="unload=False"):
        kl.merge(model, unload=False)
    np.testing.assert_allclose(to_np(model(X)), y_ab, atol=1e-6)  # unchanged
    kl.merge(model)
    assert [type(layer).__name__ for layer in model.layers[1:]] == ["Dense", "EinsumDense", "Dense"]
    np.testing.assert_allclose(to_np(model(X)), y_ab, atol=2e-5)


def test_delete_adapter_keeps_the_others():
    model, y0, outs = three_adapters()
    kl.set_active(model, "a")
    kl.delete_adapter(model, "b")  # PiSSA gives the kernel back
    assert kl.adapter_names(model) == ["a", "c"]
    np.testing.assert_allclose(to_np(model(X)), outs["a"], atol=1e-5)
    kl.set_active(model, None)
    np.testing.assert_allclose(to_np(model(X)), y0, atol=1e-5)
    kl.delete_adapter(model, "a")
    kl.delete_adapter(model, "c")
    assert type(model.get_layer("out")).__name__ == "Dense" and kl.adapters(model) == []
    np.testing.assert_allclose(to_np(model(X)), y0, atol=1e-5)
    with pytest.raises(ValueError, match="no named adapters"):
        kl.delete_adapter(model, "a")


def test_combine_cat_svd_linear():
    model, y0, outs = three_adapters()
    da, db, dc = (outs[n] - y0 for n in "abc")
    kl.combine(model, {"a": 0.7, "b": -0.3}, "cat_ab", method="cat")
    assert kl.active_adapters(model) == ["cat_ab"]
    np.testing.assert_allclose(to_np(model(X)) - y0, 0.7 * da - 0.3 * db, atol=2e-5)
    # svd of any method at full rank is exact; DoRA has no LoRA form
    kl.combine(model, {"a": 0.5, "c": 0.5}, "svd_ac", method="svd", rank=3)
    np.testing.assert_allclose(to_np(model(X)) - y0, 0.5 * da + 0.5 * dc, atol=2e-5)
    with pytest.raises(ValueError, match="no plain-LoRA form"):
        kl.combine(model, {"c": 1.0}, "bad", method="cat")
    # linear on LoRA forms of one rank: PEFT's sqrt-weighted factors
    kl.combine(model, {"a": 0.25}, "lin_a", method="linear")
    np.testing.assert_allclose(to_np(model(X)) - y0, 0.25 * da, atol=2e-5)
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        kl.combine(model, {"nope": 1.0}, "x")
    with pytest.raises(ValueError, match="method must be one of"):
        kl.combine(model, {"a": 1.0}, "x", method="bogus")


@pytest.mark.parametrize("method", ["svd", "cat", "linear"])
def test_combine_refuses_weights_that_overflow(method):
    model, y0, outs = three_adapters()
    before = [to_np(w).copy() for w in model.weights]
    names = kl.adapter_names(model)
    with pytest.raises(ValueError, match="layer 'out': the weights .* overflow float32"):
        weights = {"a": 1e308} if method == "linear" else {"a": 1e308, "b": 1e308}  # linear: one rank
        kl.combine(model, weights, "big", method=method)
    assert kl.adapter_names(model) == names
    assert all(np.array_equal(a, to_np(b)) for a, b in zip(before, model.weights))


def test_combine_linear_composes_svf_experts():
    model = model_fn()
    zs = []
    for i, name in enumerate(("math", "code")):
        kl.enable_adapter(model, method="svf", targets=["ffn", "proj"], adapter_name=name)
        for path in ("ffn", "proj"):
            m = member(model, path, name)
            m.svf_z.assign(np.random.RandomState(i).uniform(0.5, 1.5, tuple(m.svf_z.shape)).astype("float32"))
        zs.append({p: to_np(member(model, p, name).svf_z) for p in ("ffn", "proj")})
    kl.combine(model, {"math": 0.6, "code": 0.4}, "mix", method="linear")
    for p in ("ffn", "proj"):
        np.testing.assert_allclose(to_np(member(model, p, "mix").svf_z), 0.6 * zs[0][p] + 0.4 * zs[1][p], rtol=1e-6)
    # the same mix through keras_lowrank.svf.compose on a model with one SVF adapter
    ref = model_fn()
    kl.enable_adapter(ref, method="svf", targets=["ffn", "proj"])
    kl.svf.compose(ref, [zs[0], zs[1]], weights=[0.6, 0.4])
    np.testing.assert_allclose(to_np(model(X)), to_np(ref(X)), atol=1e-5)


def test_unnamed_adapter_becomes_default_and_nf4_base_is_shared():
    model = model_fn()
    kl.enable_adapter(model, rank=2, targets=["ffn", "out"], base="nf4")
    perturb(model.get_layer("out"))
    y_default = to_np(model(X))
    with pytest.raises(ValueError, match="adapter_name"):
        kl.enable_adapter(model, rank=2, targets=["out"])
    kl.enable_adapter(model, method="dora", rank=2, targets=["out"], adapter_name="b")
    assert kl.adapter_names(model) == ["default", "b"]
    out = model.get_layer("out")
    assert out.members["b"].layer is out.layer is out.members["default"].layer
    assert type(out.layer).__name__ == "NF4Linear"
    kl.set_active(model, "default")
    np.testing.assert_allclose(to_np(model(X)), y_default, atol=1e-5)


BAD = [
    (dict(adapter_name="a/b"), "adapter_name"),
    (dict(adapter_name=3), "adapter_name"),
    (dict(adapter_name="a"), "already has an adapter named 'a'"),
    (dict(adapter_name="z", base="int8"), "share its frozen base"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_leaves_model_unchanged(kwargs, message):
    model = model_fn()
    kl.enable_adapter(model, rank=2, targets=["out"], adapter_name="a")
    before = [to_np(w).copy() for w in model.weights]
    layers = [type(layer).__name__ for layer in model.layers]
    with pytest.raises((ValueError, TypeError), match=message):
        kl.enable_adapter(model, rank=2, targets=["out"], **kwargs)
    assert [type(layer).__name__ for layer in model.layers] == layers
    assert all(np.array_equal(a, to_np(b)) for a, b in zip(before, model.weights))
    with pytest.raises(ValueError, match="'nope'"):
        kl.set_active(model, ["a", "nope"])
    assert kl.active_adapters(model) == ["a"]


@pytest.mark.one_backend
def test_the_named_adapters_example_runs(tmp_path, capsys):
    """`examples/named_adapters.py --small`: two adapters trained on a tiny
    Gemma, each best on its own task when switched in, combined, reloaded."""
    import json
    import os
    import runpy

    here = os.path.dirname(os.path.abspath(__file__))
    example = runpy.run_path(os.path.join(here, "..", "examples", "named_adapters.py"))
    assert example["main"](["--small", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["adapters"] == ["plus3", "plus5", "mix"]
    assert summary["reload_diff"] <= 1e-5
    assert summary["adapter_file_bytes"] < summary["keras_file_bytes"] / 10
