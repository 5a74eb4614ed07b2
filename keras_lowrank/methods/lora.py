"""LoRA: `y = x K + b + s (dropout(x) A) B` (spec §1)."""

import math

import keras
from keras import ops

from keras_lowrank.adapter import Adapter

INITS = ("kaiming", "gaussian")


def lora_a_initializer(init, n_in, rank, seed=None, where="layer"):
    """PEFT's inits of the down-projection, in Keras layout `(n_in, r)`."""
    if init == "kaiming":
        bound = 1.0 / math.sqrt(n_in)
        return keras.initializers.RandomUniform(-bound, bound, seed=seed)
    if init == "gaussian":
        return keras.initializers.RandomNormal(stddev=1.0 / rank, seed=seed)
    raise ValueError(
        f"init for {where!r} must be one of {INITS}; received init={init!r}."
    )


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRA(Adapter):
    """Low-rank adaptation of a `Dense` or `EinsumDense` layer.

    `y = x K + b + s (dropout(x) A) B` with `A: (n_in, r)`, `B: (r, n_out)`
    in the matrix view of the kernel, `s = alpha / r` (or `alpha / sqrt(r)`
    with `rslora=True`). The variable `lora_a` holds `Aᵀ`, shape `(r, n_in)`
    (PEFT's `lora_A` layout, faster to train); `lora_b` holds `B`.
    `A` starts `U(±1/sqrt(n_in))` (PEFT's default,
    `init="kaiming"`) or `N(0, 1/r²)` (`init="gaussian"`), `B` starts at zero,
    so the layer starts as a no-op.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the rank `r`.
        alpha: scaling numerator (default `rank`).
        rslora: use `alpha / sqrt(rank)`.
        init: `"kaiming"` or `"gaussian"`.
        dropout, train_bias, activation, merged, seed: see `Adapter`.

    Example:

    >>> import keras, numpy as np
    >>> import keras_lowrank
    >>> layer = keras_lowrank.layers.LoRA(keras.layers.Dense(6), rank=2)
    >>> tuple(layer(np.ones((3, 4), "float32")).shape)
    (3, 6)
    """

    method = "lora"

    def __init__(self, layer, rank=8, alpha=None, rslora=False, init="kaiming", **kwargs):
        super().__init__(layer, rank=rank, alpha=alpha, **kwargs)
        if init not in INITS:
            raise ValueError(
                f"init for {self.name!r} must be one of {INITS}; received "
                f"init={init!r}."
            )
        self.rslora = bool(rslora)
        self.init = init

    @property
    def scaling(self):
        if self.rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def build_adapter(self, geometry):
        batch, n_in, n_out = geometry.batch_shape, geometry.n_in, geometry.n_out
        a_init = lora_a_initializer(self.init, n_in, self.rank, self.seed, self.name)
        self.lora_a = self.add_adapter_weight("lora_a", batch + (self.rank, n_in), a_init)
        self.lora_b = self.add_adapter_weight("lora_b", batch + (self.rank, n_out), "zeros")

    def adapter_output(self, x, y, training):
        x = self.adapter_input(x, training)
        rows = self.lowrank_rows(x, self.lora_a, self.lora_b, self.scaling)
        return y + ops.cast(self.geometry.rows_to_outputs(rows, x), y.dtype)

    def factor_a(self):
        """`A` in the Keras layout `(n_in, r)`, float32."""
        return ops.swapaxes(self.read(self.lora_a), -1, -2)

    def delta_matrix(self):
        return self.scaling * ops.matmul(self.factor_a(), self.read(self.lora_b))

    def get_config(self):
        config = super().get_config()
        config.update({"rslora": self.rslora, "init": self.init})
        return config
