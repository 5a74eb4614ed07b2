"""Walking a Keras model's layer tree, and swapping one layer for another.

Every sublayer has two names here:

- its *path*, the `/`-joined layer names from the model down to it
  (`"decoder_block_0/attention/query"`): what targets match against and what
  summaries print;
- its *key*, the same path in which every name Keras made up (`dense_3`,
  `sequential_1`, `gemma_backbone_2`: the class name in snake case, with or
  without a number) is replaced by the layer's position among its siblings
  of the same class (`dense[1]`). Names a user or a library gave are kept.
  The key is the same for every build of the same architecture, in one
  process or another, and it is what adapter files and `.keras` adapter
  plans are keyed by.
"""

import contextlib
import dataclasses
import re

import keras

from keras_lowrank import _compat


@dataclasses.dataclass
class Entry:
    path: str
    layer: object
    parents: list
    key: str = ""


def snake_case(name):
    """Keras's rule for the name of an unnamed layer of class `name`."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def layer_kind(layer):
    """The class Keras would have named `layer` after: an adapter or a
    quantized base answers for the layer it stands for."""
    kind = getattr(layer, "klr_layer_kind", None)
    return kind() if callable(kind) else type(layer)


def is_generated_name(layer):
    """Whether `layer.name` looks made up by Keras (`dense`, `dense_12`)."""
    base = snake_case(layer_kind(layer).__name__)
    return re.fullmatch(re.escape(base) + r"(_\d+)?", layer.name) is not None


def is_adapter(layer):
    return getattr(layer, "_klr_is_adapter", False)


def walk(model, into_adapters=False):
    """All sublayers of `model` (not the model itself), depth first."""
    entries = {}
    order = []

    def visit(layer, prefix, key_prefix):
        seen_names = {}
        seen_kinds = {}
        for child in _compat.sublayers(layer):
            kind = snake_case(layer_kind(child).__name__)
            position = seen_kinds.get(kind, 0)
            seen_kinds[kind] = position + 1
            if id(child) in entries:
                entries[id(child)].parents.append(layer)
                continue
            name = child.name
            count = seen_names.get(name, 0)
            seen_names[name] = count + 1
            if count:
                name = f"{name}#{count}"
            path = f"{prefix}/{name}" if prefix else name
            part = f"{kind}[{position}]" if is_generated_name(child) else name
            key = f"{key_prefix}/{part}" if key_prefix else part
            entry = Entry(path, child, [layer], key)
            entries[id(child)] = entry
            order.append(entry)
            if into_adapters or not is_adapter(child):
                visit(child, path, key)

    visit(model, "", "")
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
    out = []
    if _compat.is_functional(layer):
        out.append(layer)
    inner = getattr(layer, "_functional", None)
    if inner is not None and _compat.is_functional(inner):
        out.append(inner)
    return out


def all_layers_with_root(model):
    return [model] + [e.layer for e in walk(model, into_adapters=True)]
