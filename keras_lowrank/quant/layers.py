"""`NF4Linear`: a frozen Dense/EinsumDense kernel stored in NF4.

It computes what the original layer computed (`einsum(equation, x, K) + b`,
no activation: adapters hold the activation), with `K` dequantized on the
fly into the layer's compute dtype (each value a float32 product rounded
once, as bitsandbytes dequantizes), so a bfloat16 model multiplies in
bfloat16. The codes and constants are
saved as they are, so a `.keras` round trip never re-quantizes.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_lowrank import _compat
from keras_lowrank.geometry import KernelGeometry
from keras_lowrank.quant import nf4

#: the equation `keras_lowrank` gives a `Dense` layer
DENSE_EQUATION = "...a,ab->...b"


@keras.saving.register_keras_serializable(package="keras_lowrank")
class NF4Linear(keras.layers.Layer):
    """A frozen linear layer whose kernel is stored as 4-bit NormalFloat.

    Build one from a built `Dense`/`EinsumDense` with `NF4Linear.from_layer`.
    The kernel's matrix view is quantized in bitsandbytes' layout (blocks of
    64 consecutive input features of one output unit), with double
    quantization of the block constants by default (4.127 bits per
    parameter; 4.5 without).

    Args:
        equation: the einsum equation (`Dense`: `"...a,ab->...b"`).
        kernel_shape: the float kernel's shape.
        bias_shape: the bias shape, or `None`.
        double_quant: quantize the absmax constants to 8 bits.
        source: the serialized original layer (used to merge back into it).
        source_input_shape: the input shape the original layer was built with.

    Examples:

        >>> import keras, numpy as np
        >>> from keras_lowrank.quant.layers import NF4Linear
        >>> dense = keras.layers.Dense(512)
        >>> dense.build((None, 256))
        >>> q = NF4Linear.from_layer(dense)
        >>> round(q.bits_per_parameter(), 3)
        4.127
    """

    def __init__(
        self,
        equation,
        kernel_shape,
        bias_shape=None,
        double_quant=True,
        source=None,
        source_input_shape=None,
        activation=None,
        batch_labels="",
        **kwargs,
    ):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.equation = equation
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        self.bias_shape = None if bias_shape is None else tuple(int(d) for d in bias_shape)
        self.double_quant = bool(double_quant)
        self.source = source
        self.source_input_shape = (
            None if source_input_shape is None else tuple(source_input_shape)
        )
        #: the expert axis of a stacked expert weight (`keras_lowrank.experts`)
        self.batch_labels = batch_labels or ""
        self.geometry = KernelGeometry(equation, self.kernel_shape, self.batch_labels)
        self.numel = math.prod(self.kernel_shape)
        self.bias = None
        # None under an adapter (the adapter holds the activation); set on a
        # re-quantized merged layer that stands alone.
        self.activation = keras.activations.get(activation) if activation is not None else None

    # ------------------------------------------------------------------
    @classmethod
    def from_layer(cls, layer, double_quant=True, kernel=None, activation=None, name=None):
        """Quantize a built float `Dense`/`EinsumDense` (or `kernel`, if
        given, in the layer's kernel layout)."""
        from keras_lowrank.experts import ExpertLinear

        linear = (keras.layers.Dense, keras.layers.EinsumDense, ExpertLinear)
        if not isinstance(layer, linear) or getattr(
            layer, "quantization_mode", None
        ):
            raise TypeError(
                f"NF4Linear.from_layer needs a float Dense or EinsumDense layer; "
                f"{layer.name!r} is a {type(layer).__name__}"
                f"{' quantized as ' + layer.quantization_mode if getattr(layer, 'quantization_mode', None) else ''}."
            )
        float_kernel = _compat.float_kernel(layer)
        shapes = _compat.build_shapes(layer) or {}
        if activation is None:  # the layer's own (none under an adapter, which holds it)
            activation = getattr(layer, "activation", None)
            if activation is keras.activations.linear:
                activation = None
        bias = getattr(layer, "bias", None)
        q = cls(
            getattr(layer, "equation", None) or DENSE_EQUATION,
            tuple(float_kernel.shape),
            batch_labels=getattr(layer, "batch_labels", ""),
            bias_shape=None if bias is None else tuple(bias.shape),
            double_quant=double_quant,
            source=keras.saving.serialize_keras_object(layer),
            source_input_shape=next(iter(shapes.values()), None),
            activation=activation,
            activity_regularizer=layer.activity_regularizer,
            name=name or layer.name,
            dtype=layer.dtype_policy,
        )
        if kernel is None:  # in its own dtype: quantized piece by piece
            with _compat.no_autocast():
                kernel = _compat.as_tensor(float_kernel.value)
        q.build_quantized(kernel)
        if bias is not None:
            q.bias.assign(bias)
        return q

    def build_quantized(self, kernel):
        """Build the layer holding the NF4 state of `kernel` (kernel layout,
        any float dtype), made with one copy of the codes at most."""
        if _compat.writes_in_place():
            # TensorFlow copies a host array into a variable: the codes go
            # into their variable piece by piece instead, never whole on
            # the host.
            self.build()
            state = self._quantize(kernel, write_codes=_compat.slice_writer(self._state["codes"]))
            for name, value in state.items():
                self._state[name].assign(value)
        else:
            # The state is made on the host and becomes the variables'
            # initial values (JAX and torch share its memory): no second
            # copy beside it.
            self.build(initial_state=self._quantize(kernel))

    def _state_shapes(self):
        n_blocks = -(-self.numel // nf4.BLOCK)
        shapes = {"codes": ((self.numel + 1) // 2, "uint8")}
        if self.double_quant:
            shapes["absmax_codes"] = (n_blocks, "uint8")
            shapes["absmax_scale"] = (-(-n_blocks // nf4.ABSMAX_BLOCK), "float32")
            shapes["absmax_offset"] = ((), "float32")
        else:
            shapes["absmax"] = (n_blocks, "float32")
        return shapes

    def build(self, input_shape=None, initial_state=None):
        self._state = {}
        initial = initial_state or {}
        for name, (shape, dtype) in self._state_shapes().items():
            value = initial.pop(name, None)
            self._state[name] = self.add_weight(
                name=name,
                shape=shape if isinstance(shape, tuple) else (shape,),
                dtype=dtype,
                # the host state itself where the backend can share it
                initializer="zeros"
                if value is None
                else (lambda shape, dtype, v=value: _compat.from_host(v)),
                trainable=False,
            )
            del value
        if self.bias_shape is not None:
            self.bias = self.add_weight(
                name="bias", shape=self.bias_shape, initializer="zeros", trainable=False
            )
        self.built = True

    # ------------------------------------------------------------------
    def _torch_layout_pieces(self, matrix):
        """The flattened torch-layout weight (`Wᵀ` of the matrix view,
        row-major) in pieces of `nf4.CHUNK` values (the last one shorter),
        each cut from the few output units it covers: never a whole copy,
        and one piece shape for every kernel (eager JAX compiles each op
        once per shape)."""
        g = self.geometry
        n_in, n_out = g.n_in, g.n_out
        xp = np if isinstance(matrix, np.ndarray) else ops
        if self.numel <= nf4.CHUNK:  # one piece: the fewest ops (eager JAX compiles each)
            yield xp.reshape(xp.swapaxes(matrix, -1, -2), (-1,))
            return
        if g.batch_shape:
            mats = xp.reshape(matrix, (-1, n_in, n_out))
            sub = lambda b, r0, r1: mats[b, :, r0:r1]  # noqa: E731
        else:  # no reshape: eager JAX would copy the whole kernel
            sub = lambda b, r0, r1: matrix[:, r0:r1]  # noqa: E731
        per_slice = n_in * n_out
        for start in range(0, self.numel, nf4.CHUNK):
            stop = min(start + nf4.CHUNK, self.numel)
            parts = []
            while start < stop:  # within one batch slice at a time
                b, f = divmod(start, per_slice)
                end = min(stop - b * per_slice, per_slice)
                r0, r1 = f // n_in, -(-end // n_in)
                rows = xp.reshape(xp.transpose(sub(b, r0, r1)), (-1,))
                lo, hi = f - r0 * n_in, end - r0 * n_in
                parts.append(rows if (lo, hi) == (0, rows.shape[0]) else rows[lo:hi])
                start = b * per_slice + end
            yield parts[0] if len(parts) == 1 else xp.concatenate(parts)

    def quantize_kernel(self, kernel):
        """Quantize a float kernel (kernel layout, any float dtype) into this
        layer's state."""
        for name, value in self._quantize(kernel).items():
            self._state[name].assign(value)

    def _quantize(self, kernel, write_codes=None):
        """The NF4 state (NumPy arrays) of a float kernel (without the codes
        when `write_codes` takes them, see `nf4.quantize_nf4_chunks`)."""
        host = _compat.host_view(kernel)
        if host is not None:  # pieces cut on the host: no backend op at all
            g = self.geometry
            matrix = np.ascontiguousarray(np.transpose(host, g.perm)).reshape(g.matrix_shape)
        else:
            matrix = self.geometry.kernel_to_matrix(kernel)
        return nf4.quantize_nf4_chunks(
            self._torch_layout_pieces(matrix), self.numel,
            double_quant=self.double_quant, where=repr(self.name), write_codes=write_codes,
        )

    def _dequantized_flat(self, dtype):
        """The stored values (flat, torch layout) in `dtype`."""
        # Read in the stored dtypes: under a mixed policy the float32
        # constants would otherwise be autocast to the compute dtype.
        with _compat.no_autocast():
            state = {k: _compat.as_tensor(v.value) for k, v in self._state.items()}
        return nf4.dequantize_nf4(state, self.numel, dtype=dtype)

    def dequantized_matrix(self, dtype="float32"):
        """The matrix view of the stored kernel, in `dtype` (bit-identical
        to bitsandbytes' dequantization into that dtype)."""
        flat = self._dequantized_flat(dtype)
        g = self.geometry
        wt = ops.reshape(flat, g.batch_shape + (g.n_out, g.n_in))
        return ops.swapaxes(wt, -1, -2)

    def dequantized_kernel(self, dtype="float32"):
        return self.geometry.matrix_to_kernel(self.dequantized_matrix(dtype))

    def _stored_layout(self):
        """`(equation, shape)` that multiply the inputs by the kernel as it is
        stored (torch layout: shared, produced, then contracted axes), so the
        forward needs no transpose of the dequantized kernel."""
        layout = getattr(self, "_layout", None)
        if layout is None:
            g = self.geometry
            spec = "".join(g.shared + g.produced + g.reduced)
            inp, rest = self.equation.replace(" ", "").split(",")
            out = rest.split("->")[1]
            layout = (f"{inp},{spec}->{out}", tuple(g.axis_size(c) for c in spec))
            self._layout = layout
        return layout

    def _is_matmul(self, ndim):
        """Whether this layer's einsum is a matmul of the inputs' rows: no
        shared kernel axis, and no transpose of the inputs or outputs."""
        g = self.geometry
        if g.shared:
            return False
        plan = g._plan(ndim)
        return plan["x_perm"] is None and plan["y_perm"] is None

    def call(self, inputs):
        # Dequantized straight into the compute dtype, in the stored layout.
        flat = self._dequantized_flat(self.compute_dtype)
        g = self.geometry
        if self.equation == DENSE_EQUATION:
            # matmul with the transposed (out, in) weight: torch and XLA take
            # it without a copy; and TensorFlow's float16 einsum with an
            # ellipsis is wrong on the CPU.
            y = ops.matmul(inputs, ops.transpose(ops.reshape(flat, (g.n_out, g.n_in))))
        elif self._is_matmul(len(inputs.shape)):
            # The same matmul on the rows (Gemma's q/k/v, output and MLP
            # kernels): torch's einsum would copy the stored weight into its
            # own layout every step, and its backward is slower (measured
            # 1.7-2x a matmul's in bfloat16 on the CPU).
            rows = g.inputs_to_rows(inputs)
            y = ops.matmul(rows, ops.transpose(ops.reshape(flat, (g.n_out, g.n_in))))
            y = g.rows_to_outputs(y, inputs)
        else:
            equation, shape = self._stored_layout()
            y = ops.einsum(equation, inputs, ops.reshape(flat, shape))
        if self.bias is not None:
            y = y + ops.cast(self.bias, y.dtype)
        if self.activation is not None:
            y = self.activation(y)
        return y

    def compute_output_shape(self, input_shape):
        return self.geometry.output_shape(input_shape)

    # ------------------------------------------------------------------
    def plain_layer_class(self):
        name = self.source["class_name"] if self.source else None
        if name == "ExpertLinear":
            from keras_lowrank.experts import ExpertLinear

            return ExpertLinear
        return keras.layers.EinsumDense if name == "EinsumDense" else keras.layers.Dense

    def klr_layer_kind(self):
        """The class of the float layer this one stands for (stable keys)."""
        return self.plain_layer_class()

    def storage_variables(self):
        """The variables holding the quantized kernel (codes and constants)."""
        return list(self._state.values())

    def bits_per_parameter(self):
        state = {k: v for k, v in self._state.items()}
        return nf4.storage_bits(state, self.numel)

    def save_own_variables(self, store):
        for name, var in self._state.items():
            store[name] = var
        if self.bias is not None:
            store["bias"] = self.bias

    def load_own_variables(self, store):
        expected = set(self._state) | ({"bias"} if self.bias is not None else set())
        if set(store.keys()) != expected:
            raise ValueError(
                f"NF4 layer {self.name!r} expected {sorted(expected)}, the file "
                f"holds {sorted(store.keys())}."
            )
        for name, var in self._state.items():
            var.assign(np.asarray(store[name]))
        if self.bias is not None:
            self.bias.assign(store["bias"])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "equation": self.equation,
                "batch_labels": self.batch_labels,
                "kernel_shape": list(self.kernel_shape),
                "bias_shape": None if self.bias_shape is None else list(self.bias_shape),
                "double_quant": self.double_quant,
                "source": self.source,
                "source_input_shape": None
                if self.source_input_shape is None
                else list(self.source_input_shape),
                "activation": None
                if self.activation is None
                else keras.activations.serialize(self.activation),
            }
        )
        return config
