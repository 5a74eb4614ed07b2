"""The few Keras internals keras-lowrank relies on, in one place.

Each is pinned by a test (tests/test_compat.py) so a Keras release that moves
one fails loudly there instead of somewhere deep in a method.
"""

import contextlib

import keras
import numpy as np
from keras import ops
from keras.src.backend.common import global_state
from keras.src.layers.convolutional.base_conv import BaseConv  # noqa: F401 (bases.is_conv)
from keras.src.models.functional import Functional
from keras.src.ops.operation_utils import compute_conv_output_shape  # noqa: F401 (ConvGeometry)
from keras.src.quantizers import dequantize_with_sz_map
from keras.src.quantizers import unpack_int4
from keras.src.utils import tracking as keras_tracking

try:
    from keras.src.backend.common.variables import AutocastScope
except ImportError:  # an older Keras layout
    AutocastScope = None


def no_autocast():
    """A scope in which float variables are read in their stored dtype."""
    if AutocastScope is None:
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


def _with_inner_graphs(layers):
    """`layers`, each followed by the Functional graph it keeps outside its
    sublayers (a Sequential's), which holds a `ParameterDict` of its own."""
    for layer in layers:
        yield layer
        inner = sequential_graph(layer)
        if inner is not None:
            yield inner


def refresh_torch_params(layers):
    """Torch keeps a ParameterDict of every variable; refresh it after swaps."""
    if keras.backend.backend() != "torch":
        return
    for layer in _with_inner_graphs(layers):
        if hasattr(layer, "_torch_params"):
            layer._track_variables()


def torch_param_holders(layers):
    """The layers that keep a torch `ParameterDict` of their variables (and
    their sublayers'), a Sequential's inner graph included; empty on other
    backends."""
    if keras.backend.backend() != "torch":
        return []
    return [layer for layer in _with_inner_graphs(layers) if hasattr(layer, "_torch_params")]


def forget_torch_variables(holders, variables):
    """Drop `variables` from the `ParameterDict`s of `holders`, which would
    otherwise keep their tensors alive until the next refresh."""
    for holder in holders:
        params = holder._torch_params
        for v in variables:
            if v.path in params and params[v.path] is v.value:
                del params[v.path]


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
    return ops.reshape(value, tuple(value.shape))


def host_view(value):
    """A NumPy array that shares memory with a CPU tensor or variable value
    (bfloat16 as `ml_dtypes.bfloat16`), or `None` where there is no such
    view (TensorFlow, a GPU tensor): lets host code read a large kernel
    without a copy of it."""
    if isinstance(value, np.ndarray):
        return value
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if not isinstance(value, jax.Array) or any(
            d.platform != "cpu" for d in value.devices()
        ):
            return None
        return np.asarray(value)  # zero-copy on CPU
    if backend == "torch":
        import torch

        if not isinstance(value, torch.Tensor) or value.device.type != "cpu":
            return None
        value = value.detach()
        if value.dtype == torch.bfloat16:
            import ml_dtypes

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return None


def from_host(array):
    """A backend tensor sharing memory with a NumPy array where the backend
    allows it, else the array itself (which Keras then copies).

    JAX on the CPU takes a C-contiguous array aligned to 64 bytes without a
    copy (`jax.device_put`; `keras.ops.convert_to_tensor` always copies), so
    a large state made on the host (NF4 codes) becomes a variable's value
    without a second copy beside it. Torch already shares a CPU array's
    memory; TensorFlow always copies. The caller must not write to `array`
    afterwards."""
    if keras.backend.backend() == "jax" and isinstance(array, np.ndarray):
        import jax

        if (
            jax.default_backend() == "cpu"
            and array.flags.c_contiguous
            and array.ctypes.data % 64 == 0
        ):
            return jax.device_put(array)
    return array


def writes_in_place():
    """Whether a slice of a variable can be written without copying the
    variable (TensorFlow's resource variables); see `slice_writer`."""
    return keras.backend.backend() == "tensorflow"


def slice_writer(variable):
    """`write(start, values)`: `variable[start:start + len(values)] = values`
    in place (TensorFlow's `ResourceStridedSliceAssign`; only where
    `writes_in_place()`)."""
    target = variable.value

    def write(start, values):
        target[start : start + values.shape[0]].assign(values)

    return write


def aligned_empty(shape, dtype):
    """`np.empty(shape, dtype)` starting on a 64-byte boundary (what JAX
    needs to share a host array's memory, see `from_host`)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def copy_value(variable):
    """A copy of a variable's current value (a separate buffer)."""
    return ops.copy(variable.value)


def float_kernel(layer):
    """The kernel variable of a float Dense/EinsumDense (not the `kernel`
    property, which adds Keras's own LoRA and dequantizes)."""
    return layer._kernel


def keras_dequantize(layer):
    """Float32 kernel of a Keras int8/int4 Dense or EinsumDense, with Keras's
    own layout rules (keras/src/layers/core/{dense,einsum_dense}.py,
    `_get_kernel_with_merged_lora`)."""
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
    return isinstance(layer, Functional)


def _tf_reference_to(item, old):
    """Whether `item` is a TensorFlow `TrackableReference(name, ref)` to `old`."""
    return type(item).__name__ == "TrackableReference" and getattr(item, "ref", None) is old


def _is_tf_list_wrapper(value):
    """Whether `value` is a list TensorFlow's attribute tracking wrapped (a
    `ListWrapper`, which Keras's tracker left alone): TensorFlow refuses to
    save one in which an element was replaced (`__setitem__`), by it or
    behind its back."""
    return type(value).__name__ == "ListWrapper" and hasattr(value, "_non_append_mutation")


def _is_tf_dict_wrapper(value):
    """Whether `value` is a dict TensorFlow's attribute tracking wrapped (a
    proxy: `dict.__setitem__` does not apply to it)."""
    return type(value).__name__ == "_DictWrapper" and hasattr(value, "__wrapped__")


def set_untracked(obj, name, value):
    """`obj.<name> = value` past Keras's tracker, the way Keras sets a
    Functional's `_operations`. On TensorFlow a list then gets a fresh
    `ListWrapper`, tracked under `name` in place of the old one, as in a
    model built that way; elsewhere it stays a plain list."""
    with keras_tracking.DotNotTrackScope():
        setattr(obj, name, value)


def _swapped(items, old, new):
    return [new if v is old else v for v in items]


def replace_in_attributes(parent, old, new):
    """Point every attribute (and list or dict item) of `parent` that holds
    `old` at `new`, and torch's module registry with them.

    Items of Keras-tracked or plain lists and dicts are set in place, past
    Keras's tracker (which would append `new` to the parent's sublayers). A
    list TensorFlow tracks is replaced whole, so that it tracks `new` as
    if it had been built with it."""
    for attr, value in list(vars(parent).items()):
        if attr in ("_layers", "_tracker", "_operations"):
            continue
        if value is old:
            object.__setattr__(parent, attr, new)
            modules = vars(parent).get("_modules")
            if modules is not None and attr in modules:
                modules[attr] = new
        elif _is_tf_list_wrapper(value) and any(v is old for v in value):
            set_untracked(parent, attr, _swapped(value, old, new))
        elif isinstance(value, list) and any(v is old or _tf_reference_to(v, old) for v in value):
            for i, v in enumerate(value):
                if v is old:
                    list.__setitem__(value, i, new)
                elif _tf_reference_to(v, old):
                    # TensorFlow's checkpoint dependency (name, ref): left
                    # stale it would keep the old layer and its kernel alive
                    list.__setitem__(value, i, type(v)(v.name, new))
        elif isinstance(value, dict) and any(v is old for v in value.values()):
            for k, v in list(value.items()):
                if v is old:
                    if _is_tf_dict_wrapper(value):
                        value[k] = new  # the wrapper tracks `new` under `k`
                    else:
                        dict.__setitem__(value, k, new)
    modules = vars(parent).get("_modules")
    if modules:
        for key, mod in list(modules.items()):
            if mod is old:
                modules[key] = new


def sequential_graph(layer):
    """The Functional graph a built Sequential model keeps (or `None`)."""
    inner = getattr(layer, "_functional", None)
    return inner if inner is not None and is_functional(inner) else None


def _functionals_of(layer):
    out = [layer] if is_functional(layer) else []
    inner = sequential_graph(layer)
    if inner is not None:
        out.append(inner)
    return out


def replace_in_graph(parent, old, new):
    """Swap the graph node `old` for `new` in the Functional graphs of
    `parent`: its operation lists, its nodes and their output tensors."""
    for func in _functionals_of(parent):
        if old not in getattr(func, "_operations", []):
            continue
        # A new list, not an item set in the old one: on TensorFlow the
        # operations list is a tracked `ListWrapper`, which refuses to save
        # (`model.export`) once an element was replaced.
        set_untracked(func, "_operations", _swapped(func._operations, old, new))
        by_depth = getattr(func, "_operations_by_depth", None)
        if by_depth:
            for depth, ops_at in by_depth.items():
                by_depth[depth] = [new if o is old else o for o in ops_at]
        for node in old._inbound_nodes:
            node.operation = new
            for tensor in node.outputs:
                history = getattr(tensor, "_keras_history", None)
                if history is not None and history[0] is old:
                    tensor._keras_history = type(history)(new, *history[1:])
        nodes = getattr(func, "_nodes", None)
        if nodes is not None:
            prefix = f"{id(old)}_ib-"
            for key in [k for k in nodes if k.startswith(prefix)]:
                nodes.discard(key)
                nodes.add(f"{id(new)}_ib-{key[len(prefix):]}")
        # `new` keeps its own node lists (tracked as its class tracks them),
        # with the nodes of `old` as their contents
        new._inbound_nodes[:] = list(old._inbound_nodes)
        new._outbound_nodes[:] = list(old._outbound_nodes)


def producer(tensor):
    """`(operation, node index)` that produced a symbolic tensor, or `None`."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else (history[0], history[1])


def node_inputs(operation, node_index):
    """The input tensors of one call (node) of a graph operation."""
    nodes = getattr(operation, "_inbound_nodes", [])
    return list(nodes[node_index].input_tensors) if node_index < len(nodes) else []


def call_context_training():
    """The `training` flag Keras resolved for the call in progress (`None`
    outside a call or when nobody set it). Reads the current call context
    without creating one: `Layer._get_call_context()` would make a context
    that nothing clears when the layer's `call` runs outside `__call__`
    (JAX's `stateless_call`), and every later call would inherit its flag."""
    ctx = global_state.get_global_attribute("current_call_ctx")
    return None if ctx is None else ctx.training


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


# ----------------------------------------------------------------------
# Optimizers
def innermost_optimizer(optimizer):
    """The optimizer that applies updates, inside any wrappers (Keras's
    `LossScaleOptimizer`, keras-lowrank's `AdapterOptimizer`)."""
    while getattr(optimizer, "inner_optimizer", None) is not None:
        optimizer = optimizer.inner_optimizer
    return optimizer


def unscaled_gradients(optimizer, grads):
    """`grads` as the loss's own gradients: divided by the loss scale when
    `optimizer` is Keras's `LossScaleOptimizer` (mixed float16)."""
    scale = getattr(optimizer, "dynamic_scale", None)
    if scale is None:
        return grads
    return [None if g is None else g / keras.ops.cast(scale, g.dtype) for g in grads]


@contextlib.contextmanager
def per_variable_learning_rate(optimizer, factor):
    """Within the block, `optimizer` updates each variable `v` with its own
    rule at `factor(v)` times its learning rate and weight decay.

    Keras applies one learning rate to all variables: `apply` computes it and
    hands it to `_backend_update_step(grads, variables, learning_rate)` (per
    backend; PyTorch's runs all variables at once), after
    `_apply_weight_decay(variables)` (which reads `weight_decay` and the
    learning rate). Both are called here once per group of equal factor.
    Runs at trace time: the groups are Python, the compiled step is plain."""
    update = optimizer._backend_update_step
    decay = optimizer._apply_weight_decay

    def groups(pairs):
        out = {}
        for item, v in pairs:
            out.setdefault(float(factor(v)), []).append(item)
        return out

    def grouped_update(grads, variables, learning_rate):
        for f, items in groups([((g, v), v) for g, v in zip(grads, variables)]).items():
            gs = [g for g, _ in items]
            vs = [v for _, v in items]
            update(gs, vs, learning_rate if f == 1.0 else learning_rate * f)

    def grouped_decay(variables):
        wd = optimizer.weight_decay
        if wd is None:
            return decay(variables)
        try:
            for f, vs in groups([(v, v) for v in variables]).items():
                optimizer.weight_decay = wd * f
                decay(vs)
        finally:
            optimizer.weight_decay = wd

    optimizer._backend_update_step = grouped_update
    optimizer._apply_weight_decay = grouped_decay
    try:
        yield
    finally:
        del optimizer._backend_update_step
        del optimizer._apply_weight_decay


def set_optimizer(model, optimizer):
    """Replace the optimizer of a compiled model (before its train function
    is made)."""
    with unlocked(model):
        model.optimizer = optimizer
    for attr in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attr):
            setattr(model, attr, None)
