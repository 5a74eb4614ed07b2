"""Several named adapters in one model (PEFT's `adapter_name`): the
operations on them.

`enable_adapter(model, ..., adapter_name="a")` puts a named adapter on each
targeted layer, beside the adapters already there (any methods, the same or
other targets). A layer with named adapters is held by an `AdapterSet`
(`keras_lowrank.adapter_set`): the frozen base once, each named adapter on
that base, and one non-trainable 0/1 gate per name. The layer computes
PEFT's sum over the active adapters,

    y = y0 + Σ_active (adapter_i(x) - y0)

where `y0` is the frozen base's output. Adapters that rewrite the frozen
kernel (PiSSA, OLoRA, MiLoRA, SVD-training...) give back their part of the
original kernel while inactive, so every combination of active adapters
computes what those adapters alone would on the original model.

Which adapters are active is model-wide (`set_active`), a value of the gate
variables: switching needs no retrace of a compiled `predict`/`evaluate` on
any backend. By default the active adapters are also the trainable ones (as
in PEFT), which needs a new train step; `set_active(..., trainable=False)`
only switches.

Once a model has named adapters, every adapter in it is a named one: an
unnamed adapter already there becomes the adapter `"default"`.
"""

import numpy as np
from keras import ops

from keras_lowrank import adapt
from keras_lowrank import adapted_model
from keras_lowrank import adapter_set
from keras_lowrank import arguments
from keras_lowrank import bases
from keras_lowrank import compiled
from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank import svd
from keras_lowrank import tree
from keras_lowrank.adapter_merge import check_finite


def adapter_names(model):
    """Every adapter name in `model`: each layer's names in the order they
    were added there, the layers in model order."""
    return adapter_set.names_in(adapter_set.sets(model))


def active_adapters(model):
    """The names of the active adapters of `model` (`set_active`).

    Examples:

        >>> import keras
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> keras_lowrank.active_adapters(model)
        ['a']
    """
    return adapter_set.names_in(adapter_set.sets(model), active=True)


def names_arg(model, names, what):
    """`names` (a name, a list of names, or `None` for none) as a list of
    adapter names `model` has, else a `ValueError` naming the function
    `what`; a model without named adapters is refused too."""
    known = adapter_names(model)
    if not known:
        raise ValueError(
            f"{what}: model {model.name!r} has no named adapters; add them with "
            "enable_adapter(..., adapter_name=...)."
        )
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    try:
        names = list(names)
    except TypeError:
        raise ValueError(f"{what}: expected a name, a list of names or None; received {names!r}.") from None
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise ValueError(f"{what}: the model has no adapter named {name!r}; it has {known}.")
    return names


def set_active(model, names, trainable=True):
    """Make `names` (a name, a list of names, or `None` for none) the active
    adapters of `model`; the others stop contributing.

    Switching assigns the gate variables: a compiled `predict`/`evaluate`
    runs on with the new set, on every backend. With `trainable=True`
    (default, as in PEFT) the active adapters are also the trainable ones;
    when that changes which variables train, the train step is rebuilt on
    the next `fit` (the optimizer starts afresh, as after `compile`).
    `trainable=False` leaves what trains as it is (switching for serving).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], method="dora", rank=2, adapter_name="b")
        >>> keras_lowrank.set_active(model, ["a", "b"])
        >>> keras_lowrank.active_adapters(model)
        ['a', 'b']
    """
    names = names_arg(model, names, "set_active")
    arguments.check("set_active", "trainable", trainable, opt.boolean)
    found = adapter_set.sets(model)
    before = _trainable_flags(found)
    for _, s in found:
        s.set_gates(names)
        if trainable:
            s.apply_trainable()
    if _trainable_flags(found) != before:
        compiled.reset_compiled_functions(model)


def _trainable_flags(found):
    return [v.trainable for _, s in found for m in s.members.values() for v in m.adapter_variables().values()] + [
        bases.bias_variable(s.layer).trainable for _, s in found if bases.bias_variable(s.layer) is not None
    ]


def delete_adapter(model, name):
    """Take the adapter `name` out of every layer of `model` (not merged).

    An adapter that rewrote its frozen kernel (PiSSA, ...) gives its part
    back first, so the other adapters keep computing what they computed. A
    layer left with no adapter becomes its plain layer again.

    Examples:

        >>> import keras
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="b")
        >>> keras_lowrank.delete_adapter(model, "a")
        >>> keras_lowrank.adapter_names(model)
        ['b']
    """
    names_arg(model, [name], "delete_adapter")
    entries = [e for e in tree.walk(model) if tree.is_adapter_set(e.layer) and name in e.layer.members]
    for e in entries:
        member = e.layer.members[name]
        if member.merged:
            raise ValueError(f"Layer {e.path!r}: adapter {name!r} is merged; unmerge it first.")
    for e in entries:
        s = e.layer
        member = s.members[name]
        if adapter_set.rewrites(member):
            original = member.original_matrix(s.base_matrix())
            check_finite(original, e.path, "delete_adapter")
            bases.assign_kernel(s.layer, s.geometry.matrix_to_kernel(original))
        s.remove_member(name)
        if not s.members:  # the frozen layer, as a merge would leave it
            s.layer.activation = s.activation
            s.layer.activity_regularizer = s.activity_regularizer
            tree.replace_layer(model, e, s.layer)
        else:
            s.apply_trainable()
    adapted_model.mark_adapted(model)
    compiled.after_change(model)


# ----------------------------------------------------------------------
# Weighted combination (PEFT's `add_weighted_adapter`)
#: every `combine` method: the first three combine exactly or as PEFT's
#: `linear`; the others are PEFT's task-arithmetic merges (TIES, DARE,
#: magnitude pruning), on the LoRA factors or, `_svd`, on the full updates.
COMBINE_METHODS = (
    "linear", "cat", "svd",
    "ties", "dare_linear", "dare_ties", "magnitude_prune",
    "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd",
)
#: how each task-arithmetic merge prunes a tensor before it is summed
_PRUNING = {"ties": "magnitude", "magnitude_prune": "magnitude", "dare_linear": "random", "dare_ties": "random"}
#: the merges that elect a sign per entry and average the agreeing entries
_ELECTING = ("ties", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")


def _kind(method):
    """The merge rule of `method` without its `_svd` suffix (`"svd"` is
    task arithmetic, as `"linear"`)."""
    if method == "svd":
        return "linear"
    return method[: -len("_svd")] if method.endswith("_svd") else method


def _lora_form(member, where, method):
    """`(Aᵀ, B, scale)` of `member` as the plain LoRA of its contribution
    (float64, so that a weighted combination cannot overflow before it is
    checked)."""
    if member.method != registry.LORA_FORM and registry.LORA_FORM not in registry.get(member.method).export_forms:
        instead = "svd" if method in ("cat", "linear") else method + "_svd"
        raise ValueError(
            f"combine: layer {where!r} has a {member.method!r} adapter, which has no "
            f"plain-LoRA form for method={method!r} to combine factor by factor; combine "
            f"it with method={instead!r} (the SVD of its whole update, exact for any method)."
        )
    state, info = member.as_lora_state()
    scale = info["alpha"] / (info["rank"] ** 0.5 if info["rslora"] else info["rank"])
    return (_np(state["lora_a"]).astype("float64"), _np(state["lora_b"]).astype("float64"),
            float(scale))


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float32")


def _contribution(member, k):
    """What `member` adds to the kernel matrix `k` when active."""
    return _np(member.merged_matrix(k)) - _np(member.original_matrix(k))


def _svd_factors(delta, rank, where):
    """`(Aᵀ, B)` of the best rank-`rank` LoRA of `delta` (scale 1)."""
    u, s, v = svd.decompose(delta, rank, where=where)
    root = np.sqrt(s)[..., None, :]
    return np.swapaxes(u * root, -1, -2), np.swapaxes(v * root, -1, -2)


def _keep_mask(rng, shape, density):
    """DARE's random mask: each entry kept (1.0) with probability `density`."""
    return (rng.random(shape) < density).astype("float64")


def _prune(tensor, density, how, rng):
    """`tensor` with all but a `density` fraction of its entries set to 0:
    the largest in magnitude (`"magnitude"`, `int(density · size)` of
    them), or a random draw rescaled by `1 / density` (`"random"`, DARE)."""
    if density >= 1:
        return tensor
    if how == "magnitude":
        k = int(density * tensor.size)
        flat = np.abs(tensor).reshape(-1)
        keep = np.zeros(flat.shape, "float64")
        if k:
            keep[np.argpartition(-flat, k - 1)[:k]] = 1.0
        return tensor * keep.reshape(tensor.shape)
    return tensor * _keep_mask(rng, tensor.shape, density) / density


def merge_tensors(kind, tensors, weights, density=None, majority_sign_method="total", rng=None):
    """One merged tensor of `tensors` (same shapes) under the weights
    `weights`, by the task-arithmetic rule `kind` (`"linear"`, `"ties"`,
    `"dare_linear"`, `"dare_ties"` or `"magnitude_prune"`):

    - prune each tensor to `density` (`ties`, `magnitude_prune`: keep its
      largest entries; `dare_*`: keep random entries, rescaled by
      `1/density`, drawn from the NumPy generator `rng`);
    - `ties`, `dare_ties`: elect a sign per entry from the pruned tensors
      (`"total"`: the sign of their sum; `"frequency"`: the sign most of
      them have, `+` on a tie) and average, per entry, the weighted
      entries of that sign (zero where none has it);
    - otherwise sum the weighted (pruned) tensors.
    """
    if kind in _PRUNING:
        tensors = [_prune(t, density, _PRUNING[kind], rng) for t in tensors]
    stack = np.stack(tensors)
    weighted = stack * np.asarray(weights, "float64").reshape((-1,) + (1,) * (stack.ndim - 1))
    if kind not in _ELECTING:
        return weighted.sum(axis=0)
    sign = np.sign(stack)
    votes = stack.sum(axis=0) if majority_sign_method == "total" else sign.sum(axis=0)
    agree = sign == np.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def combine(model, weights, adapter_name, method="svd", rank=None, density=None,
            majority_sign_method="total", seed=None):
    """Add `adapter_name`, a weighted combination of named adapters
    (PEFT's `add_weighted_adapter`); it becomes the active adapter.

    On each layer holding any of the adapters in `weights`, with `Δ_i` what
    adapter `i` adds to the kernel when active and `w_i` its weight
    (negative weights subtract):

    - `"svd"`: the rank-`rank` truncated SVD of `Σ w_i Δ_i` (any method);
      `rank` defaults to the largest rank combined there. A LoRA.
    - `"cat"`: the LoRA of rank `Σ r_i` whose factors are the adapters'
      LoRA forms side by side: exactly `Σ w_i Δ_i`. Every adapter needs a
      plain-LoRA form.
    - `"linear"`: SVF adapters combine their multipliers, `z = Σ w_i z_i`
      (Transformer²'s composition, as `keras_lowrank.svf.compose`);
      LoRA forms of one rank combine as PEFT does, `A = Σ ±√|w_i s_i| A_i`,
      `B = Σ √|w_i s_i| B_i` (`s_i` the scale, its sign on `A`; not exactly
      `Σ w_i Δ_i` unless the adapters share a factor).
    - `"ties"`, `"dare_linear"`, `"dare_ties"`, `"magnitude_prune"`: PEFT's
      task-arithmetic merges (described below) applied, as PEFT does, to the
      `A`s and, separately, to the `B`s of LoRA forms of one rank, with the
      factor weights of `"linear"`. Adapters without a plain-LoRA form
      (DoRA, SVF...) are refused: use the `_svd` variant.
    - `"ties_svd"`, `"dare_linear_svd"`, `"dare_ties_svd"`,
      `"magnitude_prune_svd"`: the same merge of the full updates `Δ_i`
      with the weights `w_i`, then its rank-`rank` truncated SVD, as
      `"svd"` (any method, DoRA's magnitude included).

    The merges: `magnitude_prune` keeps the `density` fraction of each
    tensor's largest entries and sums the weighted tensors; `dare_linear`
    keeps each entry with probability `density`, rescales the kept ones by
    `1/density` and sums; `ties` prunes by magnitude, elects a sign per
    entry (`majority_sign_method`: `"total"`, the sign of the sum of the
    pruned entries, or `"frequency"`, the sign most of them have) and
    averages the weighted entries of that sign; `dare_ties` prunes as DARE
    and merges as TIES. `density` (in (0, 1]) is required by these merges
    and refused by the others; `"frequency"` only by the TIES merges;
    `seed` makes DARE's random masks reproducible. As in PEFT, a
    combination of one adapter neither prunes nor elects: it is that
    adapter, weighted.

    Args:
        model: a model with named adapters.
        weights: `{name: weight}`.
        adapter_name: the new adapter's name.
        method: one of `COMBINE_METHODS` (default `"svd"`, as PEFT).
        rank: the rank of an SVD combination.
        density: the fraction kept by `ties`, `dare_*` and
            `magnitude_prune` (and their `_svd` variants).
        majority_sign_method: `"total"` (default) or `"frequency"`, for
            `ties`, `dare_ties` and their `_svd` variants.
        seed: an int seeding DARE's masks (`None`: a fresh draw).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="b")
        >>> keras_lowrank.combine(model, {"a": 0.7, "b": 0.3}, "ab", method="cat")
        >>> model.layers[0].members["ab"].rank
        4
        >>> keras_lowrank.combine(model, {"a": 1.0, "b": -0.5}, "ties_ab", method="ties", density=0.5)
        >>> keras_lowrank.active_adapters(model)
        ['ties_ab']
    """
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"combine: weights must be a non-empty {{name: weight}} dict; received {weights!r}.")
    names = names_arg(model, list(weights), "combine")
    for name in names:
        w = weights[name]
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating, np.integer)) or not np.isfinite(w):
            raise ValueError(f"combine: the weight of {name!r} must be a finite number; received {w!r}.")
    adapter_set.check_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise ValueError(f"combine: the model already has an adapter named {adapter_name!r}.")
    if method not in COMBINE_METHODS:
        raise ValueError(f"combine: method must be one of {COMBINE_METHODS}; received {method!r}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"combine: rank must be a positive int; received {rank!r}.")
    _check_merge_arguments(method, density, majority_sign_method, seed)
    kind = _kind(method)
    if len(names) == 1 and kind in _PRUNING:  # PEFT: one adapter is combined linearly
        kind = "linear"
    rng = np.random.default_rng(seed) if kind.startswith("dare") else None
    merge = dict(density=density, majority_sign_method=majority_sign_method, rng=rng)
    plans = {}  # path -> (method, options, rank, {variable: value})
    for path, s in adapter_set.sets(model):
        present = [(n, s.members[n]) for n in names if n in s.members]
        if not present:
            continue
        where = path
        g = s.geometry
        if method == "linear" and len({type(m) for _, m in present}) == 1:
            own = type(present[0][1]).linear_combination([(float(weights[n]), m) for n, m in present], where)
            if own is not None:
                options, values = own
                plans[path] = (present[0][1].method, options, None,
                               {k: _combined(v, where, weights) for k, v in values.items()})
                continue
        if method == "svd" or method.endswith("_svd"):
            k = s.base_matrix()
            deltas = [_contribution(m, k).astype("float64") for _, m in present]
            delta = _combined(merge_tensors(kind, deltas, [weights[n] for n, _ in present], **merge),
                              where, weights)
            ranks = [m.summary_rank() for _, m in present if m.summary_rank() is not None]
            r = rank if rank is not None else (max(ranks) if ranks else None)
            if r is None:
                raise ValueError(
                    f"combine: layer {where!r}: the adapters {[n for n, _ in present]} have no "
                    "rank; give rank=... for the SVD combination."
                )
            a_t, b = _svd_factors(delta, min(r, g.rank_limit), where)
        else:
            forms = [(float(weights[n]), *_lora_form(m, where, method)) for n, m in present]
            if method == "cat":
                a_t = np.concatenate([w * sc * a for w, a, _, sc in forms], axis=-2)
                b = np.concatenate([bb for _, _, bb, _ in forms], axis=-2)
            else:
                if len({a.shape for _, a, _, _ in forms}) != 1:
                    raise ValueError(
                        f"combine: layer {where!r}: method={method!r} merges the factors entry by "
                        f"entry and needs adapters of one rank; they have ranks "
                        f"{[a.shape[-2] for _, a, _, _ in forms]} (use 'cat' or an SVD method)."
                    )
                # PEFT's factor weights: √|w s| on both, the sign of w s on A
                roots = [np.sqrt(abs(w * sc)) for w, _, _, sc in forms]
                signs = [1.0 if w * sc >= 0 else -1.0 for w, _, _, sc in forms]
                a_t = merge_tensors(kind, [a for _, a, _, _ in forms],
                                    [q * sg for q, sg in zip(roots, signs)], **merge)
                b = merge_tensors(kind, [bb for _, _, bb, _ in forms], roots, **merge)
        a_t, b = _combined(a_t, where, weights), _combined(b, where, weights)
        plans[path] = (registry.LORA_FORM, {}, int(a_t.shape[-2]), {"lora_a": a_t, "lora_b": b})
    kinds = sorted({(m, repr(sorted(o.items()))) for m, o, _, _ in plans.values()})
    if len(kinds) > 1:
        raise ValueError(
            f"combine: method='linear' would make adapters of different kinds on different "
            f"layers ({', '.join(sorted({k for k, _ in kinds}))}, or one method with different "
            "options); combine them with 'cat' or 'svd'."
        )
    paths = list(plans)
    made, options, _, _ = next(iter(plans.values()))
    ranks = {p: r for p, (_, _, r, _) in plans.items() if r is not None}
    if ranks:  # rank and scale 1 per layer: the factors hold the weights
        options = dict(options, rank=max(ranks.values()), rank_pattern=ranks,
                       alpha_pattern={p: float(r) for p, r in ranks.items()})
    adapt.enable_adapter(model, method=made, targets=paths, adapter_name=adapter_name, **options)
    for path, (_, _, _, values) in plans.items():
        member = _member(model, path, adapter_name)
        for name, value in values.items():
            getattr(member, name).assign(value)


def _check_merge_arguments(method, density, majority_sign_method, seed):
    """Refuse a `density`, `majority_sign_method` or `seed` that `method`
    cannot take, naming the value."""
    kind = _kind(method)
    if kind in _PRUNING:
        if (density is None or isinstance(density, bool)
                or not isinstance(density, (int, float, np.floating, np.integer))
                or not (0 < density <= 1)):
            raise ValueError(
                f"combine: method={method!r} needs a density in (0, 1], the fraction of "
                f"entries kept; received density={density!r}."
            )
    elif density is not None:
        raise ValueError(
            f"combine: density={density!r} has no effect with method={method!r}; it is for "
            f"{[m for m in COMBINE_METHODS if _kind(m) in _PRUNING]}."
        )
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(
            f"combine: majority_sign_method must be one of {MAJORITY_SIGN_METHODS}; "
            f"received {majority_sign_method!r}."
        )
    if majority_sign_method != "total" and kind not in _ELECTING:
        raise ValueError(
            f"combine: majority_sign_method={majority_sign_method!r} has no effect with "
            f"method={method!r}; it is for {[m for m in COMBINE_METHODS if _kind(m) in _ELECTING]}."
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"combine: seed must be None or an int >= 0; received {seed!r}.")


def _combined(value, where, weights):
    """A combined tensor as float32, or a `ValueError` when the weights make
    it overflow (or NaN): checked before the new adapter is made."""
    value = np.asarray(value, "float64")
    if not np.all(np.abs(value) <= np.finfo(np.float32).max):
        raise ValueError(
            f"combine: layer {where!r}: the weights {weights} make the combined "
            "adapter overflow float32 (NaN or inf); nothing was added."
        )
    return value.astype("float32")


def _member(model, path, name):
    for e in tree.walk(model):
        if e.path == path:
            return e.layer.members[name]
    raise KeyError(path)
