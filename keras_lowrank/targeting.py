"""Which layers an adapter goes on: target patterns and the output head.

Pattern forms (for `targets`, `exclude`, `rank_pattern`, `alpha_pattern`
and `trainable_layers`):

- `"query"`: a layer name, a full path, or a path suffix (`"attention/query"`);
- `"*/attention/*"`: a glob on the path;
- `"re:.*_(query|value)$"` or `re.compile(...)`: a regex (fullmatch) on the
  path;
- a kind (`KINDS`): `"all-linear"` (every Dense, EinsumDense and stacked
  expert weight but the output head), `"experts"` (the stacked expert
  weights of mixture-of-experts layers, see `keras_lowrank.experts`),
  `"router"` (the Dense/EinsumDense of an MoE block that scores the
  experts: one output per expert, named `...router...` or `...gate...`
  as in every KerasHub family), `"shared-experts"` (the Dense/EinsumDense
  layers of an MoE block named `shared...`: its always-on shared expert and
  that expert's gate, as KerasHub names them), `"linear"` (every other
  Dense/EinsumDense: attention, dense feed-forward blocks).
  A kind is a reserved word: to match a layer *named* `experts`, use
  `"re:(.*/)?experts"`; `"conv"` (`Conv1D/2D/3D`, channels last, one
  group: not in "all-linear", as in PEFT); `"embedding"` (`Embedding` and
  KerasHub's `ReversibleEmbedding`, whose tied output head then reads the
  adapted table: not in "all-linear", as in PEFT).

A layer whose parent reads its weights instead of calling it (Gemma 4's
feed-forward multiplies by `self.gating_ffw.kernel`) is found by reading the
parent's source (`direct_reads`): adapters serve `kernel` and `bias` to such
a parent (`Adapter.kernel`); `enable_adapter` leaves the layer out, with a
line in the summary, where the method cannot (`Adapter.serves_kernel`) or
the parent reads something else.

The output head is found by position, not by name: it is a Dense or
EinsumDense whose output reaches a model output through layers and ops that
hold no weights (an activation, a reshape, a dropout). For Functional and
Sequential models the graph says so; a subclassed model is traced once
with symbolic inputs of the shapes it was built with. Only when a subclassed
model cannot be traced does the rule fall back to the layer's name
(`HEAD_NAMES`); the summary says which rule found the head.
"""

import fnmatch
import functools
import inspect
import re

import keras

from keras_lowrank import _compat
from keras_lowrank import bases
from keras_lowrank import experts
from keras_lowrank import tree

#: names treated as an output head when the model cannot be traced
HEAD_NAMES = ("logits", "lm_head", "classifier", "head", "output_head", "predictions")


#: target kinds (see the module docstring)
KINDS = ("all-linear", "linear", "experts", "router", "shared-experts", "conv", "embedding")
#: the kinds "all-linear" (and the default targets) take in
LINEAR_KINDS = ("linear", "experts", "router", "shared-experts")


def kind_of(entry):
    """The kind of a layer entry (`annotate_kinds` sets it), `None` for a
    layer an adapter cannot wrap."""
    return getattr(entry, "kind", None)


def annotate_kinds(entries):
    """Set `entry.kind` on every entry: `"experts"`, `"router"`,
    `"shared-experts"` or `"linear"` for the layers an adapter can wrap,
    `None` for the rest. An MoE block is the parent of a layer that holds
    stacked expert weights; among its Dense/EinsumDense layers (outside the
    bank), its router has one output per expert and a name with `router` or
    `gate` in it, and its shared experts are named `shared...`."""
    from keras_lowrank.experts import ExpertLinear

    experts = [e for e in entries if is_candidate(e.layer) and issubclass(tree.layer_kind(e.layer), ExpertLinear)]
    blocks = {}
    for e in experts:
        bank = e.path.rsplit("/", 1)[0]
        block = bank.rsplit("/", 1)[0] if "/" in bank else ""
        blocks[block] = (bank, bases.geometry_of(bases.base_layer(e.layer)).n_shared)
    ids = {id(e.layer) for e in experts}
    for e in entries:
        if not is_candidate(e.layer):
            e.kind = None
        elif bases.is_embedding(bases.base_layer(e.layer)):
            e.kind = "embedding" if bases.storage_of(bases.base_layer(e.layer)) is bases.EMBEDDING else None
        elif bases.is_conv(bases.base_layer(e.layer)):
            try:
                bases.check_supported(bases.base_layer(e.layer), e.path)
                e.kind = "conv"
            except ValueError:
                e.kind = None  # grouped or channels-first: not adaptable
        elif id(e.layer) in ids:
            e.kind = "experts"
        else:
            e.kind = "linear"
            for block, (bank, n_experts) in blocks.items():
                inside = not block or e.path.startswith(block + "/")
                if not inside or e.path.startswith(bank + "/"):
                    continue
                rel = e.path[len(block):]
                if "shared" in rel:
                    e.kind = "shared-experts"
                elif ("router" in rel or "gate" in rel) and (
                    bases.geometry_of(bases.base_layer(e.layer)).n_out == n_experts
                ):
                    e.kind = "router"
                if e.kind != "linear":
                    break
    return entries


class Pattern:
    """A validated target pattern."""

    def __init__(self, pattern, option="targets"):
        self.source = pattern
        if isinstance(pattern, str) and pattern in KINDS:
            self.kind, self.regex = "kind", None
            return
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
        if self.kind == "kind":
            kind = kind_of(entry)
            if self.source == "all-linear":
                return kind in LINEAR_KINDS
            return kind == self.source
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
    entries = annotate_kinds(tree.spots(tree.walk(model) if entries is None else entries))
    candidates = [e for e in entries if is_candidate(e.layer)]
    available = [e.path for e in candidates]
    include_all = targets is None or (isinstance(targets, str) and targets == "all-linear")
    target_patterns = [] if include_all else [
        None if p == "all-linear" else p for p in _all_linear_or_patterns(targets)
    ]
    exclude_patterns = patterns(exclude, "exclude")
    head_ids, rule = find_heads(model, candidates)
    heads = [e for e in candidates if id(e.layer) in head_ids]
    linear = [e for e in candidates if e.kind in LINEAR_KINDS]
    if include_all:
        chosen = [e for e in linear if id(e.layer) not in head_ids]
    else:
        chosen_ids = set()
        for pattern in target_patterns:
            if pattern is None:  # "all-linear" inside a list
                hits = [e for e in linear if id(e.layer) not in head_ids]
            else:
                hits = [e for e in entries if pattern.matches(e)]
                bad = [e for e in hits if not is_candidate(e.layer)]
                if pattern.kind == "name" and bad:
                    e = bad[0]
                    raise TypeError(
                        f"Target {pattern!r} matches layer {e.path!r} of type "
                        f"{type(e.layer).__name__}; adapters wrap {bases.WRAPPED}."
                    )
                hits = [e for e in hits if is_candidate(e.layer)]
            if not hits:
                raise ValueError(
                    f"Target {'all-linear' if pattern is None else pattern!r} matches "
                    f"no layer an adapter can wrap. Layer paths that exist: {available}."
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
        counts, _ = left_out(entries, set(), {id(e.layer) for e in heads})
        hint += f" Left out: {left_out_text(counts)}." if counts else ""
        by_kind = sorted({e.kind for e in candidates if e.kind in ("conv", "embedding")})
        if include_all and by_kind:
            hint += (f" Convolutions and embeddings are adapted only when targeted "
                     f"(targets={by_kind!r}).")
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


# ----------------------------------------------------------------------
# Layers their parent reads instead of calling
#: what an adapter (or a set of named adapters) serves to a parent that
#: reads it instead of calling it (`Adapter.kernel`, `Adapter.bias`)
SERVED_READS = frozenset({"kernel", "bias"})
#: the attributes through which code reaches a linear layer's weights
#: without calling the layer
WEIGHT_READS = SERVED_READS | frozenset({
    "_kernel", "_bias", "weights", "variables", "trainable_weights",
    "non_trainable_weights", "trainable_variables", "non_trainable_variables",
    "get_weights", "set_weights", "kernel_scale", "kernel_zero", "quantized_kernel",
    "lora_kernel_a", "lora_kernel_b", "lora_enabled",
})
_SELF_READ = re.compile(r"\bself\s*\.\s*(\w+)\s*\.\s*(\w+)")
#: modules whose classes never read a sublayer's weights (framework bases)
_SKIP_MODULES = ("builtins", "torch.", "tensorflow.", "tf_keras.")


@functools.lru_cache(maxsize=None)
def _class_reads(cls):
    """`{attribute: {member, ...}}`: what the body of `cls` reads as
    `self.<attribute>.<member>` (empty where the source is not available)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    reads = {}
    for attr, member in _SELF_READ.findall(source):
        reads.setdefault(attr, set()).add(member)
    return reads


def _reads_of(parent):
    reads = {}
    for cls in type(parent).__mro__:
        if cls is object or cls.__module__.startswith(_SKIP_MODULES):
            continue
        for attr, members in _class_reads(cls).items():
            reads.setdefault(attr, set()).update(members)
    return reads


def _attribute_names(parent, layer):
    """The attribute names under which `parent` holds `layer`."""
    names = set()
    for store in (vars(parent), vars(parent).get("_modules") or {}):
        names.update(k for k, v in list(store.items()) if v is layer)
    return names


def direct_reads(entries):
    """`{id(layer): {attribute, ...}}`: for each Dense/EinsumDense (or
    adapter) of `entries`, the weight attributes (`WEIGHT_READS`) a parent's
    code reads from it directly (`self.gating_ffw.kernel`) instead of, or
    besides, calling it. Read off the source of the parents' classes:
    `self.<name>.<attribute>` where the parent holds the layer as `<name>`.

    Examples:

        >>> import keras
        >>> from keras_lowrank import targeting, tree
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.SpectralNormalization(
        ...     keras.layers.Dense(4, name="proj"), name="norm")])
        >>> entries = tree.walk(model)
        >>> reads = targeting.direct_reads(entries)
        >>> [(e.path, sorted(reads[id(e.layer)])) for e in entries if id(e.layer) in reads]
        [('norm/proj', ['kernel'])]
    """
    out = {}
    for entry in entries:
        if not is_candidate(entry.layer):
            continue
        found = set()
        for parent in entry.parents:
            reads = _reads_of(parent)
            for name in _attribute_names(parent, entry.layer):
                found |= reads.get(name, set()) & WEIGHT_READS
        if found:
            out[id(entry.layer)] = found
    return out


# ----------------------------------------------------------------------
# What was left out
#: the reasons `left_out` gives, in the order the summary prints them
LEFT_OUT_REASONS = ("not adaptable", "output head", "read directly by their parent", "not targeted")


def holds_matrix(layer):
    """Whether `layer` itself (not a sublayer) holds a weight of two or
    more axes: a kernel, a table, an expert bank."""
    own = list(_compat.created_trainable(layer)) + list(getattr(layer, "_non_trainable_variables", []))
    return any(len(v.shape) >= 2 for v in own)


def left_out(entries, chosen, heads=(), unread=(), kept=()):
    """`({reason: {class name: count}}, {reason: [path, ...]})`: the layers
    of `entries` that get no adapter (see `LEFT_OUT_REASONS`).

    `chosen`, `heads` and `unread` are sets of layer ids (adapted, output
    heads, left out as read directly by their parent); `kept` are paths of
    layers trained in full (`trainable_layers`, a task's own layers), not
    counted, nor is anything inside them or already adapted. A layer that
    is not a Dense/EinsumDense counts when it holds a weight matrix itself
    (`holds_matrix`: a Conv, an Embedding, an expert bank; not a norm)."""
    counts, paths = {}, {}
    for entry in tree.spots(entries):
        layer = entry.layer
        if id(layer) in chosen or tree.is_adapter(layer) or tree.is_adapter_set(layer):
            continue
        if any(entry.path == p or entry.path.startswith(p + "/") for p in kept):
            continue
        if not is_candidate(layer):
            if not holds_matrix(layer) or experts.slots(layer):
                continue  # a bank whose expert weights are layers of their own
            reason = "not adaptable"
        elif getattr(entry, "kind", "") is None:  # a grouped or channels-first conv
            reason = "not adaptable"
        elif id(layer) in unread:
            reason = "read directly by their parent"
        elif id(layer) in heads:
            reason = "output head"
        else:
            reason = "not targeted"
        kind = tree.layer_kind(layer).__name__
        kinds = counts.setdefault(reason, {})
        kinds[kind] = kinds.get(kind, 0) + 1
        paths.setdefault(reason, []).append(entry.path)
    order = {r: i for i, r in enumerate(LEFT_OUT_REASONS)}
    counts = dict(sorted(counts.items(), key=lambda kv: order[kv[0]]))
    return counts, {r: paths[r] for r in counts}


def left_out_text(counts):
    """`"3 Conv2D, 1 Embedding (not adaptable); 1 Dense (output head)"`."""
    return "; ".join(
        ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + f" ({reason})"
        for reason, kinds in counts.items()
    )
