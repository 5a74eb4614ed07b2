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
    #: for a named adapter: the `AdapterSet` that holds it, and its name
    holder: object = None
    adapter_name: str = None


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


def is_adapter_set(layer):
    """Whether `layer` holds named adapters (`keras_lowrank.named`)."""
    return getattr(layer, "_klr_is_adapter_set", False)


def member_suffix(name):
    """What a named adapter adds to its layer's path and key."""
    return f"@{name}"


def walk(model, into_adapters=False):
    """All sublayers of `model` (not the model itself), depth first.

    A layer with named adapters (an `AdapterSet`) is listed, followed by
    each of its adapters at `<path>@<name>` (key `<key>@<name>`, `holder`
    the set); its frozen base is listed only with `into_adapters`."""
    entries = {}
    order = []

    def visit(layer, prefix, key_prefix):
        seen_names = {}
        seen_kinds = {}
        for child in _compat.sublayers(layer):
            if getattr(child, "_klr_is_shared_state", False):
                continue  # model-level method state: not a layer of the model
            if is_adapter_set(layer) and is_adapter(child):
                continue  # the set's members: listed with the set
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
            if is_adapter_set(child):
                for member_name, member in child.members.items():
                    suffix = member_suffix(member_name)
                    member_entry = Entry(path + suffix, member, [child], key + suffix,
                                         holder=child, adapter_name=member_name)
                    entries[id(member)] = member_entry
                    order.append(member_entry)
                if into_adapters:
                    visit(child, path, key)
            elif into_adapters or not is_adapter(child):
                visit(child, path, key)

    visit(model, "", "")
    return order


def spots(entries):
    """`entries` less the named adapters (each listed after its set)."""
    return [e for e in entries if e.holder is None]


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


@contextlib.contextmanager
def scope_of(layer, path):
    """Nested `keras.name_scope`s in which a layer built in place of `layer`
    gets the variable paths `layer`'s variables have: the scope Keras built
    `layer` in, less its own name (`layer.path`; it starts with the model's
    name where the model opened a scope for it, a Sequential or a subclassed
    model, which `path` leaves out). `path_scope(path)` where `layer` is
    `None` or Keras recorded no such scope."""
    own = getattr(layer, "path", None) if layer is not None else None
    name = getattr(layer, "name", None)
    if not (isinstance(own, str) and name and (own == name or own.endswith("/" + name))):
        with path_scope(path):
            yield
        return
    with contextlib.ExitStack() as stack:
        for part in own.split("/")[:-1]:
            stack.enter_context(keras.name_scope(part))
        yield


def replace_child(parent, old, new):
    """Replace a direct sublayer `old` of `parent` by `new`."""
    with _compat.unlocked(parent):
        _compat.replace_in_layer_store(parent, old, new)
        _compat.replace_in_attributes(parent, old, new)


def replace_layer(model, entry, new):
    """Put `new` everywhere `entry.layer` is referenced in `model`: in each
    parent's attributes and tracked sublayers, and in the graph of every
    Functional model (or Sequential's inner Functional) that calls it.

    The containers that hold it are left as a build with `new` in the first
    place would have them: a list TensorFlow tracks (a Functional's
    operations) is replaced whole, not changed in place, as TensorFlow
    refuses to save (`model.export`) a tracked list whose item was replaced."""
    old = entry.layer
    for parent in entry.parents:
        replace_child(parent, old, new)
        inner = _compat.sequential_graph(parent)
        if inner is not None and old in _compat.sublayers(inner):
            replace_child(inner, old, new)  # its own sublayers: its weights, torch's ParameterDict
        _compat.replace_in_graph(parent, old, new)


def all_layers_with_root(model):
    """The model, its sublayers (inside adapters too) and its method states."""
    from keras_lowrank import shared

    return ([model] + [e.layer for e in walk(model, into_adapters=True)]
            + list(shared.states(model).values()))
