"""`enable_adapter`: put adapter layers into any Keras model, and the summary
of what it did."""

import math

from keras_lowrank import bases
from keras_lowrank import shared
from keras_lowrank import tree
from keras_lowrank.plan import Plan
from keras_lowrank.plan import adapters

__all__ = ["AdapterSummary", "adapters", "enable_adapter", "summarize"]


# ----------------------------------------------------------------------
# Summary
class AdapterSummary:
    """What `enable_adapter` did: the adapted layers and parameter counts.

    Prints as a table (layer, method, rank, kernel matrix, base storage,
    trainable parameters) followed by the output head that was left out and
    the totals. `rows`, `heads`, `head_rule`, `trainable_params`,
    `total_params` and `adapted_paths` hold the same data. Parameters of a
    quantized base count as the parameters of its float kernel, not as its
    packed bytes.
    """

    def __init__(self, method, rows, trainable_params, total_params, heads=(), head_rule=None,
                 shared_params=0):
        self.method = method
        #: trainable parameters held once by the model and read by several
        #: layers (LoRA-drop's tied pairs), not in any row
        self.shared_params = shared_params
        self.rows = rows
        self.trainable_params = trainable_params
        self.total_params = total_params
        self.heads = list(heads)
        self.head_rule = head_rule

    @property
    def adapter_params(self):
        """Trainable parameters of the adapters themselves (SVD-training's
        σ values, LoRA's A and B, tied pairs shared by layers, ...), without
        trained biases or layers."""
        return sum(r["trainable"] for r in self.rows) + self.shared_params

    @property
    def adapted_paths(self):
        return [r["path"] for r in self.rows]

    @property
    def trainable_fraction(self):
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self):
        head = ("layer", "method", "rank", "matrix", "base", "trainable")
        body = [
            (r["path"], r["method"], "-" if r["rank"] is None else str(r["rank"]),
             r["matrix"], r["base"], f"{r['trainable']:,}")
            for r in self.rows
        ]
        widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]

        def line(cells):
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        out = [line(head), line(["-" * w for w in widths])]
        out += [line(b) for b in body]
        if self.head_rule is not None:
            if self.heads:
                out.append(
                    f"output head (left out unless targeted; found by "
                    f"{self.head_rule}): {', '.join(self.heads)}"
                )
            else:
                out.append(
                    f"output head: none among the Dense/EinsumDense layers (found by {self.head_rule})"
                )
        out.append(
            f"adapted layers: {len(self.rows)}   trainable params: "
            f"{self.trainable_params:,} / {self.total_params:,} "
            f"({100 * self.trainable_fraction:.3f}%)"
        )
        if self.shared_params:
            out.append(
                f"shared by several layers (held once by the model): "
                f"{self.shared_params:,} trainable params"
            )
        other = self.trainable_params - self.adapter_params
        if other:
            out.append(
                f"adapter params: {self.adapter_params:,}   other trainable params: "
                f"{other:,} (biases, trainable_layers)"
            )
        return "\n".join(out)

    __repr__ = __str__


def summarize(model, method=None, heads=(), head_rule=None):
    rows = []
    for entry in tree.walk(model):
        if tree.is_adapter(entry.layer):
            a = entry.layer
            g = a.geometry
            rows.append(
                {
                    "path": entry.path,
                    "method": a.method,
                    "rank": a.summary_rank(),
                    "matrix": g.matrix_text(),
                    "base": bases.base_kind(a.layer),
                    "trainable": a.trainable_count(),
                }
            )
    shared_params = sum(
        math.prod(v.shape) for st in shared.states(model).values() for v in st.trainable_weights
    )
    return AdapterSummary(
        method, rows, bases.count_params(model, trainable_only=True), bases.count_params(model),
        heads, head_rule, shared_params,
    )


# ----------------------------------------------------------------------
def enable_adapter(
    model,
    method="lora",
    rank=None,
    alpha=None,
    targets=None,
    exclude=None,
    dropout=None,
    rank_pattern=None,
    alpha_pattern=None,
    train_bias=None,
    trainable_layers=None,
    base=None,
    double_quant=True,
    adapter_name=None,
    verbose=False,
    **options,
):
    """Replace the `Dense`/`EinsumDense` layers of `model` with adapters.

    Everything is validated before the model changes; a refused call (a
    `ValueError`/`TypeError` that names the layer and the value at fault)
    leaves every weight, layer and trainable flag as it was.

    Args:
        model: a built Keras model (KerasHub backbone or task model,
            Functional, Sequential or subclassed).
        method: a name from `keras_lowrank.methods()`.
        rank: adapter rank (`None`: the method's default, 8 for LoRA;
            per-layer overrides: `rank_pattern`).
        alpha: scaling numerator; `None` means `rank` (per-layer overrides:
            `alpha_pattern`).
        targets: `None` or `"all-linear"` (every Dense/EinsumDense except the
            output head), or a list of layer names, paths, path suffixes,
            globs (`"*/attention/*"`) or regexes (`"re:..."`). The output
            head is the layer whose output is the model's output (through
            weightless layers only); the summary names it.
        exclude: patterns to leave out, in the same forms.
        dropout: dropout on the adapter input (`None`: the method's default).
        rank_pattern, alpha_pattern: `{pattern: value}` per-layer overrides.
        train_bias: keep the adapted layers' biases trainable.
        trainable_layers: patterns of further layers to keep trainable
            (e.g. a classifier head or the norms).
        base: storage of the frozen kernels: `None`/`"float"` (as they are),
            `"nf4"` (4-bit NormalFloat, QLoRA's base), or `"int8"`/`"int4"`
            (Keras's own quantizers). SVD inits decompose the full-precision
            kernel and quantize the residual. A model already quantized with
            `model.quantize("int8"|"int4")` is adapted over its quantized
            kernels as it is.
        double_quant: with `base="nf4"`, also quantize the block constants
            (4.127 instead of 4.5 bits per parameter).
        adapter_name: add the adapters under this name, beside those
            already in the model (`keras_lowrank.named`): the new adapter
            becomes the active one (`set_active` to change that). Without
            it, a layer that already has an adapter is refused, unless the
            model has named adapters (then the name is `"default"`).
        verbose: print the summary table.
        **options: method options (see `keras_lowrank.methods()` and the
            method's layer class).

    Returns:
        An `AdapterSummary` (prints as a table).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
        ...                           keras.layers.Dense(4, name="out")])
        >>> summary = keras_lowrank.enable_adapter(model, method="lora", rank=2)
        >>> summary.adapted_paths
        ['hidden']
        >>> summary.heads
        ['out']
    """
    given = {"rank": rank, "alpha": alpha, "dropout": dropout, "train_bias": train_bias}
    options = {**{k: v for k, v in given.items() if v is not None}, **options}
    plan = Plan.for_model(
        model, method, options, targets=targets, exclude=exclude,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        trainable_layers=trainable_layers, base=base, double_quant=double_quant,
        adapter_name=adapter_name,
    )
    plan.prepare()
    plan.apply(init=True)
    summary = summarize(model, method, [e.path for e in plan.heads], plan.head_rule)
    if verbose:
        print(summary)
    return summary
