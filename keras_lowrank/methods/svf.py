"""SVF experts and their composition (Transformer²).

An SVF adapter trains one vector `z` per kernel (`W' = U diag(σ ⊙ z) Vᵀ`).
Experts trained on different tasks compose by addition: the model uses
`z' = Σ_k α_k z_k`, with one weight per expert (`weights=[0.6, 0.4]`) or one
per expert and layer. `compose` puts a mix in place; `cem_search` finds the
weights with the cross-entropy method on a few-shot score the user
supplies, as the paper's third adaptation strategy (population 32, elite
20%, `α ∈ [0, 1]`).

The mix is taken on the multiplier `z` (the paper's definition), so
experts must use `parametrization="paper"` (the authors' code sums its raw
pre-sigmoid parameters instead; that form is refused here). An expert is
an adapter file written by `keras_lowrank.save_adapter` or a z-set,
`{layer path: z}` (`z_set(model)` takes one from a trained model).
"""

import dataclasses
import os

import numpy as np

from keras_lowrank import arguments
from keras_lowrank import freezing
from keras_lowrank import lifecycle
from keras_lowrank import saved_plan
from keras_lowrank import saving
from keras_lowrank import tree
from keras_lowrank.methods.spectral import SPECTRUM_RTOL

SEP = saved_plan.SEP


def _np(x):
    from keras import ops

    return np.array(ops.convert_to_numpy(x), dtype="float32")


def svf_layers(model):
    """`[(path, adapter)]` of the model's SVF adapters, in model order."""
    return [(e.path, e.layer) for e in tree.walk(model)
            if tree.is_adapter(e.layer) and e.layer.method == "svf"]


def z_set(model):
    """`{layer path: z}` (NumPy) of every SVF adapter of `model`: an expert
    that `compose` takes.

    Examples:

        >>> import keras
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="hidden"),
        ...                           keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, method="svf")
        >>> {p: z.shape for p, z in keras_lowrank.svf.z_set(model).items()}
        {'hidden': (6,)}
    """
    layers = svf_layers(model)
    if not layers:
        raise ValueError(f"Model {model.name!r} has no SVF adapters.")
    return {path: _np(a.read(a.svf_z)) for path, a in layers}


@dataclasses.dataclass
class _Layer:
    """An SVF layer a composition writes: its path and key in the model,
    the shape of its `z` and its singular values."""

    path: str
    key: str
    z_shape: tuple
    s: np.ndarray


def _model_layers(model):
    return [_Layer(p, k, tuple(a.svf_z.shape), _np(a.read(a.svf_s)))
            for (p, a), k in zip(svf_layers(model), _keys(model))]


def _file_layers(model, path):
    """The SVF layers that loading the adapter file `path` would give
    `model` (a model without SVF adapters), read from the file alone."""
    where = f"adapter file {os.fspath(path)}"
    _, config, tensors = saving.read_adapter_file(path)
    by_key = {e.key: e.path for e in tree.walk(model)}
    out = []
    for key, cfg in config.get("layers", {}).items():
        _check_svf_entry(cfg, key, where)
        if key not in by_key:
            raise ValueError(f"{where}: layer {cfg.get('path', key)!r} is not in model {model.name!r}.")
        z, s = (tensors.get(f"{key}{SEP}{n}") for n in ("svf_z", "svf_s"))
        if z is None or s is None:
            raise ValueError(f"{where}: layer {cfg.get('path', key)!r} has no svf_z/svf_s tensors.")
        out.append(_Layer(by_key[key], key, tuple(z.shape), np.asarray(s, "float32")))
    if not out:
        raise ValueError(f"{where} holds no SVF adapters.")
    return out


def _check_svf_entry(cfg, key, where):
    if not isinstance(cfg, dict) or cfg.get("method") != "svf":
        method = cfg.get("method") if isinstance(cfg, dict) else None
        raise ValueError(f"{where}: layer {key!r} is a {method!r} adapter, not SVF.")
    if cfg.get("options", {}).get("parametrization", "paper") != "paper":
        raise ValueError(
            f"{where}: layer {cfg.get('path', key)!r} uses parametrization="
            f"{cfg['options']['parametrization']!r}; composition mixes the multiplier z "
            "(the paper's form): train experts with parametrization='paper'."
        )


def _z(value, layer, what):
    """An expert's `z` for `layer`: float32 of the layer's exact shape (no
    broadcasting), finite."""
    try:
        z = np.asarray(value, "float32")
    except (TypeError, ValueError):
        raise ValueError(f"{what}: z for layer {layer.path!r} is not an array of numbers; received {value!r}.") from None
    if z.shape != layer.z_shape:
        raise ValueError(
            f"{what}: z for layer {layer.path!r} has shape {z.shape}; the layer's z has "
            f"shape {layer.z_shape} (one multiplier per singular value)."
        )
    if not np.all(np.isfinite(z)):
        raise ValueError(f"{what}: z for layer {layer.path!r} holds NaN or inf values.")
    return z


def _file_expert(path, layers):
    """`{path: z}` from an adapter file, checked against the SVF layers
    (method, parametrization, shapes, singular values)."""
    where = f"adapter file {os.fspath(path)}"
    _, config, tensors = saving.read_adapter_file(path)
    by_key = {layer.key: layer for layer in layers}
    by_path = {layer.path: layer for layer in layers}
    out = {}
    for key, cfg in config.get("layers", {}).items():
        _check_svf_entry(cfg, key, where)
        layer = by_key.get(key) or by_path.get(cfg.get("path"))
        if layer is None:
            raise ValueError(f"{where}: layer {cfg.get('path', key)!r} has no SVF adapter in the model.")
        z = _z(tensors[f"{key}{SEP}svf_z"], layer, where)
        s = np.asarray(tensors[f"{key}{SEP}svf_s"], "float32")
        err = float(np.abs(s - layer.s).max()) / max(float(np.abs(layer.s).max()), 1e-30) \
            if s.shape == layer.s.shape else np.inf
        if not err <= SPECTRUM_RTOL:
            raise ValueError(
                f"{where}: layer {layer.path!r}: the expert was trained on another base (its "
                f"singular values differ by {err:.2g})."
            )
        out[layer.path] = z
    return out


def _experts(layers, sources):
    """Every expert as `{path: z}`, each checked against `layers`."""
    experts = []
    known = {layer.path: layer for layer in layers}
    for i, src in enumerate(sources):
        if isinstance(src, dict):
            unknown = sorted(set(src) - set(known), key=str)
            if unknown:
                raise ValueError(f"Expert {i}: layers {unknown} have no SVF adapter; the model has {sorted(known)}.")
            experts.append({p: _z(z, known[p], f"Expert {i}") for p, z in src.items()})
        elif isinstance(src, (str, os.PathLike)):
            experts.append(_file_expert(src, layers))
        else:
            raise ValueError(f"Expert {i} must be an adapter file path or a {{layer path: z}} dict; received {type(src).__name__}.")
    return experts


def _keys(model):
    return [e.key for e in tree.walk(model) if tree.is_adapter(e.layer) and e.layer.method == "svf"]


def _weights(weights, n_experts, paths):
    """A `(n_experts, n_layers)` array from the user's `weights`."""
    if weights is None:
        return np.full((n_experts, len(paths)), 1.0 / n_experts)
    try:
        if isinstance(weights, dict):
            missing = [p for p in paths if p not in weights]
            extra = sorted(set(weights) - set(paths), key=str)
            if missing or extra:
                raise ValueError(f"Per-layer weights: missing layers {missing}, unknown layers {extra}.")
            rows = [np.asarray(weights[p], "float64") for p in paths]
            bad = [p for p, r in zip(paths, rows) if r.shape not in ((n_experts,), (n_experts, 1))]
            if bad:
                raise ValueError(f"Per-layer weights: layer {bad[0]!r} needs {n_experts} weights (one per expert); "
                                 f"received {weights[bad[0]]!r}.")
            w = np.stack([r.reshape(n_experts) for r in rows], axis=1)
        else:
            w = np.asarray(weights, "float64")
    except (TypeError, ValueError) as e:
        if "weights" in str(e):
            raise
        raise ValueError(f"weights must be numbers; received {weights!r}.") from None
    if not isinstance(weights, dict):
        if w.shape == (n_experts,):
            w = np.repeat(w[:, None], len(paths), axis=1)
        elif w.shape != (n_experts, len(paths)):
            raise ValueError(
                f"weights must have shape ({n_experts},) (one per expert) or "
                f"({n_experts}, {len(paths)}) (one per expert and SVF layer); received shape {w.shape}."
            )
    if not np.all(np.isfinite(w)):
        raise ValueError(f"weights must be finite; received {weights!r}.")
    return w


def _mix(layers, sets, w):
    """`{path: Σ_k w_k z_k}` (an expert without a layer gives it `z = 1`)."""
    out = {}
    for j, layer in enumerate(layers):
        ones = np.ones(layer.z_shape, "float32")
        z = sum(w[i, j] * sets[i].get(layer.path, ones).astype("float64") for i in range(len(sets)))
        if not np.all(np.abs(z) <= np.finfo(np.float32).max):  # NaN and float32 overflow
            raise ValueError(f"The composition overflows at layer {layer.path!r} (weights too large).")
        out[layer.path] = np.asarray(z, "float32")
    return out


def _check_paper(model):
    for path, a in svf_layers(model):
        if a.parametrization != "paper":
            raise ValueError(
                f"Layer {path!r} uses parametrization={a.parametrization!r}; composition "
                "mixes the multiplier z (the paper's form)."
            )


def _prepared(model, experts):
    """`(layers, expert sets)` for `compose`/`cem_search`, every expert
    checked, before the model changes (a model without SVF adapters is
    checked against the first expert file, which loading would give it)."""
    experts = list(experts)
    if not experts:
        raise ValueError("compose needs at least one expert.")
    if svf_layers(model):
        _check_paper(model)
        layers = _model_layers(model)
    else:
        first = experts[0]
        if not isinstance(first, (str, os.PathLike)):
            raise ValueError(f"Model {model.name!r} has no SVF adapters; pass an adapter file first or enable_adapter(method='svf').")
        layers = _file_layers(model, first)
    return experts, layers, _experts(layers, experts)


def _assign(model, mix):
    for path, a in svf_layers(model):
        a.svf_z.assign(mix[path])


def compose(model, experts, weights=None):
    """Make the model's SVF layers use `z' = Σ_k α_k z_k`.

    Args:
        model: the base model with SVF adapters (`parametrization="paper"`);
            a model without any gets them from the first expert file
            (`load_adapter`).
        experts: adapter files and/or z-sets (`{layer path: z}`); a z-set
            may name a subset of the layers (the others keep `z = 1` from
            that expert).
        weights: `None` (the mean), one weight per expert, or per expert and
            layer: an `(n_experts, n_layers)` array or
            `{layer path: [α_1, ..., α_K]}`.

    Returns:
        The composed z-set, `{layer path: z'}`.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="hidden"),
        ...                           keras.layers.Dense(4, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, method="svf")
        >>> a, b = {"hidden": np.full(6, 2.0)}, {"hidden": np.zeros(6)}
        >>> keras_lowrank.svf.compose(model, [a, b], [0.25, 0.5])["hidden"][:2]
        array([0.5, 0.5], dtype=float32)
    """
    experts, layers, sets = _prepared(model, experts)
    w = _weights(weights, len(sets), [layer.path for layer in layers])
    mix = _mix(layers, sets, w)
    if not svf_layers(model):
        saving.load_adapter(model, experts[0])
    _assign(model, mix)
    return mix


@dataclasses.dataclass
class SearchResult:
    """What `cem_search` found: the best weights (`(n_experts,)` or
    `(n_experts, n_layers)`), their score, and the best and mean score of
    each generation."""

    weights: np.ndarray
    score: float
    history: list


def cem_search(model, experts, scorer, per_layer=False, population=32, elite_fraction=0.2,
               generations=10, init_std=0.3, seed=0, verbose=False):
    """Find composition weights with the cross-entropy method.

    Each generation samples `population` weight vectors `α ∈ [0, 1]` from a
    normal distribution (clipped), composes each (`compose`), scores it with
    `scorer(model)` (higher is better: e.g. accuracy on a few labelled
    examples of the new task), and refits the distribution to the best
    `elite_fraction`. The model ends with the best weights found.

    Args:
        model, experts: as for `compose`.
        scorer: `callable(model) -> float`, higher is better.
        per_layer: one weight per expert and layer (the reference's
            `per_layer=true`) instead of one per expert.
        population, elite_fraction, generations: the CEM settings (the
            paper's population 32 and elite 20%).
        init_std: standard deviation of the first generation around
            `1 / n_experts`.
        seed: NumPy seed of the samples.
        verbose: print each generation's best and mean score.

    Returns:
        A `SearchResult`.
    """
    where = "cem_search"
    if not callable(scorer):
        raise ValueError(f"{where}: scorer must be callable(model) -> float; received {scorer!r}.")
    arguments.flag(where, "per_layer", per_layer)
    population = arguments.number(where, "population", population, 2, None, integer=True)
    elite_fraction = arguments.number(where, "elite_fraction", elite_fraction, 0, 1, low_open=True)
    generations = arguments.number(where, "generations", generations, 1, None, integer=True)
    init_std = arguments.number(where, "init_std", init_std, 0, None, low_open=True)
    seed = arguments.number(where, "seed", seed, 0, None, integer=True, none=True)
    arguments.flag(where, "verbose", verbose)
    experts, layers, sets = _prepared(model, experts)
    paths = [layer.path for layer in layers]
    shape = (len(experts), len(paths)) if per_layer else (len(experts),)
    # What a refused search puts back: the z values, or (a model the first
    # expert file gives its SVF adapters) the model without them.
    loaded = not svf_layers(model)
    before = freezing.trainable_flags(model) if loaded else {p: _np(a.svf_z) for p, a in svf_layers(model)}
    try:
        result = _search(model, layers, sets, scorer, shape, population, elite_fraction,
                         generations, init_std, seed, verbose, experts[0] if loaded else None)
    except BaseException:
        if loaded:
            if svf_layers(model):
                lifecycle.remove_adapters(model)
            freezing.restore_trainable_flags(before)
        else:
            _assign(model, before)
        raise
    return result


def _search(model, layers, sets, scorer, shape, population, elite_fraction, generations,
            init_std, seed, verbose, first_file):
    rng = np.random.default_rng(seed)
    mean = np.full(shape, 1.0 / len(sets))
    std = np.full(shape, float(init_std))
    n_elite = max(1, int(np.ceil(population * elite_fraction)))
    if first_file is not None:
        saving.load_adapter(model, first_file)

    def score(w):
        _assign(model, _mix(layers, sets, _weights(w, len(sets), [layer.path for layer in layers])))
        value = scorer(model)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"cem_search: scorer must return a number; it returned {value!r}.") from None
        if not np.isfinite(value):
            raise ValueError(
                f"cem_search: scorer returned {value} for weights {np.round(w, 4).tolist()}; "
                "a score must be a finite number (higher is better). The model was put back."
            )
        return value

    best_w, best_score, history = None, -np.inf, []
    for gen in range(generations):
        samples = np.clip(rng.normal(mean, std, (population,) + shape), 0.0, 1.0)
        scores = np.asarray([score(w) for w in samples])
        order = np.argsort(-scores, kind="stable")
        elite = samples[order[:n_elite]]
        mean, std = elite.mean(axis=0), elite.std(axis=0) + 1e-3
        if scores[order[0]] > best_score:
            best_score, best_w = float(scores[order[0]]), samples[order[0]].copy()
        history.append((float(scores[order[0]]), float(scores.mean())))
        if verbose:
            print(f"CEM generation {gen + 1}: best {history[-1][0]:.4f}, mean {history[-1][1]:.4f}")
    _assign(model, _mix(layers, sets, _weights(best_w, len(sets), [layer.path for layer in layers])))
    return SearchResult(best_w, best_score, history)
