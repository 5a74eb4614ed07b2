"""What trains in a model with adapters: freezing everything but the
adapters (and the layers kept trainable), saving and restoring every
trainable flag, and the layers a KerasHub task trains in full."""

import keras

from keras_lowrank import _compat
from keras_lowrank import targeting
from keras_lowrank import tree


def trainable_flags(model):
    """The trainable flags of every layer and variable of `model` (inside
    adapters too), for `restore_trainable_flags`."""
    layers = tree.all_layers_with_root(model)
    return (
        [(layer, layer.trainable) for layer in layers],
        [(v, v.trainable) for layer in layers for v in _compat.created_trainable(layer)],
    )


def restore_trainable_flags(flags):
    """Put back the flags `trainable_flags` saw."""
    layer_flags, var_flags = flags
    for layer, value in layer_flags:
        layer.trainable = value
    for v, value in var_flags:
        v.trainable = value


def freeze(model, trainable_layers=None, entries=None):
    """Freeze everything but the adapters (and the layers the user names).

    `entries`: a `tree.walk(model)` already made, to read instead of walking
    the model again."""
    entries = tree.walk(model) if entries is None else entries
    keep = targeting.matching_entries(
        entries, targeting.patterns(trainable_layers, "trainable_layers"), "trainable_layers"
    )
    model.trainable = True
    for layer in [model] + [e.layer for e in entries]:
        if tree.is_adapter(layer):
            continue
        for v in _compat.created_trainable(layer):
            v.trainable = False
    for entry in keep:
        entry.layer.trainable = True
        for sub in [entry.layer] + [e.layer for e in tree.walk(entry.layer, into_adapters=True)]:
            for v in _compat.created_trainable(sub):
                v.trainable = True
    for entry in entries:
        if tree.is_adapter(entry.layer):
            entry.layer.trainable = True
            entry.layer.freeze_base()
    for entry in entries:
        if tree.is_adapter_set(entry.layer):
            entry.layer.apply_trainable()


def task_entries(model, entries):
    """The layers a KerasHub task adds around its backbone that hold
    weights (a classifier's head), as top-level entries of `entries`; none
    for any other model. A causal LM's head is its backbone's tied
    embedding, so it has none."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, keras.layers.Layer) or backbone is model:
        return []
    inside = {id(layer) for layer in backbone._flatten_layers()}
    return [e for e in entries if "/" not in e.path and id(e.layer) not in inside
            and not isinstance(e.layer, keras.layers.InputLayer) and e.layer.weights]
