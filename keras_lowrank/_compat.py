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


def keras_dequantize(layer):
    """Float32 kernel of a Keras int8/int4 Dense or EinsumDense, with Keras's
    own layout rules (keras/src/layers/core/{dense,einsum_dense}.py,
    `_get_kernel_with_merged_lora`)."""
    from keras import ops
    from keras.src.quantizers import dequantize_with_sz_map
    from keras.src.quantizers import unpack_int4

    mode = layer.quantization_mode
    einsum = isinstance(layer, keras.layers.EinsumDense)
    codes = as_tensor(layer._kernel.value)
    scale = ops.cast(as_tensor(layer.kernel_scale.value), "float32")
    if mode == "int8":
        if einsum:
            scale = layer._adjust_scale_for_dequant(scale)
        return ops.divide(ops.cast(codes, "float32"), scale)
    if mode == "int4":
        columns = layer._int4_unpacked_column_size if einsum else layer._orig_output_dim
        unpacked = unpack_int4(codes, columns, axis=-1)
        block = getattr(layer, "_int4_block_size", None)
        if block is not None and block != -1:
            kernel = dequantize_with_sz_map(
                unpacked, scale, as_tensor(layer.kernel_zero.value),
                as_tensor(layer.g_idx.value), group_axis=0,
            )
            kernel = ops.cast(kernel, "float32")
        else:
            kernel = ops.divide(ops.cast(unpacked, "float32"), scale)
        if einsum:
            kernel = ops.reshape(kernel, tuple(layer.original_kernel_shape))
        return kernel
    raise NotImplementedError(f"Keras quantization mode {mode!r}")


def keras_float_kernel_shape(layer):
    if layer.quantization_mode == "int4":
        if isinstance(layer, keras.layers.EinsumDense):
            return tuple(layer.original_kernel_shape)
        return (layer._orig_input_dim, layer._orig_output_dim)
    return tuple(layer._kernel.shape)


def is_functional(layer):
    """Whether `layer` is a Keras Functional model (graph of layers)."""
    from keras.src.models.functional import Functional

    return isinstance(layer, Functional)


def compile_config(model):
    """The arguments `model.compile` was last called with (or `None`)."""
    return getattr(model, "_compile_config", None)


def created_trainable(layer):
    """The variables `layer` itself created as trainable (whatever their
    current flag), not those of its sublayers."""
    return list(layer._trainable_variables)


def sublayers(layer):
    """The direct sublayers Keras tracks for `layer`."""
    return list(layer._layers)


def build_shapes(layer):
    """The input shapes `layer` was built with (a dict), or `None`."""
    return getattr(layer, "_build_shapes_dict", None)


def set_build_shapes(layer, shapes):
    """Record build shapes on a layer built without them (an adapter built
    around an already-built layer), so that Keras saves a build config."""
    layer._build_shapes_dict = dict(shapes)


def keras_quantized_storage(layer):
    """The variables holding a Keras int8/int4 kernel (codes and constants)."""
    names = ("_kernel", "kernel_scale", "kernel_zero", "g_idx")
    return [getattr(layer, n) for n in names if getattr(layer, n, None) is not None]
