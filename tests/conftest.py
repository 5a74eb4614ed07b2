"""Shared fixtures: tiny models of every kind, and the NumPy matrix view
the adapter contract restates each method's formula in."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402,F401
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_lowrank  # noqa: E402,F401

# What the imports made (Keras, KerasHub, the backends: some 600,000
# objects) lives as long as the process: freeze it, so that Python's full
# collections, and the `gc.collect()` Keras runs for every variable a layer
# deletes (`Layer.__delattr__`, e.g. in `quantize`), scan only what the
# tests make (measured: a full collection 0.30 s before, under 1 ms after).
gc.collect()
gc.freeze()

BACKEND = keras.backend.backend()
ALL_BACKENDS = ("jax", "tensorflow", "torch")


def dealt(cases, backend=BACKEND):
    """The cases `backend` runs of a KerasHub end-to-end check that runs
    once per suite rather than once per backend (every backend gets a third
    of them, by position, in turn), or all of them with
    `KLR_ALL_FAMILIES=1`. For checks whose method-level part runs on every
    backend elsewhere (the contract's toy-model cases)."""
    if os.environ.get("KLR_ALL_FAMILIES") == "1":
        return list(cases)
    return [c for i, c in enumerate(cases) if ALL_BACKENDS[i % len(ALL_BACKENDS)] == backend]


def to_np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.fixture(autouse=True)
def _seed_and_policy():
    keras.utils.set_random_seed(1234)
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


# ----------------------------------------------------------------------
# Small layers for the numerics checks.
# Dense: 5 -> 6 with tanh; EinsumDense "btd,ndh->btnh" with kernel (n=2, d=5,
# h=3), so its matrix view is 5 x 6 with the kernel axes permuted.
DENSE_X = np.random.RandomState(0).normal(size=(3, 5)).astype("float32")
EINSUM_X = np.random.RandomState(1).normal(size=(2, 4, 5)).astype("float32")


def dense_model():
    inp = keras.Input((5,))
    out = keras.layers.Dense(6, activation="tanh", name="target")(inp)
    return keras.Model(inp, out)


def einsum_model():
    inp = keras.Input((4, 5))
    out = keras.layers.EinsumDense(
        "btd,ndh->btnh", output_shape=(4, 2, 3), bias_axes="nh", name="target"
    )(inp)
    return keras.Model(inp, out)


SMALL = {"dense": (dense_model, DENSE_X), "einsum": (einsum_model, EINSUM_X)}


# A three-layer MLP (Dense, EinsumDense, head) and a regression batch: the
# training-dynamics tests train it a few steps at a time.
MLP_X = np.random.RandomState(0).normal(size=(8, 5)).astype("float32")
MLP_Y = np.random.RandomState(1).normal(size=(8, 3)).astype("float32")


def seq_model():
    """Dense and EinsumDense layers on (batch, steps, features) inputs:
    rows of the matrix view are batch × steps."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((3, 6)),
        keras.layers.Dense(8, activation="tanh", name="hidden"),
        keras.layers.EinsumDense("btd,dnh->btnh", output_shape=(None, 2, 4), bias_axes="nh", name="heads"),
        keras.layers.EinsumDense("btnh,nhd->btd", output_shape=(None, 3), name="out"),
    ])


def mlp_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="tanh", name="ffn")(inp)
    h = keras.layers.EinsumDense("bd,dk->bk", output_shape=(6,), bias_axes="k", name="proj")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))


def tunable(adapter):
    """The variables an adapter trains: its own and the model-level ones it
    reads (LoRA-drop's tied pair)."""
    return list(adapter.trainable_variables) + [v for v in adapter.linked_variables() if v.trainable]


def assert_noop(method, y, y0):
    """`y` (adapted, at init) against `y0` (the base) as `method` declares:
    equal, equal to float32 round-off (the SVD inits), or not a no-op."""
    from keras_lowrank import registry

    noop = registry.get(method).noop_at_init
    if noop == "exact":
        np.testing.assert_array_equal(y, y0)
    elif noop == "roundoff":
        assert np.abs(y - y0).max() <= 1e-5 * max(1.0, np.abs(y0).max())


def perturb(adapter, scale=0.3, seed=0):
    """Move every trainable variable off its no-op start."""
    rng = np.random.RandomState(seed)
    for v in tunable(adapter):
        value = rng.normal(scale=scale, size=tuple(v.shape)).astype("float32")
        if v.name == "magnitude":
            value = np.abs(value) + 0.5
        v.assign(value)


# ----------------------------------------------------------------------
# Independent NumPy statement of the matrix view (each method's own formula
# is its registered `reference`).
def np_matricize(equation, kernel):
    inp, rest = equation.split(",")
    ker, out = rest.split("->")
    inp, out = inp.replace("...", ""), out.replace("...", "")
    red = [c for c in ker if c in inp and c not in out]
    prod = [c for c in ker if c in out and c not in inp]
    perm = [ker.index(c) for c in red + prod]
    n_in = int(np.prod([kernel.shape[ker.index(c)] for c in red]))
    w = np.transpose(kernel, perm).reshape(n_in, -1)

    def back(m):
        shape = [kernel.shape[i] for i in perm]
        return np.transpose(m.reshape(shape), np.argsort(perm))

    return w, back


def _references():
    """`{method: reference}`: each method's NumPy statement of its formula,
    which it registers beside its code (`keras_lowrank.methods.reference`)."""
    from keras_lowrank import registry

    return {name: registry.get(name).reference for name in keras_lowrank.methods()}


REFERENCE_MERGED = _references()


#: the SVD-family methods: each fine-tunes a pretrained KerasHub Gemma in
#: tests/test_svd_family.py
SVD_FAMILY = ("milora", "lora_xs", "svf", "svft", "svd_training")


def families():
    """One method per family (module of keras_lowrank.methods): the
    end-to-end KerasHub flows run once per family, the contract on small
    layers for every method."""
    from keras_lowrank import registry

    out = {}
    for name in sorted(keras_lowrank.methods()):
        module = registry.get(name).layer_class.__module__
        out.setdefault(module, name)
    return sorted(out.values())


def np_layer_output(adapter, x, merged_matrix_fn):
    """Output of the adapted layer restated in NumPy from its own variables."""
    from keras_lowrank import bases

    kernel = to_np(bases.read_kernel(adapter.layer)).astype("float64")
    eq = adapter.geometry.equation
    w, back = np_matricize(eq, kernel)
    k2 = back(merged_matrix_fn(adapter, w))
    y = np.einsum(eq, x.astype("float64"), k2)
    if adapter.layer.bias is not None:
        y = y + to_np(adapter.layer.bias)
    name = keras.activations.serialize(adapter.activation)
    if name == "tanh":
        y = np.tanh(y)
    elif name not in ("linear", None):
        raise AssertionError(f"test restates linear/tanh only, got {name}")
    return y


# ----------------------------------------------------------------------
# Tiny KerasHub models (spec/keras-notes §4.4)
def hub():
    import keras_hub

    return keras_hub


def gemma_backbone(vocab=20):
    return hub().models.GemmaBackbone(
        vocabulary_size=vocab, num_layers=2, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=4,
    )


def llama_backbone():
    return hub().models.LlamaBackbone(
        vocabulary_size=10, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=8, intermediate_dim=8,
    )


def bert_backbone():
    return hub().models.BertBackbone(
        vocabulary_size=10, num_layers=2, num_heads=2, hidden_dim=4,
        intermediate_dim=8, max_sequence_length=8,
    )


def gpt2_backbone():
    return hub().models.GPT2Backbone(
        vocabulary_size=10, num_layers=2, num_heads=2, hidden_dim=4,
        intermediate_dim=8, max_sequence_length=8,
    )


def token_inputs(vocab, batch=2, seq=8, segment=False, seed=0):
    rng = np.random.RandomState(seed)
    x = {
        "token_ids": rng.randint(0, vocab, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }
    if segment:
        x["segment_ids"] = np.zeros((batch, seq), "int32")
    return x


def needs(method, model=None):
    """The options a method cannot go without (its registry's
    `example_options`, e.g. AdaLoRA's `total_steps`), and, for a method that
    initializes from sample data (EVA, CorDA, LoRA-GA), `data` for `model`:
    random inputs in the shapes of its inputs (`sample_inputs`), with
    targets and a loss for the gradient init (the model is compiled with
    mean squared error unless it is compiled already). EVA gets `rho=1`,
    which keeps every layer at the rank asked (the tests check ranks)."""
    from keras_lowrank import registry

    spec = registry.get(method)
    out = dict(spec.example_options)
    if spec.calibration is None:
        return out
    if model is None:
        raise ValueError(f"needs({method!r}): this method initializes from data; pass the model")
    x = sample_inputs(model)
    if method == "eva":
        out["rho"] = 1.0
    if spec.calibration == "gradients":
        compiled = getattr(model, "compiled", False) and getattr(model, "loss", None) is not None
        if compiled and isinstance(x, dict) and "token_ids" in x:
            out["data"] = (x, x["token_ids"])
            return out
        y = keras.tree.map_structure(
            lambda t: np.random.RandomState(1).normal(size=tuple(t.shape)).astype("float32"),
            model(x))
        if not compiled:
            model.compile(loss=keras.tree.map_structure(lambda _: "mse", y) if isinstance(y, dict) else "mse")
        out["data"] = (x, y)
        return out
    out["data"] = x
    return out


def sample_inputs(model, rows=8, length=6):
    """Random inputs for `model` in the shapes of its inputs (unknown sizes:
    `rows` examples of `length` steps): normal floats; token ids below the
    smallest embedding's vocabulary; a `padding_mask` of ones; zeros for
    other integer inputs."""
    try:
        struct = model.input
    except (AttributeError, ValueError):
        struct = None
    if struct is None:
        shapes = getattr(model, "_build_shapes_dict", None) or {}
        shape = next(iter(shapes.values()), None)
        if shape is None:
            raise ValueError(f"sample_inputs: {model.name!r} has no known input shape")
        struct = keras.KerasTensor((None,) + tuple(shape)[1:], "float32")  # any batch size
    vocab = min([int(getattr(layer, "input_dim")) for layer in model._flatten_layers()
                 if isinstance(getattr(layer, "input_dim", None), int)] or [8])
    rng = np.random.RandomState(0)

    def make(t, name=""):
        shape = tuple(rows if i == 0 and d is None else (length if d is None else d)
                      for i, d in enumerate(t.shape))
        if "int" in str(t.dtype) or "bool" in str(t.dtype):
            if "padding_mask" in name or "bool" in str(t.dtype):
                return np.ones(shape, str(t.dtype))
            if "token" in name or "ids" in name and "segment" not in name:
                return rng.randint(0, vocab, shape).astype(str(t.dtype))
            return np.zeros(shape, str(t.dtype))
        return rng.normal(size=shape).astype("float32")

    if isinstance(struct, dict):
        return {k: make(t, k) for k, t in struct.items()}
    if isinstance(struct, (list, tuple)):
        return type(struct)(make(t, getattr(t, "name", "")) for t in struct)
    return make(struct, getattr(struct, "name", ""))
