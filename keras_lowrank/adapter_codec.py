"""`AdapterCodec`: what an adapter writes to files and reads back, apart
from its math (`keras_lowrank.adapter_math`) and its Keras layer
(`keras_lowrank.adapter.Adapter`).

Two files hold an adapter. A `.keras` model holds its configuration
(`get_config`/`from_config`: the method options and the wrapped layer) and
every variable (`save_own_variables`/`load_own_variables`). An adapter file
(`keras_lowrank.save_adapter`) holds only what the adapter changed
(`adapter_state`), less the variables it can recompute from the base
(`derived`): `file_tensors`/`load_file_tensors`, then `derive` and
`rebase` make the layer consistent with the base it is loaded onto.
"""

import keras

from keras_lowrank import bases


class AdapterCodec:
    """How an adapter is written and read (a mixin of `Adapter`)."""

    #: variables recomputed from the base kernel (frozen singular vectors):
    #: `.keras` files hold them, adapter files do not (`derive` rebuilds
    #: them when an adapter file is loaded)
    derived = ()

    def adapter_state(self):
        """Name -> variable of everything this adapter changed."""
        state = dict(self._adapter_vars)
        if self.train_bias and bases.bias_variable(self.layer) is not None:
            state["base_bias"] = bases.bias_variable(self.layer)
        return state

    def state_shapes(self, geometry):
        """Name -> shape of `adapter_state()` for a kernel of this geometry,
        known before the adapter is built."""
        shapes = {s.name: tuple(s.shape) for s in self.variable_specs(geometry)}
        bias = bases.bias_variable(self.layer)
        if self.train_bias and bias is not None:
            shapes["base_bias"] = tuple(bias.shape)
        return shapes

    def file_state(self):
        """`adapter_state()` less the `derived` variables: what an adapter
        file holds."""
        return {k: v for k, v in self.adapter_state().items() if k not in self.derived}

    def file_shapes(self, geometry):
        """Name -> shape of `file_tensors()` (`None`: a size the file
        chooses, e.g. AdaLoRA's kept rank)."""
        return {k: v for k, v in self.state_shapes(geometry).items() if k not in self.derived}

    def file_tensors(self):
        """Name -> value of what an adapter file holds for this layer
        (default: the `file_state()` variables as they are)."""
        return dict(self.file_state())

    def load_file_tensors(self, tensors):
        """Set this layer's variables from an adapter file's `tensors`
        (the inverse of `file_tensors`)."""
        for name, var in self.file_state().items():
            var.assign(tensors[name])

    def derive(self, original, saved):
        """Recompute the `derived` variables from `original`, the matrix of
        the base the adapter was trained on, before an adapter file's
        tensors (`saved`, name -> array) are loaded; raise if `saved` shows
        the file was made for another base."""

    def summary_rank(self):
        """The rank the summary shows (`None`: not a rank method)."""
        return getattr(self, "rank", None)

    def rebase(self, original):
        """Make the frozen kernel consistent with the adapter's (just loaded)
        variables, given the matrix of the original base. Most methods leave
        the base untouched; residual methods (PiSSA) subtract their initial
        update."""

    def get_config(self):
        config = super().get_config()
        config.update(self.options())
        config.update(
            {
                "activation": keras.activations.serialize(self.activation),
                "merged": self.merged,
                "enabled": self.adapter_enabled,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )
        obj = cls(layer, **config)
        obj.filled_from_file()  # the plan binds its model-level state
        return obj

    def save_own_variables(self, store):
        for name, var in self._adapter_vars.items():
            store[name] = var

    def load_own_variables(self, store):
        keys = set(store.keys())
        expected = set(self._adapter_vars)
        if keys != expected:
            raise ValueError(
                f"Adapter layer {self.name!r} ({self.method}) expected the "
                f"variables {sorted(expected)} but the file holds {sorted(keys)}."
            )
        for name, var in self._adapter_vars.items():
            value = store[name]
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(
                    f"Adapter layer {self.name!r}: variable {name!r} has shape "
                    f"{tuple(var.shape)} but the file holds {tuple(value.shape)}."
                )
            var.assign(value)

