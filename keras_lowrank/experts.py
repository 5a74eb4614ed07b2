"""Expert banks: the stacked weights of mixture-of-experts layers.

KerasHub's MoE models (Mixtral, Qwen-MoE, Qwen3-MoE, Qwen3.5-MoE, GPT-OSS,
Gemma 4) keep their experts as raw weights of shape `(experts, in, out)`,
made with `add_weight` and multiplied with `ops.einsum` inside the layer's
`call` (`einsum("th,ehm->etm", x, W)`), not as `Dense` layers. To adapt
them, each such weight is *exposed*: it becomes an `ExpertLinear`, a linear
layer of its own holding the same variable (so its path, its value and its
sharding stay as they were), whose matrix view is `(experts, in, out)`, one
matrix per expert. Every adapter then works per expert, through the batch
axis of the matrix view (`geometry.KernelGeometry(batch_labels=...)`).

The bank's attribute then holds an `ExpertSlot`, and the bank's module
reads `ops` through `RoutedOps`, which hands `einsum(..., slot)` to the
layer now in that slot (the `ExpertLinear`, an adapter around it, a
quantized copy) and passes every other call to `keras.ops` unchanged. So
the bank's own code runs as written, and the adapter's forward is the
factored einsum over experts: no `(experts, in, out)` update is made per
step.

Which weights a bank has is read off its class's source: a 3-axis weight
`self.<name>` that `call` hands to `einsum` as the second operand (through
`ops.cast` or not), with an equation whose kernel axes are
`(experts, in, out)` (the expert axis in the output). `fold_back` gives the
bank its variable back (after `merge`, or when no adapter was put on it).
"""

import functools
import inspect
import re
import sys
import types
import weakref

import keras
from keras import ops

from keras_lowrank.geometry import EquationError
from keras_lowrank.geometry import KernelGeometry

#: `<alias>.einsum("<eq>", <x>, [<alias>.cast(]self.<name>`
_EINSUM = re.compile(
    r"\b(\w+)\s*\.\s*einsum\(\s*(['\"])([^'\"]+)\2\s*,\s*[^,()]+?\s*,\s*"
    r"(?:\w+\s*\.\s*cast\(\s*)?self\s*\.\s*(\w+)\s*[,)]"
)
#: the attribute of the bank that holds the exposed layer of weight `name`
LAYER_PREFIX = "klr_expert_"
#: bank -> the ids of its variables in their order before any was exposed
_ORDER = weakref.WeakKeyDictionary()


@keras.saving.register_keras_serializable(package="keras_lowrank")
class ExpertLinear(keras.layers.Layer):
    """One stacked expert weight of a mixture-of-experts layer, as a linear
    layer: `einsum(equation, x, kernel)` with a kernel of shape
    `(experts, in, out)` (its expert axis is the equation's first kernel
    label). Adapters see one `in x out` matrix per expert.

    Made by exposing an expert bank (`expose`), which hands it the bank's
    own variable; built on its own (`build`) it makes a new one.

    Args:
        equation: the einsum the bank multiplies this weight with, e.g.
            `"th,ehm->etm"` (tokens, hidden -> experts, tokens, out).
        kernel_shape: `(experts, in, out)` in the equation's kernel order.
        weight_name: the name of the bank's variable.

    Examples:

        >>> import numpy as np
        >>> from keras_lowrank.experts import ExpertLinear
        >>> layer = ExpertLinear("th,ehm->etm", (4, 8, 6), "gate")
        >>> layer.build()
        >>> tuple(layer(np.ones((3, 8), "float32")).shape)
        (4, 3, 6)
    """

    def __init__(self, equation, kernel_shape, weight_name="kernel", activation=None,
                 quantization=None, **kwargs):
        super().__init__(**kwargs)
        if quantization not in (None, "int8", "int4"):
            raise ValueError(f"ExpertLinear: quantization must be None, 'int8' or 'int4'; received {quantization!r}.")
        #: `None` (a float kernel), `"int8"` or `"int4"`
        self.quantization = quantization
        self.kernel_scale = None
        self.activation = keras.activations.get(activation) if activation is not None else None
        self.equation = equation
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        self.weight_name = weight_name
        kernel_spec = equation.replace(" ", "").split("->")[0].split(",")[1]
        #: the expert axis: a batch axis of the matrix view
        self.batch_labels = kernel_spec[0]
        self.geometry = KernelGeometry(equation, self.kernel_shape, self.batch_labels)
        #: the kernel axis the experts contract (per-column scales run along it)
        self.reduced_axis = kernel_spec.index(self.geometry.reduced[0])
        self.bias = None
        self._kernel = None

    def _code_shapes(self):
        axis, shape = self.reduced_axis, list(self.kernel_shape)
        scale = shape[:axis] + [1] + shape[axis + 1:]
        if self.quantization == "int4":
            shape[axis] = (shape[axis] + 1) // 2
        return tuple(shape), tuple(scale)

    def build(self, input_shape=None):
        if self._kernel is None and self.quantization is None:
            self._kernel = self.add_weight(
                name=self.weight_name, shape=self.kernel_shape,
                initializer="glorot_uniform", trainable=True,
            )
        elif self._kernel is None:
            codes, scale = self._code_shapes()
            self._kernel = self.add_weight(
                name=self.weight_name, shape=codes, dtype="int8", initializer="zeros", trainable=False)
            self.kernel_scale = self.add_weight(
                name="kernel_scale", shape=scale, initializer="ones", trainable=False)
        self.built = True

    def quantized_copy(self, mode):
        """A copy of this float layer with its kernel quantized by Keras's
        own quantizers (`abs_max_quantize`, `pack_int4`): symmetric, one
        scale per expert and output column, as Keras's int8/int4 EinsumDense."""
        copy = ExpertLinear(
            self.equation, self.kernel_shape, self.weight_name, quantization=mode,
            name=self.name, dtype=self.dtype_policy,
        )
        copy.build()
        value_range = (-127, 127) if mode == "int8" else (-8, 7)
        kernel = ops.cast(self._kernel, "float32")
        codes, scale = keras.quantizers.abs_max_quantize(
            kernel, axis=self.reduced_axis, value_range=value_range, dtype="int8")
        if mode == "int4":
            codes = keras.quantizers.pack_int4(codes, axis=self.reduced_axis)
            if isinstance(codes, tuple):  # (packed, packed shape, original length)
                codes = codes[0]
        copy._kernel.assign(codes)
        copy.kernel_scale.assign(ops.reshape(ops.cast(scale, "float32"), copy.kernel_scale.shape))
        return copy

    def dequantized_kernel(self, dtype="float32"):
        """The kernel as floats (`codes / scale`, Keras's convention)."""
        codes = self._kernel.value if hasattr(self._kernel, "value") else self._kernel
        if self.quantization is None:
            return ops.cast(codes, dtype)
        if self.quantization == "int4":
            codes = keras.quantizers.unpack_int4(
                codes, self.kernel_shape[self.reduced_axis], axis=self.reduced_axis)
        kernel = ops.divide(ops.cast(codes, "float32"), ops.cast(self.kernel_scale, "float32"))
        return ops.cast(kernel, dtype)

    def storage_variables(self):
        """The variables holding a quantized kernel (codes and scales)."""
        return [self._kernel] if self.quantization is None else [self._kernel, self.kernel_scale]

    def adopt(self, variable):
        """Hold `variable` (a bank's weight) as this layer's kernel."""
        self._kernel = variable
        self.built = True

    @property
    def kernel(self):
        return self._kernel

    def call(self, inputs):
        if self.quantization is None:
            kernel = ops.cast(self._kernel, self.compute_dtype)
        else:
            kernel = self.dequantized_kernel(self.compute_dtype)
        y = ops.einsum(self.equation, inputs, kernel)
        return y if self.activation is None else self.activation(y)

    def compute_output_shape(self, input_shape):
        return self.geometry.output_shape(input_shape)

    def save_own_variables(self, store):
        for i, var in enumerate(self.storage_variables()):
            store[str(i)] = var

    def load_own_variables(self, store):
        for i, var in enumerate(self.storage_variables()):
            var.assign(store[str(i)])

    def get_config(self):
        config = super().get_config()
        config.update({
            "equation": self.equation,
            "kernel_shape": list(self.kernel_shape),
            "weight_name": self.weight_name,
            "quantization": self.quantization,
            "activation": None if self.activation is None else keras.activations.serialize(self.activation),
        })
        return config


class ExpertSlot:
    """What a bank's weight attribute holds once the weight is exposed: the
    bank's `einsum` with it runs the layer now in the slot."""

    def __init__(self, bank, name, layer_attribute, equation):
        self._bank = weakref.ref(bank)
        self.name = name
        self.layer_attribute = layer_attribute
        self.equation = equation

    def layer(self):
        return getattr(self._bank(), self.layer_attribute)

    @property
    def shape(self):
        return self.layer().geometry.kernel_shape

    def __repr__(self):
        return f"ExpertSlot({self.name!r})"


class RoutedOps(types.ModuleType):
    """`keras.ops` for a bank's module: `einsum` (and `cast`) of an
    `ExpertSlot` goes to the slot's layer; everything else is `keras.ops`."""

    def __init__(self, wrapped):
        super().__init__(getattr(wrapped, "__name__", "keras.ops"))
        self._wrapped = wrapped

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def einsum(self, subscripts, *operands, **kwargs):
        if len(operands) == 2 and isinstance(operands[1], ExpertSlot):
            slot = operands[1]
            if subscripts.replace(" ", "") != slot.equation:
                raise ValueError(
                    f"Expert weight {slot.name!r} was exposed for einsum {slot.equation!r} "
                    f"but is multiplied with {subscripts!r}."
                )
            return slot.layer()(operands[0])
        if any(isinstance(o, ExpertSlot) for o in operands):
            raise TypeError(
                f"einsum({subscripts!r}) takes an exposed expert weight only as its "
                "second of two operands."
            )
        return self._wrapped.einsum(subscripts, *operands, **kwargs)

    def cast(self, x, dtype):
        if isinstance(x, ExpertSlot):
            return x  # the slot's layer computes in its compute dtype
        return self._wrapped.cast(x, dtype)


@functools.lru_cache(maxsize=None)
def _class_einsums(cls):
    """`{weight name: (module alias, equation)}` of the einsums in
    `cls.call` (and the `call` of its bases) over `self.<weight>`."""
    found = {}
    for klass in reversed(cls.__mro__):
        call = klass.__dict__.get("call")
        if call is None or klass.__module__.startswith(("keras.", "builtins")):
            continue
        try:
            source = inspect.getsource(call)
        except (OSError, TypeError):
            continue
        for alias, _, equation, name in _EINSUM.findall(source):
            found.setdefault(name, set()).add((alias, equation.replace(" ", ""), klass.__module__))
    return found


def expert_weights(layer):
    """`{name: (equation, variable, module, alias)}`: the stacked expert
    weights of `layer` that can be exposed (empty for any other layer)."""
    if isinstance(layer, ExpertLinear) or not getattr(layer, "built", False):
        return {}
    if not any(isinstance(v, keras.Variable) and len(v.shape) == 3 for v in vars(layer).values()):
        return {}  # no stacked weight (most layers): no need to read the source
    out = {}
    for name, uses in _class_einsums(type(layer)).items():
        if len(uses) != 1:
            continue  # multiplied in more than one way: not one linear map
        value = layer.__dict__.get(name)
        if isinstance(value, ExpertSlot):
            continue
        if not isinstance(value, keras.Variable) or len(value.shape) != 3:
            continue
        alias, equation, module = next(iter(uses))
        if not _routable(module, alias):
            continue  # not keras.ops (NumPy, a backend's own einsum): left as it is
        try:
            kernel_spec = equation.split("->")[0].split(",")[1]
            KernelGeometry(equation, tuple(value.shape), kernel_spec[0])
        except (EquationError, IndexError, ValueError):
            continue
        out[name] = (equation, value, module, alias)
    return out


def _routable(module_name, alias):
    """Whether `alias` in module `module_name` is `keras.ops` (or already
    routed)."""
    current = getattr(sys.modules.get(module_name), alias, None)
    return isinstance(current, RoutedOps) or current is keras.ops


def _route(module_name, alias):
    module = sys.modules.get(module_name)
    current = getattr(module, alias, None)
    if not isinstance(current, RoutedOps):
        setattr(module, alias, RoutedOps(current))


class Exposed:
    """One exposed weight: undo it with `fold_back`."""

    def __init__(self, bank, name, layer):
        self.bank = bank
        self.name = name
        self.layer = layer

    @property
    def attribute(self):
        return LAYER_PREFIX + self.name.lstrip("_")


def expose(bank, name, equation, variable, module, alias):
    """Make `bank`'s weight `name` an `ExpertLinear` held by the bank."""
    _route(module, alias)
    layer = ExpertLinear(
        equation, tuple(variable.shape), weight_name=name.lstrip("_"),
        name=name.lstrip("_"), dtype=bank.dtype_policy,
    )
    exposed = Exposed(bank, name, layer)
    locked = bank._tracker.locked
    bank._tracker.unlock()
    try:
        bank._tracker.untrack(variable)
        layer.adopt(variable)
        object.__setattr__(bank, name, ExpertSlot(bank, name, exposed.attribute, equation))
        setattr(bank, exposed.attribute, layer)
    finally:
        if locked:
            bank._tracker.lock()
    _refresh(layer)
    _refresh(bank)
    return exposed


def _refresh(layer):
    if keras.backend.backend() == "torch":
        layer._track_variables()


def slots(bank):
    """`{name: ExpertSlot}` of a bank's exposed weights."""
    return {k: v for k, v in vars(bank).items() if isinstance(v, ExpertSlot)}


def fold_back(bank, name):
    """Give `bank` its weight `name` back as a plain variable, from the
    float `ExpertLinear` now in its slot (after a merge, or unadapted)."""
    slot = bank.__dict__[name]
    layer = slot.layer()
    if not isinstance(layer, ExpertLinear):
        raise TypeError(
            f"Expert weight {name!r} of {bank.name!r} holds a {type(layer).__name__}; "
            "only a plain float expert layer folds back into its bank."
        )
    variable = layer.kernel
    locked = bank._tracker.locked
    bank._tracker.unlock()
    try:
        layer._tracker.untrack(variable)
        attribute = slot.layer_attribute
        bank._tracker.untrack(layer)
        if attribute in bank.__dict__:
            object.__delattr__(bank, attribute)
        object.__setattr__(bank, name, variable)
        store_name = "trainable_variables" if variable.trainable else "non_trainable_variables"
        bank._tracker.add_to_store(store_name, variable)
        order = {v: i for i, v in enumerate(_ORDER.get(bank, ()))}
        bank._tracker.config[store_name][1].sort(key=lambda v: order.get(id(v), len(order)))
    finally:
        if locked:
            bank._tracker.lock()
    _refresh(bank)


def expose_model(model):
    """Expose every expert weight of `model` (`[Exposed, ...]`, in model
    order); a weight already exposed is left as it is."""
    done = []
    if not isinstance(model, keras.layers.Layer):
        return done
    for layer in _all_layers(model):
        found = expert_weights(layer)
        if found and layer not in _ORDER:
            # the bank's variable order, which `fold_back` restores (its
            # `.keras` file stores them by position)
            _ORDER[layer] = [id(v) for v in layer.variables]
        for name, (equation, variable, module, alias) in found.items():
            done.append(expose(layer, name, equation, variable, module, alias))
    return done


def _all_layers(model):
    seen, out, stack = set(), [], [model]
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
        stack.extend(reversed(list(layer._flatten_layers(include_self=False, recursive=False))))
    return out


def fold_back_model(model, only=None):
    """Fold back every exposed weight of `model` whose slot holds a plain
    float `ExpertLinear` (or those of `only`, `[Exposed, ...]`)."""
    for layer in _all_layers(model):
        for name, slot in slots(layer).items():
            if only is not None and not any(e.bank is layer and e.name == name for e in only):
                continue
            if type(slot.layer()) is ExpertLinear:
                fold_back(layer, name)
