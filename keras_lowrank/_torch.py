"""Torch-only fast paths, for the few hot spots where `keras.ops` costs
extra passes over the data on the torch backend.

Imported only when `keras.backend.backend() == "torch"`. Each function has
a `keras.ops` twin it must agree with bit for bit (tests/test_quantized.py
checks NF4's dequantization against bitsandbytes' arithmetic on every
backend).
"""

import torch

#: an integer dtype per row width in bytes: a row gathered as one word
_WORDS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def take_rows(table, indices):
    """`table[indices]` along axis 0 for non-negative integer `indices` of
    any integer dtype (`uint8` too).

    One `index_select` on int32 indices. `keras.ops.take` first makes an
    int64 copy of the indices and maps negative ones (`lt`, `add`,
    `where`): four more passes, which for NF4's per-step lookup of every
    code of every kernel cost about as much as the lookup itself. A table
    whose rows are 2, 4 or 8 bytes (NF4's pairs of float32 values) is
    gathered as a 1-D table of words, half the time of gathering rows.
    """
    flat = indices.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.to(torch.int32)
    row_bytes = table.element_size() * (table[0].numel() if table.ndim > 1 else 1)
    word = _WORDS.get(row_bytes) if table.ndim > 1 else None
    if word is not None:
        words = table.contiguous().view(word).reshape(table.shape[0])
        out = torch.index_select(words, 0, flat).view(table.dtype)
    else:
        out = torch.index_select(table, 0, flat)
    return out.reshape(tuple(indices.shape) + tuple(table.shape[1:]))


def times_rows(values, scale, dtype):
    """`values * scale[:, None]`, computed in `values`' dtype and rounded
    once into `dtype`, written straight into a `dtype` buffer (no full-size
    temporary of the product in float32)."""
    out = torch.empty(values.shape, dtype=getattr(torch, dtype), device=values.device)
    return torch.mul(values, scale.unsqueeze(-1), out=out)


def loss_gradients(variables, loss_fn):
    """The gradients of `loss_fn()` (a scalar computed with Keras layers)
    with respect to `variables` (Keras variables, trainable or not), at
    their current values: each parameter requires grad for the call, as it
    did before afterwards."""
    params = [v.value for v in variables]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn()
            return torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
