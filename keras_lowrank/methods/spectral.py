"""Methods that train in the basis of the kernel's singular vectors.

With `W = U diag(σ) Vᵀ` the SVD of a kernel's matrix view (from
`keras_lowrank.svd`, float32, on the full-precision kernel before any
quantization of the base), these methods keep `U`, `V` frozen and train a
few numbers in that basis:

- `SVF` (arXiv 2501.06252, Transformer²): a vector `z` scaling the singular values,
  `W' = U diag(σ ⊙ z) Vᵀ`;
- `SVFT` (arXiv 2405.19597): a sparse matrix `M` between the singular vectors,
  `W' = W + sigmoid(g) U M Vᵀ`;
- `LoRAXS` (arXiv 2405.17604): an `r x r` matrix `R` between frozen factors,
  `W' = W + s (U_r diag(σ_r)) R V_rᵀ`;
- `SVDTraining`: the top `q` singular values themselves, with the
  rest of the kernel frozen as a residual.

What they share lives in `SpectralAdapter`, written once: the decomposition
at init, the frozen singular vectors as `derived` variables (a `.keras` file
holds them; an adapter file does not, and loading one recomputes them from
the base kernel, checking the saved singular values against the base's), and
the product `((x U) ⊙ c) Vᵀ` in the rows of the matrix view.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_lowrank import _compat
from keras_lowrank import bases
from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import svd
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods.lora import ALPHA
from keras_lowrank.methods.lora import DROPOUT
from keras_lowrank.methods.lora import RANK
from keras_lowrank.methods import reference

#: how far (relative to the largest) a file's singular values may be from
#: the base's before an adapter file is refused as made for another base
SPECTRUM_RTOL = 1e-3


def _rank_or_none(v):
    if v is None:
        return None
    return opt.positive_int(v)


RANK_OR_FULL = opt.Check("None (the full spectrum) or a positive int", _rank_or_none)
SVD_NITER = opt.Option(
    "svd_niter", None, opt.nonneg_int_or_none,
    "None: exact SVD; an int: randomized SVD with that many subspace iterations",
)


def _nonneg_float(v):
    v = opt.finite_float(v)
    if v < 0:
        raise ValueError
    return v


def _nonneg_int(v):
    if v is None:
        raise ValueError
    return opt.nonneg_int_or_none(v)


NONNEG_INT = opt.Check("an int >= 0", _nonneg_int)


def _fraction(v):
    if v is None:
        return None
    v = opt.finite_float(v)
    if not 0.0 < v <= 1.0:
        raise ValueError
    return v


def reference_svf(adapter, w):
    """SVF (paper form): `W + U diag(σ ⊙ (z − 1)) Vᵀ`."""
    u, s, v, z = (reference.value(adapter, n) for n in ("svf_u", "svf_s", "svf_v", "svf_z"))
    return w + (u * (s * (z - 1.0))[None, :]) @ v.T


def reference_svft(adapter, w):
    """SVFT: `W + sigmoid(g) U M_Ω Vᵀ`, repeated positions adding up."""
    u, v, m = (reference.value(adapter, n) for n in ("svft_u", "svft_v", "svft_m"))
    rows, cols = np.asarray(ops.convert_to_numpy(adapter.svft_index))
    dense = np.zeros((u.shape[1], u.shape[1]))
    np.add.at(dense, (rows, cols), m)
    gate = 1.0 / (1.0 + np.exp(-reference.value(adapter, "svft_gate")[0]))
    return w + gate * u @ dense @ v.T


def reference_lora_xs(adapter, w):
    """LoRA-XS: `W + s A_f R B_f`."""
    a, r, b = (reference.value(adapter, n) for n in ("xs_a", "xs_r", "xs_b"))
    return w + adapter.scaling * a @ r @ b


def reference_svd_training(adapter, w):
    """SVD-training: `K_res + U_q diag(σ) V_qᵀ` (`K_res` is the frozen kernel)."""
    u, s, v = (reference.value(adapter, n) for n in ("st_u", "st_s", "st_v"))
    return w + (u * s[None, :]) @ v.T


class SpectralAdapter(Adapter):
    """Base of the methods that keep a kernel's singular vectors frozen
    (not used directly): see the module docstring."""

    rank_bounded = True
    init_on_full_precision = True
    uses_svd = True
    lr_scale = 10.0
    #: which triplets: "top" (the default) or "bottom"
    part = "top"
    #: the variable holding the singular values the adapter was built on
    #: (kept in adapter files, to check a file against the base it loads on)
    spectrum_variable = None

    def basis_rank(self, geometry):
        """How many singular triplets the adapter keeps on this kernel."""
        rank = getattr(self, "rank", None)
        return geometry.rank_limit if rank is None else rank

    def svd_options(self):
        return {"niter": getattr(self, "svd_niter", None), "seed": self.seed}

    def bounded_rank(self, geometry):
        return self.basis_rank(geometry)

    def summary_rank(self):
        if not hasattr(self, "geometry"):
            return getattr(self, "rank", None)
        return self.basis_rank(self.geometry)

    def decompose(self, matrix):
        """`(U, s, V)` (NumPy float32) of `matrix`, the triplets this
        adapter keeps."""
        return svd.decompose(
            matrix, rank=self.basis_rank(self.geometry), part=self.part,
            where=self.name, **self.svd_options(),
        )

    def initialize_from_base(self):
        u, s, v = self.decompose(self.base_matrix())
        self.initialize_from_svd(u, s, v)

    def initialize_from_svd(self, u, s, v):
        raise NotImplementedError

    def assign_basis(self, u, s, v):
        """Put the frozen triplets into the adapter's `derived` variables."""
        raise NotImplementedError

    def derive(self, original, saved):
        u, s, v = self.decompose(original)
        name = self.spectrum_variable
        if name is not None and name in saved:
            have = np.asarray(saved[name], "float32")
            scale = max(float(np.abs(s).max()), 1e-30)
            err = float(np.abs(have - s).max()) / scale
            if err > SPECTRUM_RTOL:
                raise ValueError(
                    f"Layer {self.name!r}: the adapter file's singular values differ "
                    f"from the base kernel's by {err:.2g} (relative to the largest; "
                    f"the limit is {SPECTRUM_RTOL:g}): the file was made for another "
                    "base model. Nothing was loaded."
                )
        self.assign_basis(u, s, v)

    def value(self, var, dtype):
        return ops.cast(_compat.as_tensor(var), dtype)

    def through_basis(self, rows, u, coef, v):
        """`((rows U) ⊙ coef) Vᵀ`, `coef` a `batch + (r,)` vector."""
        h = ops.matmul(rows, self.value(u, rows.dtype))
        h = h * ops.expand_dims(ops.cast(coef, rows.dtype), -2)
        return ops.matmul(h, ops.swapaxes(self.value(v, rows.dtype), -1, -2))

    def basis_product(self, u, coef, v):
        """`U diag(coef) Vᵀ` in float32 (merge rules)."""
        return ops.matmul(self.read(u) * ops.expand_dims(coef, -2), ops.swapaxes(self.read(v), -1, -2))


# ----------------------------------------------------------------------
def _sigmoid(x):
    return ops.sigmoid(x)


# ----------------------------------------------------------------------
def _count_svf(g, o):
    return g.n_shared * (g.rank_limit if o["rank"] is None else o["rank"])


@registry.method(
    "SVF (Transformer²): a trained vector z scales the singular values, K' = U diag(σ⊙z) Vᵀ",
    trainable_count=_count_svf,
    reference=reference_svf,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class SVF(SpectralAdapter):
    """Singular value fine-tuning (Transformer², arXiv 2501.06252).

    Trains one vector `z` per kernel that scales its singular values:
    `W' = U diag(σ ⊙ z) Vᵀ`, computed as `W + U diag(σ ⊙ (z - 1)) Vᵀ` so
    that `z = 1` (the start) is exactly the base. `U, σ, V` is the full
    reduced SVD (`rank=None`, the paper) or its top `rank` triplets (the rest
    of the spectrum stays as it is).

    Two parametrizations:

    - `"paper"` (default): `z` is the multiplier itself, starting at 1;
    - `"reference"`: as the authors' code, a raw `p` starting at
      `0.1 + 0.01 N(0, 1)`, `z = sigmoid(p)`, and the norm-preserving rescale
      `W' = U diag(σ ⊙ z) Vᵀ · Σσ / Σ(σ ⊙ z)` (close to, not exactly, the
      base at the start).

    Experts trained with the paper form compose by addition:
    `keras_lowrank.svf.compose(model, [file_a, file_b], [0.7, 0.3])`.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: `None` (every singular value) or the number of top ones.
        parametrization: `"paper"` or `"reference"`.
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> dense = keras.layers.Dense(6)
        >>> dense.build((None, 4))
        >>> layer = keras_lowrank.layers.SVF(dense)
        >>> tuple(layer(np.ones((3, 4), "float32")).shape)
        (3, 6)
        >>> tuple(layer.svf_z.shape)  # min(4, 6) singular values
        (4,)
    """

    method = "svf"
    OPTIONS = (
        opt.Option("rank", None, RANK_OR_FULL, "None: every singular value; r: the top r"),
        opt.Option(
            "parametrization", "paper", opt.choice("paper", "reference"),
            "paper: z multiplies σ, starts at 1 (exact no-op); reference: z = sigmoid(p), norm-preserving",
        ),
    ) + Adapter.OPTIONS
    derived = ("svf_u", "svf_v")
    spectrum_variable = "svf_s"

    def variable_specs(self, geometry):
        b, r = geometry.batch_shape, self.basis_rank(geometry)
        return [
            VariableSpec("svf_u", b + (geometry.n_in, r), trainable=False),
            VariableSpec("svf_v", b + (geometry.n_out, r), trainable=False),
            VariableSpec("svf_s", b + (r,), trainable=False),
            VariableSpec("svf_z", b + (r,), "ones"),
        ]

    def assign_basis(self, u, s, v):
        self.svf_u.assign(u)
        self.svf_v.assign(v)

    def initialize_from_svd(self, u, s, v):
        self.assign_basis(u, s, v)
        self.svf_s.assign(s)
        if self.parametrization == "reference":
            rng = np.random.default_rng(self.seed)
            self.svf_z.assign((0.1 + 0.01 * rng.standard_normal(s.shape)).astype("float32"))
        else:
            self.svf_z.assign(np.ones(s.shape, "float32"))

    def coefficients(self, s, z):
        """`σ' - σ`: the change of each singular value (any float dtype)."""
        if self.parametrization == "paper":
            return s * (z - 1.0)
        m = _sigmoid(z)
        rho = ops.sum(s, axis=-1, keepdims=True) / ops.sum(s * m, axis=-1, keepdims=True)
        return s * m * rho - s

    @classmethod
    def linear_combination(cls, weighted, where):
        """Transformer²'s composition: `z = Σ w_i z_i`, for adapters of one
        set of options in the `"paper"` parametrization."""
        options = {k: v for k, v in weighted[0][1].options().items() if k != "seed"}
        if options.get("parametrization") != "paper" or any(
            {k: v for k, v in m.options().items() if k != "seed"} != options for _, m in weighted
        ):
            raise ValueError(
                f"combine: layer {where!r}: SVF adapters combine linearly with one set "
                "of options and parametrization='paper' (the multiplier z)."
            )
        z = sum(w * np.asarray(ops.convert_to_numpy(m.read(m.svf_z)), "float64") for w, m in weighted)
        return options, {"svf_z": z}

    def multiplier(self):
        """The effective `z` (float32): `z` itself, or `sigmoid(p)`."""
        z = self.read(self.svf_z)
        return z if self.parametrization == "paper" else _sigmoid(z)

    def adapter_output(self, x, y, training):
        rows = self.geometry.inputs_to_rows(x)
        s = self.value(self.svf_s, "float32")
        z = self.value(self.svf_z, "float32")
        coef = self.coefficients(s, z)
        return self.add_rows(x, y, self.through_basis(rows, self.svf_u, coef, self.svf_v))

    def delta_matrix(self):
        coef = self.coefficients(self.read(self.svf_s), self.read(self.svf_z))
        return self.basis_product(self.svf_u, coef, self.svf_v)


# ----------------------------------------------------------------------
SVFT_PATTERNS = ("plain", "banded", "random", "top_k")


def svft_count(pattern, k, off_diag):
    """`|Ω|` of an SVFT pattern on `k` singular vectors (arXiv 2405.19597):
    `k` for plain, `k(2d+1) - d(d+1)` otherwise, `d = min(off_diag, k - 1)`."""
    if pattern == "plain":
        return k
    d = min(off_diag, k - 1)
    return k * (2 * d + 1) - d * (d + 1)


def svft_pattern(pattern, k, off_diag, seed=None, u=None, v=None):
    """The `(i, j)` positions of `M`'s trainable entries, Keras layout (`i`
    on the input side `U`, `j` on the output side `V`): two int32 arrays of
    `svft_count(...)` entries, for one matrix.

    - plain: the diagonal; banded: diagonals `-d..d`;
    - random: as many pairs drawn uniformly with replacement (NumPy,
      `seed`; repeated pairs add up);
    - top_k: the reference's heuristic (arXiv 2405.19597), in PyTorch orientation
      `C = V Uᵀ` when the kernel is square, else `V` (if `n_out == k`) or
      `Uᵀ`, cut to `k x k`; the `|Ω|` largest entries of `C`, `(row, col)`
      → `(i, j) = (col, row)`.
    """
    n = svft_count(pattern, k, off_diag)
    if pattern == "plain":
        idx = np.arange(k)
        return idx.astype("int32"), idx.astype("int32")
    d = min(off_diag, k - 1)
    if pattern == "banded":
        ii, jj = [], []
        for o in range(-d, d + 1):
            i = np.arange(max(0, -o), min(k, k - o))
            ii.append(i)
            jj.append(i + o)
        return np.concatenate(ii).astype("int32"), np.concatenate(jj).astype("int32")
    if pattern == "random":
        rng = np.random.default_rng(0 if seed is None else seed)
        return rng.integers(0, k, n).astype("int32"), rng.integers(0, k, n).astype("int32")
    # top_k
    n_in, n_out = u.shape[0], v.shape[0]
    if n_in == n_out == k:
        c = v @ u.T
    elif n_out == k:
        c = v[:k, :k]
    else:
        c = u[:k, :k].T
    order = np.argsort(-c.ravel(), kind="stable")[:n]
    rows, cols = np.divmod(order, k)
    return cols.astype("int32"), rows.astype("int32")


def _count_svft(g, o):
    k = g.rank_limit if o["rank"] is None else o["rank"]
    return g.n_shared * (svft_count(o["pattern"], k, o["off_diag"]) + 1)


@registry.method(
    "SVFT: sparse trained M between the singular vectors, K' = K + sigmoid(g) U M Vᵀ",
    trainable_count=_count_svft,
    reference=reference_svft,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class SVFT(SpectralAdapter):
    """Singular-vector guided fine-tuning (arXiv 2405.19597).

    `W' = W + sigmoid(g) U M_Ω Vᵀ`: `U, V` the kernel's singular vectors
    (all of them with `rank=None`, or the top `rank`, the rest of the kernel
    kept as it is), `M_Ω` a sparse `k x k` matrix whose entries on the
    pattern `Ω` train, and `g` a trainable gate. The forward computes
    `((x U) M_Ω) Vᵀ` by gathering and summing the `|Ω|` entries: no dense
    `k x k` matrix per step.

    Patterns (`d = off_diag`, cut to `k - 1`): `"plain"` (the diagonal, `k`
    values), `"banded"` (diagonals `-d..d`, `k(2d+1) - d(d+1)` values),
    `"random"` (as many seeded random positions) and `"top_k"` (as many
    positions picked from the singular vectors, the reference's heuristic).
    Trainable: `|Ω| + 1` per kernel.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: `None` (every singular vector) or the number of top ones.
        pattern: `"plain"`, `"banded"`, `"random"` or `"top_k"`.
        off_diag: `d` of the banded, random and top-k patterns.
        init: `"zeros"` (`M = 0`: the layer starts exactly as the base) or
            `"reference"` (`M ~ N(0, 2/|Ω|)`, the authors' small nonzero start).
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> dense = keras.layers.Dense(6)
        >>> dense.build((None, 4))
        >>> layer = keras_lowrank.layers.SVFT(dense, pattern="banded", off_diag=1)
        >>> _ = layer(np.ones((3, 4), "float32"))
        >>> layer.trainable_count()  # 4·3 - 2 entries + the gate
        11
    """

    method = "svft"
    #: its merge rule scatters M on the host (not traceable)
    serves_kernel = False
    OPTIONS = (
        opt.Option("rank", None, RANK_OR_FULL, "None: every singular vector; r: the top r"),
        opt.Option("pattern", "plain", opt.choice(*SVFT_PATTERNS), "sparsity pattern of M"),
        opt.Option("off_diag", 2, NONNEG_INT, "d: half-width of the band (and the size of random/top_k)"),
        opt.Option("init", "zeros", opt.choice("zeros", "reference"), "zeros: exact no-op; reference: M ~ N(0, 2/|Ω|)"),
    ) + Adapter.OPTIONS
    derived = ("svft_u", "svft_v", "svft_index")
    spectrum_variable = "svft_s"

    def pattern_size(self, geometry):
        return svft_count(self.pattern, self.basis_rank(geometry), self.off_diag)

    def variable_specs(self, geometry):
        b, r = geometry.batch_shape, self.basis_rank(geometry)
        n = self.pattern_size(geometry)
        return [
            VariableSpec("svft_u", b + (geometry.n_in, r), trainable=False),
            VariableSpec("svft_v", b + (geometry.n_out, r), trainable=False),
            VariableSpec("svft_s", b + (r,), trainable=False),
            VariableSpec("svft_index", b + (2, n), trainable=False, dtype="int32"),
            VariableSpec("svft_m", b + (n,)),
            VariableSpec("svft_gate", b + (1,)),
        ]

    def assign_basis(self, u, s, v):
        self.svft_u.assign(u)
        self.svft_v.assign(v)
        k = s.shape[-1]
        flat_u = u.reshape((-1,) + u.shape[-2:])
        flat_v = v.reshape((-1,) + v.shape[-2:])
        index = []
        for i in range(flat_u.shape[0]):
            seed = None if self.seed is None else self.seed + i
            if self.pattern == "random" and self.seed is None:
                seed = i
            rows, cols = svft_pattern(self.pattern, k, self.off_diag, seed, flat_u[i], flat_v[i])
            index.append(np.stack([rows, cols]))
        self.svft_index.assign(np.stack(index).reshape(tuple(self.svft_index.shape)))

    def initialize_from_svd(self, u, s, v):
        self.assign_basis(u, s, v)
        self.svft_s.assign(s)
        n = self.svft_m.shape[-1]
        if self.init == "reference":
            rng = np.random.default_rng(self.seed)
            m = rng.normal(0.0, math.sqrt(2.0 / n), tuple(self.svft_m.shape))
        else:
            m = np.zeros(tuple(self.svft_m.shape))
        self.svft_m.assign(m.astype("float32"))
        self.svft_gate.assign(np.zeros(tuple(self.svft_gate.shape), "float32"))

    def _slices(self):
        return self.geometry.n_shared if self.geometry.batch_shape else 1

    def sparse_product(self, h, m, index):
        """`h M_Ω` for `h: batch + (N, r)`, without a dense `M`."""
        r = h.shape[-1]
        if self.pattern == "plain":
            return h * ops.expand_dims(m, -2)
        s = self._slices()
        h3 = ops.reshape(h, (s, -1, r))
        idx = ops.reshape(ops.convert_to_tensor(index), (s, 2, -1))
        n = idx.shape[-1]
        rows_idx, cols_idx = idx[:, 0, :], idx[:, 1, :]
        g = ops.take_along_axis(h3, ops.broadcast_to(ops.expand_dims(rows_idx, 1), (s, ops.shape(h3)[1], n)), axis=-1)
        g = g * ops.reshape(m, (s, 1, n))
        g = ops.reshape(ops.transpose(g, (0, 2, 1)), (s * n, -1))  # (S·n, N)
        offsets = ops.expand_dims(ops.arange(s, dtype="int32") * r, -1)
        segments = ops.reshape(cols_idx + offsets, (-1,))
        out = ops.segment_sum(g, segments, num_segments=s * r)  # (S·r, N)
        out = ops.transpose(ops.reshape(out, (s, r, -1)), (0, 2, 1))
        return ops.reshape(out, ops.shape(h))

    def adapter_output(self, x, y, training):
        rows = self.geometry.inputs_to_rows(x)
        h = ops.matmul(rows, self.value(self.svft_u, rows.dtype))
        h = self.sparse_product(h, self.value(self.svft_m, rows.dtype), self.svft_index.value)
        gate = ops.sigmoid(self.value(self.svft_gate, rows.dtype))
        out = ops.matmul(h, ops.swapaxes(self.value(self.svft_v, rows.dtype), -1, -2))
        out = out * ops.expand_dims(gate, -1)
        return self.add_rows(x, y, out)

    def dense_m(self):
        """`M_Ω` as a dense `batch + (r, r)` float32 matrix (merge only)."""
        s = self._slices()
        r = self.svft_u.shape[-1]
        idx = np.asarray(ops.convert_to_numpy(self.svft_index.value)).reshape(s, 2, -1)
        m = np.asarray(ops.convert_to_numpy(self.read(self.svft_m))).reshape(s, -1)
        dense = np.zeros((s, r, r), "float32")
        for i in range(s):
            np.add.at(dense[i], (idx[i, 0], idx[i, 1]), m[i])
        return ops.convert_to_tensor(dense.reshape(self.geometry.batch_shape + (r, r)))

    def delta_matrix(self):
        gate = ops.sigmoid(self.read(self.svft_gate))
        um = ops.matmul(self.read(self.svft_u), self.dense_m())
        return ops.matmul(um, ops.swapaxes(self.read(self.svft_v), -1, -2)) * ops.expand_dims(gate, -1)


# ----------------------------------------------------------------------
@registry.method(
    "LoRA-XS: a trained r x r matrix between frozen SVD factors, r² parameters",
    trainable_count=lambda g, o: g.n_shared * o["rank"] ** 2,
    reference=reference_lora_xs,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRAXS(SpectralAdapter):
    """LoRA-XS (arXiv 2405.17604): an `r x r` matrix between frozen SVD factors.

    `y = x K + b + s ((dropout(x) A_f) R) B_f` with `A_f = U_r diag(σ_r)`
    `(n_in, r)` and `B_f = V_rᵀ` `(r, n_out)` from the top-`r` SVD of the
    kernel (which stays as it is), `s = alpha / r`, and only `R` training:
    `r²` parameters per kernel. `R` starts at `N(0, init_std²)` (the
    reference's 1e-5: close to, not exactly, the base; `init_std=0` starts
    exactly at it).

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: `r`.
        alpha: scaling numerator (default `rank`, scale 1).
        dropout: dropout on the adapter's input.
        svd_niter: `None` for the exact SVD, an int for a randomized SVD
            (the reference uses a randomized truncated SVD).
        init_std: standard deviation of `R` at the start.
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> dense = keras.layers.Dense(6)
        >>> dense.build((None, 4))
        >>> layer = keras_lowrank.layers.LoRAXS(dense, rank=2)
        >>> _ = layer(np.ones((3, 4), "float32"))
        >>> layer.trainable_count()
        4
    """

    method = "lora_xs"
    noop_at_init = "no"  # starts from the top-r part of the kernel, not zero
    OPTIONS = (
        RANK,
        ALPHA,
        DROPOUT,
        SVD_NITER,
        opt.Option("init_std", 1e-5, opt.Check("a finite float >= 0", _nonneg_float), "std of R at the start (0: exact no-op)"),
    ) + Adapter.OPTIONS
    derived = ("xs_a", "xs_b")
    spectrum_variable = "xs_s"

    def validate_options(self):
        if self.alpha is None:
            self.alpha = float(self.rank)

    @property
    def scaling(self):
        return self.alpha / self.rank

    def variable_specs(self, geometry):
        b, r = geometry.batch_shape, self.rank
        return [
            VariableSpec("xs_a", b + (geometry.n_in, r), trainable=False),
            VariableSpec("xs_b", b + (r, geometry.n_out), trainable=False),
            VariableSpec("xs_s", b + (r,), trainable=False),
            VariableSpec("xs_r", b + (r, r)),
        ]

    def assign_basis(self, u, s, v):
        self.xs_a.assign(u * s[..., None, :])
        self.xs_b.assign(np.swapaxes(v, -1, -2))

    def initialize_from_svd(self, u, s, v):
        self.assign_basis(u, s, v)
        self.xs_s.assign(s)
        rng = np.random.default_rng(self.seed)
        shape = tuple(self.xs_r.shape)
        self.xs_r.assign((self.init_std * rng.standard_normal(shape)).astype("float32"))

    def adapter_output(self, x, y, training):
        rows = self.geometry.inputs_to_rows(self.adapter_input(x, training))
        h = ops.matmul(rows, self.value(self.xs_a, rows.dtype))
        h = ops.matmul(h, self.value(self.xs_r, rows.dtype) * ops.cast(-self.scaling, rows.dtype))
        return self.add_negated_rows(x, y, ops.matmul(h, self.value(self.xs_b, rows.dtype)))

    def delta_matrix(self):
        ar = ops.matmul(self.read(self.xs_a), self.read(self.xs_r))
        return self.scaling * ops.matmul(ar, self.read(self.xs_b))


# ----------------------------------------------------------------------
def _count_svd_training(g, o):
    if o.get("rank") is not None:
        return g.n_shared * o["rank"]
    fraction = 0.1 if o.get("rank_fraction") is None else o["rank_fraction"]
    return g.n_shared * int(g.rank_limit * fraction)


@registry.method(
    "SVD-training: only the top singular values train (rank or rank_fraction), residual frozen",
    trainable_count=_count_svd_training,
    reference=reference_svd_training,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class SVDTraining(SpectralAdapter):
    """SVD-training: train only the top singular values.

    With `U_q, σ_q, V_q` the top `q` triplets of the kernel, the frozen
    kernel becomes the residual `W - U_q diag(σ_q) V_qᵀ` and the layer
    computes `y = x K_res + ((x U_q) ⊙ σ) V_qᵀ + b` with `σ` (starting at
    `σ_q`) the only trainable variable: `q` values per kernel, where
    `q = rank`, or `int(min(n_in, n_out) · rank_fraction)` (the package's
    rule; `rank_fraction=0.1` when neither is given). Passing both is an
    error. Unlike the `svd-training` package, nothing else of the model
    trains unless asked (`trainable_layers`), and the bias is kept.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: `q`, the number of singular values that train.
        rank_fraction: `q / min(n_in, n_out)` instead of `rank`.
        svd_niter: `None` for the exact SVD, an int for a randomized SVD
            (the package uses 2).
        train_bias, seed, activation, merged, enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> dense = keras.layers.Dense(60)
        >>> dense.build((None, 40))
        >>> layer = keras_lowrank.layers.SVDTraining(dense, rank_fraction=0.1)
        >>> _ = layer(np.ones((3, 40), "float32"))
        >>> layer.trainable_count()  # int(40 · 0.1)
        4
    """

    method = "svd_training"
    noop_at_init = "roundoff"
    lr_scale = 100.0
    OPTIONS = (
        opt.Option("rank", None, RANK_OR_FULL, "q: the number of top singular values that train"),
        opt.Option(
            "rank_fraction", None, opt.Check("None or a float in (0, 1]", _fraction),
            "q = int(min(n_in, n_out) · rank_fraction) (0.1 if rank is not given either)",
        ),
        SVD_NITER,
    ) + Adapter.OPTIONS
    rewrites_kernel = True
    derived = ("st_u", "st_v")
    spectrum_variable = "st_s0"

    def validate_options(self):
        if self.rank is not None and self.rank_fraction is not None:
            raise ValueError(
                f"Layer {self.name!r}: pass rank (q singular values) or rank_fraction "
                f"(a share of them), not both; received rank={self.rank}, "
                f"rank_fraction={self.rank_fraction}."
            )
        if self.rank is None and self.rank_fraction is None:
            self.rank_fraction = 0.1

    def basis_rank(self, geometry):
        if self.rank is not None:
            return self.rank
        return int(geometry.rank_limit * self.rank_fraction)

    def check_geometry(self, geometry, where=None):
        q = self.basis_rank(geometry)
        if q < 1:
            raise ValueError(
                f"Layer {where or self.name!r}: rank_fraction={self.rank_fraction} of its "
                f"{geometry.n_in}x{geometry.n_out} kernel matrix keeps "
                f"int({geometry.rank_limit} · {self.rank_fraction}) = 0 singular values; "
                f"use rank_fraction >= {1 / geometry.rank_limit:.3g} or pass rank."
            )
        super().check_geometry(geometry, where)

    def variable_specs(self, geometry):
        b, q = geometry.batch_shape, self.basis_rank(geometry)
        return [
            VariableSpec("st_u", b + (geometry.n_in, q), trainable=False),
            VariableSpec("st_v", b + (geometry.n_out, q), trainable=False),
            VariableSpec("st_s0", b + (q,), trainable=False),
            VariableSpec("st_s", b + (q,)),
        ]

    def assign_basis(self, u, s, v):
        self.st_u.assign(u)
        self.st_v.assign(v)

    def initialize_from_svd(self, u, s, v):
        self.assign_basis(u, s, v)
        self.st_s0.assign(s)
        self.st_s.assign(np.array(s))
        top = ops.matmul(u * s[..., None, :], ops.swapaxes(ops.convert_to_tensor(v), -1, -2))
        residual = self.base_matrix() - top
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(residual))

    def adapter_output(self, x, y, training):
        rows = self.geometry.inputs_to_rows(x)
        coef = self.value(self.st_s, "float32")
        return self.add_rows(x, y, self.through_basis(rows, self.st_u, coef, self.st_v))

    def base_output(self, x, y):
        rows = self.geometry.inputs_to_rows(x)
        coef = self.value(self.st_s0, "float32")
        return self.add_rows(x, y, self.through_basis(rows, self.st_u, coef, self.st_v))

    def delta_matrix(self):
        return self.basis_product(self.st_u, self.read(self.st_s), self.st_v)

    def initial_delta(self):
        return self.basis_product(self.st_u, self.read(self.st_s0), self.st_v)

    def original_matrix(self, matrix):
        return matrix + self.initial_delta()

    def rebase(self, original):
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(original - self.initial_delta()))


