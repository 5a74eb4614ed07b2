"""LoRA: `y = x K + b + s (dropout(x) A) B` (arXiv 2106.09685)."""

import math

import keras
from keras import ops

from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import training
from keras_lowrank.adapter import Adapter
from keras_lowrank.adapter import VariableSpec

INITS = ("kaiming", "gaussian")

#: the options of every low-rank (A, B) method
RANK = opt.Option("rank", 8, opt.positive_int, "adapter rank r")
ALPHA = opt.Option(
    "alpha", None, opt.positive_float_or_none, "scaling numerator (None: the rank, scale 1)"
)
DROPOUT = opt.Option("dropout", 0.0, opt.rate, "dropout rate on the adapter's input")
RSLORA = opt.Option("rslora", False, opt.boolean, "scale by alpha/sqrt(r) instead of alpha/r")


def lora_a_initializer(init, n_in, rank, seed=None):
    """PEFT's inits of the down-projection (`U(±1/sqrt(n_in))` or
    `N(0, 1/r²)`)."""
    if init == "kaiming":
        bound = 1.0 / math.sqrt(n_in)
        return keras.initializers.RandomUniform(-bound, bound, seed=seed)
    return keras.initializers.RandomNormal(stddev=1.0 / rank, seed=seed)


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRA(Adapter):
    """Low-rank adaptation of a `Dense` or `EinsumDense` layer.

    `y = x K + b + s (dropout(x) A) B` with `A: (n_in, r)`, `B: (r, n_out)`
    in the matrix view of the kernel, `s = alpha / r` (or `alpha / sqrt(r)`
    with `rslora=True`). The variable `lora_a` holds `Aᵀ`, shape `(r, n_in)`
    (PEFT's `lora_A` layout, faster to train); `lora_b` holds `B`,
    shape `(r, n_out)`. `A` starts `U(±1/sqrt(n_in))` (PEFT's default,
    `init="kaiming"`) or `N(0, 1/r²)` (`init="gaussian"`), `B` starts at zero,
    so the layer starts as a no-op.

    Args:
        layer: the `Dense`/`EinsumDense` to adapt.
        rank: the rank `r`.
        alpha: scaling numerator (default `rank`).
        rslora: use `alpha / sqrt(rank)`.
        init: `"kaiming"` or `"gaussian"`.
        dropout: dropout rate on the adapter's input.
        train_bias: keep the wrapped layer's bias trainable.
        seed: seed of the random initializers and of dropout.
        activation: see `Adapter`.
        merged: see `Adapter`.
        enabled: see `Adapter`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.LoRA(keras.layers.Dense(6), rank=2)
        >>> tuple(layer(np.ones((3, 4), "float32")).shape)
        (3, 6)
    """

    method = "lora"
    OPTIONS = (
        RANK,
        ALPHA,
        DROPOUT,
        RSLORA,
        opt.Option("init", "kaiming", opt.choice(*INITS), "init of A: PEFT's kaiming-uniform or gaussian"),
    ) + Adapter.OPTIONS

    def validate_options(self):
        if self.alpha is None:
            self.alpha = float(self.rank)

    @property
    def scaling(self):
        if self.rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def variable_specs(self, geometry):
        batch, n_in, n_out, r = geometry.batch_shape, geometry.n_in, geometry.n_out, self.rank
        a_init = lora_a_initializer(getattr(self, "init", "kaiming"), n_in, r, self.seed)
        return [
            VariableSpec("lora_a", batch + (r, n_in), a_init),
            VariableSpec("lora_b", batch + (r, n_out), "zeros"),
        ]

    def adapter_output(self, x, y, training):
        x = self.adapter_input(x, training)
        return self.add_lowrank(x, y, self.lora_a, self.lora_b, self.scaling)

    def pair(self):
        """`(Aᵀ, B)`: the variables this layer's update is made of."""
        return self.lora_a, self.lora_b

    def update_rows(self, x):
        """`s (x A) B` for the layer input `x`, in rows of the matrix view."""
        a_t, b = self.pair()
        return self.lowrank_rows(x, a_t, b, self.scaling)

    def factor_a(self):
        """`A` in the Keras layout `(n_in, r)`, float32."""
        return ops.swapaxes(self.read(self.lora_a), -1, -2)

    def delta_matrix(self):
        return self.scaling * ops.matmul(self.factor_a(), self.read(self.lora_b))

    def as_lora_state(self):
        """The adapter as a plain LoRA: `(state, {"rank", "alpha"})`."""
        return {"lora_a": self.read(self.lora_a), "lora_b": self.read(self.lora_b)}, {
            "rank": self.rank, "alpha": self.alpha, "rslora": self.rslora,
        }


@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRAPlus(LoRA):
    """LoRA+ (arXiv 2402.12354): LoRA whose `B` (and every trainable 1-D variable of
    the model, as PEFT groups them) learns at `lr_ratio` times the
    optimizer's learning rate.

    The layer is LoRA's; the ratio is a training part that
    `model.compile` puts in place by wrapping the optimizer
    (`keras_lowrank.training.AdapterOptimizer`), under any Keras optimizer
    and learning-rate schedule. Merges as LoRA; `save_adapter(...,
    as_lora=True)` and `save_peft_adapter` write it as a LoRA.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `init`, `dropout`, `train_bias`,
    `seed`, `activation`, `merged` and `enabled`), and:

    Args:
        lr_ratio: `η_B / η_A` (λ ≥ 1; the paper's default 16).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, method="loraplus", rank=2, lr_ratio=16.0)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> type(model.optimizer).__name__
        'AdapterOptimizer'
    """

    method = "loraplus"
    OPTIONS = LoRA.OPTIONS + (
        opt.Option("lr_ratio", 16.0, opt.float_at_least(1.0), "learning rate of B (and 1-D variables) / that of A"),
    )


registry.register(
    registry.Method(
        name="lora",
        layer_class=LoRA,
        summary="LoRA: y = xK + b + s(xA)B, s = alpha/r (rslora: alpha/sqrt(r))",
        trainable_count=registry.lowrank_count,
        export_forms=("lora",),
        spec="§1",
    )
)

registry.register(
    registry.Method(
        name="loraplus",
        layer_class=LoRAPlus,
        summary="LoRA+: LoRA with B learning lr_ratio times faster (any optimizer)",
        trainable_count=registry.lowrank_count,
        training=(training.LearningRateRatio("loraplus"),),
        export_forms=("lora",),
        spec="§2",
    )
)
