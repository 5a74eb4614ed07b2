"""LoftQ: LoRA initialized for a quantized base (arXiv 2310.08659).

A quantized base `Q` loses part of the kernel `W`. LoftQ starts LoRA where
`Q + s A B` is closest to `W`, alternating `loftq_iter` times (PEFT's
`LoftQConfig(loftq_iter=...)` with `init_lora_weights="loftq"`):

    Q_t = quantize(W - s A_{t-1} B_{t-1})     (A_0 B_0 = 0)
    A_t, B_t = the rank-r SVD of W - Q_t      (split as PiSSA's, over s)

and the frozen base stores exactly `Q_T`, the last round's codes.

How the base gets those codes: the quantizer of each round is the base's
own storage (`bases.converter`: NF4 with or without double quantization,
Keras int8/int4), run on the float kernel set to `W - s A_{t-1} B_{t-1}`;
the last round's quantized layer becomes the frozen base as it is, so it
holds `Q_T` by construction (no re-quantization of `W - s A_T B_T`, which
would give other codes). The factors of the quantized residual,
`A_res = A_{T-1}`, `B_res = B_{T-1}`, are kept (frozen, small), and so is
the quantizer of the rounds (`loftq_storage`, one number): an adapter file
loaded onto the original float kernel runs the rounds again with that
quantizer, refuses the file if its factors are not what they give there,
and sets the kernel to the very same `W - s A_res B_res` (computed in
float64, rounded once to float32, on every backend), which the base
storage the file names quantizes to the same codes.

On a float base there is nothing quantized: the factors are LoftQ's for
NF4 without double quantization (PEFT's quantizer, and what
`base="nf4", double_quant=False` stores), and the float base keeps
`W - s A B` exactly, so the layer starts as the original (`A_res = A`).

As in the SVD-init family (`keras_lowrank.methods.residual`), the initial
factors `A0, B0` are kept: disabling the adapter gives `Q + s A0 B0`, the
closest the base and the initial LoRA come to `W`.
"""

import keras
import numpy as np
from keras import ops

from keras_lowrank import bases
from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import svd
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods import reference
from keras_lowrank.methods.residual import ResidualLoRA
from keras_lowrank.methods.residual import _check_finite
from keras_lowrank.methods.residual import INIT_RTOL
from keras_lowrank.methods.residual import split_triplets
from keras_lowrank.quant import nf4

LOFTQ_ITER = opt.Option(
    "loftq_iter", 1, opt.positive_int,
    "rounds of quantizing the residual and fitting the quantization error by a "
    "rank-r SVD (PEFT's loftq_iter)",
)


#: the quantizer of the rounds, as the `loftq_storage` variable records it
#: (an adapter file names it, so loading can run the rounds again)
STORAGE_CODES = {("float", False): 0, ("nf4", False): 1, ("nf4", True): 2, ("int8", False): 3, ("int4", False): 4}
STORAGE_NAMES = {v: k for k, v in STORAGE_CODES.items()}


def storage_code(layer):
    """The `STORAGE_CODES` entry of a frozen base layer."""
    kind = bases.base_kind(layer)
    return STORAGE_CODES[(kind, kind == "nf4" and bool(layer.double_quant))]


def shifted_kernel(w, a, b, scaling):
    """`W - s A B` in float64, rounded once to float32 (NumPy): the value
    each round quantizes. `a (..., n_in, r)`, `b (..., r, n_out)`."""
    w = np.asarray(ops.convert_to_numpy(w), np.float64)
    a = np.asarray(ops.convert_to_numpy(a), np.float64)
    b = np.asarray(ops.convert_to_numpy(b), np.float64)
    return (w - scaling * np.matmul(a, b)).astype(np.float32)


def nf4_roundtrip(matrix, double_quant=False):
    """`dequantize(quantize(matrix))` in NF4, in our base's layout (the
    torch-layout weight `Wᵀ` flattened row-major, blocks of 64), for a
    matrix view `(..., n_in, n_out)` (NumPy float32 in, out)."""
    m = np.asarray(matrix, np.float32)
    wt = np.ascontiguousarray(np.swapaxes(m, -1, -2))
    state = nf4.quantize_nf4(wt.reshape(-1), double_quant=double_quant)
    flat = np.asarray(ops.convert_to_numpy(nf4.dequantize_nf4(state, wt.size)), np.float32)
    return np.swapaxes(flat.reshape(wt.shape), -1, -2)


def loftq_rounds(w, quantize, rank, scaling, iters, where=None):
    """LoftQ's alternation on the matrix view `w` (float32 NumPy).

    `quantize(m)` returns `(handle, q)`: whatever stands for the quantized
    `m` (a layer, or `None`) and its dequantized matrix view. Returns
    `(handle, q, a, b, a_res, b_res)` of the last round: `a (n_in, r)`,
    `b (r, n_out)` the LoRA factors, `a_res, b_res` those of the quantized
    residual (zeros after one round)."""
    w = np.asarray(w, np.float32)
    a_res = np.zeros(w.shape[:-1] + (rank,), np.float32)
    b_res = np.zeros(w.shape[:-2] + (rank, w.shape[-1]), np.float32)
    for t in range(iters):
        handle, q = quantize(shifted_kernel(w, a_res, b_res, scaling))
        q = np.asarray(ops.convert_to_numpy(q), np.float32)
        u, s, v = svd.decompose(w - q, rank=rank, where=where)
        a, b = split_triplets(u, s, v, scaling)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if t + 1 < iters:
            a_res, b_res = a, b
    return handle, q, a, b, a_res, b_res


@registry.method(
    "LoftQ: LoRA fit to the quantization error of the base (Q + sAB close to W)",
    reference=reference.lora,
    paper="https://arxiv.org/abs/2310.08659",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoftQ(ResidualLoRA):
    """LoRA initialized by LoftQ over the layer's quantized base.

    With `enable_adapter(..., method="loftq", base="nf4" | "int8" | "int4")`
    the full-precision kernel `W` is quantized `loftq_iter` times: each
    round quantizes `W - s A B` (the previous round's factors; `W` first)
    with the base's own quantizer and takes `A, B` from the top-`r` SVD of
    `W - Q` (`σ̃ = σ_r / s`, `A = U_r diag(√σ̃)`, `B = diag(√σ̃) V_rᵀ`). The
    frozen base stores the last round's `Q` exactly; the layer starts at
    `Q + s A B`. With `alpha = rank` (scale 1) and `base="nf4",
    double_quant=False` this is PEFT's `loftq_init` (4-bit). On a float
    base, `A, B` are those for NF4 without double quantization and the base
    keeps `W - s A B` (the layer starts as the original). A kernel already
    quantized (no full-precision `W`) is refused.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `dropout`,
    `train_bias`, `seed`, `activation`, `merged` and `enabled`), and:

    Args:
        loftq_iter: rounds of the alternation (PEFT's `loftq_iter`, default 1).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, name="hidden"),
        ...                           keras.layers.Dense(8, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, method="loftq", rank=2, base="nf4")
        >>> keras_lowrank.bases.base_kind(model.get_layer("hidden").layer)
        'nf4'
        >>> tuple(model(np.ones((3, 64), "float32")).shape)
        (3, 8)
    """

    method = "loftq"
    uses_svd = True
    export_forms = ()  # Q + s A0 B0 is not W: no plain LoRA for the original kernel
    OPTIONS = ResidualLoRA.OPTIONS + (LOFTQ_ITER,)

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        return super().variable_specs(geometry) + [
            VariableSpec("lora_a_res", batch + (r, n_in), trainable=False),
            VariableSpec("lora_b_res", batch + (r, n_out), trainable=False),
            VariableSpec("loftq_storage", (1,), trainable=False),
        ]

    # ------------------------------------------------------------------
    def _rounds(self, w, quantize):
        return loftq_rounds(
            ops.convert_to_numpy(w), quantize, self.rank, self.scaling, self.loftq_iter, where=self.name
        )

    def _set_factors(self, a, b, a_res, b_res, code):
        a_t = np.swapaxes(a, -1, -2)
        for value, what in ((a_t, "factor A"), (b, "factor B")):
            _check_finite(ops.convert_to_tensor(value), self.name, what)
        values = (
            (self.lora_a, a_t), (self.lora_b, b), (self.lora_a0, a_t), (self.lora_b0, b),
            (self.lora_a_res, np.swapaxes(a_res, -1, -2)), (self.lora_b_res, b_res),
        )
        for var, value in values:  # separate buffers (JAX donates them)
            var.assign(np.array(value, np.float32))
        self.loftq_storage.assign(np.array([code], np.float32))

    def initialize_from_base(self):
        """On a float base (no conversion follows): LoftQ's factors for NF4
        without double quantization, and the base `W - s A B`."""
        kind = bases.base_kind(self.layer)
        if kind != "float":
            raise ValueError(
                f"Layer {self.name!r}: its kernel is already stored as {kind}; LoftQ "
                "needs the full-precision kernel to fit the quantization error. "
                f"Adapt the float model with base={kind!r} instead (nothing was changed)."
            )
        w = self.base_matrix()
        _, _, a, b, _, _ = self._rounds(w, lambda m: (None, nf4_roundtrip(m)))
        residual = shifted_kernel(w, a, b, self.scaling)
        _check_finite(ops.convert_to_tensor(residual), self.name, "residual kernel")
        self._set_factors(a, b, a, b, STORAGE_CODES[("float", False)])
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(residual))

    def attach_base(self, convert, init):
        """Run the rounds with the base's own quantizer (`convert` on the
        float layer, its kernel set to each round's `W - s A B`), and make
        the last round's quantized layer the frozen base."""
        if not init:
            return super().attach_base(convert, init)
        layer = self.layer
        var = bases.kernel_variable(layer)
        if var is None:  # not a float layer: refused by name
            return self.initialize_from_base()
        saved = ops.copy(var.value)
        w = self.base_matrix()

        def quantize(m):
            var.assign(ops.cast(self.geometry.matrix_to_kernel(m), var.dtype))
            q_layer = convert(layer)
            q = bases.geometry_of(q_layer).kernel_to_matrix(bases.read_kernel(q_layer))
            return q_layer, q

        try:
            q_layer, _, a, b, a_res, b_res = self._rounds(w, quantize)
        finally:
            var.assign(saved)  # the float layer as it was (it is replaced below)
        self._set_factors(a, b, a_res, b_res, storage_code(q_layer))
        super().attach_base(lambda old: q_layer, init=False)

    # ------------------------------------------------------------------
    def _file_quantizer(self, code):
        """`quantize(m)` of the rounds for the storage an adapter file names,
        on this (float) layer, which it leaves as it is."""
        kind, double_quant = STORAGE_NAMES[code]
        if kind == "float":
            return lambda m: (None, nf4_roundtrip(m))
        layer = self.layer
        if kind == "nf4":
            from keras_lowrank.quant.layers import NF4Linear

            def quantize(m):
                q = NF4Linear.from_layer(layer, double_quant=double_quant, kernel=self.geometry.matrix_to_kernel(m))
                return None, q.dequantized_matrix()

            return quantize
        var = bases.kernel_variable(layer)

        def quantize(m):
            saved = ops.copy(var.value)
            try:
                var.assign(ops.cast(self.geometry.matrix_to_kernel(m), var.dtype))
                q_layer = bases.STORAGES[kind].convert(layer)
            finally:
                var.assign(saved)
            return None, bases.geometry_of(q_layer).kernel_to_matrix(bases.read_kernel(q_layer))

        return quantize

    def rebase(self, original):
        """An adapter file onto the original float kernel `W`: run the
        rounds again with the quantizer the file names, refuse the file if
        its factors are not what they give (a file made for another kernel,
        or altered), and set the kernel to `W - s A_res B_res`, which the
        saved base storage then quantizes to the same codes (a float base
        keeps it: `A_res = A0`)."""
        s = self.scaling
        code = float(ops.convert_to_numpy(self.read(self.loftq_storage))[0])
        if code not in STORAGE_NAMES or bases.base_kind(self.layer) != "float":
            raise ValueError(
                f"Layer {self.name!r}: the adapter file's loftq_storage ({code!r}) names no "
                f"base storage LoftQ quantizes with ({sorted(STORAGE_NAMES)}), or the layer "
                "is not float. Nothing was loaded."
            )
        w = ops.convert_to_numpy(ops.cast(original, "float32"))
        saved = {n: ops.convert_to_numpy(self.read(v)) for n, v in self.adapter_variables().items()}
        _, _, a, b, a_res, b_res = self._rounds(w, self._file_quantizer(int(code)))
        if STORAGE_NAMES[int(code)][0] == "float":  # the float base keeps W - s A B
            a_res, b_res = a, b
        norm = np.linalg.norm(w) + 1e-30
        err = 0.0
        for (x, y), (fx, fy) in (((a, b), ("lora_a0", "lora_b0")), ((a_res, b_res), ("lora_a_res", "lora_b_res"))):
            given = s * np.matmul(np.swapaxes(saved[fx], -1, -2).astype(np.float64), saved[fy])
            expected = s * np.matmul(x.astype(np.float64), y)
            scale = np.linalg.norm(expected) + 1e-6 * norm  # relative to the update itself
            err = max(err, float(np.linalg.norm(given - expected) / scale))
        if not err <= INIT_RTOL:  # NaN included
            raise ValueError(
                f"Layer {self.name!r}: the initial factors of the adapter file (lora_a0/lora_b0, "
                "lora_a_res/lora_b_res) are not LoftQ's init of this layer's kernel "
                f"(mismatch {err:.3g}, relative; the limit is {INIT_RTOL:g}): the file was "
                "made for another base model, or was altered. Nothing was loaded."
            )
        a_file = np.swapaxes(saved["lora_a_res"], -1, -2)
        residual = shifted_kernel(w, a_file, saved["lora_b_res"], s)
        _check_finite(ops.convert_to_tensor(residual), self.name, "residual kernel")
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(residual))
