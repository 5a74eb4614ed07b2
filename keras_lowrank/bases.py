"""The frozen base layer under an adapter: what kind it is, and its kernel.

Adapters wrap a plain Keras `Dense` or `EinsumDense`. This module is the one
place that knows how such a layer stores its kernel, so the methods can ask
for "the kernel as a float32 matrix" and "replace the kernel" without caring
about the layer type.
"""

import math

import keras
from keras import ops

from keras_lowrank import _compat
from keras_lowrank import tree


#: frozen-base storages `enable_adapter(base=...)` accepts
BASES = ("float", "nf4", "int8", "int4")
#: Keras quantization modes an adapter can sit on
KERAS_MODES = ("int8", "int4")


def _nf4_class():
    from keras_lowrank.quant.layers import NF4Linear

    return NF4Linear


def is_nf4(layer):
    return isinstance(layer, _nf4_class())


def is_linear_layer(layer):
    """True for the layer types an adapter can wrap."""
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) or is_nf4(layer)


def base_kind(layer):
    """`"float"`, `"nf4"`, `"int8"` or `"int4"`: how the kernel is stored."""
    if is_nf4(layer):
        return "nf4"
    return quantization_mode(layer) or "float"


def check_base(base, double_quant=True):
    if base not in (None,) + BASES:
        raise ValueError(
            f"Unknown base={base!r}; frozen-base storages: {BASES} (None = as it is)."
        )
    if double_quant not in (True, False):
        raise ValueError(f"double_quant must be True or False; received {double_quant!r}.")


def converter(base, double_quant=True):
    """A function turning a float base layer into the requested storage."""
    if base in (None, "float"):
        return None
    if base == "nf4":
        nf4 = _nf4_class()
        return lambda layer: nf4.from_layer(layer, double_quant=double_quant)
    if base in KERAS_MODES:
        return lambda layer: keras_quantized_copy(layer, base)
    raise ValueError(f"Unknown base={base!r}.")


def float_policy_name(layer):
    """The layer's float dtype policy name (`"float32"`, `"mixed_bfloat16"`)."""
    compute, variable = layer.compute_dtype, layer.variable_dtype
    if compute == variable:
        return variable
    return f"mixed_{compute}"


def keras_quantized_copy(layer, mode):
    """A copy of a float Dense/EinsumDense quantized by Keras's own
    `quantize(mode)` (the original is left as it is)."""
    input_shape = build_input_shape(layer)
    if input_shape is None:
        raise ValueError(
            f"Layer {layer.name!r}: cannot copy it for {mode} quantization, "
            "its build input shape is unknown."
        )
    config = layer.get_config()
    config["dtype"] = float_policy_name(layer)  # not a DTypePolicyMap
    copy = type(layer).from_config(config)
    copy.build(input_shape)
    copy._kernel.assign(layer._kernel)
    if layer.bias is not None:
        copy.bias.assign(layer.bias)
    copy.quantize(mode)
    return copy


def layer_equation(layer):
    if is_nf4(layer):
        return layer.equation
    if isinstance(layer, keras.layers.EinsumDense):
        return layer.equation
    if isinstance(layer, keras.layers.Dense):
        return "...a,ab->...b"
    raise TypeError(
        f"Layer {layer.name!r} of type {type(layer).__name__} is not a Dense "
        "or EinsumDense layer."
    )


def quantization_mode(layer):
    return getattr(layer, "quantization_mode", None)


def check_supported(layer, path=None):
    """Raise a clear error for a layer no adapter can wrap."""
    where = path or layer.name
    if not is_linear_layer(layer):
        raise TypeError(
            f"Layer {where!r} is a {type(layer).__name__}; adapters wrap Dense "
            "and EinsumDense layers only."
        )
    if not layer.built:
        raise ValueError(f"Layer {where!r} is not built; build the model first.")
    mode = quantization_mode(layer)
    if mode is not None and mode not in KERAS_MODES:
        raise NotImplementedError(
            f"Layer {where!r} is quantized with mode={mode!r}; adapters sit on "
            f"float, NF4 and Keras {KERAS_MODES} kernels only (Keras itself "
            "silently ignores or blocks LoRA on this mode)."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer {where!r} has Keras's built-in LoRA enabled "
            f"(lora_rank={layer.lora_rank}); use one adapter system per layer."
        )
    if getattr(layer, "kernel_constraint", None) is not None:
        raise ValueError(
            f"Layer {where!r} has a kernel_constraint; an adapter cannot keep "
            "the merged kernel inside it."
        )


def float_kernel_shape(layer):
    if is_nf4(layer):
        return layer.kernel_shape
    if quantization_mode(layer) is not None:
        return _compat.keras_float_kernel_shape(layer)
    return tuple(layer._kernel.shape)


def kernel_variable(layer):
    """The float kernel variable (`None` for a quantized storage)."""
    return None if is_nf4(layer) else layer._kernel


def freeze_kernel(layer, trainable=False):
    var = kernel_variable(layer)
    if var is not None:
        var.trainable = trainable


def read_kernel(layer):
    """The kernel as a float32 tensor (dequantized), never autocast."""
    if is_nf4(layer):
        return layer.dequantized_kernel()
    if quantization_mode(layer) is not None:
        with _compat.no_autocast():
            return _compat.keras_dequantize(layer)
    with _compat.no_autocast():
        value = _compat.as_tensor(kernel_variable(layer).value)
    return ops.cast(value, "float32")


def assign_kernel(layer, value):
    """Set the kernel (a quantized storage re-quantizes `value`)."""
    if is_nf4(layer):
        layer.quantize_kernel(value)
        return
    if quantization_mode(layer) is not None:
        raise NotImplementedError(
            f"Layer {layer.name!r}: re-quantizing a Keras {quantization_mode(layer)} "
            "kernel in place is not supported."
        )
    var = kernel_variable(layer)
    var.assign(ops.cast(value, var.dtype))


def build_input_shape(layer):
    if is_nf4(layer):
        return layer.source_input_shape
    shapes = _compat.build_shapes(layer) or {}
    return next(iter(shapes.values()), None)


def bias_variable(layer):
    return getattr(layer, "bias", None)


def plain_layer(layer, activation, name, activity_regularizer=None):
    """An unbuilt plain Dense/EinsumDense like `layer`, with `activation`
    and `activity_regularizer` (which an adapter held)."""
    if is_nf4(layer):
        cls = layer.plain_layer_class()
        config = dict(layer.source["config"])
    else:
        cls = type(layer)
        config = layer.get_config()
        if quantization_mode(layer) is not None:
            config["dtype"] = float_policy_name(layer)
    config["activation"] = keras.activations.serialize(activation)
    config["activity_regularizer"] = (
        None if activity_regularizer is None else keras.regularizers.serialize(activity_regularizer)
    )
    config["name"] = name
    for key in ("lora_rank", "lora_alpha", "quantization_config"):
        config.pop(key, None)
    return cls.from_config(config)


def storage_params(layer):
    """`(stored elements, float kernel parameters)` of a linear layer whose
    kernel is quantized (NF4, Keras int8/int4); `None` for any other layer.
    Lets parameter counts mean parameters, not packed codes."""
    if is_nf4(layer):
        stored = sum(math.prod(v.shape) for v in layer.storage_variables())
        return stored, layer.numel
    mode = quantization_mode(layer)
    if mode in KERAS_MODES and isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        stored = sum(math.prod(v.shape) for v in _compat.keras_quantized_storage(layer))
        return stored, math.prod(float_kernel_shape(layer))
    return None


def count_params(model, trainable_only=False):
    """Parameters of `model`, a quantized kernel counting as its float
    kernel's size (not its packed codes and constants).

    Example:

    >>> import keras
    >>> from keras_lowrank import bases
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> bases.count_params(model)
    36
    """
    variables = model.trainable_weights if trainable_only else model.weights
    total = int(sum(math.prod(v.shape) for v in variables))
    if not trainable_only:
        for layer in tree.all_layers_with_root(model):
            stored = storage_params(layer)
            if stored is not None:
                total += stored[1] - stored[0]
    return total
