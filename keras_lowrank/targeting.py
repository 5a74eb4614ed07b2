"""Which layers an adapter goes on: target patterns and the output head.

Pattern forms (for `targets`, `exclude`, `rank_pattern`, `alpha_pattern`
and `trainable_layers`):

- `"query"`: a layer name, a full path, or a path suffix (`"attention/query"`);
- `"*/attention/*"`: a glob on the path;
- `"re:.*_(query|value)$"` or `re.compile(...)`: a regex (fullmatch) on the
  path.

The output head is found by position, not by name: it is a Dense or
EinsumDense whose output reaches a model output through layers and ops that
hold no weights (an activation, a reshape, a dropout). For Functional and
Sequential models the graph says so; a subclassed model is traced once
with symbolic inputs of the shapes it was built with. Only when a subclassed
model cannot be traced does the rule fall back to the layer's name
(`HEAD_NAMES`); the summary says which rule found the head.
"""

import fnmatch
import re

import keras

from keras_lowrank import _compat
from keras_lowrank import bases
from keras_lowrank import tree

#: names treated as an output head when the model cannot be traced
HEAD_NAMES = ("logits", "lm_head", "classifier", "head", "output_head", "predictions")


class Pattern:
    """A validated target pattern."""

    def __init__(self, pattern, option="targets"):
        self.source = pattern
        if isinstance(pattern, re.Pattern):
            self.kind, self.regex = "regex", pattern
            return
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                f"Each {option} pattern must be a non-empty string or a compiled "
                f"regex; received {pattern!r}."
            )
        if pattern.startswith("re:"):
            try:
                self.kind, self.regex = "regex", re.compile(pattern[3:])
            except re.error as e:
                raise ValueError(
                    f"Invalid regex in {option}: {pattern!r} ({e})."
                ) from None
        elif any(c in pattern for c in "*?["):
            self.kind, self.regex = "glob", None
        else:
            self.kind, self.regex = "name", None

    def matches(self, entry):
        path = entry.path
        if self.kind == "regex":
            return self.regex.fullmatch(path) is not None
        if self.kind == "glob":
            return fnmatch.fnmatchcase(path, self.source)
        p = self.source
        return path == p or path.endswith("/" + p) or entry.layer.name == p

    def __repr__(self):
        return repr(self.source)


def patterns(value, option):
    """A list of `Pattern`s from `None`, one pattern or a list of them."""
    if value is None:
        return []
    if isinstance(value, (str, re.Pattern)):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        raise ValueError(
            f"{option} must be a pattern or a list of patterns; received {value!r}."
        ) from None
    return [Pattern(p, option) for p in items]


def pattern_dict(value, option):
    """`{Pattern: value}` from a `{pattern: value}` dict (`rank_pattern`)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a dict {{pattern: value}}; received {value!r}.")
    return [(Pattern(p, option), v) for p, v in value.items()]


def match(pattern, entry):
    """Whether a target pattern matches a layer entry."""
    return Pattern(pattern).matches(entry)


def is_candidate(layer):
    return bases.is_linear_layer(layer) or tree.is_adapter(layer) or tree.is_adapter_set(layer)


# ----------------------------------------------------------------------
# The output head
def _model_outputs(model):
    """Symbolic outputs of the model, or `None` if it cannot be traced."""
    for owner in (model, _compat.sequential_graph(model)):
        if owner is None:
            continue
        try:
            outputs = owner.outputs
        except (AttributeError, ValueError):
            outputs = None
        if outputs:
            return keras.tree.flatten(outputs)
    shapes = _compat.build_shapes(model)
    if not shapes or not hasattr(model, "call"):
        return None
    try:
        args = [
            keras.tree.map_shape_structure(
                lambda s: keras.KerasTensor((None,) + tuple(s)[1:], "float32"), shape
            )
            for shape in shapes.values()
        ]
        return keras.tree.flatten(model.call(*args))
    except Exception:  # a model that cannot run symbolically: fall back to names
        return None


def _has_weights(op):
    return bool(getattr(op, "weights", None))


def find_heads(model, entries):
    """`(ids of head layers, rule)`: the linear layers whose output is the
    model's output, and `"position"` or `"name"` for how they were found."""
    outputs = _model_outputs(model)
    if outputs is None:
        ids = {id(e.layer) for e in entries if e.layer.name in HEAD_NAMES}
        return ids, "name"
    ids = set()
    seen = set()
    stack = list(outputs)
    while stack:
        source = _compat.producer(stack.pop())
        if source is None:
            continue
        op, node_index = source
        if id(op) in seen:
            continue
        seen.add(id(op))
        if is_candidate(op):
            ids.add(id(op))
        elif not _has_weights(op):
            stack.extend(_compat.node_inputs(op, node_index))
    return ids, "position"


def resolve_targets(model, targets=None, exclude=None, entries=None):
    """The entries `enable_adapter` would adapt, in model order.

    Examples:

        >>> import keras
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(4)])
        >>> [e.path for e in keras_lowrank.resolve_targets(model)]
        ['hidden']
    """
    return select(model, targets, exclude, entries)[0]


def select(model, targets=None, exclude=None, entries=None):
    """`(chosen entries, head entries, head rule)`."""
    entries = tree.spots(tree.walk(model) if entries is None else entries)
    candidates = [e for e in entries if is_candidate(e.layer)]
    available = [e.path for e in candidates]
    include_all = targets is None or (isinstance(targets, str) and targets == "all-linear")
    target_patterns = [] if include_all else [
        None if p == "all-linear" else p for p in _all_linear_or_patterns(targets)
    ]
    exclude_patterns = patterns(exclude, "exclude")
    head_ids, rule = find_heads(model, candidates)
    heads = [e for e in candidates if id(e.layer) in head_ids]
    if include_all:
        chosen = [e for e in candidates if id(e.layer) not in head_ids]
    else:
        chosen_ids = set()
        for pattern in target_patterns:
            if pattern is None:  # "all-linear" inside a list
                hits = [e for e in candidates if id(e.layer) not in head_ids]
            else:
                hits = [e for e in entries if pattern.matches(e)]
                bad = [e for e in hits if not is_candidate(e.layer)]
                if pattern.kind == "name" and bad:
                    e = bad[0]
                    raise TypeError(
                        f"Target {pattern!r} matches layer {e.path!r} of type "
                        f"{type(e.layer).__name__}; adapters wrap Dense and "
                        "EinsumDense layers only."
                    )
                hits = [e for e in hits if is_candidate(e.layer)]
            if not hits:
                raise ValueError(
                    f"Target {'all-linear' if pattern is None else pattern!r} matches "
                    f"no Dense/EinsumDense layer. Layer paths that exist: {available}."
                )
            chosen_ids.update(id(e.layer) for e in hits)
        chosen = [e for e in candidates if id(e.layer) in chosen_ids]
    for pattern in exclude_patterns:
        hits = [e for e in candidates if pattern.matches(e)]
        if not hits:
            raise ValueError(
                f"Exclude pattern {pattern!r} matches no Dense/EinsumDense "
                f"layer. Layer paths that exist: {available}."
            )
        ids = {id(e.layer) for e in hits}
        chosen = [e for e in chosen if id(e.layer) not in ids]
    if not chosen:
        hint = ""
        if include_all and heads:
            hint = (
                f" The only Dense/EinsumDense layers are the output head "
                f"{[e.path for e in heads]}, which is left out unless targeted by name."
            )
        raise ValueError(
            f"No layer left to adapt after targets={targets!r}, exclude={exclude!r}.{hint} "
            f"Layer paths that exist: {available}."
        )
    return chosen, heads, rule


def _all_linear_or_patterns(targets):
    items = [targets] if isinstance(targets, (str, re.Pattern)) else targets
    try:
        items = list(items)
    except TypeError:
        raise ValueError(
            f"targets must be None, 'all-linear', a pattern or a list of patterns; "
            f"received {targets!r}."
        ) from None
    return [p if p == "all-linear" else Pattern(p, "targets") for p in items]


def per_layer(entry, pairs, default):
    """The value of the last `(Pattern, value)` pair matching `entry`."""
    value = default
    for pattern, v in pairs:
        if pattern.matches(entry):
            value = v
    return value


def matching_entries(entries, pats, option):
    """Entries matched by every pattern of `pats`; a pattern that matches
    nothing is an error naming `option`."""
    keep = []
    for pattern in pats:
        hits = [e for e in entries if pattern.matches(e)]
        if not hits:
            raise ValueError(
                f"{option} pattern {pattern!r} matches no layer. Layer paths "
                f"that exist: {[e.path for e in entries]}."
            )
        keep.extend(hits)
    return keep
