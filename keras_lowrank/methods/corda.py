"""CorDA: context-oriented decomposition adaptation (Yang et al., NeurIPS
2024, arXiv 2406.05223).

A LoRA initialized from the SVD of the kernel multiplied by the covariance
of the layer's inputs on sample data, with the residual frozen (as PiSSA,
`ResidualLoRA`). In the matrix view `K: (n_in, n_out)`, with the input rows
`X` of each sample batch scaled by the batch's `|max X|` and
`C = mean over batches of Xᵀ X` (`n_in x n_in`):

    C_d = C + d · mean(diag C) · I     (d = 0.01, doubled until C_d is well inverted)
    C_d K = P diag(σ) Qᵀ               (SVD)
    A = C_d⁻¹ P_r diag(√(σ_r / s)),  B = diag(√(σ_r / s)) Q_rᵀ,  K_res = K - s A B

so `s A B = C_d⁻¹ (C_d K)_r`: the part of the kernel that acts on the
directions the data uses most. `corda_method="ipm"` (instruction-previewed)
adapts the `r` largest components, `"kpm"` (knowledge-preserved) the `r`
smallest, which leaves the components the data relies on in the frozen
base. This is PEFT's `init_lora_weights="corda"` (`preprocess_corda`).
"""

import keras
import numpy as np

from keras_lowrank import calibration
from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import svd
from keras_lowrank.methods import reference
from keras_lowrank.methods.residual import ResidualLoRA

#: the first damping of the covariance, and the inversion error it must reach
DAMP, INV_TOL = 0.01, 0.05


def covariance_sum(rows):
    """One batch's term of CorDA's covariance: `X̂ᵀ X̂`, `X̂ = X / |max X|`
    (PEFT scales by the absolute value of the batch's largest entry)."""
    top = abs(float(np.max(rows)))
    if not top > 0:
        raise ValueError("the largest input value of a batch is 0 (or NaN)")
    x = rows / top
    return x.T @ x


def damped_inverse(c):
    """`(C_d, C_d⁻¹)`: `C` plus `d · mean(diag C) · I`, `d` from 0.01 doubled
    until `‖C_d C_d⁻¹ - I‖ < 0.05` (PEFT's rule)."""
    eye = np.eye(c.shape[0])
    damp = DAMP
    scale = float(np.mean(np.diag(c)))
    for _ in range(64):
        fixed = c + eye * scale * damp
        inv = np.linalg.inv(fixed)
        if np.linalg.norm(fixed @ inv - eye) < INV_TOL:
            return fixed, inv
        damp *= 2
    raise ValueError("the input covariance could not be inverted (is it finite?)")


def corda_factors(w, c, rank, scaling, part, where=None):
    """CorDA's `(A (n_in, r), B (r, n_out))` for the matrix `w` and the
    input covariance `c` (float64 NumPy; see the module docstring). The
    triplets of `C_d K` come from `keras_lowrank.svd.decompose` (the top
    `r`, or the bottom `r` for `"kpm"`)."""
    fixed, inv = damped_inverse(np.asarray(c, "float64"))
    p, sigma, q = svd.decompose(fixed @ np.asarray(w, "float64"), rank=rank,
                                part="top" if part == "ipm" else "bottom", where=where)
    root = np.sqrt(sigma.astype("float64") / scaling)
    a = (inv @ p) * root[None, :]
    b = root[:, None] * q.T
    return a, b


@registry.method(
    "CorDA: LoRA from the SVD of the kernel times the input covariance on sample data",
    reference=reference.lora,
    paper="https://arxiv.org/abs/2406.05223",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class CorDA(calibration.SampleDataInit, ResidualLoRA):
    """LoRA initialized from the input covariance on sample data (CorDA).

    `enable_adapter(model, method="corda", data=...)` runs the model on the
    sample batches, accumulates each target layer's input covariance `C`,
    and initializes `A`, `B` from the SVD of `C K` (damped), with the
    residual frozen: the layer starts unchanged (to round-off). See the
    module docstring for the formulas. With a quantized base the residual
    is quantized after the decomposition, as PEFT advises.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `dropout`,
    `train_bias`, `seed`, `activation`, `merged` and `enabled`), and:

    Args:
        corda_method: `"ipm"` (instruction-previewed: adapt the `r` largest
            components) or `"kpm"` (knowledge-preserved: adapt the `r`
            smallest, keep the ones the data uses).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="d"),
        ...                           keras.layers.Dense(2)])
        >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
        >>> y0 = model.predict(x, verbose=0)
        >>> _ = keras_lowrank.enable_adapter(model, method="corda", rank=2, targets=["d"], data=x)
        >>> bool(np.allclose(model.predict(x, verbose=0), y0, atol=1e-4))
        True
    """

    method = "corda"
    calibration = "inputs"
    # a layer whose parent reads its kernel is never called, so the sample
    # data cannot reach it: it is left out
    serves_kernel = False
    #: embedding tables are refused by name (`calibration.SampleDataInit`)
    refuses_embeddings = True
    uses_svd = True
    OPTIONS = ResidualLoRA.OPTIONS + (
        opt.Option("corda_method", "ipm", opt.choice("ipm", "kpm"),
                   "'ipm': adapt the r largest components of C·K; 'kpm': the r smallest"),
    )

    @classmethod
    def calibrate(cls, model, targets, data, verbose):
        """Each target's input covariance: the mean over batches of
        `covariance_sum` of its input rows."""
        sums = {k: 0.0 for k in targets}
        counts = {k: 0 for k in targets}
        where = "enable_adapter(method='corda')"

        def on_batch(key, rows):
            try:
                sums[key] = sums[key] + covariance_sum(rows)
            except ValueError as e:
                raise ValueError(f"{where}: layer {key!r}: {e}.") from None
            counts[key] += 1

        calibration.input_rows(model, {k: (t[0], t[1]) for k, t in targets.items()}, data,
                               on_batch, where, verbose)
        return calibration.Calibrated({k: sums[k] / counts[k] for k in targets})

    def initial_factors(self, w):
        c = self.sample_data_found()
        w = np.asarray(keras.ops.convert_to_numpy(w), "float64")
        try:
            a, b = corda_factors(w, c, self.rank, self.scaling, self.corda_method, self.name)
        except ValueError as e:
            raise ValueError(f"CorDA init of layer {self.name!r}: {e}; the model was left unchanged.") from None
        return a.astype("float32"), b.astype("float32")
