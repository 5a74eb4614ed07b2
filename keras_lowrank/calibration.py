"""Sample data for the data-aware initializations (EVA, CorDA, LoRA-GA).

`enable_adapter(model, method=..., data=...)` runs the model on the user's
sample batches before anything changes, in the model's own backend, batch by
batch with a progress bar, and hands each adapter what its init needs:

- `"inputs"` (EVA, CorDA): each target layer's input rows, in the kernel's
  matrix view (`(N, n_in)`), read while the model runs (`input_rows`);
- `"gradients"` (LoRA-GA): the mean gradient of the model's compiled loss
  with respect to each target kernel's matrix view (`kernel_gradients`; the
  gradient itself comes from the backend's own autodiff, one module per
  backend: `_jax`, `_tensorflow`, `_torch`).

The data is an argument, never a global, and is read before the model
changes: a refused call (bad data, a loss the model lacks) changes nothing.

`data` takes the forms `model.fit` takes: a `tf.data.Dataset`, a
`keras.utils.PyDataset`, a list or other iterable of batches (each `x`,
`(x,)`, `(x, y)` or `(x, y, sample_weight)`), or arrays (`x`, a dict of
arrays, or a tuple `(x, y)`), cut into batches of `batch_size` rows.
"""

import contextlib

import keras
import numpy as np
from keras import ops

#: how many rows a batch of array data holds
BATCH_SIZE = 32


def _is_arrays(data):
    leaves = keras.tree.flatten(data)
    return bool(leaves) and all(hasattr(x, "shape") and hasattr(x, "dtype") for x in leaves)


def _to_numpy(batch):
    return keras.tree.map_structure(
        lambda t: t if t is None else np.asarray(ops.convert_to_numpy(t)), batch)


class Batches:
    """The sample data as a re-readable source of `(x, y, sample_weight)`
    NumPy batches (see the module docstring for the forms it takes).

    Examples:

        >>> import numpy as np
        >>> from keras_lowrank.calibration import Batches
        >>> data = Batches(np.ones((70, 4), "float32"), "eva", batch_size=32)
        >>> [x.shape[0] for x, _, _ in data]
        [32, 32, 6]
    """

    def __init__(self, data, where, batch_size=BATCH_SIZE):
        self.where = where
        self.batch_size = batch_size
        self._arrays = None
        self._source = None
        if data is None:
            raise ValueError(f"{where}: data is None; pass sample batches.")
        if isinstance(data, (np.ndarray, dict)) or (isinstance(data, tuple) and _is_arrays(data)) \
                or (hasattr(data, "shape") and hasattr(data, "dtype")):
            self._arrays = _to_numpy(data)
            sizes = {int(x.shape[0]) for x in keras.tree.flatten(self._arrays)}
            if len(sizes) != 1 or 0 in sizes:
                raise ValueError(
                    f"{where}: the arrays of data must share one non-zero number of rows; "
                    f"they have {sorted(sizes)}."
                )
            self.rows = sizes.pop()
            return
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise ValueError(
                f"{where}: data must be batches (a tf.data.Dataset, a keras.utils.PyDataset, a "
                f"list or iterable of batches) or arrays; received {type(data).__name__}."
            )
        self._source = data
        #: a one-shot iterator (a generator) can be read only once
        self.reiterable = iter(data) is not data

    def __iter__(self):
        if self._arrays is not None:
            for start in range(0, self.rows, self.batch_size):
                part = keras.tree.map_structure(lambda a: a[start : start + self.batch_size], self._arrays)
                yield keras.utils.unpack_x_y_sample_weight(part if isinstance(part, tuple) else (part,))
            return
        source = self._source
        if isinstance(source, keras.utils.PyDataset):
            dataset = source
            source = (dataset[i] for i in range(len(dataset)))
        count = 0
        for batch in source:
            count += 1
            batch = _to_numpy(batch)
            if isinstance(batch, list):
                batch = tuple(batch)
            yield keras.utils.unpack_x_y_sample_weight(batch)
        if count == 0:
            raise ValueError(f"{self.where}: data holds no batch.")

    @property
    def reusable(self):
        return self._arrays is not None or self.reiterable


def _progress(n, label, verbose):
    return keras.utils.Progbar(n, unit_name=label) if verbose else None


@contextlib.contextmanager
def recording(layers):
    """While inside, every call of a layer in `layers` (`{key: layer}`)
    appends its input to `seen[key]` (a list per key).

    The layers themselves are not touched: the `call` of each of their
    classes is wrapped for the duration (the wrapper records only the
    instances asked for, then calls the class's own `call`), and given back
    on exit."""
    seen = {key: [] for key in layers}
    keys = {id(layer): key for key, layer in layers.items()}
    classes = list(dict.fromkeys(type(layer) for layer in layers.values()))
    # the originals, read before any class is patched (a subclass that does
    # not define `call` would otherwise find its parent's wrapper)
    originals = {cls: (cls.__dict__.get("call"), cls.call) for cls in classes}
    try:
        for cls, (_, original) in originals.items():

            def call(self, inputs, *args, _original=original, **kwargs):
                key = keys.get(id(self))
                if key is not None:
                    seen[key].append(inputs)
                return _original(self, inputs, *args, **kwargs)

            call.__wrapped__ = original
            cls.call = call
        yield seen
    finally:
        for cls, (own, _) in originals.items():
            if own is None:
                del cls.call
            else:
                cls.call = own


def _call_model(model, x, training):
    if isinstance(x, tuple) and len(x) == 1:
        x = x[0]
    return model(x, training=training)


def input_rows(model, targets, data, on_batch, where, verbose=True, passes=1, active=None,
               after_batch=None, mask_padding=False):
    """Run `model` over `data` and give each target layer's input rows to
    `on_batch(key, rows)` (`rows`: a float64 `(N, n_in)` NumPy array of the
    kernel's matrix view), batch by batch. Returns the number of batches run.

    Args:
        model: the model, before any change.
        targets: `{key: (layer, geometry)}`.
        data: a `Batches`.
        on_batch: called once per recorded target per batch.
        where: the caller's name, for errors.
        verbose: show a progress bar.
        passes: read the data up to this many times (EVA reads it again
            until its components settle).
        active: `active()` before each batch: the keys to record in it
            (`None`: all); an empty set stops the run.
        after_batch: called after each batch.
        mask_padding: keep only the rows of tokens a KerasHub batch's
            `padding_mask` marks (`padding_rows`).
    """
    bar = _progress(None, "batch", verbose)
    step = 0
    for _ in range(passes):
        for x, _, _ in data:
            keys = list(targets) if active is None else [k for k in targets if k in active()]
            if not keys:
                return step
            with recording({k: targets[k][0] for k in keys}) as seen:
                _call_model(model, x, training=False)
            for key in keys:
                geometry = targets[key][1]
                if not seen[key]:
                    raise ValueError(
                        f"{where}: layer {key!r} was not called when the model ran on the "
                        "sample data (its parent reads its kernel directly, or the model skips "
                        "it); exclude it, or use an init that needs no data."
                    )
                for inputs in seen[key]:
                    rows = np.asarray(ops.convert_to_numpy(geometry.inputs_to_rows(inputs)), "float64")
                    if not np.all(np.isfinite(rows)):
                        raise ValueError(f"{where}: the inputs of layer {key!r} on the sample data "
                                         "have NaN or inf values.")
                    keep = padding_rows(x, rows.shape[0]) if mask_padding else None
                    on_batch(key, rows if keep is None else rows[keep])
            step += 1
            if bar is not None:
                bar.update(step)
            if after_batch is not None:
                after_batch()
        if not data.reusable:
            break
    return step


def _backend_gradients():
    backend = keras.backend.backend()
    if backend == "jax":
        from keras_lowrank import _jax as module
    elif backend == "tensorflow":
        from keras_lowrank import _tensorflow as module
    elif backend == "torch":
        from keras_lowrank import _torch as module
    else:
        raise ValueError(f"Gradients of the sample data need the jax, tensorflow or torch backend, "
                         f"not {backend!r}.")
    return module.loss_gradients


def kernel_gradients(model, targets, data, where, verbose=True):
    """The mean, over the batches of `data`, of the gradient of the model's
    compiled loss with respect to each target kernel, in its matrix view
    (`{key: float64 (n_in, n_out) array}`). Runs in training mode (dropout
    on), as a training step would. The model must be compiled with a loss.
    """
    if not getattr(model, "compiled", False) or getattr(model, "loss", None) is None:
        raise ValueError(
            f"{where}: the gradient init needs the model's loss; compile the model with its loss "
            "first (model.compile(loss=...)). The model was left unchanged."
        )
    gradients = _backend_gradients()
    keys = list(targets)
    variables = [_kernel_variable(targets[k][0]) for k in keys]
    total = [None] * len(keys)
    bar = _progress(None, "batch", verbose)
    n = 0
    for x, y, sw in data:
        if y is None:
            raise ValueError(f"{where}: the gradient init needs targets: batches of (x, y); "
                             "received batches of x only.")
        x_in = x[0] if isinstance(x, tuple) and len(x) == 1 else x

        def loss_fn():
            y_pred = model(x_in, training=True)
            return model.compute_loss(x=x_in, y=y, y_pred=y_pred, sample_weight=sw, training=True)

        grads = gradients(variables, loss_fn)
        for i, g in enumerate(grads):
            g = np.zeros(variables[i].shape) if g is None else np.asarray(ops.convert_to_numpy(g), "float64")
            total[i] = g if total[i] is None else total[i] + g
        n += 1
        if bar is not None:
            bar.update(n)
    out = {}
    for key, g in zip(keys, total):
        matrix = np.asarray(ops.convert_to_numpy(targets[key][1].kernel_to_matrix(g / n)), "float64")
        if not np.all(np.isfinite(matrix)):
            raise ValueError(f"{where}: the gradient of layer {key!r} on the sample data has NaN "
                             "or inf values.")
        out[key] = matrix
    return out


def _kernel_variable(layer):
    from keras_lowrank import bases

    return bases.kernel_variable(layer)


class Calibrated:
    """What a method's `calibrate` read from the sample data.

    Attributes:
        payloads: `{layer path: what that layer's init needs}`.
        ranks: `None`, or `{layer path: rank}` when the data sets each
            layer's rank (EVA; rank 0 leaves the layer out).
        alphas: with `ranks`, `{layer path: alpha}`.
    """

    def __init__(self, payloads, ranks=None, alphas=None):
        self.payloads = payloads
        self.ranks = ranks
        self.alphas = alphas


class SampleDataInit:
    """Mixed into the layer class of a method that initializes from sample
    data: refuses, by name, the kernels the data cannot describe. An expert
    stack (a kernel with a batch axis) sees every token in the forward the
    data runs, not the tokens routed to each expert; with `"inputs"`, an
    embedding table's input rows are one-hot rows as wide as the vocabulary
    (refused: `refuses_embeddings`)."""

    def check_geometry(self, geometry, where=None):
        where = where or self.name
        if geometry.batch_shape:
            raise ValueError(
                f"Layer {where!r} is a stack of {geometry.matrix_text()} expert kernels; "
                f"{self.method!r} initializes from sample data, which cannot tell which tokens "
                "each expert gets. Exclude the expert stacks (exclude='experts')."
            )
        if self.calibration == "inputs" and getattr(geometry, "discrete", False):
            raise ValueError(
                f"Layer {where!r} is an embedding table: {self.method!r} reads each layer's "
                "input rows, which for a table are one-hot rows as wide as the vocabulary. "
                "Adapt the linear layers, or use another method on the embedding."
            )
        super().check_geometry(geometry, where)

    def sample_data_found(self):
        """What the data pass found for this layer (`receive_calibration`),
        or a `ValueError` naming the layer when it was made without data
        (a layer built by hand: its init needs `enable_adapter(..., data=)`)."""
        found = self.calibrated()
        if found is None:
            raise ValueError(
                f"Layer {self.name!r}: {self.method!r} initializes from sample data; add it "
                f"with enable_adapter(model, method={self.method!r}, data=...)."
            )
        return found


def padding_rows(x, n_rows):
    """The rows of a layer's input to keep: where a KerasHub batch's
    `padding_mask` is on, when the layer sees one row per token (`n_rows`
    equals the mask's size); `None` (all rows) otherwise."""
    if isinstance(x, dict) and "padding_mask" in x:
        mask = np.asarray(x["padding_mask"]).reshape(-1).astype(bool)
        if mask.size == n_rows:
            return mask
    return None
