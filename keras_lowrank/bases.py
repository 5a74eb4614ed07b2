"""The frozen base layer under an adapter: what kind it is, and its kernel.

Adapters wrap a plain Keras `Dense` or `EinsumDense`. This module is the one
place that knows how such a layer stores its kernel, so the methods can ask
for "the kernel as a float32 matrix" and "replace the kernel" without caring
about the layer type.
"""

import keras
from keras import ops

from keras_lowrank import _compat


def is_linear_layer(layer):
    """True for the layer types an adapter can wrap."""
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))


def layer_equation(layer):
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
    if mode is not None:
        raise NotImplementedError(
            f"Layer {where!r} is quantized (mode={mode!r}); adapters over "
            "Keras-quantized kernels are not supported in this release. "
            "Adapt the float model, or quantize after merging."
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
    return tuple(layer._kernel.shape)


def kernel_variable(layer):
    return layer._kernel


def read_kernel(layer):
    """The kernel as a float32 tensor, never autocast."""
    with _compat.no_autocast():
        value = kernel_variable(layer).value
    return ops.cast(value, "float32")


def assign_kernel(layer, value):
    var = kernel_variable(layer)
    var.assign(ops.cast(value, var.dtype))


def bias_variable(layer):
    return getattr(layer, "bias", None)


def plain_config(layer, activation):
    """Config of a plain copy of `layer` with `activation` restored."""
    config = layer.get_config()
    config["activation"] = keras.activations.serialize(activation)
    for key in ("lora_rank", "lora_alpha", "quantization_config"):
        config.pop(key, None)
    return config
