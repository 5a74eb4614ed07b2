"""A merged model is a plain Keras model for export too: it exports in each
format its backend exports to, and the artifact, loaded back, computes what
the model computes; and the swaps that put adapters in and take them out
leave each backend's tracking of the model as a plain build of it has it."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import _compat
from keras_lowrank import tree

from conftest import BACKEND
from conftest import MLP_X
from conftest import gemma_backbone
from conftest import mlp_model
from conftest import perturb
from conftest import to_np
from conftest import token_inputs

# What `model.export(path, format=...)` of Keras 3.15 exports from each
# backend, with the packages of this project's environment:
# - tensorflow: "tf_saved_model" (TensorFlow's SavedModel) and "litert" (a
#   TFLite flat buffer converted from that SavedModel);
# - jax: "tf_saved_model" (the JAX function through jax2tf);
# - torch: "torch" (a torch.export ExportedProgram, `.pt2`).
# Keras refuses "litert" on jax and "torch" on any backend but torch. The
# other formats need packages this environment does not install: "onnx"
# (tf2onnx; onnxscript on torch), "openvino" (openvino), "litert" on torch
# (litert_torch), "tf_saved_model" on torch (torch_xla). So each backend
# runs only the formats it exports to, on a Functional model (the swap in
# its graph) and a KerasHub backbone (the swap in its blocks' attributes);
# LiteRT only the Functional: the Gemma backbone's TFLite needs TensorFlow's
# Flex ops (FlexStridedSlice), which tensorflow-cpu's interpreter lacks.
CASES = {
    "tensorflow": [("tf_saved_model", "functional"), ("tf_saved_model", "gemma_backbone"),
                   ("litert", "functional")],
    "jax": [("tf_saved_model", "functional"), ("tf_saved_model", "gemma_backbone")],
    "torch": [("torch", "functional"), ("torch", "gemma_backbone")],
}[BACKEND]

#: model, inputs and method: VeRA keeps a model-level state beside the
#: adapters, which the merged model must not keep (TensorFlow refuses its name)
MODELS = {
    "functional": (mlp_model, MLP_X, "vera"),
    "gemma_backbone": (gemma_backbone, token_inputs(20), "lora"),
}


def _export(model, fmt, tmp_path, x):
    path = str(tmp_path / {"torch": "model.pt2", "litert": "model.tflite"}.get(fmt, "model"))
    kwargs = {}
    if isinstance(x, dict):
        # A fixed sequence length: jax2tf cannot relate the two inputs'
        # symbolic lengths on its own (a plain Gemma fails the same way)
        kwargs["input_signature"] = [
            {k: keras.InputSpec(shape=(None,) + v.shape[1:], dtype=str(v.dtype)) for k, v in x.items()}
        ]
    model.export(path, format=fmt, verbose=False, **kwargs)
    return path


def _serve(fmt, path, x):
    """The loaded artifact's outputs for `x`, as NumPy."""
    if fmt == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)  # held: its variables live as long as it
        return np.asarray(loaded.serve(x))
    if fmt == "litert":
        import tensorflow as tf

        runner = tf.lite.Interpreter(model_path=path).get_signature_runner()
        names = runner.get_input_details()
        if isinstance(x, dict) and set(x) == set(names):
            inputs = x
        else:  # LiteRT names a structure's leaves args_0, args_0_1, ... in flattening order
            inputs = dict(zip(sorted(names, key=lambda n: (len(n), n)), keras.tree.flatten(x)))
        (out,) = runner(**inputs).values()
        return np.asarray(out)
    if fmt == "torch":
        import torch

        program = torch.export.load(path).module()
        arg = keras.tree.map_structure(torch.as_tensor, x)
        return program(arg).detach().cpu().numpy()
    raise AssertionError(fmt)


def _batch(x, fmt):
    # torch.export takes the batch size of its sample (one) unless given
    # `dynamic_shapes`; the other formats keep the batch axis free
    if fmt != "torch":
        return x
    return {k: v[:1] for k, v in x.items()} if isinstance(x, dict) else x[:1]


@pytest.mark.parametrize("fmt,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_adapted_and_merged_model_export_and_serve_what_they_compute(fmt, kind, tmp_path):
    make, x, method = MODELS[kind]
    x = _batch(x, fmt)
    model = make()
    kl.enable_adapter(model, method=method, rank=2)
    for _, adapter in kl.adapters(model):
        perturb(adapter, scale=0.2)
    adapted = to_np(model(x))
    # unmerged, the adapters (and a method's model-level state) export as they are
    (tmp_path / "adapted").mkdir()
    served = _serve(fmt, _export(model, fmt, tmp_path / "adapted", x), x)
    np.testing.assert_allclose(served, adapted, rtol=1e-4, atol=1e-5)
    kl.merge(model)
    merged = to_np(model(x))
    np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-5)

    served = _serve(fmt, _export(model, fmt, tmp_path, x), x)
    assert served.shape == merged.shape
    np.testing.assert_allclose(served, merged, rtol=1e-4, atol=1e-5)


class KeepsLists(keras.Model):
    """Holds its layers also in a list and a dict set past Keras's tracker, as
    Keras sets its own bookkeeping (on TensorFlow: containers TensorFlow
    tracks, a `ListWrapper` and a `_DictWrapper`), and calls them from there."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(6, activation="tanh", name="hidden")
        self.head = keras.layers.Dense(3, name="head")
        _compat.set_untracked(self, "order", [self.hidden, self.head])
        _compat.set_untracked(self, "by_name", {"hidden": self.hidden, "head": self.head})

    def call(self, x):
        return self.order[-1](self.by_name["hidden"](x))


def test_containers_tensorflow_tracks_follow_the_swap_and_export(tmp_path):
    model = KeepsLists()
    model(MLP_X)
    kl.enable_adapter(model, rank=2, targets=["hidden", "head"])
    for _, adapter in kl.adapters(model):
        perturb(adapter, scale=0.2)
    assert all(tree.is_adapter(layer) for layer in model.order)
    adapted = to_np(model(MLP_X))
    kl.merge(model)
    assert [type(layer) for layer in model.order] == [keras.layers.Dense] * 2
    assert model.order[0] is model.hidden and model.order[1] is model.head
    assert model.by_name["hidden"] is model.hidden and model.by_name["head"] is model.head
    merged = to_np(model(MLP_X))
    np.testing.assert_allclose(merged, adapted, rtol=1e-4, atol=1e-5)

    fmt = CASES[0][0]
    x = _batch(MLP_X, fmt)
    served = _serve(fmt, _export(model, fmt, tmp_path, x), x)
    np.testing.assert_allclose(served, to_np(model(x)), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------
# The merged model is tracked as a plain build of the same architecture
class TwoDense(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(6, activation="tanh")
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.hidden(x))


def _subclassed():
    model = TwoDense()
    model(MLP_X)
    return model


def _sequential():
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(6), keras.layers.Dense(3)])


BUILDS = {
    "functional": (mlp_model, MLP_X),
    "sequential": (_sequential, MLP_X),
    "subclassed": (_subclassed, MLP_X),
    "gemma_backbone": (gemma_backbone, token_inputs(20)),
}


def _keras_tracking(model):
    """Layers (path and class) and variables (path and shape) Keras finds."""
    return ([(e.path, type(e.layer).__name__) for e in tree.walk(model)],
            [(v.path, tuple(v.shape)) for v in model.weights])


def _tf_object_graph(model):
    """What TensorFlow saves: every object reachable from the model through
    its checkpoint dependencies, by path and class (raises, as saving does,
    on a tracked list whose item was replaced)."""
    import tensorflow as tf

    out, seen, todo = [], set(), [("", model)]
    while todo:
        path, obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for name, child in sorted(tf.train.TrackableView.children(obj).items()):
            out.append((f"{path}/{name}", type(child).__name__))
            todo.append((f"{path}/{name}", child))
    return sorted(out)


def _build(kind):
    keras.backend.clear_session()  # the same generated names for each build
    keras.utils.set_random_seed(0)
    return BUILDS[kind][0]()


@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_merged_model_is_tracked_like_a_plain_build(kind):
    x = BUILDS[kind][1]
    plain = _build(kind)
    plain(x)
    expected = _keras_tracking(plain)
    graph = _tf_object_graph(plain) if BACKEND == "tensorflow" else None
    model = _build(kind)
    kl.enable_adapter(model, rank=2)
    kl.merge(model)
    model(x)
    assert _keras_tracking(model) == expected
    if BACKEND == "tensorflow":
        assert _tf_object_graph(model) == graph
    if BACKEND == "torch":
        # each tensor torch tracks (its ParameterDicts, a Sequential's inner
        # graph's included) is a variable of the model, none left behind
        values = {id(v.value) for v in model.weights}
        assert {id(p) for p in model.parameters()} <= values


# ----------------------------------------------------------------------
# Adapted models export as they are: unmerged, and with an adapter per
# example (`PerExampleAdapters`, the selection an input of the artifact)
@pytest.mark.parametrize("fmt,kind", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_per_example_model_exports_with_the_selection_as_input(fmt, kind, tmp_path):
    make, x, _ = MODELS[kind]
    model = make()
    for i, method in enumerate(("lora", "dora", "vera")):
        kl.enable_adapter(model, method=method, rank=2, adapter_name=f"n{i}")
        for path, adapter in kl.adapters(model):
            if path.endswith(f"@n{i}"):
                perturb(adapter, scale=0.2, seed=i)
    per_example = kl.PerExampleAdapters(model)
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    entries = [["n0", None, "n1", {"n0": 0.5, "n2": 0.5}, "n2"][i % 5] for i in range(n)]
    inputs = {"inputs": x, **kl.adapter_selection(model, entries)}
    want = to_np(per_example(inputs))
    # torch.export fixes the batch size (that of the signature here)
    batch = n if fmt == "torch" else None
    spec = lambda v: keras.InputSpec(shape=(batch,) + v.shape[1:], dtype=str(v.dtype))  # noqa: E731
    path = str(tmp_path / {"torch": "model.pt2", "litert": "model.tflite"}.get(fmt, "model"))
    per_example.export(path, format=fmt, verbose=False,
                       input_signature=[keras.tree.map_structure(spec, inputs)])
    np.testing.assert_allclose(_serve(fmt, path, inputs), want, rtol=1e-4, atol=1e-5)
    # another selection, the same artifact
    other = {"inputs": x, **kl.adapter_selection(model, [entries[(i + 2) % n] for i in range(n)])}
    np.testing.assert_allclose(_serve(fmt, path, other), to_np(per_example(other)), rtol=1e-4, atol=1e-5)
