"""`AdapterMath`: the math an adapter method supplies, apart from the Keras
layer it lives in (`keras_lowrank.adapter.Adapter`) and from how it is
written to files (`keras_lowrank.adapter_codec`).

A method states its update in the matrix view of the kernel (see
`keras_lowrank.geometry`): `delta_matrix()` (or `merged_matrix(W)` when the
update is not additive, and `original_matrix(W)` when the method rewrote
the kernel), read from its variables in float32 outside any autocast scope
(`read`). `lowrank_rows`/`add_lowrank` are the low-rank product the LoRA
family's forwards share.
"""

from keras import ops

from keras_lowrank import _compat
from keras_lowrank import bases


class AdapterMath:
    """The update rule of an adapter, in the matrix view (a mixin of
    `Adapter`, which supplies `geometry`, `layer` and the variables)."""

    def lowrank_rows(self, x, a_t, b, scale):
        """`scale * (x A) B` in rows of the matrix view, with `A` stored
        transposed, `a_t: (r, n_in)` (PEFT's `lora_A` layout: XLA and torch
        compute its gradient `dhᵀ x` much faster in that shape than `xᵀ dh`)."""
        g = self.geometry
        a = _compat.as_tensor(a_t)
        if hasattr(g, "rows_times"):  # a conv (`x A` is a conv with A), an embedding (a gather)
            h = g.rows_times(x, ops.swapaxes(ops.cast(a, self.compute_dtype), -1, -2))
            rows_dtype = h.dtype
        else:
            rows = g.inputs_to_rows(x)
            rows_dtype = rows.dtype
            h = ops.matmul(rows, ops.swapaxes(ops.cast(a, rows.dtype), -1, -2))
        # Scale the r-wide tensor, not the output; `scale` may be a Python
        # number (skipped when 1) or a tensor (a value that changes per step).
        if not (isinstance(scale, (int, float)) and scale == 1.0):
            h = h * ops.cast(scale, h.dtype)
        return ops.matmul(h, ops.cast(b, rows_dtype))

    def add_lowrank(self, x, y, a_t, b, scale):
        """`y + scale (x A) B`, in the layer's output layout.

        Computed as `y - (x A)(-scale) B`, which is the same bits: on
        TensorFlow with oneDNN (the default on recent Intel CPUs) the graph
        rewriter fuses `MatMul + bias + Add + Relu` into one node it then
        cannot run, and logs "No registered '' OpKernel" and "remapper
        failed" on every traced step (the result is right). A subtraction
        does not match that pattern."""
        return self.add_negated_rows(x, y, self.lowrank_rows(x, a_t, b, -scale))

    def add_negated_rows(self, x, y, minus_rows):
        """`y + Δ` in the layer's output layout, given `minus_rows = -Δ` in
        rows of the matrix view, computed as a subtraction (see
        `add_lowrank`). A forward folds the sign into its smallest tensor
        (a scale, an r-wide product) and passes the result here."""
        return y - ops.cast(self.geometry.rows_to_outputs(minus_rows, x), y.dtype)

    def add_rows(self, x, y, rows):
        """`y + rows` in the layer's output layout, `rows` in rows of the
        matrix view (as a subtraction: see `add_lowrank`)."""
        return self.add_negated_rows(x, y, -rows)

    def read(self, var):
        with _compat.no_autocast():
            return ops.cast(_compat.as_tensor(var.value), "float32")

    def base_matrix(self):
        return self.geometry.kernel_to_matrix(bases.read_kernel(self.layer))

    def bias_value(self):
        bias = bases.bias_variable(self.layer)
        return None if bias is None else self.read(bias)

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

