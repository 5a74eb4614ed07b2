"""SVD and norms for the matrix view, in float32, backend-neutral."""

import keras
from keras import ops


def _t(m):
    return ops.swapaxes(m, -1, -2)


def svd(matrix, rank=None, niter=None, seed=None):
    """Singular value decomposition `W = U diag(s) V^T` in float32.

    Args:
        matrix: `(..., n_in, n_out)` tensor.
        rank: keep the top `rank` triplets (all `min(n_in, n_out)` if None).
        niter: `None` for an exact SVD; an int for a randomized SVD with that
            many subspace iterations (Halko et al.; no oversampling, as
            `torch.svd_lowrank(q=rank)` used by PEFT's `pissa_niter_n`).
        seed: seed of the random test matrix of the randomized SVD.

    Returns:
        `(U, s, V)` with `U: (..., n_in, k)`, `s: (..., k)`, `V: (..., n_out, k)`,
        singular values in descending order.
    """
    w = ops.cast(matrix, "float32")
    if niter is None:
        u, s, vh = ops.svd(w, full_matrices=False)
        v = _t(vh)
    else:
        u, s, v = randomized_svd(w, rank, int(niter), seed=seed)
    if rank is not None:
        u, s, v = u[..., :rank], s[..., :rank], v[..., :, :rank]
    return u, s, v


def randomized_svd(w, rank, niter, seed=None):
    """Randomized range finder + small exact SVD, in keras.ops."""
    if rank is None:
        raise ValueError("A randomized SVD needs a rank.")
    n_out = w.shape[-1]
    batch = tuple(w.shape[:-2])
    g = keras.random.normal(batch + (n_out, rank), seed=seed, dtype="float32")
    q, _ = ops.qr(ops.matmul(w, g))
    for _ in range(niter):
        z, _ = ops.qr(ops.matmul(_t(w), q))
        q, _ = ops.qr(ops.matmul(w, z))
    small = ops.matmul(_t(q), w)  # (rank, n_out)
    ub, s, vh = ops.svd(small, full_matrices=False)
    return ops.matmul(q, ub), s, _t(vh)


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
