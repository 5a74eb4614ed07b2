"""`InPlaceMerge`: an adapter's merge rule applied to the storage of the
layer it wraps (a mixin of `keras_lowrank.adapter.Adapter`).

The rule itself is `AdapterMath`'s (`merged_matrix`, `unmerged_matrix`,
`original_matrix`, in the matrix view); this piece writes it into the
wrapped kernel (`merge_in_place`, `unmerge_in_place`), snapshots and
restores what a refused or failed all-or-nothing step must put back, and
folds an adapter into a plain Keras layer (`to_plain_layer`). A float
kernel only: folding an update into a quantized one would re-quantize.
"""

from keras import ops

from keras_lowrank import bases
from keras_lowrank.linalg import NonFiniteError


class InPlaceMerge:
    """Merging an adapter into its wrapped layer, and back (see the module
    docstring). Needs `layer`, `geometry`, `merged`, `adapter_enabled`,
    `activation`, `activity_regularizer` and `adapter_state()`."""

    def refuse_in_place(self, what):
        kind = bases.base_kind(self.layer)
        if kind != "float":
            raise ValueError(
                f"Cannot {what} layer {self.name!r} in place: its kernel is "
                f"stored as {kind}, and folding the update into it would "
                "re-quantize (a silent loss). Use keras_lowrank.merge(model) "
                "for a float kernel, or merge(model, requantize=True) to "
                "re-quantize and see the error."
            )

    def merge_in_place(self):
        """Fold the update into the wrapped kernel (keeps the adapter).

        Callers that need all-or-nothing (`keras_lowrank.merge`) snapshot
        the kernel and `adapter_state()` first (`snapshot`/`restore`)."""
        if self.merged:
            return
        self.refuse_in_place("merge")
        w = self.merged_matrix(self.base_matrix())
        check_finite(w, self.name, "merge")
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(w))
        self.merged = True

    def unmerge_in_place(self):
        if not self.merged:
            return
        w = self.unmerged_matrix(self.base_matrix())
        check_finite(w, self.name, "unmerge")
        bases.assign_kernel(self.layer, self.geometry.matrix_to_kernel(w))
        self.merged = False

    def snapshot(self):
        """Copies of the float kernel and the adapter state, for `restore`."""
        kernel = bases.kernel_variable(self.layer)
        return {
            "kernel": None if kernel is None else ops.copy(kernel.value),
            "state": {k: ops.copy(v.value) for k, v in self.adapter_state().items()},
            "merged": self.merged,
            "enabled": self.adapter_enabled,
        }

    def restore(self, snap):
        """Put back exactly what `snapshot` saw (bit for bit)."""
        if snap["kernel"] is not None:
            bases.kernel_variable(self.layer).assign(snap["kernel"])
        state = self.adapter_state()
        for k, value in snap["state"].items():
            state[k].assign(value)
        self.merged = snap["merged"]
        self.adapter_enabled = snap["enabled"]

    def to_plain_layer(self):
        """A plain (unbuilt) Dense/EinsumDense and the merged float kernel."""
        w = self.base_matrix()
        if not self.merged:
            # A disabled adapter folds to the base it computes.
            w = self.merged_matrix(w) if self.adapter_enabled else self.original_matrix(w)
        check_finite(w, self.name, "merge")
        kernel = self.geometry.matrix_to_kernel(w)
        plain = bases.plain_layer(
            self.layer, self.activation, self.name, self.activity_regularizer
        )
        return plain, kernel


def check_finite(matrix, name, what):
    ok = bool(ops.convert_to_numpy(ops.all(ops.isfinite(matrix))))
    if not ok:
        raise NonFiniteError(
            f"{what} of layer {name!r} produced NaN or inf values; the model "
            "was left unchanged."
        )
