"""`enable_adapter`: put adapter layers into any Keras model, and the summary
of what it did."""

import math
import re
import warnings

from keras_lowrank import bases
from keras_lowrank import calibration
from keras_lowrank import experts
from keras_lowrank import registry
from keras_lowrank import shared
from keras_lowrank import targeting
from keras_lowrank import tree
from keras_lowrank.adapted_model import adapters
from keras_lowrank.plan import Plan

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

    `left_out` counts, by reason and layer class, what `enable_adapter` did
    not adapt: `"not adaptable"` (layers with a weight matrix no adapter
    fits: a depthwise, grouped or transposed convolution, ...), `"output head"`, `"read
    directly by their parent"` (a parent reads the layer's weights instead
    of calling it, and the method cannot serve them), `"not targeted"`
    (left out by `targets`/`exclude`); `left_out_paths` lists the layers.
    `kernel_reads` are the adapted layers whose parent reads their `kernel`
    instead of calling them (Gemma 4's feed-forward), which the adapter
    serves (`Adapter.kernel`).
    """

    def __init__(self, method, rows, trainable_params, total_params, heads=(), head_rule=None,
                 shared_params=0, task_layers=(), left_out=None, left_out_paths=None,
                 kernel_reads=(), kinds=None):
        self.method = method
        #: `{kind: (adapted, of)}` by target kind (`"linear"`, `"experts"`,
        #: `"router"`, `"shared-experts"`; see `keras_lowrank.targeting`)
        self.kinds = dict(kinds or {})
        #: `{reason: {layer class: count}}` of the layers not adapted
        self.left_out = {r: dict(k) for r, k in (left_out or {}).items()}
        #: `{reason: [path, ...]}`, the same layers by path
        self.left_out_paths = {r: list(p) for r, p in (left_out_paths or {}).items()}
        #: adapted layers their parent multiplies by `kernel` itself
        self.kernel_reads = list(kernel_reads)
        #: paths of the layers a KerasHub task adds around its backbone,
        #: trained in full (`train_task_layers`)
        self.task_layers = list(task_layers)
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
        if self.kinds:
            order = {k: i for i, k in enumerate(targeting.KINDS)}
            out.append("by kind: " + ", ".join(
                f"{kind} {a} of {n} adapted"
                for kind, (a, n) in sorted(self.kinds.items(), key=lambda kv: order.get(kv[0], 99))
            ))
        if self.left_out:
            out.append("left out: " + targeting.left_out_text(self.left_out))
        if self.kernel_reads:
            shown = ", ".join(self.kernel_reads[:4])
            if len(self.kernel_reads) > 4:
                shown += f", ... ({len(self.kernel_reads)} layers: summary.kernel_reads)"
            out.append(
                f"adapted through their kernel (their parent reads it instead of "
                f"calling them; adapter dropout does not apply there): {shown}"
            )
        if self.task_layers:
            out.append(
                f"trained in full (the task's own layers, outside its backbone; "
                f"train_task_layers=False freezes them): {', '.join(self.task_layers)}"
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


def summarize(model, method=None, heads=(), head_rule=None, task_layers=(), left_out=None,
              left_out_paths=None, kernel_reads=()):
    rows = []
    walked = targeting.annotate_kinds(tree.walk(model))
    kinds = {}
    for entry in tree.spots(walked):
        if entry.kind is not None:
            counts = kinds.setdefault(entry.kind, [0, 0])
            counts[0] += bool(tree.is_adapter(entry.layer) or tree.is_adapter_set(entry.layer))
            counts[1] += 1
    # expert weights still inside their banks (not exposed: not adapted)
    for layer in tree.all_layers_with_root(model):
        n = len(experts.expert_weights(layer))
        if n:
            kinds.setdefault("experts", [0, 0])[1] += n
    for entry in walked:
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
                    "kind": entry.kind or targeting.kind_of(entry),
                }
            )
    shared_params = sum(
        math.prod(v.shape) for st in shared.states(model).values() for v in st.trainable_weights
    )
    return AdapterSummary(
        method, rows, bases.count_params(model, trainable_only=True), bases.count_params(model),
        heads, head_rule, shared_params, task_layers, left_out, left_out_paths, kernel_reads,
        {k: tuple(v) for k, v in kinds.items()},
    )


# ----------------------------------------------------------------------
def enable_adapter(
    model,
    method=registry.DEFAULT_METHOD,
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
    train_task_layers=True,
    verbose=False,
    data=None,
    **options,
):
    """Replace the `Dense`/`EinsumDense` layers of `model` with adapters
    (and, by target, its mixture-of-experts expert stacks, convolutions and
    embeddings).

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
        targets: `None` or `"all-linear"` (every Dense/EinsumDense and
            mixture-of-experts expert stack except the output head), or a
            list of layer names, paths, path suffixes, globs
            (`"*/attention/*"`), regexes (`"re:..."`) or kinds (`"linear"`,
            `"experts"`, `"router"`, `"shared-experts"`, `"conv"`,
            `"embedding"`: `keras_lowrank.targeting`; convolutions and
            embeddings only when named). The output head is the layer whose
            output is the model's output (through weightless layers only);
            the summary names it.
        exclude: patterns to leave out, in the same forms.
        dropout: dropout on the adapter input (`None`: the method's default).
        rank_pattern, alpha_pattern: `{pattern: value}` per-layer overrides.
        train_bias: keep the adapted layers' biases trainable.
        trainable_layers: patterns of further layers to keep trainable
            (e.g. the norms), trained in full; adapter files hold them.
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
        train_task_layers: on a KerasHub task model, keep the layers the
            task adds around its backbone (a classifier's new head) trainable
            and train them in full, as Keras's `enable_lora` and PEFT's
            `modules_to_save` do; adapter files hold them. A causal LM's
            head is its backbone's tied embedding and stays frozen. `False`
            freezes them too (they are adapted like any other layer when
            targeted).
        verbose: print the summary table (and a progress bar over `data`).
        data: sample data for the methods that initialize from it (`eva`,
            `corda`, `lora_ga`; `keras_lowrank.method_info(method)` says
            which): batches or arrays in the forms `model.fit` takes
            (`keras_lowrank.calibration`). The model runs on them before
            anything changes; other methods refuse it.
        **options: method options (`keras_lowrank.method_info(method)` lists
            them, with their defaults and meaning).

    A layer whose parent reads its weights instead of calling it (Gemma 4's
    feed-forward multiplies by `gating_ffw.kernel` itself) is adapted all
    the same: the adapter's `kernel` is the adapted kernel, and the update
    trains through it (adapter dropout does not apply there). Methods whose
    training step does more than multiply by one kernel (`dylora`,
    `adalora`, `delta_lora`, `lora_fa` with its correction, `svft`) leave
    such a layer out instead; the summary says which.

    Returns:
        An `AdapterSummary` (prints as a table, then what was adapted by
        kind, then what was left out, by reason and layer class).

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
    # Layers whose parent reads their weights instead of calling them: an
    # adapter serves their kernel where the method can, else they stay out.
    serves = registry.get(method).layer_class.serves_kernel_with(options)
    # Stacked expert weights become layers of their own (`keras_lowrank.experts`);
    # those left without an adapter go back into their banks at the end.
    exposed = experts.expose_model(model)
    try:
        return _enable(model, method, options, serves, exposed, targets, exclude, rank_pattern,
                       alpha_pattern, trainable_layers, base, double_quant, adapter_name,
                       train_task_layers, verbose, data)
    finally:
        experts.fold_back_model(model, only=exposed)


def _enable(model, method, options, serves, exposed, targets, exclude, rank_pattern,
            alpha_pattern, trainable_layers, base, double_quant, adapter_name,
            train_task_layers, verbose, data=None):
    entries = tree.walk(model)
    spots = tree.spots(entries)
    reads = targeting.direct_reads(spots)
    unread, kernel_reads = _direct_reads(spots, reads, serves)
    del spots
    excluded = exclude
    if unread:
        excluded = _pattern_list(exclude) + [re.compile(re.escape(p)) for p in unread]
    try:
        plan = Plan.for_model(
            model, method, options, targets=targets, exclude=excluded,
            rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
            trainable_layers=trainable_layers, base=base, double_quant=double_quant,
            adapter_name=adapter_name, train_task_layers=train_task_layers, entries=entries,
        )
    except ValueError as e:
        if unread and str(e).startswith("No layer left to adapt after"):
            raise ValueError(
                f"No layer left to adapt after targets={targets!r}, exclude={exclude!r}: "
                f"the parents of {unread} read their weights instead of calling them, "
                f"which a {method!r} adapter cannot serve (its training step does more "
                "than multiply by one kernel). Use a method that can (e.g. 'lora', "
                "'dora') or target other layers."
            ) from None
        raise
    del entries  # the plan holds them, until the float layers go (`Plan._convert_bases`)
    counts, paths = _left_out(plan, unread)
    chosen = {(lp.spot or lp.entry).path for lp in plan.layers}
    kernel_reads = [p for p in kernel_reads if p in chosen]
    plan = _calibrate(model, method, plan, data, verbose, dict(
        model=model, method=method, options=options, targets=targets, exclude=excluded,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, trainable_layers=trainable_layers,
        base=base, double_quant=double_quant, adapter_name=adapter_name,
        train_task_layers=train_task_layers))
    plan.prepare()
    plan.apply(init=True)
    summary = summarize(model, method, [e.path for e in plan.heads], plan.head_rule,
                        plan.task_layers, counts, paths, kernel_reads)
    if verbose:
        print(summary)
    return summary


def _calibrate(model, method, plan, data, verbose, plan_args):
    """Run the method's init on the sample `data` (`calibration`), before
    the model changes; a method that sets each layer's rank from the data
    (EVA) gets a new plan with those ranks. Returns the plan to apply."""
    spec = registry.get(method)
    if spec.calibration is None:
        if data is not None:
            raise ValueError(
                f"enable_adapter: method {method!r} does not initialize from sample data; "
                "data must be None (the methods that do: "
                f"{[m for m in registry.methods() if registry.get(m).calibration]})."
            )
        return plan
    if data is None:
        raise ValueError(
            f"enable_adapter: method {method!r} initializes from sample data; pass data=... "
            "(batches or arrays, as model.fit takes them)."
        )
    batches = calibration.Batches(data, f"enable_adapter(method={method!r})")
    targets = {}
    for lp in plan.layers:
        layer = lp.entry.layer
        if lp.existing or lp.spot is not None or tree.is_adapter(layer) or tree.is_adapter_set(layer):
            raise ValueError(
                f"enable_adapter: layer {lp.path!r} already holds an adapter; method {method!r} "
                "reads the layer's own inputs from the sample data, so it goes on plain layers only."
            )
        geometry = bases.geometry_of(layer)  # the adapter's `check_geometry` refused the rest
        targets[lp.path] = (layer, geometry, lp.options)
    found = spec.layer_class.calibrate(model, targets, batches, verbose)
    if found.ranks is not None:
        ranks, alphas = found.ranks, found.alphas
        kept = [p for p in targets if ranks[p] > 0]
        if not kept:
            raise ValueError(
                f"enable_adapter: method {method!r} gave every targeted layer rank 0 on this data; "
                "nothing was changed."
            )
        exact = lambda p: re.compile("^" + re.escape(p) + "$")  # noqa: E731
        args = dict(plan_args)
        args["targets"] = [exact(p) for p in kept]
        args["rank_pattern"] = {exact(p): ranks[p] for p in kept}
        args["alpha_pattern"] = {exact(p): alphas[p] for p in kept}
        with warnings.catch_warnings():  # the first plan warned already
            warnings.simplefilter("ignore")
            plan = Plan.for_model(args.pop("model"), args.pop("method"), args.pop("options"), **args)
    for lp in plan.layers:
        lp.adapter.receive_calibration(found.payloads[lp.path])
    return plan


def _pattern_list(value):
    if value is None:
        return []
    if isinstance(value, (str, re.Pattern)):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise ValueError(
            f"exclude must be a pattern or a list of patterns; received {value!r}."
        ) from None


def _direct_reads(entries, reads, serves):
    """`(paths left out, paths adapted through their kernel)` of the layers
    whose parent reads their weights (`reads`, from
    `targeting.direct_reads`): an adapter serves `kernel` and `bias` when
    its method computes exactly `x · kernel` (`serves`)."""
    unread, through_kernel = [], []
    for entry in entries:
        found = reads.get(id(entry.layer))
        if not found:
            continue
        if serves and found <= targeting.SERVED_READS:
            through_kernel.append(entry.path)
        else:
            unread.append(entry.path)
    return unread, through_kernel


def _left_out(plan, unread):
    """What the plan leaves out, counted by reason and class (before it is
    applied: the counts hold no reference to the model's layers)."""
    entries = plan.entries
    chosen = {id((lp.spot or lp.entry).layer) for lp in plan.layers}
    heads = {id(e.layer) for e in plan.heads}
    unread = set(unread)
    unread_ids = {id(e.layer) for e in entries if e.path in unread}
    kept = list(getattr(plan, "task_layers", ()) or ())
    if plan.trainable_layers:
        pats = targeting.patterns(plan.trainable_layers, "trainable_layers")
        kept += [e.path for e in targeting.matching_entries(entries, pats, "trainable_layers")]
    return targeting.left_out(entries, chosen, heads, unread_ids, kept)
