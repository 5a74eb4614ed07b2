"""PiSSA: principal singular values and vectors adaptation (spec §16)."""

import math

import keras
from keras import ops

from keras_lowrank import bases
from keras_lowrank import linalg
from keras_lowrank import options as opt
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods.lora import ALPHA
from keras_lowrank.methods.lora import DROPOUT
from keras_lowrank.methods.lora import RANK
from keras_lowrank.methods.lora import RSLORA
from keras_lowrank.methods.lora import LoRA


@keras.saving.register_keras_serializable(package="keras_lowrank")
class PiSSA(LoRA):
    """LoRA initialized from the top-`r` singular triplets of the kernel.

    With `W = U diag(σ) Vᵀ` (float32, matrix view) and `σ̃ = σ_r / s`:
    `A = U_r diag(√σ̃)`, `B = diag(√σ̃) V_rᵀ`, and the frozen kernel becomes the
    residual `W - s A B`, so the layer's output is unchanged at the start.
    The initial factors are kept (non-trainable) so that the adapter can be
    disabled, saved as a plain rank-`2r` LoRA for the original kernel
    (`save_adapter(..., as_lora=True)`), and loaded onto a fresh base.

    Args:
        layer, rank, alpha, rslora, dropout, train_bias, seed, activation,
        merged, enabled: as for `LoRA` (the init is the SVD).
        svd_niter: `None` for an exact SVD; an int for a randomized SVD with
            that many subspace iterations.

    Example:

    >>> import keras, numpy as np
    >>> import keras_lowrank
    >>> dense = keras.layers.Dense(6)
    >>> dense.build((None, 4))
    >>> layer = keras_lowrank.layers.PiSSA(dense, rank=2)
    >>> tuple(layer(np.ones((3, 4), "float32")).shape)
    (3, 6)
    """

    method = "pissa"
    OPTIONS = (
        RANK,
        ALPHA,
        DROPOUT,
        RSLORA,
        opt.Option(
            "svd_niter", None, opt.nonneg_int_or_none,
            "None: exact SVD; an int: randomized SVD with that many subspace iterations",
        ),
    ) + Adapter.OPTIONS
    init_on_full_precision = True  # QPiSSA: quantize the residual
    rewrites_kernel = True

    def check_geometry(self, geometry, where=None):
        where = where or self.name
        if self.rank > geometry.rank_limit:
            raise ValueError(
                f"rank={self.rank} is larger than layer {where!r} allows for "
                f"method {self.method!r}: its kernel is a {geometry.n_in}x"
                f"{geometry.n_out} matrix, so rank <= {geometry.rank_limit}."
            )
        super().check_geometry(geometry, where)

    def rank_warnings(self, geometry):
        return []

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
        u, s, v = linalg.svd(w, rank=self.rank, niter=self.svd_niter, seed=self.seed)
        root = ops.sqrt(s / self.scaling)
        a = u * ops.expand_dims(root, -2)  # (n_in, r)
        b = ops.expand_dims(root, -1) * ops.swapaxes(v, -1, -2)
        residual = w - self.scaling * ops.matmul(a, b)
        a = ops.swapaxes(a, -1, -2)  # stored as Aᵀ
        for value, what in ((a, "A"), (b, "B"), (residual, "residual kernel")):
            if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(value)))):
                raise FloatingPointError(
                    f"PiSSA init of layer {self.name!r}: the {what} has NaN or "
                    "inf values (is the kernel finite?); the model was left unchanged."
                )
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
        w = original - self.initial_delta()
        if not bool(ops.convert_to_numpy(ops.all(ops.isfinite(w)))):
            raise FloatingPointError(
                f"Layer {self.name!r}: the residual kernel would have NaN or inf values."
            )
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(w))

    def as_lora_state(self):
        """The update as a plain rank-2r LoRA for the original kernel (§16)."""
        a = ops.concatenate([self.read(self.lora_a), self.read(self.lora_a0)], axis=-2)
        b = ops.concatenate([self.read(self.lora_b), -self.read(self.lora_b0)], axis=-2)
        alpha = self.alpha * (math.sqrt(2.0) if self.rslora else 2.0)
        return {"lora_a": a, "lora_b": b}, {"rank": 2 * self.rank, "alpha": alpha}
