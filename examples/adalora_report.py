"""AdaLoRA: a rank budget moved between layers by importance, and its report.

AdaLoRA starts every layer at `rank` and prunes singular values by their
importance until the model holds `target_rank` per layer on average; the
layers that matter keep more. This script trains AdaLoRA on a tiny KerasHub
Gemma with its schedule over the whole run, prints the rank report (kept
rank per layer) and saves its plot, then saves the shrunk adapter file.

    python examples/adalora_report.py [--backend B] [--epochs 8] [--out DIR] [--small]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_tasks as tt  # noqa: E402


def main(argv=None):
    args, epochs, n, out = tt.setup(argv, __doc__, default_epochs=8, small_epochs=4)
    import keras

    import keras_lowrank as kl

    model, _ = tt.pretrained_lm(2 * epochs, n)
    data = tt.task(3, n, seed=1)
    steps = epochs * (n // 32)
    kl.enable_adapter(model, method="adalora", rank=6, target_rank=2, total_steps=steps,
                      tinit=steps // 5, tfinal=steps // 5, delta_t=2)
    tt.compile_lm(model, 2e-2)
    model.fit(*data, batch_size=32, epochs=epochs, verbose=0)
    report = kl.adalora.rank_report(model)
    print(report)
    import matplotlib

    matplotlib.use("Agg")
    plot = os.path.join(out, "adalora_ranks.png")
    ax = report.plot()
    ax.figure.tight_layout()
    ax.figure.savefig(plot, dpi=100)
    adapter_file = os.path.join(out, "adalora.safetensors")
    kl.save_adapter(model, adapter_file)
    kept = {path: (alloc if alloc is not None else nonzero) for path, _, alloc, nonzero in report.rows}
    result = {
        "backend": keras.backend.backend(),
        "kept_rank": kept,
        "mean_kept_rank": sum(kept.values()) / len(kept),
        "accuracy": tt.accuracy(model, data),
        "plot": plot,
        "adapter_file_bytes": os.path.getsize(adapter_file),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
