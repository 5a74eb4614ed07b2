"""4-bit NormalFloat (NF4) with optional double quantization, in keras.ops.

Bit-compatible with bitsandbytes' `quantize_4bit(..., quant_type="nf4")`:
the values are taken in the order of the flattened *torch-layout* weight
(`Wᵀ` of the matrix view, row-major: 64 consecutive input features of one
output unit per block), each block is scaled by `1 / absmax` (the tail block
is divided by its absmax), clipped to [-1, 1] and mapped to the nearest NF4
value (a value on a midpoint goes down), and two codes share a byte, the
first in the high nibble. Double quantization stores the absmax constants as
8-bit codes of bitsandbytes' signed dynamic map, in blocks of 256, after
subtracting their mean.

Quantizing (once per kernel) runs on the host in float32 NumPy, piece by
piece; dequantizing (every forward) runs in `keras.ops` on the device.
"""

import keras
import numpy as np
from keras import ops

from keras_lowrank import _compat
from keras_lowrank import linalg
from keras_lowrank.quant._dynamic_map import DYNAMIC_MAP

#: the bitsandbytes NF4 table (index 0..15)
NF4_TABLE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
        0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype="float32",
)

#: the two NF4 values of every byte: [NF4[b >> 4], NF4[b & 15]]
NF4_PAIRS = np.stack([NF4_TABLE[np.arange(256) // 16], NF4_TABLE[np.arange(256) % 16]], axis=-1)

BLOCK = 64
ABSMAX_BLOCK = 256
#: values quantized at a time (a multiple of BLOCK): quantizing a kernel of
#: any size holds only this many float32 values and their codes in flight
CHUNK = 1 << 16
#: codes written out at a time by `quantize_nf4_chunks` (one write per
#: piece costs TensorFlow a slice assignment each)
WRITE_BYTES = 1 << 20


def _midpoints(code):
    code = np.asarray(code, np.float32)
    return (code[:-1] + code[1:]) / np.float32(2.0)


def _bucketize(x, bounds):
    """torch.bucketize(x, bounds, right=False): the number of bounds < x."""
    return np.searchsorted(bounds, x, side="left").astype(np.int32)


def _nf4_codes(x, bounds):
    """`_bucketize` for NF4's 15 bounds, as uint8: the count of bounds below
    each value, one vectorized comparison per bound (about 6x faster than
    NumPy's per-value binary search on a piece, the same codes)."""
    q = np.zeros(x.shape, np.uint8)
    for b in bounds:
        q += x > b
    return q


_TINY = np.float32(1e-38)  # bitsandbytes' floor of a tail block's absmax
_ONE = np.float32(1.0)


def _blockwise_scale(flat, block):
    """Per-block absmax and the scaled values, bitsandbytes' arithmetic, in
    float32 NumPy: full blocks are multiplied by `1 / absmax`, the tail
    block divided by its absmax; clipped to [-1, 1]; an all-zero block
    scales to 0 (bitsandbytes divides it by 1e-38)."""
    n = flat.shape[0]
    rem = n % block
    full = n - rem
    scaled = np.empty((n,), np.float32)
    absmax = []
    if full:
        com = flat[:full].reshape(full // block, block)
        am = np.abs(com).max(axis=-1)
        nonzero = am > 0
        inv = _ONE / np.where(nonzero, am, _ONE)
        block_scaled = np.clip(com * inv[:, None], -_ONE, _ONE)
        block_scaled[~nonzero] = 0
        scaled[:full] = block_scaled.reshape(-1)
        absmax.append(am)
    if rem:
        tail = flat[full:]
        am = np.abs(tail).max()
        scaled[full:] = np.clip(tail / am, -_ONE, _ONE) if am > 0 else 0
        absmax.append(np.array([am if am > 0 else _TINY], np.float32))
    return scaled, (np.concatenate(absmax) if len(absmax) > 1 else absmax[0])


def _host_float32(values):
    """A flat float32 NumPy array of a tensor, variable or array (any float dtype)."""
    if not isinstance(values, np.ndarray):
        values = ops.convert_to_numpy(values)
    return np.asarray(values).astype(np.float32, copy=False).reshape(-1)


def check_finite(values, where="kernel"):
    if not linalg.all_finite(values):
        raise ValueError(
            f"NF4 quantization of {where}: the values contain NaN or inf, "
            "which have no 4-bit code."
        )


def quantize_blockwise_8bit(values, block=ABSMAX_BLOCK, code=None):
    """8-bit blockwise quantization with the dynamic map: (codes, absmax),
    NumPy arrays."""
    code = DYNAMIC_MAP if code is None else code
    scaled, absmax = _blockwise_scale(_host_float32(values), block)
    return _bucketize(scaled, _midpoints(code)).astype(np.uint8), absmax


def dequantize_blockwise_8bit(codes, absmax, block=ABSMAX_BLOCK, code=None):
    code = ops.convert_to_tensor(DYNAMIC_MAP if code is None else code, "float32")
    n = codes.shape[0]
    vals = _take_rows(code, codes)
    return _times_block_absmax(vals, absmax, block, n)


def _take_rows(table, codes):
    """`table[codes]` along axis 0, for unsigned integer codes."""
    if keras.backend.backend() == "torch":  # keras.ops.take's int64 copy and
        from keras_lowrank import _torch  # negative-index fix cost 4 passes

        return _torch.take_rows(table, ops.convert_to_tensor(codes))
    return ops.take(table, ops.cast(codes, "int32"), axis=0)


def _times_block_absmax(vals, absmax, block, n, dtype="float32"):
    """`vals * absmax` per block, in float32, then cast to `dtype` (how
    bitsandbytes dequantizes to bfloat16/float16: a float32 product, rounded
    once)."""
    n_blocks = absmax.shape[0]
    pad = n_blocks * block - n
    if pad:
        vals = ops.concatenate([vals, ops.zeros((pad,), vals.dtype)])
    vals = ops.reshape(vals, (n_blocks, block))
    if keras.backend.backend() == "torch":  # the product written once, in `dtype`
        from keras_lowrank import _torch

        out = _torch.times_rows(vals, ops.convert_to_tensor(absmax, "float32"), dtype)
    else:
        out = vals * ops.expand_dims(absmax, -1)
        if dtype != "float32":
            out = ops.cast(out, dtype)
    out = ops.reshape(out, (-1,))
    return out[:n] if pad else out


def quantize_nf4(values, double_quant=True, block=BLOCK, where="kernel"):
    """Quantize a float tensor (taken in row-major order) to NF4.

    Returns a dict of NumPy arrays: `codes` (uint8, two per byte), and either
    `absmax` (float32, one per block) or, with double quantization,
    `absmax_codes` (uint8), `absmax_scale` (float32, one per 256 blocks) and
    `absmax_offset` (float32 scalar).
    """
    flat = values.reshape(-1) if isinstance(values, np.ndarray) else ops.reshape(values, (-1,))
    n = flat.shape[0]
    return quantize_nf4_chunks(
        (flat[i : i + CHUNK] for i in range(0, n, CHUNK)), n, double_quant, block, where
    )


def quantize_nf4_chunks(chunks, numel, double_quant=True, block=BLOCK, where="kernel", write_codes=None):
    """`quantize_nf4` of values given piece by piece.

    `chunks` yields consecutive pieces of the flat values (tensors or
    arrays of any float dtype), each a multiple of `block` long except the
    last; only one piece is in flight at a time, so a kernel much larger
    than `CHUNK` quantizes without a float32 copy of it. The arithmetic runs
    on the host in float32 NumPy, like the SVD engine: the same codes on
    every backend, and no backend op compiled per piece shape (eager JAX
    would keep each compiled op). The codes and block constants are the same
    as from one call on all the values (blocks never straddle pieces).

    `write_codes(start, piece)`, if given, receives the codes piece by
    piece (from byte `start`) instead of one array of them in the result:
    where a variable can be written in place, no host copy of the codes is
    made at all.
    """
    codes = None
    if write_codes is None:
        # aligned: JAX on the CPU then takes the codes without a copy
        codes = _compat.aligned_empty(((numel + 1) // 2,), np.uint8)

        def write_codes(start, piece):
            codes[start : start + piece.shape[0]] = piece

    pending = []  # codes handed to `write_codes` WRITE_BYTES at a time

    def flush():
        if pending:
            start = pending[0][0]
            write_codes(start, pending[0][1] if len(pending) == 1 else np.concatenate([p for _, p in pending]))
            pending.clear()

    absmax = np.empty((-(-numel // block),), np.float32)
    bounds = _midpoints(NF4_TABLE)
    pos = 0
    for chunk in chunks:
        if pos % block:
            raise ValueError(f"NF4 quantization of {where}: a piece ends inside a block.")
        chunk = _host_float32(chunk)
        m = int(chunk.shape[0])
        check_finite(chunk, where)
        scaled, am = _blockwise_scale(chunk, block)
        q = _nf4_codes(scaled, bounds)
        if m % 2:
            q = np.concatenate([q, np.full((1,), 7, np.uint8)])  # 0.0 pads
        pending.append((pos // 2, (q[0::2] * 16 + q[1::2]).astype(np.uint8, copy=False)))
        if len(pending) * (CHUNK // 2) >= WRITE_BYTES:
            flush()
        absmax[pos // block : pos // block + am.shape[0]] = am
        pos += m
    flush()
    if pos != numel:
        raise ValueError(f"NF4 quantization of {where}: {pos} values given, {numel} expected.")
    out = {} if codes is None else {"codes": codes}
    if double_quant:
        # The mean in float64: the same offset on every backend.
        offset = np.float32(absmax.astype(np.float64).mean())
        q2, absmax2 = quantize_blockwise_8bit(absmax - offset)
        out.update(absmax_codes=q2, absmax_scale=absmax2, absmax_offset=np.asarray(offset, np.float32))
    else:
        out["absmax"] = absmax
    return out


def dequantize_absmax(state, n_blocks=None):
    if "absmax" in state:
        return ops.cast(state["absmax"], "float32")
    am = dequantize_blockwise_8bit(state["absmax_codes"], state["absmax_scale"])
    return am + ops.cast(state["absmax_offset"], "float32")


def dequantize_nf4(state, numel, block=BLOCK, dtype="float32"):
    """The values (flat, row-major) of an NF4 state, in `dtype`.

    Each value is `NF4[code] * absmax` in float32, rounded once to `dtype`:
    bit-identical to bitsandbytes' `dequantize_4bit` into that dtype."""
    # One lookup per byte gives both values (high nibble first).
    vals = ops.reshape(_take_rows(ops.convert_to_tensor(NF4_PAIRS), state["codes"]), (-1,))
    vals = vals[:numel] if vals.shape[0] != numel else vals
    return _times_block_absmax(vals, dequantize_absmax(state), block, numel, dtype)


def storage_bits(state, numel):
    """Bits per quantized value, from the stored arrays."""
    total = 0
    for v in state.values():
        arr = np.asarray(ops.convert_to_numpy(v))
        total += arr.size * arr.dtype.itemsize * 8
    return total / numel
