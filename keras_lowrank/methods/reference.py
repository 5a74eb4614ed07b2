"""NumPy statements of the methods' formulas, for the adapter contract.

Each method registers `reference=f` (`keras_lowrank.registry.method`):
`f(adapter, w)` is the matrix view its layer computes with for the base
matrix `w` (`(n_in, n_out)`, float64), restated in NumPy from the layer's
own variables, independently of its Keras code. The adapter-contract suite
compares every method's layer with it, on a Dense and an EinsumDense kernel,
on every backend. The helpers here read the variables.

Examples:

    >>> import keras, numpy as np
    >>> from keras_lowrank.methods import reference
    >>> from keras_lowrank.methods.lora import LoRA
    >>> dense = keras.layers.Dense(3)
    >>> dense.build((None, 4))
    >>> layer = LoRA(dense, rank=2)
    >>> layer.build(None)
    >>> w = np.zeros((4, 3))
    >>> reference.lora(layer, w).shape
    (4, 3)
"""

import numpy as np
from keras import ops


def value(adapter, name):
    """The adapter's variable `name` as a float64 NumPy array."""
    return np.asarray(ops.convert_to_numpy(getattr(adapter, name))).astype("float64")


def factor_a(adapter, name="lora_a"):
    """`A` in Keras layout `(n_in, r)`; the variable stores `Aᵀ`, `(r, n_in)`."""
    return np.swapaxes(value(adapter, name), -1, -2)


def column_norm(m):
    """The L2 norm of each column (one per output)."""
    return np.sqrt((m**2).sum(axis=0))


def lora(adapter, w):
    """`W + s A B`: LoRA, and every method whose layer computes it (LoRA+,
    LoRA-FA, and PiSSA/MiLoRA/OLoRA on their residual base)."""
    return w + adapter.scaling * factor_a(adapter) @ value(adapter, "lora_b")
