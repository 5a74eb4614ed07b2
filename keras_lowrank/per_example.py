"""A different adapter per example: how an `AdapterSet` computes a mixed batch.

While a selection is in place (`selecting(...)`, entered by
`keras_lowrank.serving` inside the traced call), every `AdapterSet` of the
model computes each example with that example's adapters instead of the
model-wide gates. A selection is two `(batch, m)` tensors over the model's
adapter names (`names`): `index` (which adapter, `-1` or any index outside
`names`: none) and `weight` (its weight). Example `e` then computes

    y_e = y0_e + Σ_j weight[e, j] (adapter_{index[e, j]}(x)_e - y0_e)

at every layer: with one index of weight 1 per example, exactly what the
model computes with only that adapter active.

Members of a set compute their part in one of two ways, as their class
declares (`Adapter.per_example`):

- `"factors"`: the member's update is the plain LoRA its `as_lora_state()`
  gives (for adapters that rewrite the base, relative to the original base,
  which is the part they give back while inactive). The set stacks those
  factors, zero-padded to the largest rank, gathers them by example and
  multiplies in two batched einsums: one pass for every such member,
  however many adapters the batch mixes. DoRA (`"factors_gain"`) adds a gathered
  per-column gain on the base output.
- `"own"`: the member computes its output for the whole batch, and each
  example keeps it with its own weight (exact for any method whose output
  for one example does not depend on the others).

A class with `per_example = None` (Lily: its router mixes its projectors
over the whole batch) is refused by name, as are expert stacks (their rows
are tokens routed to experts, not examples). The selection is a Python
context around the traced call, so changing its values never retraces.
"""

import contextlib
import threading

import keras
import numpy as np
from keras import ops

from keras_lowrank.adapter import rewrites

_STATE = threading.local()

#: the per-example kinds an `Adapter` class may declare
KINDS = ("factors", "factors_gain", "own")
#: the kinds gathered per example
GATHERED = KINDS[:2]


class Selection:
    """The adapters of each example in a batch (see the module docstring)."""

    def __init__(self, names, index, weight):
        self.names = tuple(names)
        self.index = ops.cast(index, "int32")
        self.weight = ops.cast(weight, "float32")
        self._safe = None
        self._local = {}  # per layer table: the same for layers with the same adapters

    def local(self, table):
        """`(batch, m)`: `table[index]`, an index outside the names taking
        the table's last entry (none)."""
        key = table.tobytes()
        if key not in self._local:
            if self._safe is None:
                k = len(self.names)
                self._safe = ops.where(ops.logical_or(self.index < 0, self.index >= k), k, self.index)
            self._local[key] = ops.take(ops.convert_to_tensor(table), self._safe, axis=0)
        return self._local[key]

    def column(self, name):
        """`(batch,)`: the weight each example gives the adapter `name`."""
        if name not in self.names:
            return ops.zeros_like(self.weight[:, 0])
        hit = ops.cast(ops.equal(self.index, self.names.index(name)), "float32")
        return ops.sum(hit * self.weight, axis=1)


def current():
    """The selection in place (`None`: the gates decide)."""
    return getattr(_STATE, "selection", None)


@contextlib.contextmanager
def selecting(selection):
    """Compute every `AdapterSet` called inside per example."""
    before = current()
    _STATE.selection = selection
    try:
        yield selection
    finally:
        _STATE.selection = before


# ----------------------------------------------------------------------
def refusal(where, member, name):
    """Why `member` (adapter `name` of the layer at `where`) cannot run per
    example, or `None`."""
    kind = getattr(member, "per_example", "own")
    if kind is None:
        return (f"layer {where!r}: adapter {name!r} is a {member.method!r} adapter, whose "
                "output for one example depends on the others in the batch; it cannot "
                "run per example (serve it alone with set_active, or merge it).")
    if not batch_first(member.geometry):
        return (f"layer {where!r} is a stack of experts: its rows are tokens routed to "
                "experts, not examples, so it cannot take an adapter per example.")
    return None


def batch_first(geometry):
    """Whether the layer's output starts with the input's batch axis (not
    an axis of the kernel, as in a stack of experts)."""
    if getattr(geometry, "broadcast", None):
        return False
    out = getattr(geometry, "_out", None)
    if not out or out.startswith("..."):
        return True
    return out[0] not in getattr(geometry, "_ker", "")


def _per_row(weight, y):
    """`(batch,)` weights broadcast over `y`, whose first axis is the batch
    or the batch's rows flattened example by example (`batch × t`)."""
    rows = ops.shape(y)[0]
    batch = ops.shape(weight)[0]
    if not (isinstance(rows, int) and isinstance(batch, int) and rows == batch):
        weight = ops.repeat(weight, rows // batch, axis=0)
    return ops.reshape(ops.cast(weight, y.dtype), (-1,) + (1,) * (len(y.shape) - 1))


def _kind(member, training):
    kind = getattr(member, "per_example", "own")
    if kind in GATHERED:
        # a subclass with a forward of its own computes its own part
        owner = next(c for c in type(member).__mro__ if "per_example" in c.__dict__)
        if type(member).adapter_output is not owner.adapter_output:
            kind = "own"
    if kind in GATHERED and (training or member.geometry.batch_shape
                                     or hasattr(member.geometry, "rows_times")):
        return "own"  # dropout, heads sharing a kernel axis, convs, embeddings
    return kind


def mixed_output(aset, x, y0, selection, training):
    """The output (before the activation) of the `AdapterSet` `aset` for the
    batch `x`, each example with its own adapters; `y0` is the frozen
    layer's output."""
    y = y0
    gathered = []
    for name, member in aset.members.items():
        why = refusal(aset.name, member, name)
        if why is not None:
            raise ValueError(why)
        kept = member.base_output(x, y0) if rewrites(member) else None
        if kept is not None:
            y = y + (kept - y0)
        kind = _kind(member, training)
        if kind in GATHERED and name in selection.names:
            gathered.append((selection.names.index(name), member, kind))
            continue
        weight = selection.column(name)
        out = member.adapter_output(x, y0, training)
        y = y + _per_row(weight, y0) * (out - (y0 if kept is None else kept))
    if gathered:
        y = y + _gathered_update(aset, x, y0, gathered, selection)
    return y


def _as(x, dtype):
    """`x` in `dtype` (no cast op where it is already: each op costs on an
    eager backend)."""
    return x if keras.backend.standardize_dtype(x.dtype) == dtype else ops.cast(x, dtype)


def _gathered_update(aset, x, y0, gathered, selection):
    """`Σ_j w[e, j] Δ_{index[e, j]}(x_e)` for the LoRA-form members
    `gathered` (`[(index in names, member, kind)]`), by gathering each
    example's factors from one zero-padded stack."""
    g = aset.geometry
    rows = g.inputs_to_rows(x)  # (N, n_in), example by example
    dtype = rows.dtype
    a_list, b_list, gains = [], [], []
    for _, member, kind in gathered:
        a_t, b, gain = member.per_example_factors()
        a_list.append(_as(a_t, dtype))
        b_list.append(_as(b, dtype))
        gains.append(None if gain is None else _as(gain, dtype))
    r_max = max(int(a.shape[0]) for a in a_list)

    def stack(parts, width):
        padded = [p if int(p.shape[0]) == r_max else ops.pad(p, [[0, r_max - int(p.shape[0])], [0, 0]])
                  for p in parts]
        return ops.stack(padded + [ops.zeros((r_max, width), dtype)])  # the last: no adapter

    a_stack = stack(a_list, g.n_in)  # (k + 1, r, n_in)
    b_stack = stack(b_list, g.n_out)  # (k + 1, r, n_out)
    # model-wide index -> place in the stack (k: none, or not on this layer)
    table = np.full(len(selection.names) + 1, len(gathered), "int32")
    for place, (i, _, _) in enumerate(gathered):
        table[i] = place
    local = selection.local(table)  # (batch, m)
    weight = _as(selection.weight, dtype)
    batch = ops.shape(local)[0]
    xr = ops.reshape(rows, (batch, -1, g.n_in))
    # each example's m adapters side by side: (batch, m r, ·) factors, and
    # two batched matmuls (faster than einsum on torch's CPU kernels)
    m = local.shape[1]
    a_g = ops.reshape(ops.take(a_stack, local, axis=0), (batch, m * r_max, g.n_in))
    b_g = ops.reshape(ops.take(b_stack, local, axis=0), (batch, m * r_max, g.n_out))
    h = ops.matmul(xr, ops.swapaxes(a_g, -1, -2))  # (batch, t, m r)
    h = h * ops.reshape(ops.repeat(weight, r_max, axis=1), (batch, 1, m * r_max))
    delta = ops.matmul(h, b_g)
    if any(gain is not None for gain in gains):
        gain_stack = ops.stack([ops.zeros((g.n_out,), dtype) if gain is None else gain
                                for gain in gains] + [ops.zeros((g.n_out,), dtype)])
        per_example = ops.einsum("bm,bmn->bn", weight, ops.take(gain_stack, local, axis=0))
        base = y0
        bias = getattr(aset.layer, "bias", None)
        if bias is not None:
            base = base - ops.cast(bias, base.dtype)
        base_rows = ops.reshape(ops.cast(g.outputs_to_rows(base), dtype), (batch, -1, g.n_out))
        delta = delta + base_rows * per_example[:, None, :]
    delta = ops.reshape(delta, (-1, g.n_out))
    return ops.cast(g.rows_to_outputs(delta, x), y0.dtype)
