"""SVF experts and their composition (Transformer², spec §14).

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

from keras_lowrank import plan as plan_lib
from keras_lowrank import saving
from keras_lowrank import tree
from keras_lowrank.methods.spectral import SPECTRUM_RTOL

SEP = plan_lib.SEP


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


def _file_expert(path, layers):
    """`{path: z}` from an adapter file, checked against the model's SVF
    layers (method, parametrization, shapes, singular values)."""
    where = f"adapter file {os.fspath(path)}"
    _, config, tensors = saving.read_adapter_file(path)
    by_key = {a_key: (p, a) for p, a, a_key in layers}
    out = {}
    for key, cfg in config.get("layers", {}).items():
        if cfg.get("method") != "svf":
            raise ValueError(f"{where}: layer {cfg.get('path', key)!r} is a {cfg.get('method')!r} adapter, not SVF.")
        if cfg.get("options", {}).get("parametrization", "paper") != "paper":
            raise ValueError(
                f"{where}: layer {cfg.get('path', key)!r} uses parametrization="
                f"{cfg['options']['parametrization']!r}; composition mixes the multiplier z "
                "(the paper's form): train experts with parametrization='paper'."
            )
        hit = by_key.get(key) or next(((p, a) for p, a, _ in layers if p == cfg.get("path")), None)
        if hit is None:
            raise ValueError(f"{where}: layer {cfg.get('path', key)!r} has no SVF adapter in the model.")
        p, a = hit
        z = np.asarray(tensors[f"{key}{SEP}svf_z"], "float32")
        s = np.asarray(tensors[f"{key}{SEP}svf_s"], "float32")
        mine = _np(a.read(a.svf_s))
        if z.shape != tuple(a.svf_z.shape):
            raise ValueError(f"{where}: layer {p!r}: z has shape {z.shape}, the adapter {tuple(a.svf_z.shape)}.")
        err = float(np.abs(s - mine).max()) / max(float(np.abs(mine).max()), 1e-30)
        if err > SPECTRUM_RTOL:
            raise ValueError(
                f"{where}: layer {p!r}: the expert was trained on another base (its "
                f"singular values differ by {err:.2g})."
            )
        out[p] = z
    return out


def _experts(model, sources):
    layers = [(p, a, k) for (p, a), k in zip(svf_layers(model), _keys(model))]
    experts = []
    for i, src in enumerate(sources):
        if isinstance(src, dict):
            known = {p for p, _, _ in layers}
            unknown = sorted(set(src) - known)
            if unknown:
                raise ValueError(f"Expert {i}: layers {unknown} have no SVF adapter; the model has {sorted(known)}.")
            experts.append({p: np.asarray(z, "float32") for p, z in src.items()})
        elif isinstance(src, (str, os.PathLike)):
            experts.append(_file_expert(src, layers))
        else:
            raise ValueError(f"Expert {i} must be an adapter file path or a {{layer path: z}} dict; received {type(src).__name__}.")
    return layers, experts


def _keys(model):
    return [e.key for e in tree.walk(model) if tree.is_adapter(e.layer) and e.layer.method == "svf"]


def _weights(weights, n_experts, paths):
    """A `(n_experts, n_layers)` array from the user's `weights`."""
    if weights is None:
        return np.full((n_experts, len(paths)), 1.0 / n_experts)
    if isinstance(weights, dict):
        missing = [p for p in paths if p not in weights]
        extra = sorted(set(weights) - set(paths))
        if missing or extra:
            raise ValueError(f"Per-layer weights: missing layers {missing}, unknown layers {extra}.")
        w = np.stack([np.asarray(weights[p], "float64").reshape(n_experts) for p in paths], axis=1)
    else:
        w = np.asarray(weights, "float64")
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
    experts = list(experts)
    if not experts:
        raise ValueError("compose needs at least one expert.")
    if not svf_layers(model):
        first = experts[0]
        if not isinstance(first, (str, os.PathLike)):
            raise ValueError(f"Model {model.name!r} has no SVF adapters; pass an adapter file first or enable_adapter(method='svf').")
        saving.load_adapter(model, first)
    for path, a in svf_layers(model):
        if a.parametrization != "paper":
            raise ValueError(
                f"Layer {path!r} uses parametrization={a.parametrization!r}; composition "
                "mixes the multiplier z (the paper's form)."
            )
    layers, sets = _experts(model, experts)
    paths = [p for p, _, _ in layers]
    w = _weights(weights, len(sets), paths)
    out = {}
    for j, (p, a, _) in enumerate(layers):
        ones = np.ones(tuple(a.svf_z.shape), "float32")
        z = sum(w[i, j] * sets[i].get(p, ones) for i in range(len(sets)))
        out[p] = np.asarray(z, "float32")
    for p, a, _ in layers:
        a.svf_z.assign(out[p])
    return out


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
    experts = list(experts)
    if not experts:
        raise ValueError("cem_search needs at least one expert.")
    if not callable(scorer):
        raise ValueError(f"scorer must be callable(model) -> float; received {scorer!r}.")
    if not (isinstance(population, int) and population >= 2):
        raise ValueError(f"population must be an int >= 2; received {population!r}.")
    if not 0.0 < elite_fraction <= 1.0:
        raise ValueError(f"elite_fraction must be in (0, 1]; received {elite_fraction!r}.")
    compose(model, experts, None)  # checks the experts, creates the adapters if needed
    paths = [p for p, _ in svf_layers(model)]
    shape = (len(experts), len(paths)) if per_layer else (len(experts),)
    rng = np.random.default_rng(seed)
    mean = np.full(shape, 1.0 / len(experts))
    std = np.full(shape, float(init_std))
    n_elite = max(1, int(np.ceil(population * elite_fraction)))
    best_w, best_score, history = None, -np.inf, []
    for gen in range(int(generations)):
        samples = np.clip(rng.normal(mean, std, (population,) + shape), 0.0, 1.0)
        scores = []
        for w in samples:
            compose(model, experts, w)
            scores.append(float(scorer(model)))
        scores = np.asarray(scores)
        order = np.argsort(-scores, kind="stable")
        elite = samples[order[:n_elite]]
        mean, std = elite.mean(axis=0), elite.std(axis=0) + 1e-3
        if scores[order[0]] > best_score:
            best_score, best_w = float(scores[order[0]]), samples[order[0]].copy()
        history.append((float(scores[order[0]]), float(scores.mean())))
        if verbose:
            print(f"CEM generation {gen + 1}: best {history[-1][0]:.4f}, mean {history[-1][1]:.4f}")
    compose(model, experts, best_w)
    return SearchResult(best_w, best_score, history)
