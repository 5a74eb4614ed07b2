"""LoRA-drop (spec §12): variables tied across layers in every flow, the
importance and selection against a NumPy restatement of §12, and the
three-stage `lora_drop` pipeline."""

import json
import zipfile

import h5py
import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank.methods.lora_drop import stages as drop
from keras_lowrank import saving

from conftest import gemma_backbone
from conftest import to_np
from conftest import token_inputs

X = np.random.RandomState(0).normal(size=(6, 8)).astype("float32")


def _model():
    """Three 8x8 layers (a, b, c), one 8x5 (d) and the head."""
    inp = keras.Input((8,))
    h = keras.layers.Dense(8, activation="tanh", name="a")(inp)
    h = keras.layers.Dense(8, activation="tanh", name="b")(h)
    h = keras.layers.Dense(8, activation="tanh", name="c")(h)
    h = keras.layers.Dense(5, activation="tanh", name="d")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))


def _tied(model, **kwargs):
    kl.enable_adapter(model, method="lora_drop", rank=2, **kwargs)
    state = kl.shared.get(model, "lora_drop")
    return state


def _fill(state, seed=0):
    rng = np.random.RandomState(seed)
    for v in state.trainable_weights:
        v.assign(rng.normal(scale=0.3, size=tuple(v.shape)).astype("float32"))


def _assert_tied(model, layers=("a", "b", "c")):
    """A change made through one layer is seen by every layer of its pair."""
    first = model.get_layer(layers[0])
    a_t, b = first.pair()
    for name in layers[1:]:
        other = model.get_layer(name)
        assert other.pair()[0] is a_t and other.pair()[1] is b
    new = np.full(tuple(b.shape), 0.125, "float32")
    b.assign(new)
    for name in layers:
        np.testing.assert_array_equal(to_np(model.get_layer(name).pair()[1]), new)


def test_tied_pair_exists_once_in_weights_optimizer_and_files(tmp_path):
    model = _model()
    state = _tied(model)
    assert sorted(state.pairs) == ["8x5", "8x8"]
    paths = [v.path for v in model.weights]
    assert len(paths) == len(set(paths))
    tied = [p for p in paths if p.split("/")[-1] in ("a_8x8", "b_8x8", "a_8x5", "b_8x5")]
    assert len(tied) == 4
    assert sorted(v.path for v in model.trainable_weights) == sorted(tied)
    _assert_tied(model)
    # one optimizer slot per tied variable (Adam: m and v)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(X, np.zeros((6, 3), "float32"), epochs=1, verbose=0)
    slots = [v for v in model.optimizer.variables if "8x8" in v.path]
    assert len(slots) == 4  # m and v of a_8x8 and b_8x8
    _fill(state)
    y = to_np(model(X))
    path = tmp_path / "m.keras"
    model.save(path)
    with zipfile.ZipFile(path) as z:
        z.extract("model.weights.h5", tmp_path)
    found = []
    with h5py.File(tmp_path / "model.weights.h5") as f:
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    found = [n for n in found if not n.startswith("optimizer")]
    assert len(found) == len(model.weights)  # each variable once
    assert sum(n.startswith("_klr_shared/") for n in found) == 4
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_np(loaded(X)), y, rtol=1e-6, atol=1e-6)
    _assert_tied(loaded)
    assert len({v.path for v in loaded.weights}) == len(loaded.weights)


def test_sequential_model_lists_the_tied_pair_and_trains_it():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="a"),
                              keras.layers.Dense(8, name="b"), keras.layers.Dense(3, name="out")])
    state = _tied(model)
    assert {id(v) for v in state.weights} <= {id(v) for v in model.trainable_weights}
    assert len(model.trainable_weights) == 2
    _fill(state)
    before = [to_np(v).copy() for v in state.weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(X, np.ones((6, 3), "float32"), epochs=2, verbose=0)
    assert all(not np.array_equal(b, to_np(v)) for b, v in zip(before, state.weights))
    _assert_tied(model, ("a", "b"))


def test_adapter_file_stores_the_pair_once_and_reload_ties(tmp_path):
    model = _model()
    weights = [to_np(w).copy() for w in model.weights]
    state = _tied(model, alpha_pattern={"b": 6.0})
    _fill(state)
    y = to_np(model(X))
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)
    tensors = saving.read_adapter_file(f)[2]
    assert sorted(tensors) == ["@lora_drop::a_8x5", "@lora_drop::a_8x8",
                               "@lora_drop::b_8x5", "@lora_drop::b_8x8"]
    fresh = _model()
    for w, v in zip(fresh.weights, weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    np.testing.assert_allclose(to_np(fresh(X)), y, rtol=1e-6, atol=1e-6)
    assert fresh.get_layer("b").scaling == 3.0
    _assert_tied(fresh)


def test_merge_folds_each_layers_share_and_unmerge_disable_keep_the_tying():
    model = _model()
    kernels = {n: to_np(model.get_layer(n).kernel).astype("float64") for n in "abcd"}
    state = _tied(model, alpha_pattern={"b": 6.0, "c": 1.0})
    _fill(state)
    y = to_np(model(X))
    kl.merge(model, unload=False)
    for n in "abcd":
        a = model.get_layer(n)
        a_t, b = (to_np(v).astype("float64") for v in a.pair())
        want = kernels[n] + a.scaling * a_t.T @ b
        np.testing.assert_allclose(to_np(a.layer.kernel), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_np(model(X)), y, rtol=1e-5, atol=1e-5)
    kl.unmerge(model)
    for n in "abcd":
        np.testing.assert_allclose(to_np(model.get_layer(n).layer.kernel), kernels[n], atol=1e-6)
    with kl.disable_adapter(model):
        _assert_tied(model)
    _assert_tied(model)
    kl.merge(model)
    assert not kl.shared.states(model) and not kl.adapters(model)
    assert {v.name for v in model.weights} == {"kernel", "bias"}


def test_tying_in_a_kerashub_backbone_with_targets(tmp_path):
    bb = gemma_backbone()
    weights = [to_np(w).copy() for w in bb.weights]
    kl.enable_adapter(bb, method="lora_drop", rank=2, targets=["query", "value"],
                      exclude=["decoder_block_1/attention/value"])
    paths = [p for p, _ in kl.adapters(bb)]
    assert paths == ["decoder_block_0/attention/query", "decoder_block_0/attention/value",
                     "decoder_block_1/attention/query"]
    state = kl.shared.get(bb, "lora_drop")
    assert sorted(state.pairs) == ["16x16", "16x4"]  # query: 4 heads x 4; value: 1 head x 4
    q0 = bb.get_layer("decoder_block_0").attention.query_dense
    q1 = bb.get_layer("decoder_block_1").attention.query_dense
    assert q0.pair()[0] is q1.pair()[0]
    _fill(state)
    x = token_inputs(20)
    y = to_np(bb(x)) if not isinstance(bb(x), dict) else None
    path = tmp_path / "bb.keras"
    bb.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_np(loaded(x)), y, rtol=1e-5, atol=1e-5)
    lq0 = loaded.get_layer("decoder_block_0").attention.query_dense
    lq1 = loaded.get_layer("decoder_block_1").attention.query_dense
    assert lq0.pair()[1] is lq1.pair()[1]
    f = tmp_path / "bb.safetensors"
    kl.save_adapter(bb, f)
    fresh = gemma_backbone()
    for w, v in zip(fresh.weights, weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-5, atol=1e-5)


def test_own_and_tied_layers_side_by_side_and_clear_errors():
    model = _model()
    kl.enable_adapter(model, method="lora_drop", rank=2, targets=["a"], tied=False)
    assert kl.shared.get(model, "lora_drop") is None  # no tied layer yet
    assert [v.name for v in model.get_layer("a").trainable_variables] == ["lora_a", "lora_b"]
    kl.enable_adapter(model, method="lora_drop", rank=2, targets=["b", "c"])
    assert model.get_layer("b").pair()[0] is model.get_layer("c").pair()[0]
    assert model.get_layer("a").pair()[0] is not model.get_layer("b").pair()[0]
    # a second tied call would need other pairs: refused, model unchanged
    n = len(model.weights)
    with pytest.raises(ValueError, match="already has LoRA-drop shared pairs"):
        kl.enable_adapter(model, method="lora_drop", rank=2, targets=["d"])
    assert len(model.weights) == n and model.get_layer("d").__class__.__name__ == "Dense"
    # layers sharing one pair need one rank
    other = _model()
    with pytest.raises(ValueError, match="'b' shares the 8x8 pair.*rank=2.*rank=3"):
        kl.enable_adapter(other, method="lora_drop", rank=2, rank_pattern={"b": 3})
    assert not kl.adapters(other)


# ----------------------------------------------------------------------
# Importance and selection against §12, restated in NumPy
def _np_forward_with_lora(model, x):
    """The adapted model of `_model()` with LoRA on a, b, c, d, in NumPy:
    returns each layer's `g_i = Σ ‖s (x_i A_i) B_i‖²`."""
    h = x.astype("float64")
    g = {}
    for name in "abcd":
        a = model.get_layer(name)
        k = to_np(a.layer.kernel).astype("float64")
        bias = to_np(a.layer.bias).astype("float64")
        lora = a.scaling * (h @ to_np(a.lora_a).astype("float64").T) @ to_np(a.lora_b).astype("float64")
        g[name] = float((lora**2).sum())
        h = np.tanh(h @ k + bias + lora)
    return g


def _np_select(g, threshold):
    names = list(g)
    values = np.array([g[n] for n in names])
    order = np.argsort(-values, kind="stable")
    cum = np.cumsum(values[order]) / values.sum()
    count = int(np.searchsorted(cum, threshold - 1e-12) + 1)
    return [names[i] for i in order[:count]]


def test_importance_and_selection_match_numpy():
    model = _model()
    kl.enable_adapter(model, method="lora", rank=2, alpha_pattern={"c": 5.0})
    rng = np.random.RandomState(3)
    for _, a in kl.adapters(model):
        for v in a.trainable_variables:
            v.assign(rng.normal(scale=rng.uniform(0.05, 0.6), size=tuple(v.shape)).astype("float32"))
    x = np.random.RandomState(4).normal(size=(10, 8)).astype("float32")
    got = drop.importance(model, (x, np.zeros((10, 3))), batch_size=4)
    want = _np_forward_with_lora(model, x)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4)
    for threshold in (0.3, 0.6, 0.9, 0.99, 1.0):
        assert drop.select(got, threshold) == _np_select(want, threshold)


def test_selection_edges():
    assert drop.select({"a": 1.0, "b": 1.0}, 0.5) == ["a"]  # ties: the given order
    assert drop.select({"a": 0.0, "b": 2.0}, 1.0) == ["b"]
    with pytest.raises(ValueError, match="not all zero"):
        drop.select({"a": 0.0, "b": 0.0}, 0.9)
    for bad in (0, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="threshold"):
            drop.select({"a": 1.0}, bad)


# ----------------------------------------------------------------------
# The pipeline
def _task():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = np.tanh(x[:, :3] * 1.5 + x[:, 3:6])
    return x, y


def test_lora_drop_pipeline(tmp_path):
    x, y = _task()
    model = _model()
    base = [to_np(w).copy() for w in model.weights]
    report = kl.lora_drop(model, (x[:16], y[:16]), threshold=0.6, rank=2, steps=20, seed=0,
                          loss="mse", optimizer=keras.optimizers.Adam(0.05), plot=True)
    # the report: every layer, sorted, cumulative, and the same rule as select()
    scores = {r["path"]: r["importance"] for r in report.rows}
    assert sorted(scores) == ["a", "b", "c", "d"]
    assert abs(sum(scores.values()) - 1.0) < 1e-9
    assert [r["importance"] for r in report.rows] == sorted(scores.values(), reverse=True)
    assert report.kept == drop.select(scores, 0.6)
    assert report.rows[-1]["cumulative"] == pytest.approx(1.0)
    assert "kept" in str(report) and "tied" in str(report) and report.figure is not None
    # the model: own pairs where kept, one tied pair per shape elsewhere
    layers = dict(kl.adapters(model))
    assert {p: a.tied for p, a in layers.items()} == {p: p not in report.kept for p in scores}
    assert {a.method for a in layers.values()} == {"lora_drop"}
    # parameters: counted from the adapters against plain LoRA (2 (8+8) x 3 + 2 (8+5))
    assert report.lora_params == 3 * 2 * 16 + 2 * 13
    own = sum(2 * (8 + (5 if p == "d" else 8)) for p in report.kept)
    tied_shapes = {"8x5" if p == "d" else "8x8" for p in scores if p not in report.kept}
    assert report.params == own + sum(2 * (8 + (5 if s == "8x5" else 8)) for s in tied_shapes)
    assert report.params < report.lora_params
    # the stage-1 LoRA left no trace: kernels and biases are the base's
    for w, b in zip([w for w in model.weights if w.name in ("kernel", "bias")], base):
        np.testing.assert_array_equal(to_np(w), b)
    # stage 3 trains with fit (the model was compiled with the stage-1 loss)
    losses = model.fit(x, y, epochs=15, batch_size=16, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0]
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_np(loaded(x)), to_np(model(x)), rtol=1e-5, atol=1e-5)


def test_lora_drop_refuses_bad_input_and_leaves_the_model_unchanged():
    x, y = _task()
    model = _model()
    before = [to_np(w).copy() for w in model.weights]
    cases = [
        (dict(threshold=0.0, loss="mse"), "threshold"),
        (dict(threshold=2, loss="mse"), "threshold"),
        (dict(steps=0, loss="mse"), "steps"),
        (dict(), "compile the model or pass loss"),
        (dict(loss="mse", rank=0), "rank"),
        (dict(loss="mse", targets=["nope"]), "nope"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=needle):
            kl.lora_drop(model, (x, y), **kwargs)
        assert not kl.adapters(model)
        assert [l.__class__.__name__ for l in model.layers[1:]] == ["Dense"] * 5
        for w, b in zip(model.weights, before):
            np.testing.assert_array_equal(to_np(w), b)
    kl.enable_adapter(model, method="lora", rank=2, targets=["a"])
    with pytest.raises(ValueError, match="'a' already has"):
        kl.lora_drop(model, (x, y), loss="mse", targets=["a", "b"])


def test_lora_drop_on_a_kerashub_causal_lm():
    import keras_hub

    lm = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    x = token_inputs(20, batch=8, seq=8)
    y = (x["token_ids"] + 3) % 20
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    lm.compile(optimizer=keras.optimizers.Adam(2e-2), loss=loss)
    report = kl.lora_drop(lm, (x, y), threshold=0.5, rank=2, steps=6, batch_size=4, seed=0)
    assert len(report.rows) == len(kl.adapters(lm)) == 14  # q, k, v, o and three ffw per block
    assert 0 < len(report.kept) < len(report.rows)
    assert report.params < report.lora_params
    losses = lm.fit(x, y, epochs=10, batch_size=8, verbose=0).history["loss"]
    assert losses[-1] < 0.9 * losses[0]
    assert json.dumps(report.rows)  # plain data
