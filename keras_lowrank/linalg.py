"""Norms and QR of the matrix view, in float32, backend-neutral (the SVD
is `keras_lowrank.svd`), and the finiteness test of large tensors."""

import numpy as np
from keras import ops


class NonFiniteError(ValueError, FloatingPointError):
    """A computation on a layer's kernel (a merge, an SVD, an init, a
    combination) met or gave NaN or inf values. A `ValueError`, like every
    refusal, and a `FloatingPointError` for what it is."""


#: the smallest normal float32: the floor of a column norm
TINY = 1.1754944e-38


def column_norm(matrix):
    """L2 norm over the input axis (axis -2): one value per output column.

    Computed as `c · ‖m / c‖` with `c` the column's largest magnitude, so
    that squares neither underflow (values near 1e-30) nor overflow (near
    1e20) in float32, and floored at the smallest normal float32, so that a
    zero column gives a tiny norm instead of a division by zero.
    """
    m = ops.cast(matrix, "float32")
    scale = ops.max(ops.abs(m), axis=-2, keepdims=True)
    safe = ops.where(scale > 0, scale, ops.ones_like(scale))
    norm = ops.sqrt(ops.sum(ops.square(m / safe), axis=-2)) * ops.squeeze(safe, -2)
    return ops.maximum(norm, TINY)


def qr(matrix):
    """Reduced QR decomposition `M = Q R` in float32 (batched over leading
    axes): `Q: (..., m, k)` with orthonormal columns, `R: (..., k, n)`,
    `k = min(m, n)`. The same LAPACK convention (signs of `R`'s diagonal)
    as `numpy.linalg.qr` and `torch.linalg.qr`."""
    return ops.qr(ops.cast(matrix, "float32"), mode="reduced")


#: elements a NumPy finiteness test reads at a time (no kernel-sized temporary)
FINITE_CHUNK = 1 << 20


def all_finite(values):
    """Whether every value of a tensor, variable value or NumPy array is
    finite, without a temporary the size of `values`.

    A NumPy array (or a host view of a CPU tensor, `_compat.host_view`) is
    tested piece by piece. A device tensor is summed: the sum is NaN or inf
    when some value is, and a sum makes no temporary (TensorFlow's allocator
    would keep one the size of the kernel; `isfinite` on a bfloat16 tensor
    costs a float32 copy on some backends). A sum of finite values can
    still overflow: only then is `sum(x * 0)`, NaN exactly when some `x` is
    NaN or inf, taken to tell the two apart.
    """
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iub":  # (bfloat16, an ml_dtypes type, has kind "V")
            return True
        flat = values.reshape(-1)
        return all(
            bool(np.isfinite(flat[i : i + FINITE_CHUNK]).all())
            for i in range(0, flat.shape[0], FINITE_CHUNK)
        )
    if "float" not in str(getattr(values, "dtype", "float")):
        return True

    def finite(t):
        return bool(np.isfinite(ops.convert_to_numpy(ops.cast(t, "float32"))))

    return finite(ops.sum(values)) or finite(ops.sum(values * 0))
