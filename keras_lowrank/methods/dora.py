"""DoRA: weight-decomposed LoRA (arXiv 2402.09353).

`K' = m ⊙ (K + sAB) / ‖K + sAB‖_c`, with the column norm held constant in the
backward pass (paper §4.3). The forward never builds `K'`: it rescales the
frozen layer's output, `y = b + g ⊙ (x K + s x A B)` with `g = m / n`.
The column norm is computed scaled and floored (`linalg.column_norm`), so a
zero column or a kernel of values near 1e-30 or 1e20 gives no NaN.
"""

import keras
from keras import ops

from keras_lowrank import linalg
from keras_lowrank import registry
from keras_lowrank.adapter import VariableSpec
from keras_lowrank.methods.lora import LORA_FORMAT
from keras_lowrank.methods.lora import LoRA
from keras_lowrank.methods import reference


def reference_merged(adapter, w):
    """DoRA: `m ⊙ (W + s A B) / ‖W + s A B‖` column by column."""
    v = w + adapter.scaling * reference.factor_a(adapter) @ reference.value(adapter, "lora_b")
    return reference.value(adapter, "magnitude")[None, :] * v / reference.column_norm(v)[None, :]


@registry.method(
    "DoRA: magnitude m times the normalized direction K + sAB",
    trainable_count=lambda g, o: g.n_shared * (o["rank"] * (g.n_in + g.n_out) + g.n_out),
    reference=reference_merged,
    peft=LORA_FORMAT,
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class DoRA(LoRA):
    """Weight-decomposed low-rank adaptation.

    Trains a magnitude `m` (one value per output unit of the matrix view) and
    a LoRA pair `A, B`. `m` starts at the column norms of the kernel, `B` at
    zero, so the layer starts as a no-op.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `init`, `dropout`, `train_bias`,
    `seed`, `activation`, `merged` and `enabled`).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> layer = keras_lowrank.layers.DoRA(keras.layers.Dense(6), rank=2)
        >>> tuple(layer(np.ones((3, 4), "float32")).shape)
        (3, 6)
    """

    method = "dora"
    per_example = "factors_gain"
    export_forms = ()  # the magnitude has no plain-LoRA form

    def variable_specs(self, geometry):
        shape = geometry.batch_shape + (geometry.n_out,)
        return super().variable_specs(geometry) + [
            VariableSpec("magnitude", shape, "ones"),
            # Column norm at merge time, so that a merged layer can be unmerged.
            VariableSpec("merge_norm", shape, "ones", trainable=False),
        ]

    def initialize_from_base(self):
        super().initialize_from_base()  # LoRA's init="orthogonal"
        w = self.base_matrix() + self.delta_matrix()
        self.magnitude.assign(linalg.column_norm(w))

    def weight_norm(self):
        """`stop_gradient(‖K + sAB‖_c)` in float32."""
        w = self.base_matrix() + self.delta_matrix()
        return ops.stop_gradient(linalg.column_norm(w))

    def adapter_output(self, x, y, training):
        g = ops.cast(self.magnitude, "float32") / self.weight_norm()
        x_ad = self.adapter_input(x, training)
        bias = self.layer.bias if getattr(self.layer, "bias", None) is not None else None
        if x_ad is x:
            base = y if bias is None else y - ops.cast(bias, y.dtype)
        else:
            base = self.layer(x_ad)
            if bias is not None:
                base = base - ops.cast(bias, base.dtype)
        base_rows = self.geometry.outputs_to_rows(base)
        low = self.lowrank_rows(x_ad, self.lora_a, self.lora_b, self.scaling)
        g = ops.cast(self.geometry.column_vector_to_rows(g), low.dtype)
        rows = (g - 1.0) * base_rows + g * low
        return y + ops.cast(self.geometry.rows_to_outputs(rows, x), y.dtype)

    def per_example_factors(self):
        """DoRA's output is `y0 + (g - 1) ⊙ base + g ⊙ s (x A) B` with
        `g = m / ‖K + sAB‖_c` (`base`: `y0` without its bias)."""
        g = ops.cast(self.magnitude, "float32") / self.weight_norm()
        a_t, b, _ = super().per_example_factors()
        return a_t, b * ops.expand_dims(g, 0), g - 1.0

    def merged_matrix(self, matrix):
        v = matrix + self.delta_matrix()
        m = self.read(self.magnitude)
        return ops.expand_dims(m / linalg.column_norm(v), -2) * v

    def merge_in_place(self):
        if self.merged:
            return
        self.refuse_in_place("merge")
        norm = linalg.column_norm(self.base_matrix() + self.delta_matrix())
        super().merge_in_place()
        # Kept so that the merged layer can be unmerged.
        self.merge_norm.assign(norm)

    def unmerged_matrix(self, matrix):
        m = self.read(self.magnitude)
        norm = self.read(self.merge_norm)
        v = matrix * ops.expand_dims(norm / m, -2)
        return v - self.delta_matrix()
