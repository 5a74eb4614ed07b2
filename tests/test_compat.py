"""Pins for the Keras internals keras-lowrank relies on (keras_lowrank/_compat.py
and the layer swap in keras_lowrank/tree.py). A Keras release that moves one
fails here, by name."""

import doctest
import importlib
import importlib.util
import os

import keras
import numpy as np
import pytest

import keras_lowrank
from keras_lowrank import _compat


def test_autocast_scope_reads_stored_dtype():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = keras.layers.Dense(3)
    layer.build((None, 2))

    class Probe(keras.layers.Layer):
        def call(self, x):
            with _compat.no_autocast():
                raw = layer.kernel.value
            return layer.kernel.value, raw

    cast, raw = Probe()(np.ones((1, 2), "float32"))
    assert keras.backend.standardize_dtype(raw.dtype) == "float32"
    assert keras.backend.standardize_dtype(cast.dtype) == "bfloat16"


def test_tracker_and_functional_internals_exist():
    layer = keras.layers.Dense(2)
    assert hasattr(layer, "_tracker") and hasattr(layer._tracker, "replace_tracked_value")
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    assert hasattr(model, "_operations") and hasattr(model, "_nodes")
    assert hasattr(model, "_operations_by_depth")
    from keras.src.ops.function import make_node_key

    op = model.layers[-1]
    assert make_node_key(op, 0) in model._nodes


def _modules_with_examples():
    """Every module of the package whose docstrings hold examples (`>>>`)."""
    import pkgutil

    root = os.path.dirname(keras_lowrank.__file__)
    names = ["keras_lowrank"] + [
        m.name for m in pkgutil.walk_packages([root], "keras_lowrank.")
        if not m.name.startswith("keras_lowrank.examples")
    ]
    found = []
    for name in names:
        spec = importlib.util.find_spec(name)
        with open(spec.origin) as f:
            if ">>>" in f.read():
                found.append(name)
    return found


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


def test_optimizer_layer_and_call_context_internals_exist():
    """_compat.per_variable_learning_rate, float_kernel, created_trainable
    and call_context_training rely on these."""
    opt = keras.optimizers.Adam()
    assert callable(opt._backend_update_step) and callable(opt._apply_weight_decay)
    assert hasattr(opt, "weight_decay")
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    assert _compat.float_kernel(layer) is layer.kernel
    assert [v.name for v in _compat.created_trainable(layer)] == ["kernel", "bias"]
    from keras.src.backend.common import global_state

    assert global_state.get_global_attribute("current_call_ctx") is None
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x, training=None):
            seen.append(_compat.call_context_training())
            return x

    Probe()(np.ones((1, 2), "float32"), training=True)
    assert seen == [True] and _compat.call_context_training() is None


def test_every_method_has_a_page_whose_options_come_from_its_declarations():
    """docs/methods/<method>.md exists for every method and shows its options
    table through the site's hook (`{{ method_options }}`, made from
    `Method.options_table()`), so it cannot drift; the overview's table and
    the navigation are made from the registry too (scripts/docs_hooks.py)."""
    import os

    import keras_lowrank as kl

    docs = os.path.join(os.path.dirname(__file__), "..", "docs")
    overview = open(os.path.join(docs, "methods.md"), encoding="utf-8").read()
    assert "{{ methods_table }}" in overview
    for name in kl.methods():
        text = open(os.path.join(docs, "methods", f"{name}.md"), encoding="utf-8").read()
        assert text.startswith("# ") and f'method="{name}"' in text.splitlines()[0], name
        assert "{{ method_options }}" in text, f"docs/methods/{name}.md: show its options with {{{{ method_options }}}}"


def test_host_state_enters_a_variable_with_one_copy_at_most():
    """The NF4 codes made on the host become a variable without a second
    copy: JAX on the CPU shares a 64-byte aligned array (`from_host`),
    torch shares any CPU array, and TensorFlow writes a slice of a variable
    in place (`slice_writer`)."""
    codes = _compat.aligned_empty((1000,), "uint8")
    assert codes.ctypes.data % 64 == 0 and codes.shape == (1000,)
    codes[:] = np.arange(1000) % 251
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        shared = _compat.from_host(codes)
        if jax.default_backend() == "cpu":
            assert shared.unsafe_buffer_pointer() == codes.ctypes.data
        np.testing.assert_array_equal(np.asarray(shared), codes)
    var = keras.Variable(initializer=lambda shape, dtype: _compat.from_host(codes), shape=(1000,), dtype="uint8", trainable=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(var), codes)
    assert _compat.writes_in_place() == (backend == "tensorflow")
    if _compat.writes_in_place():
        write = _compat.slice_writer(var)
        write(10, np.full((5,), 7, "uint8"))
        want = codes.copy()
        want[10:15] = 7
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(var), want)
