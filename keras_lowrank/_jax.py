"""JAX-only code: what `keras.ops` has no path for on the jax backend.

Imported only when `keras.backend.backend() == "jax"`.
"""

import jax
import keras


def loss_gradients(variables, loss_fn):
    """The gradients of `loss_fn()` (a scalar computed with Keras layers)
    with respect to `variables` (Keras variables, trainable or not), at
    their current values: `loss_fn` runs under a `keras.StatelessScope`
    that maps each variable to the value `jax.grad` differentiates."""

    def loss(values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return loss_fn()

    return jax.grad(loss)([v.value for v in variables])
