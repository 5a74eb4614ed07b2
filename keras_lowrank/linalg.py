"""Norms and QR of the matrix view, in float32, backend-neutral (the SVD
is `keras_lowrank.svd`)."""

from keras import ops


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
