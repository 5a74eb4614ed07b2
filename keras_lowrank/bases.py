"""The frozen base layer under an adapter: how its kernel is stored.

Adapters wrap a `Dense` or `EinsumDense` (or an `NF4Linear` standing for
one). How that layer stores its kernel is a `Storage` strategy, one class
per kind:

- `FloatStorage`: a float kernel variable (any float dtype);
- `NF4Storage`: keras-lowrank's 4-bit NormalFloat (`quant.layers.NF4Linear`);
- `KerasQuantizedStorage("int8" | "int4")`: Keras's own quantized layers.

Every question the rest of the library asks about a base layer ("the
kernel as a float32 tensor", "replace the kernel", "turn this float layer
into NF4", "how many parameters") goes to `storage_of(layer)`; a new storage
is one new class here. The module-level functions are the shortcuts the
methods use.
"""

import math

import keras
from keras import ops

from keras_lowrank import _compat
from keras_lowrank import arguments
from keras_lowrank import tree
from keras_lowrank.geometry import ConvGeometry
from keras_lowrank.geometry import EmbeddingGeometry
from keras_lowrank.geometry import KernelGeometry
from keras_lowrank import linalg
from keras_lowrank import options as opt
from keras_lowrank.experts import ExpertLinear
from keras_lowrank.quant.layers import DENSE_EQUATION
from keras_lowrank.quant.layers import NF4Linear

#: frozen-base storages `enable_adapter(base=...)` accepts
BASES = ("float", "nf4", "int8", "int4")
#: the float layer classes an adapter wraps (a stacked expert weight, once
#: exposed, is an `ExpertLinear`)
LINEAR_CLASSES = (keras.layers.Dense, keras.layers.EinsumDense, ExpertLinear)
#: Keras quantization modes an adapter can sit on
KERAS_MODES = ("int8", "int4")


def float_policy_name(layer):
    """The layer's float dtype policy name (`"float32"`, `"mixed_bfloat16"`)."""
    compute, variable = layer.compute_dtype, layer.variable_dtype
    if compute == variable:
        return variable
    return f"mixed_{compute}"


def _float32(value):
    with _compat.no_autocast():
        value = _compat.as_tensor(value)
    return ops.cast(value, "float32")


class Storage:
    """How a frozen linear layer stores its kernel (one subclass per kind)."""

    kind = None

    def equation(self, layer):
        raise NotImplementedError

    def float_kernel_shape(self, layer):
        raise NotImplementedError

    def kernel_variable(self, layer):
        """The float kernel variable, or `None` for a quantized storage."""
        return None

    def read_kernel(self, layer):
        """The kernel as a float32 tensor (dequantized), never autocast."""
        raise NotImplementedError

    def assign_kernel(self, layer, value):
        raise NotImplementedError(
            f"Layer {layer.name!r}: its {self.kind} kernel cannot be rewritten in place."
        )

    def build_input_shape(self, layer):
        shapes = _compat.build_shapes(layer) or {}
        return next(iter(shapes.values()), None)

    def plain_config(self, layer):
        """`(class, config)` of a plain float layer like this one."""
        config = layer.get_config()
        config["dtype"] = float_policy_name(layer)
        return type(layer), config

    def storage_params(self, layer):
        """`(stored elements, float kernel parameters)`, or `None` when they
        are the same thing (a float kernel)."""
        return None

    def check(self, layer, where):
        """Raise a clear error if an adapter cannot sit on this storage."""

    def float_values(self, layer):
        """The float values that make up the stored kernel (the kernel, or
        a quantized kernel's scales), for the finiteness check."""
        return [v.value for v in self.storage_variables_of(layer) if "float" in str(v.dtype)]

    def storage_variables_of(self, layer):
        var = self.kernel_variable(layer)
        return [] if var is None else [var]

    def convert(self, layer, double_quant=True):
        """A copy of the float `layer` in this storage."""
        raise NotImplementedError


class FloatStorage(Storage):
    kind = "float"

    def equation(self, layer):
        return getattr(layer, "equation", None) or DENSE_EQUATION

    def float_kernel_shape(self, layer):
        return tuple(self.kernel_variable(layer).shape)

    def kernel_variable(self, layer):
        return _compat.float_kernel(layer)

    def read_kernel(self, layer):
        return _float32(self.kernel_variable(layer).value)

    def assign_kernel(self, layer, value):
        var = self.kernel_variable(layer)
        var.assign(ops.cast(value, var.dtype))

    def plain_config(self, layer):
        return type(layer), layer.get_config()

    def convert(self, layer, double_quant=True):
        return layer


class ConvStorage(FloatStorage):
    """A float `Conv1D/2D/3D` kernel (channels last, one group): its matrix
    view is `(prod(kernel_size)·in) x filters` (`geometry.ConvGeometry`).
    Its base stays float: Keras quantizes no convolution, and NF4 is for
    einsum kernels."""

    def equation(self, layer):
        return None

    def check(self, layer, where):
        if layer.data_format != "channels_last":
            raise ValueError(
                f"Layer {where!r} ({type(layer).__name__}) has data_format="
                f"{layer.data_format!r}; adapters adapt channels_last convolutions only."
            )
        if layer.groups != 1:
            raise ValueError(
                f"Layer {where!r} ({type(layer).__name__}) has groups={layer.groups}; a "
                "grouped convolution's kernel is not one matrix, and adapters adapt "
                "convolutions with groups=1 only."
            )


class EmbeddingStorage(FloatStorage):
    """A float `Embedding` table (KerasHub's `ReversibleEmbedding` too: a
    tied table is also its output head), `(vocabulary, dim)`: its matrix
    view is the table (`geometry.EmbeddingGeometry`). Its base stays float."""

    def equation(self, layer):
        return None

    def kernel_variable(self, layer):
        return layer._embeddings

    def check(self, layer, where):
        if getattr(layer, "embeddings_constraint", None) is not None:
            raise ValueError(
                f"Layer {where!r} has an embeddings_constraint; an adapter cannot keep "
                "the merged table inside it."
            )


class NF4Storage(Storage):
    kind = "nf4"

    def equation(self, layer):
        return layer.equation

    def float_kernel_shape(self, layer):
        return layer.kernel_shape

    def read_kernel(self, layer):
        return layer.dequantized_kernel()

    def assign_kernel(self, layer, value):
        layer.quantize_kernel(value)

    def build_input_shape(self, layer):
        return layer.source_input_shape

    def plain_config(self, layer):
        return layer.plain_layer_class(), dict(layer.source["config"])

    def storage_params(self, layer):
        stored = sum(math.prod(v.shape) for v in layer.storage_variables())
        return stored, layer.numel

    def storage_variables_of(self, layer):
        return layer.storage_variables()

    def convert(self, layer, double_quant=True):
        return NF4Linear.from_layer(layer, double_quant=double_quant)


class KerasQuantizedStorage(Storage):
    """A Dense/EinsumDense that Keras quantized (`layer.quantize(mode)`)."""

    def __init__(self, mode):
        self.kind = mode

    def equation(self, layer):
        return FloatStorage().equation(layer)

    def float_kernel_shape(self, layer):
        if isinstance(layer, ExpertLinear):
            return layer.kernel_shape
        return _compat.keras_float_kernel_shape(layer)

    def read_kernel(self, layer):
        with _compat.no_autocast():
            if isinstance(layer, ExpertLinear):
                return layer.dequantized_kernel()
            return _compat.keras_dequantize(layer)

    def storage_variables_of(self, layer):
        if isinstance(layer, ExpertLinear):
            return layer.storage_variables()
        return _compat.keras_quantized_storage(layer)

    def storage_params(self, layer):
        stored = sum(math.prod(v.shape) for v in self.storage_variables_of(layer))
        return stored, math.prod(self.float_kernel_shape(layer))

    def convert(self, layer, double_quant=True):
        """A copy of a float layer quantized by Keras's own `quantize` (an
        expert stack by Keras's own quantizers: `ExpertLinear.quantized_copy`)."""
        if isinstance(layer, ExpertLinear):
            return layer.quantized_copy(self.kind)
        input_shape = FLOAT.build_input_shape(layer)
        if input_shape is None:
            raise ValueError(
                f"Layer {layer.name!r}: cannot copy it for {self.kind} quantization, "
                "its build input shape is unknown."
            )
        config = layer.get_config()
        config["dtype"] = float_policy_name(layer)  # not a DTypePolicyMap
        copy = type(layer).from_config(config)
        copy.build(input_shape)
        FLOAT.kernel_variable(copy).assign(FLOAT.kernel_variable(layer))
        if layer.bias is not None:
            copy.bias.assign(layer.bias)
        copy.quantize(self.kind)
        return copy


class UnsupportedStorage(Storage):
    """A Keras quantization mode no adapter can sit on (float8, GPTQ, AWQ)."""

    def __init__(self, mode):
        self.kind = mode

    def check(self, layer, where):
        raise NotImplementedError(
            f"Layer {where!r} is quantized with mode={self.kind!r}; adapters sit on "
            f"float, NF4 and Keras {KERAS_MODES} kernels only (Keras itself "
            "silently ignores or blocks LoRA on this mode)."
        )


FLOAT = FloatStorage()
STORAGES = {
    "float": FLOAT,
    "nf4": NF4Storage(),
    "int8": KerasQuantizedStorage("int8"),
    "int4": KerasQuantizedStorage("int4"),
}


CONV = ConvStorage()


def is_conv(layer):
    """Whether `layer` is a `Conv1D`, `Conv2D` or `Conv3D` (not a transposed,
    depthwise or separable convolution)."""
    return isinstance(layer, _compat.BaseConv)


EMBEDDING = EmbeddingStorage()


def is_embedding(layer):
    """Whether `layer` is a Keras `Embedding` (KerasHub's `ReversibleEmbedding`
    too)."""
    return isinstance(layer, keras.layers.Embedding)


def storage_of(layer):
    """The `Storage` of a linear layer, or `None` for any other layer."""
    if isinstance(layer, NF4Linear):
        return STORAGES["nf4"]
    if is_conv(layer):
        return CONV
    if is_embedding(layer):
        mode = getattr(layer, "quantization_mode", None)
        return EMBEDDING if mode is None else UnsupportedStorage(mode)
    if not isinstance(layer, LINEAR_CLASSES):
        return None
    if isinstance(layer, ExpertLinear):  # Keras's `quantization_mode` means its own dispatch
        mode = layer.quantization
    else:
        mode = getattr(layer, "quantization_mode", None)
    if mode is None:
        return FLOAT
    return STORAGES.get(mode) or UnsupportedStorage(mode)


def _storage(layer):
    s = storage_of(layer)
    if s is None:
        raise TypeError(
            f"Layer {layer.name!r} of type {type(layer).__name__} is not a Dense "
            "or EinsumDense layer."
        )
    return s


# ----------------------------------------------------------------------
# Shortcuts
def is_linear_layer(layer):
    """True for the layer types an adapter can wrap."""
    return storage_of(layer) is not None


def base_kind(layer):
    """`"float"`, `"nf4"`, `"int8"` or `"int4"`: how the kernel is stored."""
    return _storage(layer).kind


def quantization_mode(layer):
    """Keras's quantization mode of the layer (`None` for float and NF4);
    an expert stack's int8/int4 (made with Keras's quantizers)."""
    if isinstance(layer, ExpertLinear):
        return layer.quantization
    return getattr(layer, "quantization_mode", None)


def check_base(base, double_quant=True):
    if base not in (None,) + BASES:
        raise ValueError(
            f"Unknown base={base!r}; frozen-base storages: {BASES} (None = as it is)."
        )
    arguments.check("enable_adapter", "double_quant", double_quant, opt.boolean)


def converter(base, double_quant=True):
    """A function turning a float base layer into the requested storage
    (`None` for the float storage)."""
    if base in (None, "float"):
        return None
    target = STORAGES[base]
    return lambda layer: target.convert(layer, double_quant=double_quant)


#: what an adapter can wrap, in words (for errors)
WRAPPED = ("Dense, EinsumDense, Conv1D/2D/3D and Embedding layers and the expert stacks "
           "of mixture-of-experts layers (not depthwise, separable or transposed convolutions)")


def check_supported(layer, path=None):
    """Raise a clear error for a layer no adapter can wrap."""
    where = path or layer.name
    storage = storage_of(layer)
    if storage is None:
        raise TypeError(
            f"Layer {where!r} is a {type(layer).__name__}; adapters wrap {WRAPPED}."
        )
    if not layer.built:
        raise ValueError(f"Layer {where!r} is not built; build the model first.")
    storage.check(layer, where)
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


def base_layer(layer):
    """The linear layer under an adapter or a set of named adapters (the
    layer itself when it is one)."""
    while layer is not None and not is_linear_layer(layer):
        layer = getattr(layer, "layer", None)
    return layer


def geometry_of(layer):
    """The `KernelGeometry` (matrix view) of a linear layer's kernel."""
    s = _storage(layer)
    if s is CONV:
        return ConvGeometry(s.float_kernel_shape(layer), layer.strides, layer.padding, layer.dilation_rate)
    if s is EMBEDDING:
        return EmbeddingGeometry(s.float_kernel_shape(layer))
    return KernelGeometry(
        s.equation(layer), s.float_kernel_shape(layer), getattr(layer, "batch_labels", "")
    )


def layer_equation(layer):
    return _storage(layer).equation(layer)


def float_kernel_shape(layer):
    return _storage(layer).float_kernel_shape(layer)


def kernel_variable(layer):
    """The float kernel variable (`None` for a quantized storage)."""
    return _storage(layer).kernel_variable(layer)


def freeze_kernel(layer, trainable=False):
    var = kernel_variable(layer)
    if var is not None:
        var.trainable = trainable


def check_finite_kernel(layer, where):
    """Refuse a frozen kernel (or a quantized kernel's scales) that holds
    NaN or inf: no adapter is put on a non-finite base, whatever the method
    and the storage (a NaN kernel has no NF4 code, no SVD, and makes every
    output NaN). Read without a copy of the kernel where the backend allows
    (`_compat.host_view`)."""
    storage = _storage(layer)
    with _compat.no_autocast():
        values = storage.float_values(layer)
    for value in values:
        host = _compat.host_view(value)
        if not linalg.all_finite(value if host is None else host):
            raise ValueError(
                f"Layer {where!r}: its frozen kernel ({storage.kind}) holds NaN or inf "
                "values; an adapter needs a finite base (nothing was changed). Fix or "
                "reload the model's weights first."
            )


def kernel_bytes(layer):
    """Bytes of the layer's float kernel (0 for a quantized storage)."""
    var = kernel_variable(layer)
    if var is None:
        return 0
    bits = int("".join(c for c in str(var.dtype) if c.isdigit()) or 32)
    return math.prod(var.shape) * bits // 8


def read_kernel(layer):
    """The kernel as a float32 tensor (dequantized), never autocast."""
    return _storage(layer).read_kernel(layer)


def assign_kernel(layer, value):
    """Set the kernel (NF4 re-quantizes `value`; Keras int8/int4 refuse)."""
    _storage(layer).assign_kernel(layer, value)


def build_input_shape(layer):
    return _storage(layer).build_input_shape(layer)


def bias_variable(layer):
    return getattr(layer, "bias", None)


def plain_layer(layer, activation, name, activity_regularizer=None):
    """An unbuilt plain Dense/EinsumDense like `layer`, with `activation`
    and `activity_regularizer` (which an adapter held)."""
    cls, config = _storage(layer).plain_config(layer)
    if not is_embedding(layer):  # an embedding has no activation
        config["activation"] = keras.activations.serialize(activation)
    config["activity_regularizer"] = (
        None if activity_regularizer is None else keras.regularizers.serialize(activity_regularizer)
    )
    config["name"] = name
    for key in ("lora_rank", "lora_alpha", "quantization_config", "quantization"):
        config.pop(key, None)
    return cls.from_config(config)


def reverse_output(layer, x, table):
    """What a `ReversibleEmbedding` computes with `reverse=True` (the output
    head), with `table` in place of its own: the logits `x @ tableᵀ`, in its
    `reverse_dtype`, soft-capped as it does. An untied layer's head is its
    own (`reverse_embeddings`, not adapted) and runs as it is."""
    if not getattr(layer, "tie_weights", None):
        if not hasattr(layer, "tie_weights"):
            raise TypeError(f"Layer {layer.name!r} has no reverse (output head) mode.")
        return layer(x, reverse=True)
    kernel = ops.transpose(table)
    dtype = getattr(layer, "reverse_dtype", None)
    if dtype is not None:
        x, kernel = ops.cast(x, dtype), ops.cast(kernel, dtype)
    else:
        kernel = ops.cast(kernel, x.dtype)
    logits = ops.matmul(x, kernel)
    cap = getattr(layer, "logit_soft_cap", None)
    if cap is not None:
        logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
    return logits


def storage_params(layer):
    """`(stored elements, float kernel parameters)` of a linear layer whose
    kernel is quantized (NF4, Keras int8/int4); `None` for any other layer.
    Lets parameter counts mean parameters, not packed codes."""
    s = storage_of(layer)
    return None if s is None else s.storage_params(layer)


def count_params(model, trainable_only=False):
    """Parameters of `model`, a quantized kernel counting as its float
    kernel's size (not its packed codes and constants).

    Examples:

        >>> import keras
        >>> from keras_lowrank import bases
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        >>> bases.count_params(model)
        36
    """
    arguments.check("count_params", "trainable_only", trainable_only, opt.boolean)
    variables = model.trainable_weights if trainable_only else model.weights
    total = int(sum(math.prod(v.shape) for v in variables))
    if not trainable_only:
        for layer in tree.all_layers_with_root(model):
            stored = storage_params(layer)
            if stored is not None:
                total += stored[1] - stored[0]
    return total
