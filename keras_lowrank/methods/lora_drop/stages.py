"""`lora_drop`: LoRA-drop's three stages (arXiv 2402.07721).

1. **Importance.** LoRA on every targeted layer, trained with `model.fit` for
   `steps` steps on `sample_data` (the paper's stratified sample of the
   training set). Then, over the same sample, each adapted layer's
   `g_i = Σ ‖s (x_i A_i) B_i‖²` (the squared L2 norm of its LoRA output,
   summed over samples and tokens), and `I_i = g_i / Σ_j g_j`.
2. **Selection.** Sorted by `I_i`, the smallest prefix whose cumulative
   importance reaches `threshold` keeps its own LoRA pair.
3. **The model to fine-tune.** The stage-1 LoRA is taken out (the kernels
   were never changed), and LoRA-drop adapters go in, freshly initialized
   (our choice where the paper leaves it open): the retained layers with
   their own pair, every other layer reading the one pair tied to its
   kernel shape.

The result is an ordinary adapted model: `model.fit` trains it, `.keras` and
adapter files keep the tying, `merge` folds each layer's share.
"""

import dataclasses
import math
import re

import keras
import numpy as np
from keras import ops

from keras_lowrank import adapted_model
from keras_lowrank import freezing
from keras_lowrank import lifecycle
from keras_lowrank import tree
from keras_lowrank.adapt import enable_adapter
from keras_lowrank.adapt import summarize

__all__ = ["LoRADropReport", "importance", "lora_drop", "select"]


# ----------------------------------------------------------------------
# Stage 1: importance
def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _batches(data, batch_size):
    """The sample as a list of `(x, y, sample_weight)` batches: from a
    `(x, y)` / `(x, y, w)` tuple of arrays (or dicts of arrays), a bare `x`,
    a `tf.data.Dataset` or a `keras.utils.PyDataset`. The sample is small
    (a fraction of the training set), so it is held in memory."""
    if hasattr(data, "as_numpy_iterator"):  # tf.data
        return [keras.utils.unpack_x_y_sample_weight(b) for b in data.as_numpy_iterator()]
    if isinstance(data, keras.utils.PyDataset):
        return [keras.utils.unpack_x_y_sample_weight(data[i]) for i in range(len(data))]
    if isinstance(data, list):
        data = tuple(data)
    x, y, w = keras.utils.unpack_x_y_sample_weight(data)
    leaves = keras.tree.flatten(x)
    if not leaves:
        raise ValueError("lora_drop: sample_data holds no inputs.")
    n = int(np.shape(leaves[0])[0])
    if n == 0:
        raise ValueError("lora_drop: sample_data is empty.")
    out = []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        pick = lambda t: None if t is None else keras.tree.map_structure(lambda a: a[sl], t)  # noqa: E731
        out.append((pick(x), pick(y), pick(w)))
    return out


def importance(model, sample_data, batch_size=32, paths=None):
    """`{path: g_i}`: the squared L2 norm of each LoRA layer's output
    `s (x_i A_i) B_i`, summed over every sample and token of `sample_data`
    (inference mode, no dropout). Works on the `lora` and `lora_drop`
    layers of `model` (those in `paths`, if given).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> from keras_lowrank.methods.lora_drop import stages as drop
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="a"),
        ...                           keras.layers.Dense(2, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, rank=2)
        >>> drop.importance(model, np.ones((3, 4), "float32"))  # B starts at zero
        {'a': 0.0}
    """
    return _measure(model, _batches(sample_data, batch_size), paths)


def _measure(model, batches, paths=None):
    layers = [(p, a) for p, a in adapted_model.adapters(model)
              if hasattr(a, "update_rows") and (paths is None or p in paths)]
    if not layers:
        raise ValueError(f"Model {model.name!r} has no LoRA layers to measure.")
    totals = {p: 0.0 for p, _ in layers}
    by_id = {id(a): p for p, a in layers}

    def probe(adapter, x):
        rows = adapter.update_rows(x)
        totals[by_id[id(adapter)]] += float(_np(ops.sum(ops.square(ops.cast(rows, "float32")))))

    for _, a in layers:
        a.set_probe(probe)
    try:
        for x, _, _ in batches:
            model(x, training=False)
    finally:
        for _, a in layers:
            a.set_probe(None)
    return totals


# ----------------------------------------------------------------------
# Stage 2: selection
def select(scores, threshold):
    """The layers that keep their own pair: sorted by score (ties in the
    given order), the smallest prefix whose cumulative share of the total
    reaches `threshold`.

    Examples:

        >>> from keras_lowrank.methods.lora_drop import stages as drop
        >>> drop.select({"a": 1.0, "b": 6.0, "c": 3.0}, 0.9)
        ['b', 'c']
    """
    _check_threshold(threshold)
    total = float(sum(scores.values()))
    if not math.isfinite(total) or total <= 0:
        raise ValueError(
            f"LoRA-drop importance needs LoRA outputs that are not all zero; the "
            f"stage-1 outputs sum to {total}. Train stage 1 longer (steps) or "
            "with a larger learning rate."
        )
    order = sorted(scores, key=lambda p: -scores[p])
    kept, acc = [], 0.0
    for p in order:
        kept.append(p)
        acc += scores[p]
        if acc >= threshold * total:
            break
    return kept


def _check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0 < threshold <= 1):
        raise ValueError(f"lora_drop: threshold must be in (0, 1]; received threshold={threshold!r}.")


# ----------------------------------------------------------------------
# The report
@dataclasses.dataclass
class LoRADropReport:
    """What `lora_drop` found and did. Prints as a table.

    Attributes:
        rows: one dict per adapted layer, most important first: `path`,
            `importance` (`I_i`), `cumulative`, `kept` (own pair) and
            `pair` (the tied pair it reads, or `None`).
        threshold: the cumulative-importance threshold `T`.
        params: trainable adapter parameters of the LoRA-drop model.
        lora_params: those of plain LoRA on the same layers and rank.
        summary: the `AdapterSummary` of the LoRA-drop model.
        figure: the importance bar chart (with `plot=True`).
    """

    rows: list
    threshold: float
    params: int
    lora_params: int
    summary: object = None
    figure: object = None

    @property
    def kept(self):
        return [r["path"] for r in self.rows if r["kept"]]

    @property
    def param_ratio(self):
        """LoRA-drop's trainable parameters / plain LoRA's."""
        return self.params / max(self.lora_params, 1)

    def __str__(self):
        head = ("layer", "importance", "cumulative", "adapter")
        body = [(r["path"], f"{r['importance']:.4f}", f"{r['cumulative']:.4f}",
                 "own pair" if r["kept"] else f"tied {r['pair']}") for r in self.rows]
        widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]
        out.append(
            f"kept {len(self.kept)} of {len(self.rows)} layers (threshold {self.threshold:g}); "
            f"trainable adapter params {self.params:,} vs LoRA {self.lora_params:,} "
            f"({100 * self.param_ratio:.1f}%)"
        )
        return "\n".join(out)

    __repr__ = __str__

    def plot(self, path=None, ax=None):
        """A bar chart of the importance per layer (kept layers in one
        colour, tied ones in another); saved to `path` if given. Returns
        the matplotlib figure."""
        try:
            import matplotlib

            if ax is None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("plotting needs matplotlib: pip install 'keras-lowrank[plot]'.") from None
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(self.rows) + 2), 4))
        else:
            fig = ax.figure
        colors = ["tab:blue" if r["kept"] else "tab:gray" for r in self.rows]
        ax.bar(range(len(self.rows)), [r["importance"] for r in self.rows], color=colors)
        ax.set_xticks(range(len(self.rows)))
        ax.set_xticklabels([r["path"] for r in self.rows], rotation=90, fontsize="x-small")
        ax.set_ylabel("importance $I_i$")
        ax.set_title(f"LoRA-drop: {len(self.kept)} of {len(self.rows)} layers keep their own pair "
                     f"(T = {self.threshold:g})")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


# ----------------------------------------------------------------------
def _exact(paths):
    return ["re:" + re.escape(p) for p in paths]


def lora_drop(model, sample_data, threshold=0.9, rank=8, steps=100, alpha=None,
              targets=None, exclude=None, optimizer=None, loss=None, batch_size=32,
              seed=None, plot=False, verbose=False, **options):
    """LoRA-drop (arXiv 2402.07721): find the layers whose LoRA output matters, give
    them their own LoRA pair, and tie one pair per kernel shape across the
    others.

    Args:
        model: a built Keras model with no adapters on the targeted layers.
        sample_data: the sample `D_s` (a fraction of the training data), in
            any form `model.fit` takes whole: `(x, y)` arrays or dicts, a
            `tf.data.Dataset`, a `keras.utils.PyDataset`. Model inputs, so a
            KerasHub task needs `preprocessor=None` and preprocessed data.
        threshold: the cumulative importance `T` the kept layers reach.
        rank, alpha: of the stage-1 LoRA and of the final adapters.
        steps: stage-1 optimizer steps (cycling over the sample).
        targets, exclude: which layers (as in `enable_adapter`).
        optimizer, loss: for stage 1; by default the model's own compile
            (a model that is not compiled needs `loss`; `optimizer` defaults
            to Adam(1e-3)).
        batch_size: for array samples.
        seed: seed of the adapters' initializers.
        plot: draw the importance bars (`report.figure`).
        verbose: print the report.
        **options: further LoRA options for both stages (`dropout`,
            `rslora`, `init`, `train_bias`).

    Returns:
        A `LoRADropReport`. The model now holds the stage-3 adapters (and is
        recompiled with a fresh copy of its optimizer if it was compiled).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> inp = keras.Input((8,))
        >>> h = keras.layers.Dense(8, activation="relu", name="a")(inp)
        >>> h = keras.layers.Dense(8, activation="relu", name="b")(h)
        >>> model = keras.Model(inp, keras.layers.Dense(2, name="out")(h))
        >>> x = np.random.RandomState(0).normal(size=(32, 8)).astype("float32")
        >>> y = x[:, :2] * 2.0
        >>> report = keras_lowrank.lora_drop(model, (x, y), rank=2, steps=5, seed=0,
        ...                                  loss="mse", optimizer=keras.optimizers.Adam(0.05))
        >>> sorted(r["path"] for r in report.rows)
        ['a', 'b']
        >>> sorted(a.method for _, a in keras_lowrank.adapters(model))
        ['lora_drop', 'lora_drop']
    """
    _check_threshold(threshold)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"lora_drop: steps must be an int >= 1; received steps={steps!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"lora_drop: batch_size must be an int >= 1; received batch_size={batch_size!r}.")
    if getattr(model, "preprocessor", None) is not None:
        raise ValueError(
            f"lora_drop: {model.name!r} has a preprocessor; build the task with "
            "preprocessor=None and pass preprocessed (x, y) as sample_data."
        )
    compiled = getattr(model, "compiled", False) and getattr(model, "optimizer", None) is not None
    if loss is None and not compiled:
        raise ValueError(
            "lora_drop trains LoRA on the sample first: compile the model or pass "
            "loss= (and optionally optimizer=)."
        )
    batches = _batches(sample_data, batch_size)
    shared_opts = {"rank": rank, "alpha": alpha, "seed": seed, **options}
    flags = freezing.trainable_flags(model)
    # Stage 1: LoRA on the sample
    stage1 = enable_adapter(model, method="lora", targets=targets, exclude=exclude, **shared_opts)
    paths = stage1.adapted_paths
    try:
        if loss is not None:
            model.compile(optimizer=optimizer if optimizer is not None else keras.optimizers.Adam(1e-3),
                          loss=loss)
        for step in range(steps):  # the compiled train step, cycling over the sample
            bx, by, bw = batches[step % len(batches)]
            model.train_on_batch(bx, by, sample_weight=bw)
        scores = _measure(model, batches, set(paths))
        kept = select(scores, threshold)
    finally:
        lifecycle.remove_adapters(model, set(paths))
        freezing.restore_trainable_flags(flags)
    # Stage 3: own pairs for the kept layers, tied pairs for the others
    tied = [p for p in paths if p not in kept]
    try:
        enable_adapter(model, method="lora_drop", targets=_exact(kept), tied=False, **shared_opts)
        if tied:
            enable_adapter(model, method="lora_drop", targets=_exact(tied), tied=True, **shared_opts)
    except BaseException:
        ours = {p for p, _ in adapted_model.adapters(model)} & set(paths)
        if ours:
            lifecycle.remove_adapters(model, ours)
        freezing.restore_trainable_flags(flags)
        raise
    summary = summarize(model, "lora_drop")
    total = sum(scores.values())
    layers = {e.path: e.layer for e in tree.walk(model)}
    rows, acc = [], 0.0
    for p in sorted(paths, key=lambda q: -scores[q]):
        acc += scores[p]
        a = layers[p]
        rows.append({
            "path": p, "importance": scores[p] / total, "cumulative": acc / total,
            "kept": p in kept, "pair": None if p in kept else a.geometry.matrix_text(),
        })
    report = LoRADropReport(rows, float(threshold), summary.adapter_params,
                            stage1.adapter_params, summary)
    if plot:
        report.figure = report.plot()
    if verbose:
        print(report)
    return report
