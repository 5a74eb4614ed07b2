"""EVA: explained variance adaptation (Paischer et al., arXiv 2410.07170).

A LoRA whose `A` starts as the leading right singular vectors of each
layer's input activations on sample data (their principal components), `B`
at zero (so the layer starts exactly as it was), and whose ranks are
redistributed across the layers by explained variance.

The data pass (`calibrate`, PEFT's `get_eva_state_dict`) runs the model on
the sample batches and feeds each layer's input rows (the tokens a KerasHub
`padding_mask` marks, when there is one) to an incremental PCA per layer,
`incremental_pca`, with `⌊r·ρ⌉` components (`ρ = rho`). A layer is done once
its components settle: each of its assigned components has a cosine
similarity of at least `tau` with the one the previous batch gave. After
each batch the rank budget `Σ r` is dealt out again: the `Σ r` largest
explained-variance ratios over all layers win, so a layer gets between 0
and `⌊r·ρ⌉` components (0 leaves it out). Layers that see the same inputs
(a block's query, key and value) share one PCA. The data is read again
until every layer is done (at most `max_passes` times).

`A` is the first `r_ℓ` components (divided by the square roots of their
singular values with `whiten=True`); with `adjust_scaling_factors=True` a
layer whose rank changed keeps its scale (`alpha · r_ℓ / r`).
"""

import collections

import keras
import numpy as np

from keras_lowrank import calibration
from keras_lowrank import options as opt
from keras_lowrank import registry
from keras_lowrank.adapter import Adapter
from keras_lowrank.methods import reference
from keras_lowrank.methods.lora import ALPHA
from keras_lowrank.methods.lora import DROPOUT
from keras_lowrank.methods.lora import RANK
from keras_lowrank.methods.lora import RSLORA
from keras_lowrank.methods.lora import LoRA


class IncrementalPCA:
    """Principal components of rows fed batch by batch (float64 NumPy):
    the combination rule of Ross et al. (2008) as scikit-learn's
    `IncrementalPCA.partial_fit` writes it, with an exact SVD and the sign
    of each component fixed by its largest entry. (A PCA of activation rows,
    in float64 at every batch: not a kernel's decomposition, so not
    `keras_lowrank.svd`, which works in float32 and reports each kernel.)

    Examples:

        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(40, 2)) @ rng.normal(size=(2, 5))  # rows in a plane
        >>> pca = IncrementalPCA(2)
        >>> pca.partial_fit(x[:20]); pca.partial_fit(x[20:])
        >>> full = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][:2]
        >>> bool(np.allclose(np.abs(pca.components), np.abs(full)))  # exact: 2 components span the rows
        True
    """

    def __init__(self, n_components):
        self.n_components = n_components
        self.components = None
        self.n_seen = 0

    def partial_fit(self, x):
        x = np.asarray(x, "float64")
        n = x.shape[0]
        total = self.n_seen + n
        batch_mean = x.mean(axis=0)
        if self.components is None:
            self.sum = x.sum(axis=0)
            self.sq = (x ** 2).sum(axis=0)
            stacked = x - batch_mean
        else:
            old_mean = self.sum / self.n_seen
            correction = np.sqrt(self.n_seen / total * n) * (old_mean - batch_mean)
            stacked = np.vstack([self.singular_values[:, None] * self.components, x - batch_mean,
                                 correction[None, :]])
            self.sum = self.sum + x.sum(axis=0)
            self.sq = self.sq + (x ** 2).sum(axis=0)
        _, s, vt = np.linalg.svd(stacked, full_matrices=False)
        signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
        signs[signs == 0] = 1.0
        vt = vt * signs[:, None]
        self.n_seen = total
        mean = self.sum / total
        # Σ_i ‖x_i - mean‖²: the total variance times the count
        spread = float(np.sum(self.sq - total * mean ** 2))
        k = self.n_components
        self.components = vt[:k]
        self.singular_values = s[:k]
        self.explained_variance_ratio = s[:k] ** 2 / spread if spread > 0 else np.zeros_like(s[:k])


def _unit(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError
    return float(value)


def _cosine(a, b):
    num = np.sum(a * b, axis=1)
    den = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)
    return num / den


def rank_distribution(ratios, owner_of, budget, max_components):
    """How many components each layer gets: the `budget` largest
    explained-variance ratios over all layers (`ratios[owner][:max]`, each
    layer reading its owner's), ties in layer order; then a layer that
    shares its owner's inputs never gets more than the owner (the counts
    are swapped)."""
    keys, values = [], []
    for layer, owner in owner_of.items():
        for v in ratios[owner][: max_components[owner]]:
            keys.append(layer)
            values.append(v)
    order = np.argsort(-np.asarray(values), kind="stable")[:budget]
    counts = collections.Counter(keys[i] for i in order)
    counts = {layer: counts.get(layer, 0) for layer in owner_of}
    for layer, owner in owner_of.items():
        if layer != owner and counts[owner] < counts[layer]:
            counts[owner], counts[layer] = counts[layer], counts[owner]
    return counts


@registry.method(
    "EVA: LoRA with A from the principal components of each layer's inputs on sample data",
    reference=reference.lora,
    paper="https://arxiv.org/abs/2410.07170",
)
@keras.saving.register_keras_serializable(package="keras_lowrank")
class EVA(calibration.SampleDataInit, LoRA):
    """LoRA initialized by explained variance adaptation (EVA).

    `enable_adapter(model, method="eva", rank=r, data=...)` runs the model
    on the sample batches, sets `A` of each layer to the leading principal
    components of its inputs and `B = 0` (an exact no-op at start), and
    deals the rank budget (`r` per targeted layer) out by explained
    variance: a layer gets from 0 to `round(r·rho)` (0: no adapter). See the
    module docstring. After the init, an EVA adapter is a LoRA: it trains,
    merges and saves as one.

    Takes `LoRA`'s arguments (`layer`, `rank`, `alpha`, `rslora`, `dropout`,
    `train_bias`, `seed`, `activation`, `merged` and `enabled`), and:

    Args:
        rho: how far a layer's rank may grow: up to `round(rank·rho)`
            (1: every layer keeps its rank).
        tau: the cosine similarity between successive batches' components
            at which a layer's components count as settled.
        whiten: divide the components by the square roots of their
            singular values.
        adjust_scaling_factors: scale `alpha` with the rank a layer gets,
            so its scale `alpha/r` stays as asked.
        max_passes: how many times the data may be read while components
            settle (an error names the layers still moving after that).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, name="a"),
        ...                           keras.layers.Dense(8, name="b"), keras.layers.Dense(2)])
        >>> x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
        >>> summary = keras_lowrank.enable_adapter(model, method="eva", rank=2, data=x)
        >>> sum(model.get_layer(n).rank for n in summary.adapted_paths)  # the budget, redistributed
        4
    """

    method = "eva"
    calibration = "inputs"
    # a layer whose parent reads its kernel is never called, so the sample
    # data cannot reach it: it is left out
    serves_kernel = False
    #: embedding tables are refused by name (`calibration.SampleDataInit`)
    refuses_embeddings = True
    OPTIONS = (RANK, ALPHA, DROPOUT, RSLORA) + (
        opt.Option("rho", 2.0, opt.float_at_least(1.0),
                   "a layer's rank may grow to round(rank*rho) as the budget is redistributed"),
        opt.Option("tau", 0.99, opt.Check("a float in (0, 1]", _unit), "cosine similarity at which components count as settled"),
        opt.Option("whiten", False, opt.boolean, "divide A's rows by the square roots of their singular values"),
        opt.Option("adjust_scaling_factors", True, opt.boolean,
                   "scale alpha with a layer's new rank so alpha/r is kept"),
        opt.Option("max_passes", 10, opt.positive_int, "how many times the data may be read"),
    ) + Adapter.OPTIONS

    @classmethod
    def calibrate(cls, model, targets, data, verbose):
        where = "enable_adapter(method='eva')"
        first = next(iter(targets.values()))[2]
        rho, tau = first["rho"], first["tau"]
        ranks = {k: t[2]["rank"] for k, t in targets.items()}
        budget = sum(ranks.values())
        max_comp = {k: min(int(round(ranks[k] * rho)), targets[k][1].n_in) for k in targets}
        # layers that see the same inputs share one PCA (found on the first batch)
        first_rows = {}
        calibration.input_rows(
            model, {k: (t[0], t[1]) for k, t in targets.items()}, _first_batch(data),
            lambda k, rows: first_rows.setdefault(k, rows), where, verbose=False, mask_padding=True)
        owner_of, owners = {}, []
        for k in targets:
            if k not in first_rows:
                raise ValueError(f"{where}: layer {k!r} was not called on the sample data.")
            owner_of[k] = next((o for o in owners if first_rows[o].shape == first_rows[k].shape
                                and np.array_equal(first_rows[o], first_rows[k])), k)
            if owner_of[k] == k:
                owners.append(k)
        for o in owners:
            max_comp[o] = max(max_comp[k] for k in targets if owner_of[k] == o)
        pcas = {o: IncrementalPCA(max_comp[o]) for o in owners}
        settled = {o: np.zeros(max_comp[o], bool) for o in owners}
        done = {o: False for o in owners}
        state = {"dist": dict(max_comp)}

        def on_batch(key, rows):
            pca = pcas[key]
            if rows.shape[0] < pca.n_components:
                return  # too few rows for the components (as PEFT, skipped)
            previous = None if pca.components is None else pca.components.copy()
            pca.partial_fit(rows)
            if previous is not None:
                settled[key] = _cosine(pca.components, previous) >= tau

        def active():
            for o in owners:
                now = bool(np.all(settled[o][: state["dist"][o]]))
                done[o] = now
            return {o for o in owners if not done[o]}

        def after_batch():
            if all(p.components is not None for p in pcas.values()):
                counts = rank_distribution({o: pcas[o].explained_variance_ratio for o in owners},
                                           owner_of, budget, max_comp)
                state["dist"] = {o: max(counts[k] for k in targets if owner_of[k] == o) for o in owners}
                state["counts"] = counts

        calibration.input_rows(model, {o: (targets[o][0], targets[o][1]) for o in owners}, data,
                               on_batch, where, verbose, passes=first["max_passes"], active=active,
                               after_batch=after_batch, mask_padding=True)
        active()
        if "counts" not in state:
            raise ValueError(f"{where}: some layers got too few input rows on the sample data for "
                             f"{max(max_comp.values())} components; give more data.")
        counts = state["counts"]
        moving = [k for k in targets if not np.all(settled[owner_of[k]][: counts[k]])]
        if moving:
            raise ValueError(
                f"{where}: the components of {moving} did not settle (tau={tau}) within "
                f"max_passes={first['max_passes']} passes over the data; give more data, a lower "
                "tau or more passes. The model was left unchanged."
            )
        payloads, alphas = {}, {}
        for k, (_, _, options) in targets.items():
            pca, r = pcas[owner_of[k]], counts[k]
            a = pca.components[:r]
            if first["whiten"]:
                a = a / np.sqrt(pca.singular_values[:r])[:, None]
            payloads[k] = a.astype("float32")
            alpha = options["alpha"] if options["alpha"] is not None else float(options["rank"])
            if r != options["rank"] and options["adjust_scaling_factors"]:
                alpha = alpha * r / options["rank"]
            alphas[k] = float(alpha)
        return calibration.Calibrated(payloads, ranks=counts, alphas=alphas)

    def initialize_from_base(self):
        a = self.sample_data_found()
        self.lora_a.assign(keras.ops.convert_to_tensor(a, self.lora_a.dtype))


class _first_batch:
    """The first batch of `Batches`, as a one-batch source."""

    def __init__(self, data):
        self.data = data
        self.reusable = False

    def __iter__(self):
        for batch in self.data:
            yield batch
            return
