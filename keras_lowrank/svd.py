"""The SVD engine every SVD-based method shares.

One function, `decompose`, gives the singular triplets of a kernel's matrix
view (`W = U diag(s) Vᵀ`, `W: (..., n_in, n_out)`, batched over the leading
axes of a batched EinsumDense kernel), in float32, for all of PiSSA, MiLoRA,
LoRA-XS, SVF, SVFT and SVD-training:

- `part="top"` or `"bottom"` with a `rank`, or the full reduced SVD;
- exact, or randomized (`niter` subspace iterations, top triplets only: a
  randomized range finder approximates the *top* subspace, so the bottom
  triplets are refused);
- computed on the host with NumPy, whatever the Keras backend, so an init
  takes the same time on jax, tensorflow and torch (the backends' own SVDs
  differ by up to 10x on a CPU). The exact path is an eigendecomposition of
  the smaller Gram matrix in float64 (`W Wᵀ` or `Wᵀ W`), then the other
  side's vectors as `W v / s`: faster than a float32 LAPACK SVD, and
  accurate to float32 for the minor triplets too (a float32 Gram matrix
  would not be). Triplets whose singular value is below the float64
  round-off of the Gram matrix are recomputed with a float64 SVD, so that a
  rank-deficient kernel still gets orthonormal vectors;
- signs fixed (the largest-magnitude entry of each output-side vector `v`
  is positive), so that the same kernel gives the same triplets on every
  backend and every run: methods that keep the singular vectors frozen
  recompute them when an adapter file is loaded instead of storing them.

`progress(count)` reports each kernel, naming its layer, when there are
more than a handful of them.
"""

import contextlib
import sys

import numpy as np

from keras_lowrank import arguments
from keras_lowrank import linalg
from keras_lowrank import options as opt

#: what users call (the rest serves the methods' inits)
__all__ = ["decompose", "singular_values"]

#: show a progress bar from this many kernels on
PROGRESS_FROM = 6

_progress = []
_labels = []


@contextlib.contextmanager
def layer_label(label):
    """Name the kernel being decomposed in the progress report (the plan
    gives each layer's path)."""
    _labels.append(label)
    try:
        yield
    finally:
        _labels.pop()


@contextlib.contextmanager
def progress(count, title="SVD", kind="svd"):
    """Report each `decompose(..., where=...)` call inside the block (each
    `tick(where, kind)` of this `kind`), with the layer's name, when
    `count` is at least `PROGRESS_FROM`: one line rewritten in place on a
    terminal or in a notebook, about ten lines in a log. Reports of other
    kinds nest (quantizing a model whose inits decompose its kernels)."""
    show = count >= PROGRESS_FROM
    if show:
        print(f"{title} of {count} kernels", flush=True)
    _progress.append({"show": show, "done": 0, "count": count, "title": title, "kind": kind})
    try:
        yield
    finally:
        state = _progress.pop()
        if state["show"] and _interactive():
            print(flush=True)


def _interactive():
    """A terminal or a notebook (which both honour a carriage return)."""
    tty = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
    return tty or "ipykernel" in sys.modules


def tick(where, kind="svd"):
    """One more kernel `where` done, in the innermost `progress` report of
    this `kind` (none: nothing)."""
    states = [s for s in _progress if s["kind"] == kind]
    if not states:
        return
    state = states[-1]
    state["done"] += 1
    if _labels:
        where = _labels[-1]
    if state["show"]:
        width = len(str(state["count"]))
        text = f"{state['title']} [{state['done']:>{width}}/{state['count']}] {where}"
        if _interactive():
            print("\r" + text.ljust(79)[:79], end="", flush=True)
        else:  # a log: about ten lines
            step = max(1, -(-state["count"] // 10))
            if state["done"] % step == 0 or state["done"] in (1, state["count"]):
                print(text, flush=True)


def as_numpy(matrix):
    """A float32 NumPy copy of a tensor, variable or array."""
    if not isinstance(matrix, np.ndarray):
        from keras import ops

        matrix = ops.convert_to_numpy(matrix)
    return np.asarray(matrix, dtype=np.float32)


def _fix_signs(u, v):
    """Make the largest-magnitude entry of each column of `v` positive
    (flipping `u`'s matching column): a deterministic choice among the
    `±` pairs every SVD may return."""
    idx = np.argmax(np.abs(v), axis=-2)  # (..., k)
    peak = np.take_along_axis(v, idx[..., None, :], axis=-2)
    sign = np.where(peak < 0, -1.0, 1.0).astype(v.dtype)
    return u * sign, v * sign


def _exact_one(w):
    """Full reduced SVD of one float32 matrix `(m, n)`: float64 Gram
    eigendecomposition on the smaller side."""
    m, n = w.shape
    tall = m >= n
    a = w.astype(np.float64)
    if tall:  # Gram Wᵀ W (n x n), its eigenvectors are V
        gram = a.T @ a
    else:  # W Wᵀ (m x m), its eigenvectors are U
        gram = a @ a.T
    evals, vecs = np.linalg.eigh(gram)  # LAPACK syevd
    evals, vecs = evals[::-1], vecs[:, ::-1]
    s = np.sqrt(np.maximum(evals, 0.0))
    # Below this, the Gram matrix's round-off swamps s²: those directions
    # carry no reliable vectors from W v / s.
    floor = np.sqrt(max(gram.shape) * np.finfo(np.float64).eps) * max(s[0], 1e-300) if s.size else 0.0
    good = s > floor
    if tall:
        other = (a @ vecs[:, good]) / s[good]
    else:
        other = (vecs[:, good].T @ a).T / s[good]
    if not np.all(good):
        # Rank-deficient: redo exactly in float64 (rare for trained kernels).
        u64, s64, vh64 = np.linalg.svd(a, full_matrices=False)
        return u64, s64, vh64.T
    if tall:
        return other, s, vecs
    return vecs, s, other


def _randomized_one(w, rank, niter, rng):
    """Top-`rank` triplets of one matrix by a randomized range finder with
    `niter` subspace iterations and no oversampling (as PEFT's
    `torch.svd_lowrank(q=rank)`)."""
    m, n = w.shape
    g = rng.standard_normal((n, rank)).astype(np.float32)
    q, _ = np.linalg.qr(w @ g)
    for _ in range(niter):
        z, _ = np.linalg.qr(w.T @ q)
        q, _ = np.linalg.qr(w @ z)
    ub, s, vh = np.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ ub).astype(np.float64), s.astype(np.float64), vh.T.astype(np.float64)


def decompose(matrix, rank=None, part="top", niter=None, seed=None, where=None):
    """Singular triplets of `matrix = U diag(s) Vᵀ` (float32, NumPy).

    Args:
        matrix: `(..., n_in, n_out)` tensor or array (a kernel's matrix view).
        rank: how many triplets (`None`: all `min(n_in, n_out)`).
        part: `"top"` (largest singular values) or `"bottom"` (smallest).
        niter: `None` for the exact SVD; an int for a randomized SVD with
            that many subspace iterations (top triplets only).
        seed: seed of the randomized SVD's test matrix (`None`: 0, so that
            the same kernel always gives the same init).
        where: the layer's name, for the progress bar and errors.

    Returns:
        `(U, s, V)`: `U (..., n_in, r)`, `s (..., r)` descending,
        `V (..., n_out, r)`, float32 NumPy arrays.

    Examples:

        >>> import numpy as np
        >>> from keras_lowrank import svd
        >>> w = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
        >>> u, s, v = svd.decompose(w, rank=2, part="bottom")
        >>> np.allclose(s, np.linalg.svd(w, compute_uv=False)[-2:], rtol=1e-5)
        True
    """
    if part not in ("top", "bottom"):
        raise ValueError(f"part must be 'top' or 'bottom'; received {part!r}.")
    rank = arguments.check("svd.decompose", "rank", rank, opt.positive_int_or_none)
    niter = arguments.check("svd.decompose", "niter", niter, opt.nonneg_int_or_none)
    seed = arguments.check("svd.decompose", "seed", seed, opt.seed)
    w = as_numpy(matrix)
    k = min(w.shape[-2:])
    r = k if rank is None else int(rank)
    label = f"layer {where!r}" if where else "the matrix"
    if not 1 <= r <= k:
        raise ValueError(
            f"SVD of {label}: rank={rank} does not fit a {w.shape[-2]}x{w.shape[-1]} matrix "
            f"(1 <= rank <= {k})."
        )
    if not np.all(np.isfinite(w)):
        raise linalg.NonFiniteError(f"SVD of {label}: the kernel has NaN or inf values.")
    if niter is not None and part == "bottom":
        raise ValueError(
            f"SVD of {label}: a randomized SVD approximates the top singular "
            "subspace only; the smallest triplets need the exact SVD (niter=None)."
        )
    batch = w.shape[:-2]
    flat = w.reshape((-1,) + w.shape[-2:])
    rng = np.random.default_rng(0 if seed is None else seed)
    us, ss, vs = [], [], []
    for one in flat:
        if niter is None:
            u, s, v = _exact_one(one)
            if part == "top":
                u, s, v = u[:, :r], s[:r], v[:, :r]
            else:
                u, s, v = u[:, k - r:], s[k - r:], v[:, k - r:]
        else:
            u, s, v = _randomized_one(one, r, int(niter), rng)
        u, v = _fix_signs(u, v)
        us.append(u.astype(np.float32))
        ss.append(s.astype(np.float32))
        vs.append(v.astype(np.float32))
    tick(where)

    def stack(parts, tail):
        return np.stack(parts).reshape(batch + tail)

    return (
        stack(us, (w.shape[-2], r)),
        stack(ss, (r,)),
        stack(vs, (w.shape[-1], r)),
    )


def singular_values(matrix):
    """All singular values of `matrix` (`(..., n_in, n_out)`), descending,
    float32 NumPy: the eigenvalues of the smaller Gram matrix in float64."""
    w = as_numpy(matrix)
    flat = w.reshape((-1,) + w.shape[-2:]).astype(np.float64)
    out = []
    for a in flat:
        gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
        ev = np.linalg.eigvalsh(gram)[::-1]
        out.append(np.sqrt(np.maximum(ev, 0.0)))
    return np.stack(out).reshape(w.shape[:-2] + (min(w.shape[-2:]),)).astype(np.float32)
