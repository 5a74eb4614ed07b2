"""Quantized frozen bases (NF4 with double quantization)."""

import numpy as np
from keras import ops

from keras_lowrank import svd
from keras_lowrank.quant import nf4


def _nf4_roundtrip(matrix, double_quant=True):
    """Quantize and dequantize a (n_in, n_out) matrix in NF4's layout."""
    wt = ops.reshape(ops.transpose(ops.convert_to_tensor(matrix, "float32")), (-1,))
    state = nf4.quantize_nf4(wt, double_quant=double_quant)
    n_in, n_out = matrix.shape
    flat = nf4.dequantize_nf4(state, n_in * n_out)
    return ops.transpose(ops.reshape(flat, (n_out, n_in)))


def error_report(kernel, rank, alpha=None, double_quant=True):
    """NF4 error of a kernel alone vs. with QPiSSA's residual quantization.

    `nf4_error = ‖K - nf4(K)‖_F / ‖K‖_F`; `qpissa_error = ‖K - (nf4(K_res) +
    s A B)‖_F / ‖K‖_F` with `K_res = K - s A B` from the top-`rank` SVD
    (arXiv 2404.02948). `kernel` is a matrix view `(n_in, n_out)`.

    Examples:

        >>> import numpy as np
        >>> from keras_lowrank.quant import error_report
        >>> k = np.random.RandomState(0).normal(size=(128, 64)).astype("float32")
        >>> r = error_report(k, rank=8)
        >>> sorted(r)
        ['nf4_error', 'qpissa_error', 'reduction']
    """
    k = ops.convert_to_tensor(np.asarray(kernel, dtype="float32"))
    norm = float(ops.convert_to_numpy(ops.sqrt(ops.sum(k * k))))
    plain = k - _nf4_roundtrip(k, double_quant)
    u, s, v = svd.decompose(k, rank=rank)
    principal = ops.convert_to_tensor((u * s[None, :]) @ v.T)
    residual = k - principal
    q = k - (_nf4_roundtrip(residual, double_quant) + principal)
    e_plain = float(ops.convert_to_numpy(ops.sqrt(ops.sum(plain * plain)))) / norm
    e_q = float(ops.convert_to_numpy(ops.sqrt(ops.sum(q * q)))) / norm
    return {"nf4_error": e_plain, "qpissa_error": e_q, "reduction": 1.0 - e_q / e_plain}
