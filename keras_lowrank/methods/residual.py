"""The SVD/QR-init family: LoRA initialized from the kernel, residual base.

These methods start LoRA's `A, B` from a decomposition of the kernel's
matrix view `W` and freeze the residual `W - s A0 B0`, so the layer computes
`W` at the start (to float32 round-off). What they share lives in
`ResidualLoRA`, written once:

- the initial factors `A0, B0` are kept (non-trainable), so that disabling
  the adapter gives the original base (`K_res + s A0 B0`), an adapter file
  can be loaded onto an original kernel (`rebase` recomputes the residual),
  and `save_adapter(..., as_lora=True)` writes the plain rank-2r LoRA
  `A' = [A | A0]`, `B' = [B ; -B0]` for the original kernel (arXiv 2404.02948);
- the decomposition runs in float32 on the full-precision kernel, before a
  quantized base stores the residual (QPiSSA);
- merging is exact: `K' = K_res + s A B`.

A method of the family only says how it decomposes `W` (`initial_factors`):

- `PiSSA` (arXiv 2404.02948): the top-`r` singular triplets;
- `MiLoRA` (arXiv 2406.09044): the `r` smallest singular triplets;
- `OLoRA` (arXiv 2406.01775): the QR decomposition of `Wᵀ` (PyTorch layout).

The singular triplets come from `keras_lowrank.svd` (one engine for every
SVD method, on the host, the same on every backend).
"""

import math

import keras
import numpy as np
from keras import ops

from keras_lowrank import bases
from keras_lowrank import linalg
from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import svd
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.linalg import NonFiniteError
from keras_lowrank.methods.lora import ALPHA
from keras_lowrank.methods.lora import DROPOUT
from keras_lowrank.methods.lora import RANK
from keras_lowrank.methods.lora import RSLORA
from keras_lowrank.methods.lora import LoRA
from keras_lowrank.methods import reference


def _check_finite(value, name, what):
    if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(value)))):
        raise NonFiniteError(
            f"Init of layer {name!r}: the {what} has NaN or inf values (is the "
            "kernel finite?); the model was left unchanged."
        )


@keras.saving.register_keras_serializable(package="keras_lowrank")
class ResidualLoRA(LoRA):
    """Base of the LoRA methods initialized from the kernel (not used
    directly): see the module docstring."""

    OPTIONS = (RANK, ALPHA, DROPOUT, RSLORA) + Adapter.OPTIONS
    rank_bounded = True
    init_on_full_precision = True  # quantize the residual (QPiSSA)
    rewrites_kernel = True
    noop_at_init = "roundoff"  # float32 round-off of the decomposition

    def initial_factors(self, w):
        """`(A (n_in, r), B (r, n_out))`, float32, from the matrix view `w`
        (batched over leading axes): the initial LoRA factors, such that the
        residual base is `w - s A B`."""
        raise NotImplementedError

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        return [
            VariableSpec("lora_a", batch + (r, n_in)),
            VariableSpec("lora_b", batch + (r, n_out)),
            VariableSpec("lora_a0", batch + (r, n_in), trainable=False),
            VariableSpec("lora_b0", batch + (r, n_out), trainable=False),
        ]

    def initialize_from_base(self):
        w = self.base_matrix()
        a, b = self.initial_factors(w)
        residual = w - self.scaling * ops.matmul(a, b)
        a = ops.swapaxes(a, -1, -2)  # stored as Aᵀ
        for value, what in ((a, "factor A"), (b, "factor B"), (residual, "residual kernel")):
            _check_finite(value, self.name, what)
        # Separate buffers: JAX donates each variable's buffer in the train step.
        for var, value in ((self.lora_a, a), (self.lora_b, b), (self.lora_a0, a), (self.lora_b0, b)):
            var.assign(ops.copy(value))
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(residual))

    def initial_delta(self):
        a0 = ops.swapaxes(self.read(self.lora_a0), -1, -2)
        return self.scaling * ops.matmul(a0, self.read(self.lora_b0))

    def base_output(self, x, y):
        return self.add_lowrank(x, y, self.lora_a0, self.lora_b0, self.scaling)

    def original_matrix(self, matrix):
        return matrix + self.initial_delta()

    def rebase(self, original):
        """Subtract the file's initial update from `original`, once it is
        known to be this method's decomposition of `original`: an adapter
        file cannot rewrite the frozen base into something else (factors
        made for another kernel, or huge ones whose product would cancel
        the kernel in float32)."""
        a0 = ops.swapaxes(self.read(self.lora_a0), -1, -2)
        b0 = self.read(self.lora_b0)
        exact = bases.base_kind(self.layer) == "float"
        err = float(ops.convert_to_numpy(self.init_mismatch(ops.cast(original, "float32"), a0, b0, exact)))
        if not err <= INIT_RTOL:  # NaN included
            raise ValueError(
                f"Layer {self.name!r}: the initial factors lora_a0/lora_b0 of the adapter "
                f"file are not {self.method}'s decomposition of this layer's kernel "
                f"(mismatch {err:.3g}, relative; the limit is {INIT_RTOL:g}): the file "
                "was made for another base model, or was altered. Nothing was loaded."
            )
        w = original - self.scaling * ops.matmul(a0, b0)
        _check_finite(w, self.name, "residual kernel")
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(w))

    def init_mismatch(self, w, a0, b0, exact):
        """How far `A0 (n_in, r)`, `B0 (r, n_out)` are from what this
        method's init takes from the matrix `w`, relative (0: exactly).
        `exact`: `w` is the float kernel itself (not a dequantized one,
        which is only close to the kernel the factors came from).

        The default: `s A0 B0` is no larger than `w` (it is a part of `w`
        and the residual the rest), the test for a `w` known only
        approximately; subclasses test their decomposition exactly."""
        return _excess_norm(self.scaling * ops.matmul(a0, b0), w, slack=0.25)

    def as_lora_state(self):
        """The update as a plain rank-2r LoRA for the original kernel (§16)."""
        a = ops.concatenate([self.read(self.lora_a), self.read(self.lora_a0)], axis=-2)
        b = ops.concatenate([self.read(self.lora_b), -self.read(self.lora_b0)], axis=-2)
        alpha = self.alpha * (math.sqrt(2.0) if self.rslora else 2.0)
        return {"lora_a": a, "lora_b": b}, {"rank": 2 * self.rank, "alpha": alpha, "rslora": self.rslora}


@registry.method(
    "PiSSA: LoRA from the top-r SVD triplets, residual frozen base",
    reference=reference.lora,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class PiSSA(ResidualLoRA):
    """LoRA initialized from the top-`r` singular triplets of the kernel.

    With `W = U diag(σ) Vᵀ` (float32, matrix view) and `σ̃ = σ_r / s`:
    `A = U_r diag(√σ̃)`, `B = diag(√σ̃) V_rᵀ`, and the frozen kernel becomes the
    residual `W - s A B`, so the layer's output is unchanged at the start.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `dropout`, `train_bias`, `seed`,
    `activation`, `merged` and `enabled`; the init is the SVD), and:

    Args:
        svd_niter: `None` for an exact SVD; an int for a randomized SVD with
            that many subspace iterations.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> dense = keras.layers.Dense(6)
        >>> dense.build((None, 4))
        >>> layer = keras_lowrank.layers.PiSSA(dense, rank=2)
        >>> tuple(layer(np.ones((3, 4), "float32")).shape)
        (3, 6)
    """

    method = "pissa"
    uses_svd = True
    OPTIONS = ResidualLoRA.OPTIONS + (
        opt.Option(
            "svd_niter", None, opt.nonneg_int_or_none,
            "None: exact SVD; an int: randomized SVD with that many subspace iterations",
        ),
    )

    part = "top"

    def init_mismatch(self, w, a0, b0, exact):
        """A part of `w`'s SVD, `s A0 B0 = U_r diag(σ_r) V_rᵀ`, leaves a
        residual `R` orthogonal to its singular vectors: `A0ᵀ R = 0` and
        `R B0ᵀ = 0` (for the top or the bottom triplets alike, from an
        exact or a randomized SVD), and no larger than `w`."""
        delta = self.scaling * ops.matmul(a0, b0)
        bound = _excess_norm(delta, w, slack=1e-3 if exact else 0.25)
        if not exact:
            return bound
        r = w - delta
        scale = _norm(w) + linalg.TINY
        left = _norm(ops.matmul(ops.swapaxes(a0, -1, -2), r)) / (_norm(a0) * scale + linalg.TINY)
        right = _norm(ops.matmul(r, ops.swapaxes(b0, -1, -2))) / (_norm(b0) * scale + linalg.TINY)
        return ops.maximum(bound, ops.maximum(left, right))

    def initial_factors(self, w):
        u, s, v = svd.decompose(
            w, rank=self.rank, part=self.part, niter=self.svd_niter, seed=self.seed, where=self.name
        )
        return split_triplets(u, s, v, self.scaling)


#: how far an adapter file's initial factors may be from the init's
#: decomposition of the kernel (relative; float32 round-off is ~1e-6)
INIT_RTOL = 1e-3


def _norm(x):
    """Frobenius norm over every axis (a batch of matrices counts as one)."""
    return ops.sqrt(ops.sum(ops.square(ops.cast(x, "float32"))))


def _excess_norm(delta, w, slack):
    """How much `‖delta‖` exceeds `(1 + slack) ‖w‖`, relative to `‖w‖`
    (0 when it does not)."""
    limit = (1.0 + slack) * _norm(w)
    return ops.maximum(_norm(delta) - limit, 0.0) / (limit + linalg.TINY)


def split_triplets(u, s, v, scaling):
    """PiSSA's factors of `U diag(s) Vᵀ` at scale `scaling`:
    `A = U diag(√(s/scaling))`, `B = diag(√(s/scaling)) Vᵀ`."""
    root = np.sqrt(s / scaling)
    a = u * root[..., None, :]  # (n_in, r)
    b = root[..., :, None] * np.swapaxes(v, -1, -2)
    return a, b


def _exact_svd_only(value):
    if value is not None:
        raise ValueError
    return None


EXACT_SVD_ONLY = opt.Check(
    "None (the exact SVD): MiLoRA adapts the smallest singular triplets, which a "
    "randomized SVD does not approximate (it finds the top subspace)",
    _exact_svd_only,
)


@registry.method(
    "MiLoRA: LoRA from the r smallest SVD triplets, principal part frozen",
    reference=reference.lora,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class MiLoRA(PiSSA):
    """LoRA initialized from the `r` smallest singular triplets (MiLoRA).

    As PiSSA with the minor components: with `W = U diag(σ) Vᵀ` (exact,
    float32 matrix view), `U_m, σ_m, V_m` the last `r` triplets and
    `σ̃ = σ_m / s`: `A = U_m diag(√σ̃)`, `B = diag(√σ̃) V_mᵀ`, and the frozen
    kernel becomes the principal part `W - U_m diag(σ_m) V_mᵀ`, so the layer
    starts unchanged (to round-off). Dividing by `s` keeps that true for any
    `alpha` (the paper takes `s = 1`). Merge is exact, and
    `save_adapter(..., as_lora=True)` writes the rank-2r LoRA for the
    original kernel, as for PiSSA. A randomized SVD is refused: it does not
    approximate the minor subspace.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `dropout`, `train_bias`, `seed`,
    `activation`, `merged` and `enabled`; the init is the SVD).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> dense = keras.layers.Dense(6)
        >>> dense.build((None, 4))
        >>> layer = keras_lowrank.layers.MiLoRA(dense, rank=2)
        >>> tuple(layer(np.ones((3, 4), "float32")).shape)
        (3, 6)
    """

    method = "milora"
    part = "bottom"
    OPTIONS = ResidualLoRA.OPTIONS + (
        opt.Option(
            "svd_niter", None, EXACT_SVD_ONLY,
            "must be None: the minor triplets need the exact SVD",
        ),
    )


@registry.method(
    "OLoRA: LoRA from the QR decomposition of the kernel, residual frozen base",
    reference=reference.lora,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class OLoRA(ResidualLoRA):
    """LoRA initialized from the QR decomposition of the kernel (OLoRA).

    As PEFT's `init_lora_weights="olora"`: `Q, R = qr(Wᵀ)` (float32,
    reduced, `Wᵀ` the PyTorch-layout weight), `B = Q_rᵀ` (the first `r`
    orthonormal columns), `A = R_rᵀ` (the first `r` rows of `R`), and the
    frozen kernel becomes `W - s A B` (no division by `s`, unlike PiSSA).
    QR is not transpose-invariant: the QR of `W` would give another init.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `dropout`, `train_bias`, `seed`,
    `activation`, `merged` and `enabled`; the init is the QR).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> dense = keras.layers.Dense(6)
        >>> dense.build((None, 4))
        >>> layer = keras_lowrank.layers.OLoRA(dense, rank=2)
        >>> tuple(layer(np.ones((3, 4), "float32")).shape)
        (3, 6)
    """

    method = "olora"

    def init_mismatch(self, w, a0, b0, exact):
        """`Wᵀ = Q R` gives `B0 = Q_rᵀ` with orthonormal rows and
        `A0 = R_rᵀ = W B0ᵀ`."""
        if not exact:  # ‖A0 B0‖ = ‖Q_r R_r‖ <= ‖W‖ (no scale: s multiplies it)
            return _excess_norm(ops.matmul(a0, b0), w, slack=0.25)
        r = ops.shape(b0)[-2]
        gram = ops.matmul(b0, ops.swapaxes(b0, -1, -2)) - ops.eye(r, dtype="float32")
        rows = _norm(gram) / (r ** 0.5)
        fit = _norm(a0 - ops.matmul(w, ops.swapaxes(b0, -1, -2))) / (_norm(w) + linalg.TINY)
        return ops.maximum(rows, fit)

    def initial_factors(self, w):
        q, r = linalg.qr(ops.swapaxes(w, -1, -2))  # Wᵀ = Q R
        b = ops.swapaxes(q[..., :, : self.rank], -1, -2)  # (r, n_out)
        a = ops.swapaxes(r[..., : self.rank, :], -1, -2)  # (n_in, r)
        return a, b
