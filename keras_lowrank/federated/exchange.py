"""What a federated client and its server exchange: adapter arrays only.

An adapted model's exchanged state is the trainable variables of its
adapter layers, keyed by `"<layer key>/<variable name>"` (the stable layer
keys of adapter files, so two builds of the same architecture agree in any
process). At a DyLoRA rank `ℓ` the DyLoRA factors are cut to their first
`ℓ` components (`A[:ℓ]`, `B[:ℓ]`, the layer's own `ceil(ℓ r / R)` for a
layer of smaller rank): a client never receives, trains or sends a coordinate
above the round's rank. No base weight is ever part of it: the base is
identified by a fingerprint, so a client whose base differs from the
server's refuses the round instead of training a mismatched adapter.
"""

import hashlib
from collections.abc import Mapping

import keras
import numpy as np
from keras import ops

from keras_lowrank import tree

#: separator between a layer key and a variable name
SEP = "/"


def adapter_entries(model, where="keras_lowrank.federated"):
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"{where}: model must be a Keras model with adapters; received "
                        f"model={model!r}.")
    entries = [e for e in tree.walk(model) if tree.is_adapter(e.layer)]
    if not entries:
        raise ValueError(
            f"{where}: model {model.name!r} has no adapters: call enable_adapter on it "
            "before federating it."
        )
    merged = [e.key for e in entries if e.layer.merged]
    if merged:
        raise ValueError(f"{where}: model {model.name!r}: the adapters {merged} are merged; "
                         "unmerge(model) first.")
    return entries


def max_rank(model):
    """The model's largest nested rank `R` (DyLoRA's: its adapters stay
    working adapters when cut to any rank), or `None` without such
    adapters."""
    limits = [e.layer.nested_rank_limit() for e in tree.walk(model)
              if tree.is_adapter(e.layer) and e.layer.nested_factors]
    return max(limits) if limits else None


def _layer_rank(adapter, rank):
    if rank is None or not adapter.nested_factors:
        return None
    return int(ops.convert_to_numpy(adapter.layer_rank(ops.convert_to_tensor(rank, "int32"))))


def _check_rank(model, rank, where):
    if rank is None:
        return None
    big = max_rank(model)
    if big is None:
        raise ValueError(
            f"{where}: model {model.name!r} has no DyLoRA adapters; a rank "
            f"(received rank={rank!r}) only applies to DyLoRA."
        )
    message = f"{where}: rank must be None or an int in [1, {big}]; received rank={rank!r}."
    if isinstance(rank, (bool, np.bool_)) or not isinstance(rank, (int, np.integer)):
        raise TypeError(message)
    if not 1 <= rank <= big:
        raise ValueError(message)
    return int(rank)


def adapter_arrays(model, rank=None):
    """`{key: numpy array}` of the model's trainable adapter variables, the
    DyLoRA factors cut to rank `rank` (`None`, or an int in [1, R]: all
    of them for `None`)."""
    where = "adapter_arrays"
    entries = adapter_entries(model, where)
    rank = _check_rank(model, rank, where)
    out = {}
    for e in entries:
        cut = _layer_rank(e.layer, rank)
        for v in e.layer.trainable_weights:
            name = v.name.split("/")[-1]
            value = np.asarray(ops.convert_to_numpy(v))
            if cut is not None and name in e.layer.nested_factors:
                value = value[..., :cut, :]
            out[f"{e.key}{SEP}{name}"] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def set_adapter_arrays(model, arrays, rank=None):
    """Write `arrays` (as `adapter_arrays(model, rank)` gives them) into the
    model; DyLoRA components above `rank` keep their values. The whole set
    is checked (keys, shapes, finite real values) before anything is
    written."""
    where = "set_adapter_arrays"
    entries = adapter_entries(model, where)
    rank = _check_rank(model, rank, where)
    if not isinstance(arrays, Mapping):
        raise TypeError(f"{where}: arrays must be a dict of arrays (as adapter_arrays gives them); "
                        f"received arrays of type {type(arrays).__name__}.")
    expected = {}
    targets = {}
    for e in entries:
        cut = _layer_rank(e.layer, rank)
        for v in e.layer.trainable_weights:
            name = v.name.split("/")[-1]
            shape = tuple(v.shape)
            if cut is not None and name in e.layer.nested_factors:
                shape = shape[:-2] + (cut, shape[-1])
            key = f"{e.key}{SEP}{name}"
            expected[key] = shape
            targets[key] = (v, cut if name in e.layer.nested_factors else None)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: model {model.name!r}: the adapter arrays do not fit its adapters "
            f"(missing: {missing[:5]}, unexpected: {extra[:5]})."
        )
    values = {}
    for key, shape in expected.items():
        value = np.asarray(arrays[key])
        if not (np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)):
            raise TypeError(
                f"{where}: model {model.name!r}: array {key!r} must hold real numbers; "
                f"received dtype {value.dtype}."
            )
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{where}: model {model.name!r}: array {key!r} has shape {tuple(value.shape)}; "
                f"the adapter needs {shape}."
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{where}: model {model.name!r}: array {key!r} holds non-finite values.")
        values[key] = value
    for key, value in values.items():
        v, cut = targets[key]
        if cut is not None:
            full = np.array(ops.convert_to_numpy(v))
            full[..., :cut, :] = value
            value = full
        v.assign(value.astype(v.dtype))


def base_fingerprint(model):
    """A SHA-256 hex digest of every frozen weight of the adapted layers
    (kernels, quantized codes and scales, biases): two models share a base
    exactly when their fingerprints agree."""
    h = hashlib.sha256()
    for e in adapter_entries(model, "base_fingerprint"):
        for v in e.layer.layer.non_trainable_weights:
            value = np.ascontiguousarray(ops.convert_to_numpy(v))
            h.update(e.key.encode())
            h.update(str(value.dtype).encode() + str(value.shape).encode())
            h.update(value.tobytes())
    return h.hexdigest()


def update_norm(new, old):
    """The L2 norm of `new - old` over every array (dicts of arrays)."""
    return float(np.sqrt(sum(np.sum((np.asarray(new[k], np.float64) - old[k]) ** 2) for k in new)))
