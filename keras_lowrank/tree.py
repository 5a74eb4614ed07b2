"""Walking a Keras model's layer tree, and swapping one layer for another.

A layer's *path* is the `/`-joined names from the model down to it
(`"decoder_block_0/attention/query"`); it is what targets match against,
what summaries print and what adapter files are keyed by. Paths do not depend
on variable names, so they survive `.keras` round trips.
"""

import contextlib
import dataclasses

import keras

from keras_lowrank import _compat


@dataclasses.dataclass
class Entry:
    path: str
    layer: object
    parents: list


def walk(model, into_adapters=False):
    """All sublayers of `model` (not the model itself), depth first."""
    from keras_lowrank.adapter import Adapter

    entries = {}
    order = []

    def visit(layer, prefix):
        seen_names = {}
        for child in list(layer._layers):
            if id(child) in entries:
                entries[id(child)].parents.append(layer)
                continue
            name = child.name
            count = seen_names.get(name, 0)
            seen_names[name] = count + 1
            if count:
                name = f"{name}#{count}"
            path = f"{prefix}/{name}" if prefix else name
            entry = Entry(path, child, [layer])
            entries[id(child)] = entry
            order.append(entry)
            if into_adapters or not isinstance(child, Adapter):
                visit(child, path)

    visit(model, "")
    return order


def find(model, path):
    for entry in walk(model):
        if entry.path == path:
            return entry
    return None


@contextlib.contextmanager
def path_scope(path):
    """Nested `keras.name_scope`s for each part of a layer's parent path, so
    new variables get the paths the replaced layer's variables had."""
    parts = [p.split("#")[0] for p in path.split("/")[:-1] if p]
    with contextlib.ExitStack() as stack:
        for part in parts:
            stack.enter_context(keras.name_scope(part))
        yield


def _swap_in_functional(func, old, new):
    if old not in getattr(func, "_operations", []):
        return
    ops_list = func._operations
    ops_list[ops_list.index(old)] = new
    by_depth = getattr(func, "_operations_by_depth", None)
    if by_depth:
        for depth, ops_at in by_depth.items():
            by_depth[depth] = [new if o is old else o for o in ops_at]
    for node in old._inbound_nodes:
        node.operation = new
        for i, tensor in enumerate(node.outputs):
            history = getattr(tensor, "_keras_history", None)
            if history is not None and history[0] is old:
                tensor._keras_history = type(history)(new, *history[1:])
    nodes = getattr(func, "_nodes", None)
    if nodes is not None:
        prefix = f"{id(old)}_ib-"
        for key in [k for k in nodes if k.startswith(prefix)]:
            nodes.discard(key)
            nodes.add(f"{id(new)}_ib-{key[len(prefix):]}")
    new._inbound_nodes = old._inbound_nodes
    new._outbound_nodes = old._outbound_nodes


def _replace_in_attrs(parent, old, new):
    for attr, value in list(vars(parent).items()):
        if attr in ("_layers", "_tracker", "_operations"):
            continue
        if value is old:
            object.__setattr__(parent, attr, new)
            # Keras/torch: keep torch's module registry in step.
            modules = vars(parent).get("_modules")
            if modules is not None and attr in modules:
                modules[attr] = new
        elif isinstance(value, list) and any(v is old for v in value):
            for i, v in enumerate(value):
                if v is old:
                    list.__setitem__(value, i, new)
        elif isinstance(value, dict) and any(v is old for v in value.values()):
            for k, v in list(value.items()):
                if v is old:
                    dict.__setitem__(value, k, new)
    modules = vars(parent).get("_modules")
    if modules:
        for key, mod in list(modules.items()):
            if mod is old:
                modules[key] = new


def replace_child(parent, old, new):
    """Replace a direct sublayer `old` of `parent` by `new`."""
    with _compat.unlocked(parent):
        _compat.replace_in_layer_store(parent, old, new)
        _replace_in_attrs(parent, old, new)


def replace_layer(model, entry, new):
    """Put `new` everywhere `entry.layer` is referenced in `model`."""
    old = entry.layer
    for parent in entry.parents:
        replace_child(parent, old, new)
        for func in _functionals_of(parent):
            _swap_in_functional(func, old, new)


def _functionals_of(layer):
    from keras.src.models.functional import Functional

    out = []
    if isinstance(layer, Functional):
        out.append(layer)
    inner = getattr(layer, "_functional", None)
    if inner is not None and isinstance(inner, Functional):
        out.append(inner)
    return out


def all_layers_with_root(model):
    return [model] + [e.layer for e in walk(model, into_adapters=True)]
