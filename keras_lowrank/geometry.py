"""Kernel geometry: the matrix view of a `Dense` or `EinsumDense` kernel.

Every method in keras-lowrank works on the same matrix view of the frozen
kernel: rows are the contracted (input) axes, columns are the remaining
(output) axes, `W = transpose(kernel, reduced + other).reshape(n_in, n_out)`.
This is the view a PEFT `nn.Linear` has (transposed), so a rank-`r` adapter on
Gemma's `query` kernel `(heads, d_model, head_dim)` is rank `r` on the
`(d_model, heads * head_dim)` matrix, and SVDs, norms and parameter counts
mean what they mean for a `Dense` layer.

Kernel axes that appear in the input *and* in the output (per-axis, batched
kernels such as `"abc,bcd->abd"`... where `b` is shared) become a leading batch
dimension of the matrix view: `W` then has shape `(n_shared, n_in, n_out)` and
every method acts independently on each slice.

A stacked expert weight (`"th,ehm->etm"`: every expert `e` multiplies the
same tokens) names its expert axis in `batch_labels`: that axis is a batch
dimension of the matrix view too, `(n_experts, n_in, n_out)`, though the
inputs do not have it; their rows then have a batch dimension of 1, which
broadcasts against the per-expert factors, so no input is copied per expert.
"""

import math
import string

from keras import ops


class EquationError(ValueError):
    pass


def _split_equation(equation):
    eq = equation.replace(" ", "")
    if eq.count("->") != 1 or eq.count(",") != 1:
        raise EquationError(
            f"Expected an equation of the form 'input,kernel->output'; "
            f"received equation={equation!r}."
        )
    lhs, out = eq.split("->")
    inp, ker = lhs.split(",")
    return inp, ker, out


def _labels(spec):
    return [c for c in spec.replace("...", "")]


class KernelGeometry:
    """Matrix view of an einsum kernel.

    Args:
        equation: the layer's einsum equation (`Dense` uses `"...a,ab->...b"`).
        kernel_shape: the shape of the (unpacked, float) kernel.
        batch_labels: kernel labels that are batch axes of the matrix view
            even where the input lacks them (the expert axis of a stacked
            expert weight); each must appear in the output.

    Examples:

        >>> g = KernelGeometry("btd,ndh->btnh", (4, 16, 8))
        >>> (g.n_in, g.n_out, g.batch_shape)
        (16, 32, ())
        >>> KernelGeometry("th,ehm->etm", (4, 16, 8), batch_labels="e").matrix_shape
        (4, 16, 8)
    """

    def __init__(self, equation, kernel_shape, batch_labels=""):
        self.equation = equation
        self.batch_labels = "".join(batch_labels or "")
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        inp, ker, out = _split_equation(equation)
        if "..." in ker:
            raise EquationError(
                f"The kernel spec may not contain an ellipsis: {equation!r}."
            )
        if ("..." in inp) != ("..." in out):
            raise EquationError(
                f"An ellipsis must appear in both the input and the output "
                f"spec: {equation!r}."
            )
        self._inp, self._ker, self._out = inp, ker, out
        k_labels = list(ker)
        if len(set(k_labels)) != len(k_labels):
            raise EquationError(f"Repeated kernel label in {equation!r}.")
        if len(k_labels) != len(self.kernel_shape):
            raise EquationError(
                f"Kernel spec {ker!r} of {equation!r} does not match the "
                f"kernel shape {self.kernel_shape}."
            )
        in_set, out_set = set(_labels(inp)), set(_labels(out))
        for c in self.batch_labels:
            if c not in k_labels or c not in out_set:
                raise EquationError(
                    f"Batch label {c!r} must be a kernel and an output label of {equation!r}."
                )
        batch = set(self.batch_labels)
        self.shared = [c for c in k_labels if (c in in_set or c in batch) and c in out_set]
        #: batch labels the inputs lack (their rows broadcast over them)
        self.broadcast = [c for c in self.shared if c not in in_set]
        if self.broadcast and len(self.broadcast) != len(self.shared):
            raise EquationError(
                f"{equation!r}: batch labels the input lacks ({self.broadcast}) cannot "
                f"mix with shared kernel axes the input has."
            )
        self.reduced = [c for c in k_labels if c in in_set and c not in out_set]
        self.produced = [c for c in k_labels if c in out_set and c not in in_set and c not in batch]
        lost = [c for c in k_labels if c not in in_set and c not in out_set]
        if lost:
            raise EquationError(
                f"Kernel axes {lost} of {equation!r} appear in neither the "
                "input nor the output; such a kernel has no matrix view."
            )
        lead = [c for c in _labels(inp) if c not in k_labels]
        dropped = [c for c in lead if c not in out_set]
        if dropped:
            raise EquationError(
                f"Input axes {dropped} of {equation!r} are summed without the "
                "kernel; such a layer is not a linear map with a matrix view."
            )
        extra = [c for c in _labels(out) if c not in in_set and c not in k_labels]
        if extra:
            raise EquationError(f"Unknown output labels {extra} in {equation!r}.")
        if not self.reduced or not self.produced:
            raise EquationError(
                f"{equation!r} has no contracted or no produced kernel axis; "
                "it is not a dense projection."
            )
        dim = dict(zip(k_labels, self.kernel_shape))
        self._dim = dim
        self.n_in = math.prod(dim[c] for c in self.reduced)
        self.n_out = math.prod(dim[c] for c in self.produced)
        self.n_shared = math.prod(dim[c] for c in self.shared)
        self.batch_shape = (self.n_shared,) if self.shared else ()
        self.matrix_shape = self.batch_shape + (self.n_in, self.n_out)
        self.perm = [k_labels.index(c) for c in self.shared + self.reduced + self.produced]
        self.inv_perm = [self.perm.index(i) for i in range(len(self.perm))]
        self._plans = {}

    def axis_size(self, label):
        """The size of the kernel axis named `label` in the equation."""
        return self._dim[label]

    @property
    def rank_limit(self):
        """The largest rank a matrix of this shape can have."""
        return min(self.n_in, self.n_out)

    # ------------------------------------------------------------------
    # Kernel <-> matrix
    def kernel_to_matrix(self, kernel):
        w = ops.transpose(kernel, self.perm)
        return ops.reshape(w, self.matrix_shape)

    def matrix_to_kernel(self, matrix):
        shape = [self.kernel_shape[i] for i in self.perm]
        w = ops.reshape(matrix, shape)
        return ops.transpose(w, self.inv_perm)

    # ------------------------------------------------------------------
    # Activations <-> rows
    def _plan(self, ndim):
        plan = self._plans.get(ndim)
        if plan is not None:
            return plan
        used = set(self.equation)
        pool = [c for c in string.ascii_letters if c not in used]
        inp, out = self._inp, self._out
        if "..." in inp:
            n_ell = ndim - len(inp.replace("...", ""))
            if n_ell < 0:
                raise EquationError(
                    f"Input of rank {ndim} does not fit {self.equation!r}."
                )
            ell = "".join(pool[:n_ell])
            inp = inp.replace("...", ell)
            out = out.replace("...", ell)
        if len(inp) != ndim:
            raise EquationError(
                f"Input of rank {ndim} does not fit {self.equation!r}."
            )
        kset = set(self._ker)
        lead = [c for c in inp if c not in kset]
        x_order = [c for c in self.shared if c in inp] + lead + self.reduced
        x_perm = [inp.index(c) for c in x_order]
        rows_order = self.shared + lead + self.produced
        y_perm = [rows_order.index(c) for c in out]  # rows-shaped -> output
        out_to_rows = [out.index(c) for c in rows_order]
        ident = lambda p: p == list(range(len(p)))  # noqa: E731
        plan = {
            "x_perm": None if ident(x_perm) else x_perm,
            "y_perm": None if ident(y_perm) else y_perm,
            "out_to_rows": None if ident(out_to_rows) else out_to_rows,
            "lead_axes": [inp.index(c) for c in lead],
            "shared_dims": [self._dim[c] for c in self.shared],
            "produced_dims": [self._dim[c] for c in self.produced],
        }
        self._plans[ndim] = plan
        return plan

    def inputs_to_rows(self, x):
        """`x` -> `batch_shape + (N, n_in)` rows for the matrix view."""
        plan = self._plan(len(x.shape))
        if plan["x_perm"] is not None:
            x = ops.transpose(x, plan["x_perm"])
        if not self.broadcast:
            return ops.reshape(x, self.batch_shape + (-1, self.n_in))
        # one copy of the rows per expert (a view where the backend has
        # them): every method's batched forward sees `batch_shape` rows
        x = ops.reshape(x, (1, -1, self.n_in))
        return ops.broadcast_to(x, (self.n_shared, ops.shape(x)[1], self.n_in))

    def outputs_to_rows(self, y):
        """Layer output -> `batch_shape + (N, n_out)` rows."""
        plan = self._plan_for_output(len(y.shape))
        if plan["out_to_rows"] is not None:
            y = ops.transpose(y, plan["out_to_rows"])
        return ops.reshape(y, self.batch_shape + (-1, self.n_out))

    def rows_to_outputs(self, rows, x):
        """`batch_shape + (N, n_out)` rows -> the layer's output layout."""
        plan = self._plan(len(x.shape))
        shape_x = ops.shape(x)
        lead = [shape_x[i] for i in plan["lead_axes"]]
        shape = list(plan["shared_dims"]) + lead + list(plan["produced_dims"])
        y = ops.reshape(rows, shape)
        if plan["y_perm"] is not None:
            y = ops.transpose(y, plan["y_perm"])
        return y

    def _plan_for_output(self, out_ndim):
        # The output rank determines the input rank: same lead axes.
        n_lead = out_ndim - len(self.shared) - len(self.produced)
        in_ndim = n_lead + len(self.shared) - len(self.broadcast) + len(self.reduced)
        return self._plan(in_ndim)

    def output_shape(self, input_shape):
        """Static output shape of `einsum(equation, x, kernel)`."""
        input_shape = tuple(input_shape)
        plan_inp, out = self._inp, self._out
        dims = {}
        if "..." in plan_inp:
            n_ell = len(input_shape) - len(plan_inp.replace("...", ""))
            pos = plan_inp.index("...")
            ell_dims = input_shape[pos : pos + n_ell]
            labels = plan_inp.replace("...", "")
            rest = input_shape[:pos] + input_shape[pos + n_ell :]
        else:
            ell_dims, labels, rest = (), plan_inp, input_shape
        dims.update(zip(labels, rest))
        dims.update(self._dim)
        result = []
        parts = out.split("...")
        for i, part in enumerate(parts):
            if i:
                result.extend(ell_dims)
            result.extend(dims[c] for c in part)
        return tuple(result)

    def column_vector_to_rows(self, v):
        """A per-output-column vector `batch_shape + (n_out,)` broadcastable
        against rows."""
        return ops.expand_dims(v, -2)

    def matrix_text(self):
        """`"n_in x n_out"` (with `"n_shared x"` in front for a batch)."""
        prefix = f"{self.n_shared}x" if self.batch_shape else ""
        return f"{prefix}{self.n_in}x{self.n_out}"

    def __repr__(self):
        extra = f", batch_labels={self.batch_labels!r}" if self.batch_labels else ""
        return (
            f"KernelGeometry({self.equation!r}, kernel={self.kernel_shape}{extra}, "
            f"matrix={self.matrix_shape})"
        )


class ConvGeometry:
    """Matrix view of a convolution kernel (`Conv1D/2D/3D`, channels last):
    the kernel `kernel_size + (in, out)` is the `(in·prod(kernel_size)) x
    out` matrix, its rows in torch's order (input channel, then the spatial
    offsets): exactly the view PEFT's conv layers have of
    `weight.reshape(out, -1)`, transposed, so ranks, norms, SVDs and
    Kronecker factors mean the same. A row of the inputs is one receptive field
    (im2col), so every method's forward applies unchanged; a product of the
    rows with a thin matrix (`rows_times`: LoRA's `x A`) is a convolution
    with that matrix as its kernel, which never forms the fields.

    Args:
        kernel_shape: `kernel_size + (in_channels, filters)`.
        strides, padding, dilation_rate: the layer's own.

    Examples:

        >>> g = ConvGeometry((3, 3, 4, 8), strides=(1, 1), padding="same", dilation_rate=(1, 1))
        >>> (g.n_in, g.n_out, g.matrix_text())
        (36, 8, '36x8')
    """

    batch_shape = ()
    broadcast = ()

    def __init__(self, kernel_shape, strides, padding, dilation_rate):
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        self.kernel_size = self.kernel_shape[:-2]
        self.rank = len(self.kernel_size)
        self.channels = self.kernel_shape[-2]
        self.strides = tuple(strides)
        self.padding = padding
        self.dilation_rate = tuple(dilation_rate)
        self.n_in = math.prod(self.kernel_shape[:-1])
        self.n_out = self.kernel_shape[-1]
        self.n_shared = 1
        self.matrix_shape = (self.n_in, self.n_out)
        self.equation = f"conv{self.rank}d"
        self.batch_labels = ""
        #: kernel `(k..., in, out)` -> `(in, k..., out)` (torch's row order)
        self.perm = [self.rank] + list(range(self.rank)) + [self.rank + 1]
        self.inv_perm = [self.perm.index(i) for i in range(len(self.perm))]

    @property
    def rank_limit(self):
        return min(self.n_in, self.n_out)

    def kernel_to_matrix(self, kernel):
        return ops.reshape(ops.transpose(kernel, self.perm), self.matrix_shape)

    def matrix_to_kernel(self, matrix):
        return self._to_kernel(matrix, self.n_out)

    def _to_kernel(self, matrix, cols):
        shape = (self.channels,) + self.kernel_size + (cols,)
        return ops.transpose(ops.reshape(matrix, shape), self.inv_perm)

    def _conv(self, x, kernel):
        padding = self.padding
        if padding == "causal":  # Conv1D's own rule: pad the past, then "valid"
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            x = ops.pad(x, [[0, 0], [left, 0], [0, 0]])
            padding = "valid"
        return ops.conv(x, kernel, strides=list(self.strides), padding=padding,
                        dilation_rate=self.dilation_rate, data_format="channels_last")

    def rows_times(self, x, matrix):
        """`inputs_to_rows(x) @ matrix` (`matrix: (n_in, k)`), as one
        convolution with `matrix` for its kernel."""
        m = ops.cast(matrix, x.dtype)
        cols = m.shape[-1]
        y = self._conv(x, self._to_kernel(m, cols))
        return ops.reshape(y, (-1, cols))

    def inputs_to_rows(self, x):
        """Every receptive field of `x` as a row of `n_in` values (im2col:
        a convolution with the identity as its kernel)."""
        eye = ops.eye(self.n_in, dtype=x.dtype)
        return self.rows_times(x, eye)

    def outputs_to_rows(self, y):
        return ops.reshape(y, (-1, self.n_out))

    def _output_spatial(self, x):
        shape = ops.shape(x)
        out = []
        for i in range(self.rank):
            n, k = shape[1 + i], self.kernel_size[i]
            s, d = self.strides[i], self.dilation_rate[i]
            if self.padding in ("same", "causal"):
                out.append((n + s - 1) // s if self.padding == "same" else (n - 1) // s + 1)
            else:
                out.append((n - d * (k - 1) - 1) // s + 1)
        return out

    def rows_to_outputs(self, rows, x):
        shape = [ops.shape(x)[0]] + self._output_spatial(x) + [self.n_out]
        return ops.reshape(rows, shape)

    def column_vector_to_rows(self, v):
        return ops.expand_dims(v, -2)

    def output_shape(self, input_shape):
        from keras_lowrank import _compat

        return _compat.compute_conv_output_shape(
            input_shape, self.n_out, self.kernel_size, strides=self.strides,
            padding="valid" if self.padding == "causal" else self.padding,
            dilation_rate=self.dilation_rate,
        )

    def matrix_text(self):
        return f"{self.n_in}x{self.n_out}"

    def __repr__(self):
        return (f"ConvGeometry(kernel={self.kernel_shape}, strides={self.strides}, "
                f"padding={self.padding!r}, matrix={self.matrix_shape})")


class EmbeddingGeometry:
    """Matrix view of an embedding table `(vocabulary, dim)`: the table
    itself, `n_in = vocabulary` rows (a token id is a one-hot row) and
    `n_out = dim` columns, the view PEFT's embedding LoRA has
    (`lora_embedding_A (r, vocabulary)`, `lora_embedding_B (dim, r)`). A
    product of the rows with a matrix (`rows_times`: LoRA's `x A`) is a
    gather of that matrix's rows, which never forms the one-hot rows;
    `inputs_to_rows` forms them for the methods that need whole rows.

    Examples:

        >>> g = EmbeddingGeometry((100, 8))
        >>> (g.n_in, g.n_out, g.matrix_text())
        (100, 8, '100x8')
    """

    batch_shape = ()
    broadcast = ()
    #: integer inputs: no dropout on them
    discrete = True

    def __init__(self, kernel_shape):
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        self.n_in, self.n_out = self.kernel_shape
        self.n_shared = 1
        self.matrix_shape = self.kernel_shape
        self.equation = "embedding"
        self.batch_labels = ""
        self.perm = self.inv_perm = [0, 1]

    @property
    def rank_limit(self):
        return min(self.n_in, self.n_out)

    def kernel_to_matrix(self, kernel):
        return kernel

    def matrix_to_kernel(self, matrix):
        return matrix

    def rows_times(self, ids, matrix):
        """`inputs_to_rows(ids) @ matrix`: the rows of `matrix` at `ids`."""
        return ops.take(matrix, ops.reshape(ops.cast(ids, "int32"), (-1,)), axis=0)

    def inputs_to_rows(self, ids):
        return ops.one_hot(ops.reshape(ops.cast(ids, "int32"), (-1,)), self.n_in)

    def outputs_to_rows(self, y):
        return ops.reshape(y, (-1, self.n_out))

    def rows_to_outputs(self, rows, ids):
        return ops.reshape(rows, tuple(ops.shape(ids)) + (self.n_out,))

    def column_vector_to_rows(self, v):
        return ops.expand_dims(v, -2)

    def output_shape(self, input_shape):
        return tuple(input_shape) + (self.n_out,)

    def matrix_text(self):
        return f"{self.n_in}x{self.n_out}"

    def __repr__(self):
        return f"EmbeddingGeometry(table={self.kernel_shape})"
