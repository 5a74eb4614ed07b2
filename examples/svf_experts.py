"""SVF experts (Transformer²): train one per task, compose them, search the mix.

SVF trains one vector `z` per kernel (`W' = U diag(σ ⊙ z) Vᵀ`). This script
trains two experts on a tiny KerasHub Gemma (next token = token + 3, and
token + 5), keeps each as a z-set, composes them with fixed weights
(`keras_lowrank.svf.compose`), and lets the cross-entropy method find the
weights that score best on a few examples of one task
(`keras_lowrank.svf.cem_search`), which should lean on that task's expert.

    python examples/svf_experts.py [--backend B] [--epochs 8] [--out DIR] [--small]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_tasks as tt  # noqa: E402


def main(argv=None):
    args, epochs, n, out = tt.setup(argv, __doc__, default_epochs=8, small_epochs=4)
    import keras
    import numpy as np

    import keras_lowrank as kl

    model, _ = tt.pretrained_lm(2 * epochs, n)
    tasks = {"plus3": tt.task(3, n, seed=1), "plus5": tt.task(5, n, seed=2)}
    kl.enable_adapter(model, method="svf")
    experts = {}
    for name, data in tasks.items():
        for _, a in kl.svf.svf_layers(model):  # each expert starts from z = 1
            a.svf_z.assign(np.ones(tuple(a.svf_z.shape), "float32"))
        tt.compile_lm(model, 5e-2)
        model.fit(*data, batch_size=32, epochs=epochs, verbose=0)
        experts[name] = kl.svf.z_set(model)
    scores = {}
    for weights in ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5]):
        kl.svf.compose(model, list(experts.values()), weights=weights)
        scores[str(weights)] = {t: round(tt.accuracy(model, d), 4) for t, d in tasks.items()}
        print(f"weights {weights}: " + "  ".join(f"{t} {a:.3f}" for t, a in scores[str(weights)].items()))
    few = ({k: v[:16] for k, v in tasks["plus3"][0].items()}, tasks["plus3"][1][:16])
    search = kl.svf.cem_search(
        model, list(experts.values()), lambda m: tt.accuracy(m, few),
        population=8 if args.small else 16, generations=3 if args.small else 6)
    found = [float(w) for w in np.asarray(search.weights).reshape(-1)]
    print(f"CEM on a few examples of plus3: weights {np.round(found, 3).tolist()}")
    result = {
        "backend": keras.backend.backend(),
        "accuracy_by_weights": scores,
        "cem_weights": found,
        "cem_accuracy_plus3": tt.accuracy(model, tasks["plus3"]),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
