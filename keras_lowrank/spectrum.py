"""The singular values of a model's kernels, and a plot of them.

`spectrum(model)` gives, for every Dense/EinsumDense kernel (or the ones
`targets` names), the singular values of its matrix view (see
`keras_lowrank.geometry`), from the SVD engine (`keras_lowrank.svd`). An
adapted layer reports the kernel it computes (its merged update included).
`plot_spectrum` draws them with matplotlib (the `plot` extra) and reports
the share of values inside a range.
"""

import numpy as np

from keras_lowrank import arguments
from keras_lowrank import bases
from keras_lowrank import options as opt
from keras_lowrank import svd
from keras_lowrank import targeting
from keras_lowrank import tree


def spectrum(model, targets=None, exclude=None):
    """Singular values of the model's kernels, per layer path.

    Args:
        model: a Keras model (adapted or not).
        targets: `None` (every Dense/EinsumDense layer, the output head
            included) or patterns as for `enable_adapter`.
        exclude: patterns to leave out.

    Returns:
        `{path: array}`, in model order; each array holds the singular
        values in descending order, `(k,)` or `(n_shared, k)` for a batched
        EinsumDense kernel.

    Examples:

        >>> import keras
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> {p: s.shape for p, s in keras_lowrank.spectrum(model).items()}
        {'out': (4,)}
    """
    entries = [e for e in tree.spots(tree.walk(model)) if targeting.is_candidate(e.layer)]
    chosen = entries
    if targets is not None:
        pats = targeting.patterns(targets, "targets")
        hit = {id(e.layer) for e in targeting.matching_entries(entries, pats, "targets")}
        chosen = [e for e in entries if id(e.layer) in hit]
    drop = targeting.patterns(exclude, "exclude")
    if drop:
        gone = {id(e.layer) for e in targeting.matching_entries(entries, drop, "exclude")}
        chosen = [e for e in chosen if id(e.layer) not in gone]
    out = {}
    with svd.progress(len(chosen), "Singular values"):
        for e in chosen:
            out[e.path] = svd.singular_values(_matrix(e.layer))
            svd.tick(e.path)
    return out


def _matrix(layer):
    if tree.is_adapter_set(layer):
        return layer.effective_matrix()
    if tree.is_adapter(layer):
        w = layer.base_matrix()
        if not layer.merged:
            w = layer.merged_matrix(w) if layer.adapter_enabled else layer.original_matrix(w)
        return w
    geometry = bases.geometry_of(layer)
    return geometry.kernel_to_matrix(bases.read_kernel(layer))


def _band(where, low, high):
    """`(low, high)`: finite floats >= 0, `low <= high`."""
    low = arguments.check(where, "low", low, opt.nonneg_float)
    high = arguments.check(where, "high", high, opt.nonneg_float)
    if low > high:
        raise ValueError(f"{where}: low must be <= high; received low={low!r}, high={high!r}.")
    return low, high


def spectrum_share(values, low=0.1, high=1.1):
    """The fraction of singular values `s` with `low <= s <= high`, over
    one array or all arrays of a `spectrum` dict.

    Examples:

        >>> import numpy as np
        >>> import keras_lowrank
        >>> keras_lowrank.spectrum_share(np.array([0.05, 0.5, 1.0, 2.0]))
        0.5
    """
    low, high = _band("spectrum_share", low, high)
    if isinstance(values, dict):
        values = np.concatenate([np.ravel(v) for v in values.values()]) if values else np.zeros(0)
    v = np.ravel(np.asarray(values))
    return float(np.mean((v >= low) & (v <= high))) if v.size else 0.0


def plot_spectrum(spectra, path=None, value_range=(0.1, 1.1), ax=None, max_layers=12):
    """Plot singular values per layer (log scale) and shade `value_range`.

    Args:
        spectra: a `spectrum(...)` dict, or a model (its spectrum is computed).
        path: save the figure there (PNG, SVG, ...), if given.
        value_range: `(low, high)`: the band shaded, and whose share of the
            values the title reports.
        ax: a matplotlib axis to draw on (a new figure if `None`).
        max_layers: draw at most this many layers (evenly spaced), so the
            legend stays readable; the share counts all of them.

    Returns:
        `(figure, share)`: the matplotlib figure and the share of singular
        values inside `value_range`.

    Examples:

        >>> import keras
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="out")])
        >>> fig, share = keras_lowrank.plot_spectrum(model)
        >>> 0.0 <= share <= 1.0
        True
    """
    try:
        import matplotlib

        if ax is None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plot_spectrum needs matplotlib: pip install 'keras-lowrank[plot]'."
        ) from None
    if not isinstance(value_range, (tuple, list)) or len(value_range) != 2:
        raise ValueError(f"plot_spectrum: value_range must be (low, high); received {value_range!r}.")
    low, high = _band("plot_spectrum", *value_range)
    max_layers = arguments.check("plot_spectrum", "max_layers", max_layers, opt.positive_int)
    if path is not None:
        path = arguments.path("plot_spectrum", "path", path)
    if not isinstance(spectra, dict):
        spectra = spectrum(spectra)
    share = spectrum_share(spectra, low, high)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    else:
        fig = ax.figure
    names = list(spectra)
    step = max(1, int(np.ceil(len(names) / max_layers)))
    for name in names[::step]:
        values = np.ravel(spectra[name])
        values = np.sort(values)[::-1]
        ax.plot(np.arange(1, values.size + 1), values, label=name, linewidth=1)
    ax.axhspan(low, high, color="tab:green", alpha=0.1)
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(f"{100 * share:.1f}% of singular values in [{low:g}, {high:g}]")
    if names:
        ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig, share
