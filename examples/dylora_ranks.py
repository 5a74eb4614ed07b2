"""DyLoRA: train once, then use the adapter at any rank up to its maximum.

DyLoRA trains with a random rank per step, so every prefix of its factors
is a usable adapter. This script trains a rank-8 DyLoRA on a tiny KerasHub
Gemma and evaluates it at every rank (`keras_lowrank.dylora.evaluate_ranks`),
then sets the inference rank and merges at that rank.

    python examples/dylora_ranks.py [--backend B] [--epochs 8] [--out DIR] [--small]
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
    data = tt.task(3, n, seed=1)
    kl.enable_adapter(model, method="dylora", rank=8)
    tt.compile_lm(model, 2e-2)
    model.fit(*data, batch_size=32, epochs=epochs, verbose=0)
    by_rank = kl.dylora.evaluate_ranks(model, *data, batch_size=len(data[1]), verbose=0)
    for rank, metrics in by_rank.items():
        print(f"rank {rank}: loss {metrics['loss']:.3f}  accuracy {metrics['accuracy']:.3f}")
    best = min(by_rank, key=lambda r: by_rank[r]["loss"])
    kl.dylora.set_rank(model, 4)
    x = {k: v[:8] for k, v in data[0].items()}
    y4 = keras.ops.convert_to_numpy(model(x))
    kl.merge(model)  # folds the rank-4 update
    merged_diff = float(np.max(np.abs(keras.ops.convert_to_numpy(model(x)) - y4)))
    result = {
        "backend": keras.backend.backend(),
        "loss_by_rank": {r: round(m["loss"], 4) for r, m in by_rank.items()},
        "accuracy_by_rank": {r: round(m["accuracy"], 4) for r, m in by_rank.items()},
        "best_rank": best,
        "merged_at_rank_4_diff": merged_diff,
    }
    print(json.dumps(result))
    if merged_diff > 1e-4:
        print(f"failed: the merge at rank 4 differs by {merged_diff:.3g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
