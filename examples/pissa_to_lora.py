"""PiSSA trained, then exported as a plain LoRA for the original base.

PiSSA starts from the top singular triplets of each kernel and freezes the
residual, so its adapter file only makes sense on that residual. Saved with
`save_adapter(..., as_lora=True)` it becomes the rank-2r plain LoRA that
applies to the *original* kernel (arXiv 2404.02948): this script trains PiSSA on a
tiny KerasHub Gemma, writes both files, loads the LoRA one onto a fresh copy
of the original base, and checks that the outputs are the same.

    python examples/pissa_to_lora.py [--backend B] [--epochs 6] [--out DIR] [--small]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_tasks as tt  # noqa: E402

TOL = 1e-4


def main(argv=None):
    args, epochs, n, out = tt.setup(argv, __doc__, default_epochs=6, small_epochs=3)
    import keras
    import numpy as np

    import keras_lowrank as kl

    model, base_weights = tt.pretrained_lm(2 * epochs, n)
    data = tt.task(3, n, seed=1)
    kl.enable_adapter(model, method="pissa", rank=4)
    tt.compile_lm(model, 1e-2)
    model.fit(*data, batch_size=32, epochs=epochs, verbose=0)
    pissa_file = os.path.join(out, "pissa.safetensors")
    lora_file = os.path.join(out, "pissa_as_lora.safetensors")
    kl.save_adapter(model, pissa_file)
    kl.save_adapter(model, lora_file, as_lora=True)

    fresh = tt.fresh_lm(base_weights)  # the original kernels, not PiSSA's residuals
    summary = kl.load_adapter(fresh, lora_file)
    methods = sorted({row["method"] for row in summary.rows})
    x = {k: v[:8] for k, v in data[0].items()}
    diff = float(np.max(np.abs(keras.ops.convert_to_numpy(model(x)) - keras.ops.convert_to_numpy(fresh(x)))))
    tt.compile_lm(fresh, 1e-2)
    result = {
        "backend": keras.backend.backend(),
        "methods_in_lora_file": methods,
        "ranks": sorted({row["rank"] for row in summary.rows}),
        "max_output_diff": diff,
        "accuracy_pissa": tt.accuracy(model, data),
        "accuracy_lora_on_original_base": tt.accuracy(fresh, data),
    }
    print(f"PiSSA file {os.path.getsize(pissa_file):,} B, as LoRA {os.path.getsize(lora_file):,} B; "
          f"outputs differ by {diff:.2g}")
    print(json.dumps(result))
    if methods != ["lora"] or diff > TOL:
        print(f"failed: the LoRA form differs from PiSSA (max {diff:.3g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
