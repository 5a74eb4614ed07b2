"""Serving several named adapters from one model: a different adapter per
example in one compiled call.

`adapter_selection(model, adapter_names)` turns one entry per example (a
name, `None`, a list of names or `{name: weight}`) into two arrays,
`PerExampleAdapters(model)` is a Keras model that takes them beside the
model's inputs (for `predict`, `__call__` and `export`), and
`generate(causal_lm, prompts, adapter_names)` runs KerasHub's `generate`
with an adapter per prompt. How each layer computes a mixed batch is in
`keras_lowrank.per_example`; loading a new adapter into a slot without a
retrace is `keras_lowrank.hotswap`.
"""

import math

import keras
import numpy as np

from keras_lowrank import adapter_set
from keras_lowrank import named
from keras_lowrank import per_example

#: the input keys of a selection (`adapter_selection`, `PerExampleAdapters`)
INDEX = "adapter_index"
WEIGHT = "adapter_weight"
INPUTS = "inputs"


def check_model(model, what):
    """The model's adapter names, after refusing (by layer and adapter) what
    cannot run per example; a model without named adapters is refused."""
    found = adapter_set.sets(model)
    if not found:
        raise ValueError(
            f"{what}: model {model.name!r} has no named adapters to select per example; "
            "add them with enable_adapter(..., adapter_name=...)."
        )
    for path, s in found:
        for name, member in s.members.items():
            why = per_example.refusal(path, member, name)
            if why is not None:
                raise ValueError(f"{what}: {why}")
    return tuple(adapter_set.names_in(found))


def adapter_selection(model, adapter_names):
    """The per-example selection of adapters, as the two arrays
    `PerExampleAdapters` and `generate` take.

    Args:
        model: a model with named adapters (or its `PerExampleAdapters`).
        adapter_names: one entry per example: an adapter name, `None` (the
            base model), a list of names (their sum, as active together) or
            a dict `{name: weight}` (a weighted sum; a weight may be
            negative).

    Returns:
        `{"adapter_index": int32 (batch, m), "adapter_weight": float32
        (batch, m)}`, `m` the most adapters an example names (at least 1).
        Indices are positions in `keras_lowrank.adapter_names(model)`; `-1`
        (weight 0) fills the unused places.

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="b")
        >>> s = keras_lowrank.adapter_selection(model, ["a", None, {"a": 0.5, "b": 0.5}])
        >>> s["adapter_index"].tolist(), s["adapter_weight"].tolist()
        ([[0, -1], [-1, -1], [0, 1]], [[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    """
    if isinstance(model, PerExampleAdapters):
        names = model._names
    else:
        names = check_model(model, "adapter_selection")
    if isinstance(adapter_names, (str, dict)) or not hasattr(adapter_names, "__iter__"):
        raise ValueError(
            "adapter_selection: adapter_names must be a list with one entry per example "
            f"(a name, None, a list of names or {{name: weight}}); received {adapter_names!r}."
        )
    rows = []
    for e, entry in enumerate(adapter_names):
        if entry is None:
            pairs = []
        elif isinstance(entry, str):
            pairs = [(entry, 1.0)]
        elif isinstance(entry, dict):
            pairs = list(entry.items())
        elif isinstance(entry, (list, tuple)):
            pairs = [(n, 1.0) for n in entry]
        else:
            raise ValueError(
                f"adapter_selection: example {e}: expected a name, None, a list of names or "
                f"{{name: weight}}; received {entry!r}."
            )
        seen = set()
        for name, weight in pairs:
            if not isinstance(name, str) or name not in names:
                raise ValueError(
                    f"adapter_selection: example {e}: the model has no adapter named {name!r}; "
                    f"it has {list(names)}."
                )
            if name in seen:
                raise ValueError(f"adapter_selection: example {e} names {name!r} twice.")
            seen.add(name)
            if isinstance(weight, bool) or not isinstance(weight, (int, float, np.number)) \
                    or not math.isfinite(float(weight)):
                raise ValueError(
                    f"adapter_selection: example {e}: the weight of {name!r} must be a finite "
                    f"number; received {weight!r}."
                )
        rows.append([(names.index(n), float(w)) for n, w in pairs])
    if not rows:
        raise ValueError("adapter_selection: adapter_names is empty (one entry per example).")
    m = max(1, max(len(r) for r in rows))
    index = np.full((len(rows), m), -1, "int32")
    weight = np.zeros((len(rows), m), "float32")
    for e, r in enumerate(rows):
        for j, (i, w) in enumerate(r):
            index[e, j], weight[e, j] = i, w
    return {INDEX: index, WEIGHT: weight}


@keras.saving.register_keras_serializable(package="keras_lowrank")
class PerExampleAdapters(keras.Model):
    """A model with named adapters that runs each example with its own
    adapters, in one call.

    Its input is a dict: `"inputs"` (what `model` takes) and the two arrays
    of `adapter_selection` (`"adapter_index"`, `"adapter_weight"`). Each
    example's output is what `model` computes with only that example's
    adapters active (a weighted set: each layer adds each adapter's update
    times its weight). `predict`, `__call__` and `export` work as for any
    Keras model; a compiled `predict` runs on when the selection changes,
    without a new trace. The gates of `set_active` are ignored inside it.
    It holds `model` (no copy): training `model` shows here. The adapter
    names are those `model` has when it is wrapped (the indices of
    `adapter_selection`); wrap it again after adding or deleting adapters.

    Adapters whose method has a plain-LoRA form (LoRA, rsLoRA, PiSSA, OLoRA,
    MiLoRA, VeRA, LoHa, ... and DoRA) are gathered per example and multiplied
    in two batched einsums per layer; others compute for the whole batch and
    are weighted per example. Lily (whose router mixes over the batch) and
    stacks of experts are refused by name.

    Args:
        model: a model with named adapters (`enable_adapter(...,
            adapter_name=...)`).

    Examples:

        >>> import keras, numpy as np
        >>> import keras_lowrank
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="out")])
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], rank=2, adapter_name="a")
        >>> _ = keras_lowrank.enable_adapter(model, targets=["out"], method="dora", rank=2, adapter_name="b")
        >>> served = keras_lowrank.PerExampleAdapters(model)
        >>> x = np.ones((3, 4), "float32")
        >>> sel = keras_lowrank.adapter_selection(model, ["a", "b", None])
        >>> served.predict({"inputs": x, **sel}, verbose=0).shape
        (3, 2)
    """

    def __init__(self, model, **kwargs):
        kwargs.setdefault("name", f"{model.name}_per_example")
        super().__init__(**kwargs)
        names = check_model(model, "PerExampleAdapters")
        self.model = model
        # read once: walking the model on every eager (torch) call costs more than the adapters
        self._names = names

    def call(self, inputs, training=None):
        if not isinstance(inputs, dict) or set(inputs) != {INPUTS, INDEX, WEIGHT}:
            keys = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
            raise ValueError(
                f"{self.name}: expected a dict with keys {[INPUTS, INDEX, WEIGHT]} "
                f"(keras_lowrank.adapter_selection gives the last two); received {keys}."
            )
        selection = per_example.Selection(self._names, inputs[INDEX], inputs[WEIGHT])
        with per_example.selecting(selection):
            return self.model(inputs[INPUTS], training=training)

    def compute_output_spec(self, inputs, training=None):
        return self.model.compute_output_spec(inputs[INPUTS])

    def get_config(self):
        return {"name": self.name, "model": keras.saving.serialize_keras_object(self.model)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"), custom_objects=custom_objects)
        return cls(model, **config)


# ----------------------------------------------------------------------
# KerasHub generate
def _install_generate_step(causal_lm):
    """Make `causal_lm.generate_step` read a selection from its inputs (once;
    without one it is the model's own step)."""
    if getattr(causal_lm, "_klr_per_example_step", False):
        return
    original = causal_lm.generate_step

    def generate_step(inputs, stop_token_ids=None):
        if isinstance(inputs, dict) and INDEX in inputs:
            inputs = dict(inputs)
            selection = per_example.Selection(named.adapter_names(causal_lm),
                                              inputs.pop(INDEX), inputs.pop(WEIGHT))
            with per_example.selecting(selection):
                return original(inputs, stop_token_ids)
        return original(inputs, stop_token_ids)

    causal_lm.generate_step = generate_step
    causal_lm._klr_per_example_step = True
    causal_lm.generate_function = None  # built again around the new step


def _batch_size(inputs):
    if isinstance(inputs, str):
        return 1
    if isinstance(inputs, dict):
        first = inputs.get("token_ids", inputs.get("prompts", next(iter(inputs.values()))))
        return len(first) if not isinstance(first, str) else 1
    try:
        return len(inputs)
    except TypeError:
        return None


def generate(causal_lm, inputs, adapter_names, max_length=None, stop_token_ids="auto",
             strip_prompt=False):
    """KerasHub's `causal_lm.generate(...)` with an adapter per prompt.

    One batch of prompts runs in one compiled generate function, each prompt
    with its own adapters (an entry of `adapter_names` as in
    `adapter_selection`: a name, `None`, a list or `{name: weight}`);
    changing the names does not retrace it. Each prompt's output is what
    `generate` gives with only its adapters active. The other arguments are
    `generate`'s.

    Args:
        causal_lm: a KerasHub `CausalLM` with named adapters.
        inputs: the prompts (strings when the model has a preprocessor, else
            a dict of `token_ids` and `padding_mask`), one batch.
        adapter_names: one entry per prompt.

    Example (a KerasHub model with its preprocessor)::

        kl.enable_adapter(gemma_lm, rank=8, adapter_name="sql")
        kl.enable_adapter(gemma_lm, rank=8, adapter_name="chat")
        kl.generate(gemma_lm, ["SELECT", "Hello", "Hi"], ["sql", "chat", None],
                    max_length=32)
    """
    if not hasattr(causal_lm, "generate_step") or not hasattr(causal_lm, "generate"):
        raise ValueError(f"generate: {type(causal_lm).__name__} {causal_lm.name!r} is not a "
                         "KerasHub CausalLM (it has no generate_step).")
    try:
        import tensorflow as tf

        is_dataset = isinstance(inputs, tf.data.Dataset)
    except ImportError:
        is_dataset = False
    if is_dataset:
        raise ValueError("generate: pass one batch of prompts (a list or arrays), not a "
                         "tf.data.Dataset: adapter_names has one entry per prompt of that batch.")
    selection = adapter_selection(causal_lm, adapter_names)
    preprocessor = getattr(causal_lm, "preprocessor", None)
    n = _batch_size(inputs)
    if n != len(selection[INDEX]):
        raise ValueError(f"generate: {n} prompts, but adapter_names has "
                         f"{len(selection[INDEX])} entries (one per prompt).")
    _install_generate_step(causal_lm)
    kwargs = dict(max_length=max_length, stop_token_ids=stop_token_ids, strip_prompt=strip_prompt)
    if preprocessor is None:
        if not isinstance(inputs, dict):
            raise ValueError("generate: a CausalLM without a preprocessor takes a dict of "
                             "token_ids and padding_mask.")
        kwargs.pop("max_length")
        return causal_lm.generate({**inputs, **selection}, **kwargs)
    own = preprocessor.generate_preprocess

    def with_selection(x, sequence_length=None):
        return {**own(x, sequence_length=sequence_length), **selection}

    preprocessor.generate_preprocess = with_selection
    try:
        return causal_lm.generate(inputs, **kwargs)
    finally:
        del preprocessor.generate_preprocess
