"""The few Keras internals keras-lowrank relies on, in one place.

Each is pinned by a test (tests/test_compat.py) so a Keras release that moves
one fails loudly there instead of somewhere deep in a method.
"""

import contextlib

import keras


def no_autocast():
    """A scope in which float variables are read in their stored dtype."""
    try:
        from keras.src.backend.common.variables import AutocastScope
    except ImportError:  # older Keras layout
        return contextlib.nullcontext()
    return AutocastScope(None)


def unlocked(layer):
    """Context manager that lets us add state to a built layer."""

    @contextlib.contextmanager
    def scope():
        tracker = getattr(layer, "_tracker", None)
        was_locked = bool(tracker and tracker.locked)
        if tracker is not None:
            tracker.unlock()
        try:
            yield
        finally:
            if tracker is not None and was_locked:
                tracker.lock()

    return scope()


def refresh_torch_params(layers):
    """Torch keeps a ParameterDict of every variable; refresh it after swaps."""
    if keras.backend.backend() != "torch":
        return
    for layer in layers:
        if hasattr(layer, "_torch_params"):
            layer._track_variables()


def replace_in_layer_store(parent, old, new):
    """Replace `old` by `new` in the parent's tracked sublayers."""
    tracker = getattr(parent, "_tracker", None)
    if tracker is not None and tracker.is_in_store("layers", old):
        tracker.replace_tracked_value("layers", old, new)
    layers = vars(parent).get("_layers")
    if layers is not None:
        for i, layer in enumerate(layers):
            if layer is old:
                list.__setitem__(layers, i, new)


def as_tensor(value):
    """A backend tensor from a variable's value.

    `keras.ops.convert_to_tensor` keeps a TensorFlow variable a variable, and
    some ops (`swapaxes`) then fail on it; a same-shape reshape reads it into
    a tensor on every backend without copying."""
    from keras import ops

    return ops.reshape(value, tuple(value.shape))
