"""`Adapter`: the base class every adapter layer derives from.

An adapter is a Keras `Wrapper` around a frozen `Dense` or `EinsumDense`.
The wrapped layer computes the frozen pre-activation output (its activation
and activity regularizer move onto the adapter), the adapter adds its own
contribution in the matrix view of the kernel (see `keras_lowrank.geometry`),
then applies the activation. Subclasses declare their options (`OPTIONS`),
their variables (`variable_specs`), their forward (`adapter_output`) and their
merge rule (`delta_matrix` or `merged_matrix`).

The class is four pieces: the math a method supplies (`AdapterMath`, in
`keras_lowrank.adapter_math`: the merge rule in the matrix view and the
forward helpers), that rule applied to the wrapped layer's storage
(`InPlaceMerge`, `keras_lowrank.adapter_merge`: merge and unmerge in place,
snapshots, folding into a plain layer), how it is written to files
(`AdapterCodec`, `keras_lowrank.adapter_codec`), and the Keras layer shell
here (options, capabilities, variables, attaching to the wrapped layer,
the forward). What an adapter refers to without owning it (its named set,
its model-level state) is one `AdapterLinks`, written only by the
adapter's own methods.

A method's hooks take one of two forms, by when they run. Those a plan
calls before anything is allocated take the kernel's `geometry` as an
argument (`variable_specs`, `bounded_rank`, `check_geometry`,
`standalone_state`); those that run on a built layer read `self.geometry`
(`adapter_output`, `delta_matrix`, `merged_matrix`). Callers outside the
method ask for the merge rule in one form only, matrix to matrix
(`merged_matrix(W)`, `unmerged_matrix(W)`, `original_matrix(W)`); a method
whose update is additive states `delta_matrix()` and inherits the three.

Building an adapter creates its own variables only. `attach` is the one step
that changes the wrapped layer (moves the activation, freezes the kernel,
runs a data-dependent init); `detach` gives the layer back as it was, which
is how a refused or failed call leaves the model unchanged.
"""

import dataclasses
import math
import warnings

import keras
from keras import ops

from keras_lowrank import bases
from keras_lowrank import options as opt
from keras_lowrank import tree
from keras_lowrank.adapter_codec import AdapterCodec
from keras_lowrank.adapter_math import AdapterMath
from keras_lowrank.adapter_merge import InPlaceMerge

#: the most elements one adapter variable may hold (the int32 index limit of
#: several backends); a larger request is refused before anything is allocated
MAX_VARIABLE_ELEMENTS = 2**31 - 1

_UNSET = object()


@dataclasses.dataclass(frozen=True)
class VariableSpec:
    """One adapter variable: name, shape, initializer, trainable."""

    name: str
    shape: tuple
    initializer: object = "zeros"
    trainable: bool = True
    #: `None`: the adapter's variable dtype (float32); "int32" for indices
    dtype: str = None


def adapter_policy_name(layer):
    """The dtype policy of an adapter around `layer`: the layer's compute
    dtype, with float32 variables when the layer keeps half-precision ones
    (Keras's Adam/AdamW cannot move a bfloat16 variable by a small step, so
    bfloat16 adapter variables silently do not train; PEFT keeps its adapters
    in float32 for the same reason)."""
    compute = layer.compute_dtype
    variable = layer.variable_dtype
    if variable in ("float16", "bfloat16"):
        variable = "float32"
    if compute == variable:
        return variable
    return f"mixed_{compute}"


class CalibrationBox:
    """Holds an init's data for an adapter without Keras tracking it."""

    def __init__(self, value):
        self.value = value


@keras.saving.register_keras_serializable(package="keras_lowrank")
class Adapter(AdapterMath, InPlaceMerge, AdapterCodec, keras.layers.Wrapper):
    """Base class of adapter layers (not used directly).

    Args:
        layer: the `Dense` or `EinsumDense` layer to adapt. Its kernel is
            frozen; its activation and activity regularizer move onto the
            adapter.
        activation: activation applied after the adapter (default: the
            wrapped layer's own activation).
        merged: whether the adapter's update is folded into the kernel.
        enabled: whether the adapter contributes to the output.
        **options: the method's options (`OPTIONS`), e.g. `rank`, `alpha`,
            `dropout`, `train_bias`, `seed`; other keyword arguments go to
            `keras.layers.Wrapper`.
    """

    method = None
    #: the options every adapter takes; subclasses add theirs
    OPTIONS = (
        opt.Option("train_bias", False, opt.boolean, "keep the wrapped layer's bias trainable"),
        opt.Option("seed", None, opt.seed, "seed of random initializers and dropout"),
    )
    # ------------------------------------------------------------------
    # Capabilities: what the method is, declared here once as class
    # attributes (subclasses inherit and refine them); the registry's
    # `Method` reads them under the same names (`registry.CAPABILITIES`).
    #: whether the adapter is a no-op on its base at initialization:
    #: "exact", "roundoff" (float32 round-off: the SVD inits), or "no"
    noop_at_init = "exact"
    #: whether the update folds into the kernel (`merge`) and back out
    mergeable = True
    unmergeable = True
    #: the frozen-base storages the method composes with
    base_kinds = ("float", "nf4", "int8", "int4")
    #: its model-level state (a `keras_lowrank.shared.SharedState`
    #: subclass, held once by the model), or `None`
    model_state = None
    #: its training-time parts (`keras_lowrank.training`): where each runs
    #: inside the compiled train step
    training_parts = ()
    #: the forms `save_adapter` can convert it to (`"lora"`: a plain LoRA)
    export_forms = ()
    #: the learning rate the method wants, relative to LoRA's (the
    #: singular-value methods train a few numbers on the scale of σ and
    #: want a much larger one)
    lr_scale = 1.0
    #: SVD inits decompose the full-precision kernel and quantize the
    #: residual (QPiSSA); others initialize from the quantized base, so that
    #: they start as a no-op on it.
    init_on_full_precision = False
    #: whether `attach(init=True)` rewrites the frozen kernel
    rewrites_kernel = False
    #: whether the rank must be <= min(n_in, n_out) (`bounded_rank`): the
    #: inits that decompose the kernel
    rank_bounded = False
    #: whether the init decomposes the kernel (`keras_lowrank.svd`; the
    #: plan shows a progress bar over many such layers)
    uses_svd = False
    #: variables whose rank components are ordered and stay a working
    #: adapter when cut to a rank (DyLoRA's factors); such a method also has
    #: `layer_rank(ℓ)` and `nested_rank_limit()` (the federated exchange)
    nested_factors = ()
    #: whether `kernel` is exactly the map the adapter computes, in training
    #: too (False for methods whose training step does more than multiply
    #: by one kernel: a sampled rank, a regularizer, a corrected gradient, a
    #: state update); `enable_adapter` leaves out a layer whose parent reads
    #: its kernel when this is False (`serves_kernel_with`)
    serves_kernel = True
    #: what the init reads from sample data (`enable_adapter(..., data=)`,
    #: `keras_lowrank.calibration`): `None` (nothing), `"inputs"` (each
    #: layer's input rows: EVA, CorDA) or `"gradients"` (the loss's gradient
    #: with respect to each kernel: LoRA-GA); such a method also has the
    #: class method `calibrate(model, targets, data, options, verbose)`
    calibration = None
    #: how a batch with a different adapter per example computes this
    #: adapter (`keras_lowrank.per_example`): `"factors"` (its update is the
    #: plain LoRA of `per_example_factors()`, gathered by example), `"factors_gain"`
    #: (that and a per-column gain on the base output), `"own"` (its output
    #: for the whole batch, weighted per example) or `None` (refused: its
    #: output for one example depends on the others)
    per_example = "own"
    #: marks adapter layers for `keras_lowrank.tree` (no import cycle)
    _klr_is_adapter = True

    def klr_layer_kind(self):
        """The class of the layer this adapter stands for (stable keys)."""
        return tree.layer_kind(self.layer)

    @classmethod
    def option_names(cls):
        return [o.name for o in cls.OPTIONS]

    def __init__(self, layer, activation=None, merged=False, enabled=True, **kwargs):
        names = set(self.option_names())
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        regularizer = kwargs.pop("activity_regularizer", _UNSET)
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", adapter_policy_name(layer))
        super().__init__(layer, **kwargs)
        for key, value in opt.validate(self.OPTIONS, given, self.name, self.method).items():
            setattr(self, key, value)
        self.validate_options()
        if activation is None:
            activation = getattr(layer, "activation", None)
        self.activation = keras.activations.get(activation)
        self.activity_regularizer = (
            layer.activity_regularizer
            if regularizer is _UNSET
            else keras.regularizers.get(regularizer)
        )
        self.merged = opt.boolean.fn(merged) if merged is not None else False
        self.adapter_enabled = bool(enabled)
        self.supports_masking = True
        self._init_from_base = True
        #: set by keras_lowrank's plan, which attaches adapters itself
        self._managed = False
        #: a layer built by hand (not by a plan, not from a file) makes its
        #: own model-level state, if its method has one
        self._standalone = True
        self._attached = False
        self._adapter_vars = {}
        self._links = AdapterLinks()
        self._detach_state = None
        if getattr(self, "dropout", 0.0) > 0:
            self.seed_generator = keras.random.SeedGenerator(self.seed)

    def validate_options(self):
        """Cross-option checks of a method (after each option's own check)."""

    # ------------------------------------------------------------------
    # Who puts the adapter in place (these methods are the only writers)
    def managed_by_plan(self):
        """A plan attaches this adapter, initializes it and binds its
        model-level state (the layer does none of it itself)."""
        self._managed = True

    def filled_from_file(self):
        """The adapter's variables, and its model-level state, come from a
        file: it neither initializes from the base nor makes its own state."""
        self._init_from_base = False
        self._standalone = False

    def join_set(self, holder):
        """This adapter is one of the named adapters of `holder` (an
        `AdapterSet`, referred to without tracking it), and these of its
        variables train while it is active."""
        self._links.holder = holder
        if self.built:
            self.record_trainable()

    def leave_set(self):
        """This adapter no longer belongs to an `AdapterSet`."""
        self._links.holder = None

    def holder(self):
        """The `AdapterSet` holding this adapter, or `None`."""
        return self._links.holder

    def record_trainable(self):
        """Remember which variables train, for a set that freezes and
        unfreezes its inactive adapters."""
        self._links.trainable_names = tuple(
            n for n, v in self._adapter_vars.items() if v.trainable
        )

    def trainable_names(self):
        """The variables that train while this adapter is active (as
        recorded by `record_trainable`)."""
        return self._links.trainable_names

    def set_probe(self, probe):
        """Call `probe(adapter, inputs)` on each eager forward through the
        adapter (a measurement such as LoRA-drop's importance), or stop
        (`None`)."""
        self._links.probe = probe

    # ------------------------------------------------------------------
    # Model-level state (`keras_lowrank.shared`)
    def bind_shared(self, state):
        """Use the model-level `state` of this adapter's method. The adapter
        refers to it without tracking it: the model holds it, once."""
        self._links.state = state

    def shared_state(self):
        """The model-level state bound by `bind_shared` (or `None`).

        A method, not a property: Keras's `.keras` saving walks an object's
        properties and would store the state again under every layer."""
        return self._links.state

    def linked_variables(self):
        """Variables of the model-level state this layer reads and trains
        (LoRA-drop's tied pair); its own are in `trainable_variables`."""
        return []

    def standalone_state(self, geometry):
        """The state a layer used on its own (outside `enable_adapter`)
        makes for itself, for methods with model-level state."""
        return None

    def options(self):
        """The method options of this adapter, as declared in `OPTIONS`."""
        return {name: getattr(self, name) for name in self.option_names()}

    @classmethod
    def linear_combination(cls, weighted, where):
        """`combine(..., method="linear")` of adapters of this method on one
        layer, when the method has a linear combination of its own:
        `(options, {variable name: float64 array})` of the combined adapter,
        given `weighted`, `[(weight, adapter), ...]`. `None` (the default):
        the method has none, and combines through its plain-LoRA form."""
        return None

    # ------------------------------------------------------------------
    # Variables
    def variable_specs(self, geometry):
        """The adapter's variables for a kernel of this geometry."""
        raise NotImplementedError

    def bounded_rank(self, geometry):
        """The rank `rank_bounded` methods hold to `min(n_in, n_out)`."""
        return getattr(self, "rank", None)

    def check_geometry(self, geometry, where=None):
        """Refuse what this adapter cannot be on this kernel, before anything
        is allocated: an equation with no matrix view, a rank the method
        bounds, a variable too large to allocate."""
        where = where or self.name
        r = self.bounded_rank(geometry) if self.rank_bounded else None
        if r is not None and r > geometry.rank_limit:
            raise ValueError(
                f"rank={r} is larger than layer {where!r} allows for method "
                f"{self.method!r}: its kernel is a {geometry.n_in}x{geometry.n_out} "
                f"matrix, so rank <= {geometry.rank_limit}."
            )
        for spec in self.variable_specs(geometry):
            n = math.prod(spec.shape)
            if n > MAX_VARIABLE_ELEMENTS:
                raise ValueError(
                    f"Layer {where!r}: the {self.method} adapter's variable "
                    f"{spec.name!r} would have shape {tuple(spec.shape)} "
                    f"({n:,} elements; the limit is {MAX_VARIABLE_ELEMENTS:,}) "
                    f"for a {geometry.matrix_text()} kernel matrix with "
                    f"{self._size_text()}; nothing was allocated."
                )

    def _size_text(self):
        return f"rank={self.rank}" if hasattr(self, "rank") else "these options"

    def rank_warnings(self, geometry):
        """Ranks that are allowed but cannot help (PEFT allows them too)."""
        if self.rank_bounded:
            return []  # refused by check_geometry instead
        rank = getattr(self, "rank", None)
        if rank is not None and rank > geometry.rank_limit:
            return [f"rank={rank} > min(n_in, n_out)={geometry.rank_limit} ({geometry.matrix_text()})"]
        return []

    # ------------------------------------------------------------------
    # Build and attach
    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        bases.check_supported(self.layer, self.name)
        self.geometry = bases.geometry_of(self.layer)
        if self.shared_state() is None and self._standalone and not self._managed:
            state = self.standalone_state(self.geometry)
            if state is not None:
                state.build()
                state.initialize()
                self.own_state = state  # tracked: saved with this layer
                self.bind_shared(state)
        self.check_geometry(self.geometry)
        self.build_adapter(self.geometry)
        self.built = True
        if not self._managed and not self._attached:
            for warning in self.rank_warnings(self.geometry):
                warnings.warn(f"Layer {self.name!r}: {warning}.", stacklevel=2)
            self.attach(init=self._init_from_base)

    def build_adapter(self, geometry):
        for spec in self.variable_specs(geometry):
            var = self.add_adapter_weight(
                spec.name, spec.shape, spec.initializer, spec.trainable, spec.dtype
            )
            setattr(self, spec.name, var)

    def adapter_variables(self):
        """`{name: variable}`: the adapter's own variables, as
        `variable_specs` declared them (not the wrapped layer's)."""
        return dict(self._adapter_vars)

    def add_adapter_weight(self, name, shape, initializer, trainable=True, dtype=None):
        var = self.add_weight(
            name=name,
            shape=tuple(shape),
            initializer=initializer,
            trainable=trainable,
            dtype=dtype or self.variable_dtype,
        )
        self._adapter_vars[name] = var
        return var

    def attach(self, init):
        """Take over the wrapped layer: move its activation and activity
        regularizer here, freeze its kernel (and bias, unless `train_bias`),
        and with `init` run the data-dependent initialization. `detach`
        undoes all of it."""
        layer = self.layer
        kernel = bases.kernel_variable(layer)
        bias = bases.bias_variable(layer)
        saved = {
            "layer": layer,
            "activation": getattr(layer, "activation", None),
            "activity_regularizer": layer.activity_regularizer,
            "kernel_trainable": None if kernel is None else kernel.trainable,
            "bias_trainable": None if bias is None else bias.trainable,
            "kernel": None,
        }
        if init and self.rewrites_kernel and kernel is not None:
            saved["kernel"] = ops.copy(kernel.value)
        self._detach_state = saved
        self._attached = True
        if getattr(layer, "activation", None) is not None:
            layer.activation = keras.activations.linear
        layer.activity_regularizer = None
        self.freeze_base()
        if init:
            self.initialize_from_base()

    def detach(self):
        """Give the wrapped layer back as it was before `attach`."""
        saved = self._detach_state
        if saved is None:
            return
        layer = saved["layer"]
        if saved["kernel"] is not None:
            bases.kernel_variable(layer).assign(saved["kernel"])
        if hasattr(layer, "activation"):
            layer.activation = saved["activation"]
        layer.activity_regularizer = saved["activity_regularizer"]
        kernel = bases.kernel_variable(layer)
        if kernel is not None and saved["kernel_trainable"] is not None:
            kernel.trainable = saved["kernel_trainable"]
        bias = bases.bias_variable(layer)
        if bias is not None and saved["bias_trainable"] is not None:
            bias.trainable = saved["bias_trainable"]
        self._detach_state = None
        self._attached = False

    def commit(self):
        """Forget what `detach` needs (the change is final)."""
        self._detach_state = None

    def initialize_from_base(self):
        """Data-dependent initialization (SVD inits); plain inits need none."""

    def receive_calibration(self, found):
        """Keep what the init read from the sample data for this layer
        (`calibration`; the method's `calibrate` made it) until
        `initialize_from_base` uses it."""
        self._calibrated = CalibrationBox(found)

    def calibrated(self):
        """What `receive_calibration` kept (`None` when nothing was)."""
        box = getattr(self, "_calibrated", None)
        return None if box is None else box.value

    def attach_base(self, convert, init):
        """Move the frozen kernel into another storage (e.g. NF4).

        `convert` maps the float layer to its replacement. With `init`, the
        data-dependent initialization runs before or after the conversion,
        as the method needs.
        """
        if init and self.init_on_full_precision:
            self.initialize_from_base()
        old = self.layer
        new = convert(old)
        tree.replace_child(self, old, new)
        self.geometry = bases.geometry_of(new)
        holder = self.holder()
        if holder is not None:  # named adapters share the base: all move
            holder.replace_base(old, new)
        self.freeze_base()
        if init and not self.init_on_full_precision:
            self.initialize_from_base()

    def freeze_base(self):
        holder = self.holder()
        if holder is not None:  # a named adapter: its set decides for all
            holder.apply_trainable()
            return
        bases.freeze_kernel(self.layer)
        bias = bases.bias_variable(self.layer)
        if bias is not None:
            bias.trainable = self.train_bias

    # ------------------------------------------------------------------
    # Forward
    def adapter_input(self, x, training):
        if getattr(self.geometry, "discrete", False):
            return x  # token ids: no dropout (PEFT's embedding LoRA has none either)
        if getattr(self, "dropout", 0.0) > 0 and training:
            return keras.random.dropout(x, self.dropout, seed=self.seed_generator)
        return x

    def call(self, inputs, training=None, reverse=False):
        if reverse:  # a tied embedding's output head reads the adapted table
            return bases.reverse_output(self.layer, inputs, self.kernel)
        own = getattr(self, "own_state", None)
        if own is not None:  # a layer on its own runs its state's step hook
            own.begin_call(bool(training))
        y = self.layer(inputs)
        if not self.merged:
            if self.adapter_enabled:
                probe = self._links.probe
                if probe is not None:  # an eager measurement (lora_drop's importance)
                    probe(self, inputs)
                y = self.adapter_output(inputs, y, training)
            else:
                y = self.base_output(inputs, y)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def adapter_output(self, x, y, training):
        raise NotImplementedError

    def base_output(self, x, y):
        """Output of the original base with the adapter disabled."""
        return y

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, training=None, reverse=False):
        if reverse:  # a tied embedding's output head (symbolic calls)
            return self.layer.compute_output_spec(inputs, reverse=True)
        return super().compute_output_spec(inputs, training=training)

    def per_example_factors(self):
        """`(A' (r, n_in), B (r, n_out), gain)` with the update this adapter
        adds to the original base, for an input row `x`, equal to
        `(x A'ᵀ) B` (+ `gain ⊙` the base output without its bias, for DoRA;
        `gain` is `None` otherwise), for the methods whose `per_example` is
        `"factors"` or `"factors_gain"`: the plain-LoRA form of `as_lora_state()`, its
        scale folded into `A'`."""
        state, info = self.as_lora_state()
        rank = info["rank"]
        scale = info["alpha"] / (math.sqrt(rank) if info.get("rslora") else rank)
        return state["lora_a"] * scale, state["lora_b"], None

    # ------------------------------------------------------------------
    # The weights a parent layer reads directly
    @classmethod
    def serves_kernel_with(cls, options):
        """`serves_kernel` for adapters made with these method `options`
        (as given to `enable_adapter`; defaults where absent)."""
        return cls.serves_kernel

    def computed_matrix(self):
        """The matrix view (float32) of the kernel this layer computes with:
        the frozen kernel when merged, the kernel with the update when
        enabled, the original base when disabled. Built from the variables
        (traceable, differentiable), unlike the merge helpers' checks."""
        k = self.base_matrix()
        if self.merged:
            return k
        if self.adapter_enabled:
            return self.merged_matrix(k)
        return self.original_matrix(k)

    @property
    def kernel(self):
        """The kernel this adapted layer computes with, in the wrapped
        layer's kernel layout and compute dtype (a quantized base is
        dequantized). For a parent that reads `layer.kernel` instead of
        calling the layer (Gemma 4's feed-forward multiplies by
        `gating_ffw.kernel` itself): the adapter trains through it. Dropout
        on the adapter input does not apply on this path, and the bias and
        activation are the parent's to apply, as for a plain layer."""
        matrix = self.computed_matrix()
        return ops.cast(self.geometry.matrix_to_kernel(matrix), self.layer.compute_dtype)

    @property
    def bias(self):
        """The wrapped layer's bias variable (`None` without one)."""
        return bases.bias_variable(self.layer)

    # ------------------------------------------------------------------
    # Counting
    def trainable_count(self):
        """Trainable parameters of the adapter itself (not a trained bias)."""
        return sum(math.prod(v.shape) for v in self._adapter_vars.values() if v.trainable)


def rewrites(member):
    """Whether `member`'s base output differs from the frozen layer's (it
    rewrote the kernel and gives its part back while inactive)."""
    return type(member).base_output is not Adapter.base_output


class AdapterLinks:
    """What an adapter refers to without owning it: the `AdapterSet` that
    holds it, the variables that train while it is
    active, the model-level state it reads, an eager probe. A plain object,
    so Keras neither tracks nor saves what it refers to (the model holds
    each of those once); only the adapter's own methods write it."""

    __slots__ = ("holder", "trainable_names", "state", "probe")

    def __init__(self):
        self.holder = self.state = self.probe = None
        self.trainable_names = ()
