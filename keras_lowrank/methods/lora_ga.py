"""LoRA-GA: low-rank adaptation with gradient approximation (Wang et al.,
NeurIPS 2024, arXiv 2407.05000).

A LoRA whose factors start as the singular vectors of the loss's gradient
with respect to the kernel, estimated on sample batches, so that the first
steps of training move the layer as full fine-tuning would; the frozen base
is the residual `K - s A B`, so the layer starts unchanged (as PiSSA,
`ResidualLoRA`).

In the matrix view, with `G` the mean gradient of the model's compiled loss
over the sample batches (`n_in x n_out`) and `G = P diag(σ) Qᵀ` its SVD, the
`2r` leading triplets are split between the factors (`direction`, PEFT's
names): `A = P[:, I_A]` and `B = diag(σ[I_B]) Q[:, I_B]ᵀ`, where

- `"ArB2r"` (default): `I_A = 0..r-1`, `I_B = r..2r-1`;
- `"A2rBr"`: `I_A = r..2r-1`, `I_B = 0..r-1`;
- `"ArBr"`: `I_A` the odd indices, `I_B` the even ones, of `0..2r-1`;
- `"random"`: `r` of the `2r` indices drawn with the adapter's seed, the
  same for both;

then scaled (`scale`): `"stable"` multiplies `B` by `n_out^¼ / √γ`
(`γ = stable_gamma`), `"weight_svd"` by `σ₁(K) / σ[I_B][0]`, `"gd_scale"`
divides both by `s`, `"unit"` leaves them. This is PEFT's
`init_lora_weights="lora_ga"` with its `LoraGAConfig`.
"""

import keras
import numpy as np

from keras_lowrank import calibration
from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import svd
from keras_lowrank.methods import reference
from keras_lowrank.methods.residual import ResidualLoRA

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def split_indices(direction, rank, seed=None):
    """`(I_A, I_B)`: which of the `2r` leading triplets go to `A` and `B`.

    Examples:

        >>> split_indices("ArBr", 2)
        ([1, 3], [0, 2])
    """
    r = rank
    if direction == "ArB2r":
        return list(range(r)), list(range(r, 2 * r))
    if direction == "A2rBr":
        return list(range(r, 2 * r)), list(range(r))
    if direction == "ArBr":
        return list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))
    chosen = [int(i) for i in np.random.default_rng(seed).permutation(2 * r)[:r]]
    return chosen, chosen


def lora_ga_factors(grad, w, rank, scaling, direction="ArB2r", scale="stable", stable_gamma=16.0,
                    seed=None, where=None):
    """LoRA-GA's `(A (n_in, r), B (r, n_out))` from the gradient `grad` and
    the kernel `w`, both matrix views (float64 NumPy; see the module
    docstring). The triplets come from `keras_lowrank.svd.decompose`."""
    grad = np.asarray(grad, "float64")
    p, sigma, q = svd.decompose(grad, rank=min(2 * rank, min(grad.shape)), where=where)
    p, sigma, qt = p.astype("float64"), sigma.astype("float64"), q.T.astype("float64")
    m = len(sigma)
    if m < 2 * rank:  # a small kernel has fewer than 2r triplets: the rest are zero
        p = np.pad(p, ((0, 0), (0, 2 * rank - m)))
        qt = np.pad(qt, ((0, 2 * rank - m), (0, 0)))
        sigma = np.pad(sigma, (0, 2 * rank - m))
    i_a, i_b = split_indices(direction, rank, seed)
    a = p[:, i_a]
    s_b = sigma[i_b]
    b = s_b[:, None] * qt[i_b]
    if scale == "stable":
        b = b * (w.shape[-1] ** 0.25) / (stable_gamma ** 0.5)
    elif scale == "weight_svd":
        if s_b[0] > 0:
            b = b * (float(svd.decompose(w, rank=1, where=where)[1][0]) / s_b[0])
    elif scale == "gd_scale":
        a, b = a / scaling, b / scaling
    return a, b


@registry.method(
    "LoRA-GA: LoRA from the SVD of the loss gradient on sample data, residual frozen base",
    reference=reference.lora,
    paper="https://arxiv.org/abs/2407.05000",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class LoRAGA(calibration.SampleDataInit, ResidualLoRA):
    """LoRA initialized from the gradient on sample data (LoRA-GA).

    `enable_adapter(model, method="lora_ga", data=...)` computes the mean
    gradient of the model's compiled loss with respect to each target kernel
    over the sample batches (`(x, y)` batches; compile the model with its
    loss first), and initializes `A`, `B` from its SVD, with the residual
    frozen: the layer starts unchanged (to round-off). See the module
    docstring. A kernel with fewer than `2·rank` singular triplets
    (`min(n_in, n_out) < 2·rank`) gives zero components in their place: a
    component with a zero `A` column still has a nonzero `B` row, or the
    reverse, so every component trains.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `dropout`,
    `train_bias`, `seed`, `activation`, `merged` and `enabled`), and:

    Args:
        direction: how the `2r` leading triplets are split between `A` and
            `B`: `"ArB2r"` (default), `"A2rBr"`, `"ArBr"` or `"random"`.
        scale: `"stable"` (default), `"weight_svd"`, `"gd_scale"` or `"unit"`.
        stable_gamma: `γ` of the `"stable"` scale.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="d"),
        ...                           keras.layers.Dense(2)])
        >>> model.compile(loss="mse")
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(64, 2)).astype("float32")
        >>> y0 = model.predict(x, verbose=0)
        >>> _ = keras_lowrank.enable_adapter(model, method="lora_ga", rank=2, targets=["d"], data=(x, y))
        >>> bool(np.allclose(model.predict(x, verbose=0), y0, atol=1e-4))
        True
    """

    method = "lora_ga"
    calibration = "gradients"
    # a layer whose parent reads its kernel is never called, so the sample
    # data cannot reach it: it is left out
    serves_kernel = False
    uses_svd = True
    OPTIONS = ResidualLoRA.OPTIONS + (
        opt.Option("direction", "ArB2r", opt.choice(*DIRECTIONS),
                   "how the 2r leading gradient triplets are split between A and B"),
        opt.Option("scale", "stable", opt.choice(*SCALES), "how the factors are scaled"),
        opt.Option("stable_gamma", 16.0, opt.positive_float, "gamma of the 'stable' scale"),
    )

    @classmethod
    def calibrate(cls, model, targets, data, verbose):
        """Each target kernel's mean loss gradient on the sample batches."""
        where = "enable_adapter(method='lora_ga')"
        grads = calibration.kernel_gradients(model, {k: (t[0], t[1]) for k, t in targets.items()},
                                             data, where, verbose)
        return calibration.Calibrated(grads)

    def initial_factors(self, w):
        grad = self.sample_data_found()
        w = np.asarray(keras.ops.convert_to_numpy(w), "float64")
        a, b = lora_ga_factors(grad, w, self.rank, self.scaling, self.direction, self.scale,
                               self.stable_gamma, self.seed, self.name)
        return a.astype("float32"), b.astype("float32")
