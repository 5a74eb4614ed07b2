"""TensorFlow-only code: what `keras.ops` has no path for on the
tensorflow backend.

Imported only when `keras.backend.backend() == "tensorflow"`.
"""

import tensorflow as tf


def loss_gradients(variables, loss_fn):
    """The gradients of `loss_fn()` (a scalar computed with Keras layers)
    with respect to `variables` (Keras variables, trainable or not), at
    their current values (a `tf.GradientTape` watching each one)."""
    values = [v.value for v in variables]
    with tf.GradientTape() as tape:
        tape.watch(values)
        loss = loss_fn()
    # a table read by `tf.gather` gets `IndexedSlices`: made dense here
    return [g if g is None else tf.convert_to_tensor(g) for g in tape.gradient(loss, values)]
