"""`Adapter`: the base class every adapter layer derives from.

An adapter is a Keras `Wrapper` around a frozen `Dense` or `EinsumDense`.
The wrapped layer computes the frozen pre-activation output (its activation
is moved onto the adapter), the adapter adds its own contribution in the
matrix view of the kernel (see `keras_lowrank.geometry`), then applies the
activation. Subclasses declare their variables in `build_adapter`, their
forward in `adapter_output`, and their merge rule in `merged_matrix`.
"""

import math

import keras
from keras import ops

from keras_lowrank import _compat
from keras_lowrank import bases
from keras_lowrank.geometry import KernelGeometry


def check_rank(rank, where="layer"):
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(
            f"rank for {where!r} must be a positive int; received rank={rank!r}."
        )
    if rank <= 0:
        raise ValueError(
            f"rank for {where!r} must be a positive int; received rank={rank}."
        )


@keras.saving.register_keras_serializable(package="keras_lowrank")
class Adapter(keras.layers.Wrapper):
    """Base class of adapter layers (not used directly).

    Args:
        layer: the `Dense` or `EinsumDense` layer to adapt. Its kernel is
            frozen; its activation moves onto the adapter.
        rank: adapter rank.
        alpha: scaling numerator (`None`: the method's default, usually `rank`).
        dropout: dropout rate on the adapter's input.
        train_bias: keep the wrapped layer's bias trainable.
        activation: activation applied after the adapter (default: the wrapped
            layer's own activation).
        merged: whether the adapter's update is folded into the kernel.
        seed: seed of the adapter's dropout and random initializers.
    """

    method = None
    #: whether the adapter may hold a rank larger than min(n_in, n_out)
    rank_bounded = False

    def __init__(
        self,
        layer,
        rank=8,
        alpha=None,
        dropout=0.0,
        train_bias=False,
        activation=None,
        merged=False,
        seed=None,
        **kwargs,
    ):
        kwargs.setdefault("name", layer.name)
        # The float policy of the wrapped layer (never its quantized policy:
        # the adapter computes in float, the wrapped layer quantizes itself).
        kwargs.setdefault("dtype", bases.float_policy_name(layer))
        super().__init__(layer, **kwargs)
        check_rank(rank, self.name)
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(
                f"dropout for {self.name!r} must be in [0, 1); received "
                f"dropout={dropout!r}."
            )
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = float(dropout)
        self.train_bias = bool(train_bias)
        self.seed = seed
        if activation is None:
            activation = getattr(layer, "activation", None)
        self.activation = keras.activations.get(activation)
        # The wrapped layer computes the pre-activation output only.
        if getattr(layer, "activation", None) is not None:
            layer.activation = keras.activations.linear
        self.merged = bool(merged)
        self.adapter_enabled = True
        self.supports_masking = True
        self._init_from_base = True
        self._adapter_vars = {}
        if self.dropout > 0:
            self.seed_generator = keras.random.SeedGenerator(seed)

    # ------------------------------------------------------------------
    # Scaling
    @property
    def scaling(self):
        return self.alpha / self.rank

    # ------------------------------------------------------------------
    # Build
    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        bases.check_supported(self.layer, self.name)
        self.geometry = KernelGeometry.from_layer(self.layer)
        self.validate_geometry(self.geometry)
        self.build_adapter(self.geometry)
        self.freeze_base()
        if self._init_from_base:
            self.initialize_from_base()
        self.built = True

    def validate_geometry(self, geometry):
        if self.rank_bounded and self.rank > geometry.rank_limit:
            raise ValueError(
                f"rank={self.rank} is larger than layer {self.name!r} allows "
                f"for method {self.method!r}: its kernel is a "
                f"{geometry.n_in}x{geometry.n_out} matrix, so rank <= "
                f"{geometry.rank_limit}."
            )

    def build_adapter(self, geometry):
        raise NotImplementedError

    def initialize_from_base(self):
        """Data-dependent initialization (SVD inits); plain inits need none."""

    #: SVD inits decompose the full-precision kernel and quantize the
    #: residual (QPiSSA); others initialize from the quantized base, so that
    #: they start as a no-op on it.
    init_on_full_precision = False

    def attach_base(self, convert, init):
        """Move the frozen kernel into another storage (e.g. NF4).

        `convert` maps the float layer to its replacement. With `init`, the
        data-dependent initialization runs before or after the conversion,
        as the method needs.
        """
        if init and self.init_on_full_precision:
            self.initialize_from_base()
        new = convert(self.layer)
        old = self.layer
        from keras_lowrank import tree

        tree.replace_child(self, old, new)
        self.geometry = KernelGeometry.from_layer(new)
        self.freeze_base()
        if init and not self.init_on_full_precision:
            self.initialize_from_base()

    def add_adapter_weight(self, name, shape, initializer, trainable=True):
        var = self.add_weight(
            name=name,
            shape=tuple(shape),
            initializer=initializer,
            trainable=trainable,
            dtype=self.variable_dtype,
        )
        self._adapter_vars[name] = var
        return var

    def freeze_base(self):
        bases.freeze_kernel(self.layer)
        bias = bases.bias_variable(self.layer)
        if bias is not None:
            bias.trainable = self.train_bias

    # ------------------------------------------------------------------
    # Forward
    def adapter_input(self, x, training):
        if self.dropout > 0 and training:
            return keras.random.dropout(x, self.dropout, seed=self.seed_generator)
        return x

    def call(self, inputs, training=None):
        y = self.layer(inputs)
        if not self.merged:
            if self.adapter_enabled:
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

    def lowrank_rows(self, x, a_t, b, scale):
        """`scale * (x A) B` in rows of the matrix view, with `A` stored
        transposed, `a_t: (r, n_in)` (PEFT's `lora_A` layout: XLA and torch
        compute its gradient `dhᵀ x` much faster in that shape than `xᵀ dh`)."""
        rows = self.geometry.inputs_to_rows(x)
        a = ops.cast(_compat.as_tensor(a_t), rows.dtype)
        h = ops.matmul(rows, ops.swapaxes(a, -1, -2))
        if scale != 1.0:  # scale the r-wide tensor, not the output
            h = h * ops.cast(scale, h.dtype)
        return ops.matmul(h, ops.cast(b, rows.dtype))

    # ------------------------------------------------------------------
    # Values, in float32 and outside any autocast scope
    def read(self, var):
        with _compat.no_autocast():
            return ops.cast(_compat.as_tensor(var.value), "float32")

    def base_matrix(self):
        return self.geometry.kernel_to_matrix(bases.read_kernel(self.layer))

    def bias_value(self):
        bias = bases.bias_variable(self.layer)
        return None if bias is None else self.read(bias)

    # ------------------------------------------------------------------
    # Merge rules (float32, matrix view)
    def delta_matrix(self):
        """Additive update `W' - W` of the matrix view."""
        raise NotImplementedError

    def merged_matrix(self, matrix):
        return matrix + self.delta_matrix()

    def unmerged_matrix(self, matrix):
        return matrix - self.delta_matrix()

    def original_matrix(self, matrix):
        """The matrix of the base the adapter was put on (PiSSA: K_res + s A0 B0)."""
        return matrix

    def _refuse_quantized(self, what):
        if bases.base_kind(self.layer) != "float":
            raise ValueError(
                f"Cannot {what} layer {self.name!r} in place: its kernel is "
                f"stored as {bases.base_kind(self.layer)}, and folding the update "
                "into it would re-quantize (a silent loss). Use "
                "keras_lowrank.merge(model) for a float kernel, or "
                "merge(model, requantize=True) to re-quantize and see the error."
            )

    def merge_in_place(self):
        """Fold the update into the wrapped kernel (keeps the adapter)."""
        if self.merged:
            return
        self._refuse_quantized("merge")
        w = self.merged_matrix(self.base_matrix())
        check_finite(w, self.name, "merge")
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(w))
        self.merged = True

    def unmerge_in_place(self):
        if not self.merged:
            return
        w = self.unmerged_matrix(self.base_matrix())
        check_finite(w, self.name, "unmerge")
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(w))
        self.merged = False

    def to_plain_layer(self):
        """A plain (unbuilt) Dense/EinsumDense and the merged float kernel."""
        w = self.base_matrix()
        if not self.merged:
            w = self.merged_matrix(w)
        check_finite(w, self.name, "merge")
        kernel = self.geometry.matrix_to_kernel(w)
        plain = bases.plain_layer(self.layer, self.activation, self.name)
        return plain, kernel

    # ------------------------------------------------------------------
    # Adapter-only state
    def adapter_state(self):
        """Name -> variable of everything this adapter changed."""
        state = dict(self._adapter_vars)
        if self.train_bias and bases.bias_variable(self.layer) is not None:
            state["base_bias"] = bases.bias_variable(self.layer)
        return state

    def rebase(self, original):
        """Make the frozen kernel consistent with the adapter's (just loaded)
        variables, given the matrix of the original base. Most methods leave
        the base untouched; residual methods (PiSSA) subtract their initial
        update."""

    # ------------------------------------------------------------------
    # Counting
    def trainable_count(self):
        """Trainable parameters of the adapter itself (not a trained bias)."""
        return sum(math.prod(v.shape) for v in self._adapter_vars.values() if v.trainable)

    # ------------------------------------------------------------------
    # Serialization
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "rank": self.rank,
                "alpha": self.alpha,
                "dropout": self.dropout,
                "train_bias": self.train_bias,
                "activation": keras.activations.serialize(self.activation),
                "merged": self.merged,
                "seed": self.seed,
            }
        )
        return config

    def adapter_config(self):
        """The method options of this adapter (no layer, no Keras fields)."""
        config = self.get_config()
        for key in ("layer", "name", "trainable", "dtype", "activation", "merged"):
            config.pop(key, None)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )
        obj = cls(layer, **config)
        obj._init_from_base = False  # the variables come from the file
        return obj

    def save_own_variables(self, store):
        for name, var in self._adapter_vars.items():
            store[name] = var

    def load_own_variables(self, store):
        keys = set(store.keys())
        expected = set(self._adapter_vars)
        if keys != expected:
            raise ValueError(
                f"Adapter layer {self.name!r} ({self.method}) expected the "
                f"variables {sorted(expected)} but the file holds {sorted(keys)}."
            )
        for name, var in self._adapter_vars.items():
            value = store[name]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(
                    f"Adapter layer {self.name!r}: variable {name!r} has shape "
                    f"{tuple(var.shape)} but the file holds {tuple(value.shape)}."
                )
            var.assign(value)


def check_finite(matrix, name, what):
    ok = bool(ops.convert_to_numpy(ops.all(ops.isfinite(matrix))))
    if not ok:
        raise FloatingPointError(
            f"{what} of layer {name!r} produced NaN or inf values; the model "
            "was left unchanged."
        )
